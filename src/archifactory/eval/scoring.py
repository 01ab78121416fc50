"""Log-likelihood scoring: the engine every zero-shot task and the lm-eval adapter run through.

A request is a (context, continuation) pair of token ids; its score is the summed log-probability of the
continuation's tokens given the context (nats) and whether every continuation token is the model's
greedy (argmax) choice. This is lm-evaluation-harness's ``loglikelihood`` request, computed the same way:

- a pair of strings is split into tokens as lm-eval's ``TemplateLM._encode_pair`` does: trailing
  whitespace of the context moves to the continuation, the whole string is encoded once and the
  continuation is what follows the context's tokens (so a merge across the boundary is not split);
- sequences longer than the model's window keep their last ``max_length + 1`` tokens (the context is cut
  from the left);
- every sequence starts with the end-of-document id, as each training document follows one.

Requests are scored in batches of right-padded sequences, longest first; right padding cannot change a
causal model's outputs at earlier positions, so each score equals a forward pass over that sequence alone.

With ``share_prefix``, requests that share a context (the choices of one multiple-choice item) are scored
from one cached pass over that context instead: the context runs once, its cache (KV cache or recurrent
state) is copied for each choice, and the choices run as one right-padded batch from there. This is the
same function (every mixer's cached forward equals its full forward: the mixer contract) computed in a
different order, so scores agree to rounding; it saves the repeated context work, which is most of the
work when contexts are long and choices short (MMLU, HellaSwag, ARC).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Protocol, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class Request:
    """One scoring request: ``context`` and ``continuation`` token ids (continuation non-empty)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Score:
    logprob: float
    """Summed log-probability of the continuation tokens (nats)."""
    greedy: bool
    """Whether each continuation token is the argmax of the model's next-token distribution."""
    n_tokens: int
    """Continuation tokens scored."""


