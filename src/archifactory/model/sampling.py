"""Turning next-token logits into tokens: temperature, top-k and nucleus (top-p, Holtzman et al. 2020)."""

from __future__ import annotations

import torch

from archifactory.errors import InputError


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top ``top_k`` and outside the smallest set whose probability
    reaches ``top_p``. ``logits``: (B, V). The neutral settings (``top_k >= V``, ``top_p == 1``, or
    ``None``) return ``logits`` unchanged, as transformers' ``TopKLogitsWarper`` / ``TopPLogitsWarper``
    would keep every token. Ties at the k-th value are all kept (as transformers does)."""
    if top_k is not None:
        if top_k < 1:
            raise InputError(f"top_k={top_k} must be >= 1")
        if top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:  # NaN fails too, and is named
            raise InputError(f"top_p={top_p} {'is not a number (NaN); it ' if top_p != top_p else ''}must be in (0, 1]")
        if top_p < 1.0:
            logits = _nucleus(logits, top_p)
    return logits


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    # Drop a token when the tokens ranked above it already reach top_p (the first is always kept), i.e.
    # when the probability of it and every less likely token is <= 1 - top_p. That tail mass is summed
    # from the smallest probability up, in fp64: a descending fp32 cumulative sum over a large vocabulary
    # reaches 1.0 thousands of tokens early (50,000 random logits: 1.0 after ~27,000 tokens) and cut
    # tokens whose true tail mass was well above 1 - top_p.
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    tail = sorted_logits.double().softmax(dim=-1).cumsum(dim=-1)  # mass of this token and all below it
    drop_sorted = tail <= 1.0 - top_p
    drop_sorted[..., -1] = False  # the most likely token is always kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` (B, V); ``temperature == 0`` is greedy."""
    if not 0 <= temperature < float("inf"):  # NaN fails too
        nan = "is not a number (NaN); it " if temperature != temperature else ""
        raise InputError(f"temperature={temperature} {nan}must be finite and >= 0 (0: greedy)")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = logits / temperature
    logits = filter_logits(logits, top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
