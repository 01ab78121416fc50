"""The GRPO objective (Shao et al. 2024, DeepSeekMath), with TRL's conventions.

For each prompt, G completions are sampled and rewarded. A completion's advantage is its reward
normalised within its group, ``A = (r - mean_group) / (std_group + 1e-4)`` (TRL ``scale_rewards="group"``,
std unbiased as ``torch.std``; ``"batch"`` uses the std over the whole batch, ``"none"`` only centres, as
Dr. GRPO). Every completion token t gets the clipped surrogate of PPO with the ratio
``rho_t = exp(logp_t - logp_old_t)``::

    l_t = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
    KL_t = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1        (Schulman's k3 estimator)

and the token losses are reduced by ``loss_type``:

- ``dapo`` (TRL's default; Yu et al. 2025): sum over every completion token of the batch / their number
  (``n_tokens`` counts the whole optimizer step across micro-batches and processes when given);
- ``grpo`` (the original): mean over each sequence's tokens, then mean over sequences;
- ``bnpo``: sum / completion tokens of this micro-batch;
- ``dr_grpo`` (Liu et al. 2025): sum / (sequences x ``max_completion_length``).

``beta`` defaults to 0 (no reference model, TRL's default since v0.19).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

LossType = Literal["dapo", "grpo", "bnpo", "dr_grpo"]
RewardScale = Literal["group", "batch", "none"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: RewardScale = "group") -> torch.Tensor:
    """``rewards`` (N,) ordered group by group (N = prompts x ``group_size``) -> advantages (N,)."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        raise ValueError(f"scale={scale!r}; use 'group', 'batch' or 'none'")
    return centred / (std + 1e-4)


@dataclasses.dataclass
class GRPOLossOutput:
    loss: torch.Tensor
    """Scalar to backpropagate."""
    clip_fraction: torch.Tensor
    """Share of completion tokens whose ratio was clipped (either side, where the clip binds)."""
    kl: torch.Tensor
    """Mean per-token KL estimate to the reference (0 without one)."""


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: LossType = "dapo",
    n_tokens: int | None = None,
    max_completion_length: int | None = None,
) -> GRPOLossOutput:
    """``logprobs``, ``old_logprobs``, ``ref_logprobs``, ``mask``: (B, T) per completion token (mask 1 on
    real completion tokens); ``advantages``: (B,). ``epsilon_high`` defaults to ``epsilon_low``."""
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages[:, None]
    surrogate = torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high) * a)
    per_token = -surrogate
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs (the frozen reference model's log-probabilities)")
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    else:
        kl = torch.zeros_like(per_token)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / (n_tokens if n_tokens is not None else mask.sum().clamp(min=1))
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        loss = (per_token * mask).sum() / (logprobs.shape[0] * max_completion_length)
    else:
        raise ValueError(f"loss_type={loss_type!r}; use 'dapo', 'grpo', 'bnpo' or 'dr_grpo'")
    with torch.no_grad():
        clipped = ((ratio < 1 - epsilon_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
        n = mask.sum().clamp(min=1)
        clip_fraction = (clipped.to(mask.dtype) * mask).sum() / n
        mean_kl = (kl.detach() * mask).sum() / n
    return GRPOLossOutput(loss, clip_fraction, mean_kl)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each target under ``logits / temperature`` (as TRL divides by the sampling
    temperature): ``logits`` (B, T, V), ``targets`` (B, T) -> (B, T) float32."""
    logits = logits.float() / temperature
    return torch.gather(logits.log_softmax(dim=-1), -1, targets.clamp(min=0)[..., None]).squeeze(-1)
