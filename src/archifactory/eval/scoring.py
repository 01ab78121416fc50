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
) -> list[Score]:
    """Score every request (see the module docstring); ``on_scored(n)`` is called after each batch."""
    for i, r in enumerate(requests):
        if not r.continuation:
            raise ValueError(f"request {i} has an empty continuation: nothing to score")
        if not r.context:
            raise ValueError(f"request {i} has an empty context: start it with the end-of-document id")
    # lm-eval's window: the last max_length + 1 tokens, of which the last max_length are targets
    windows = [(r.context + r.continuation)[-(scorer.max_length + 1):] for r in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(windows[i]))
    scores: list[Score | None] = [None] * len(requests)
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