class TokenScorer(Protocol):
    """What the engine needs of a model: per-position log-probabilities of given next tokens."""

    max_length: int
    """Longest input (tokens) one forward pass takes."""

    def token_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids``, ``targets``: (B, T) -> (log p(targets), targets == argmax), both (B, T)."""


class ModelScorer:
    """A :class:`~archifactory.model.lm.CausalLM` as a :class:`TokenScorer` (float32 log-softmax)."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device | None = None) -> None:
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_length = int(model.config.max_seq_len)

    @torch.no_grad()
    def token_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids.to(self.device)).logits.float()  # (B, T, V)
        targets = targets.to(self.device)
        logprobs = torch.log_softmax(logits, dim=-1)
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
        return picked.cpu(), (logits.argmax(-1) == targets).cpu()


    @torch.no_grad()
    def group_logprobs(self, context: Sequence[int], continuations: Sequence[Sequence[int]]
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per continuation: (log p of each of its tokens, whether each is the argmax), given ``context``,
        from one cached pass over the context (see the module docstring). ``len(context) +
        len(continuation)`` must not exceed ``max_length + 1`` (no window cut). Raises ``ValueError`` if
        ``context`` is empty."""
        if not context:
            raise ValueError("an empty context has no position to predict the first continuation token from")
        model = self.model
        cache = model.init_cache(1, self.device)
        if len(context) > 1:
            model(torch.tensor([list(context[:-1])], device=self.device), cache=cache)
        n, width = len(continuations), max(len(c) for c in continuations)
        cache = model.reorder_cache(cache, torch.zeros(n, dtype=torch.long))  # the prefix's state, n times
        inputs = torch.zeros(n, width, dtype=torch.long)
        targets = torch.zeros(n, width, dtype=torch.long)
        for row, cont in enumerate(continuations):
            inputs[row, : len(cont)] = torch.tensor([context[-1], *cont[:-1]])
            targets[row, : len(cont)] = torch.tensor(list(cont))
        logits = model(inputs.to(self.device), cache=cache).logits.float()
        targets = targets.to(self.device)
        picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        greedy = (logits.argmax(-1) == targets).cpu()
        return [(picked[row, : len(c)], greedy[row, : len(c)]) for row, c in enumerate(continuations)]


class UnigramScorer:
    """A null model: every position predicts the same distribution ``log_probs`` (V,), e.g. unigram
    frequencies of the training tokens, or uniform. It has no context at all."""

    def __init__(self, log_probs: torch.Tensor, name: str, max_length: int = 1 << 30) -> None:
        self.log_probs = log_probs.double()
        self.name = name
        self.max_length = max_length
        self.argmax = int(log_probs.argmax())

    def token_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.log_probs[targets], targets == self.argmax

    @classmethod
    def uniform(cls, vocab_size: int) -> "UnigramScorer":
        return cls(torch.full((vocab_size,), -math.log(vocab_size), dtype=torch.float64), "uniform")

    @classmethod
    def from_counts(cls, counts: Sequence[int] | torch.Tensor, name: str = "unigram") -> "UnigramScorer":
        """Unigram model from token counts, add-one smoothed so no token has probability zero."""
        counts = torch.as_tensor(counts, dtype=torch.float64) + 1.0
        return cls(torch.log(counts / counts.sum()), name)


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split as lm-eval's ``TemplateLM._encode_pair`` splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids):]


def score_requests(
    scorer: TokenScorer,
    requests: Sequence[Request],
    batch_size: int = 16,
    on_scored: Callable[[int], None] | None = None,
    share_prefix: bool = False,
) -> list[Score]:
    """Score every request (see the module docstring); ``on_scored(n)`` is called after each batch.

    ``share_prefix``: score requests with the same context (and no window cut) from one cached pass over
    the context, when ``scorer`` has ``group_logprobs`` (:class:`ModelScorer`); other requests, and every
    request of a scorer without it, are batched as usual."""
    for i, r in enumerate(requests):
        if not r.continuation:
            raise ValueError(f"request {i} has an empty continuation: nothing to score")
        if not r.context:
            raise ValueError(f"request {i} has an empty context: start it with the end-of-document id")
    scores: list[Score | None] = [None] * len(requests)
    rest = list(range(len(requests)))
    if share_prefix and hasattr(scorer, "group_logprobs"):
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(requests):
            if len(r.context) + len(r.continuation) <= scorer.max_length + 1:
                groups.setdefault(r.context, []).append(i)
        shared = {i for members in groups.values() if len(members) > 1 for i in members}
        rest = [i for i in rest if i not in shared]
        for context, members in groups.items():
            if len(members) < 2:
                continue
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                results = scorer.group_logprobs(context, [requests[i].continuation for i in chunk])
                for i, (logprobs, greedy) in zip(chunk, results):
                    scores[i] = Score(float(logprobs.double().sum()), bool(greedy.all()), len(logprobs))
                if on_scored is not None:
                    on_scored(len(chunk))
    # lm-eval's window: the last max_length + 1 tokens, of which the last max_length are targets
    windows = {i: (requests[i].context + requests[i].continuation)[-(scorer.max_length + 1):] for i in rest}
    order = sorted(rest, key=lambda i: -len(windows[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        T = max(len(windows[i]) for i in batch) - 1
        input_ids = torch.zeros(len(batch), T, dtype=torch.long)
        targets = torch.zeros(len(batch), T, dtype=torch.long)
        for row, i in enumerate(batch):
            w = torch.tensor(windows[i], dtype=torch.long)
            input_ids[row, : len(w) - 1] = w[:-1]
            targets[row, : len(w) - 1] = w[1:]
        logprobs, greedy = scorer.token_logprobs(input_ids, targets)
        for row, i in enumerate(batch):
            n_window = len(windows[i]) - 1
            n_cont = min(len(requests[i].continuation), n_window)  # a continuation longer than the window is cut
            positions = slice(n_window - n_cont, n_window)
            scores[i] = Score(float(logprobs[row, positions].double().sum()), bool(greedy[row, positions].all()),
                              n_cont)
        if on_scored is not None:
            on_scored(len(batch))
    return scores  # type: ignore[return-value]
