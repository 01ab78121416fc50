"""What the hierarchical model kinds (``megabyte``, ``hourglass``) share: the ``CausalLM`` interface
(loss, logits, generation, costs, saving) over a trunk that is not one stack of equal-length blocks.

A subclass builds ``embed``, ``blocks`` (every block of every stack, so FSDP wrapping, kernel reports
and MoE statistics see them all), ``final_norm`` and ``lm_head``, and implements ``trunk(input_ids)``,
``flops_breakdown(seq_len)`` and ``param_groups()``.

Generation, by default, recomputes: a shortened token's inputs change as its group fills, so the
cache is the tokens seen so far (:class:`RecomputeCache`) and each step runs the whole forward on them.
That is exact (the same function as the full forward) at O(T^2) cost per sequence, as the reference
implementations (megabyte-pytorch, hourglass-transformer-pytorch) generate. MegaByte and Hourglass
override it with cached decoders (each token costs one position of each stack it passes through).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from archifactory.errors import InputError
from archifactory.model.lm import CausalLM


@dataclasses.dataclass
class RecomputeCache:
    """Decoding state of a hierarchical model: the (B, t) token ids seen so far."""

    tokens: torch.Tensor | None = None
    pos: int = 0


def merge_aux(total: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    for name, value in new.items():
        total[name] = total[name] + value if name in total else value


def count_params(groups: dict[str, list[nn.Module | nn.Parameter]]) -> dict[str, int]:
    """Parameters per group, each tensor counted once (in the first group that holds it)."""
    seen: set[int] = set()
    counts: dict[str, int] = {}
    for name, parts in groups.items():
        total = 0
        for part in parts:
            params = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        counts[name] = total
    return counts


class HierarchicalLM(CausalLM):
    blocker: ClassVar[str] = "a hierarchical model"
    """What :meth:`document_blockers` names: pooling mixes neighbouring tokens across document ends."""

    def init_cache(self, batch_size: int, device=None, dtype=None) -> RecomputeCache:
        return RecomputeCache()

    def document_blockers(self) -> list[str]:
        return [self.blocker]

    def trunk(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def check_length(self, n_tokens: int) -> None:
        if self.config.position.limits_length and n_tokens > self.config.max_seq_len:
            raise InputError(
                f"{n_tokens} tokens exceed the {self.config.position.kind} position table's "
                f"max_seq_len={self.config.max_seq_len}; use shorter inputs or a larger model.max_seq_len"
            )

    def hidden_states(self, input_ids, cache: RecomputeCache | None = None, document_ids=None):
        T = input_ids.shape[1]
        self.check_length((cache.pos if cache is not None else 0) + T)
        if cache is None:
            return self.trunk(input_ids)
        tokens = input_ids if cache.tokens is None else torch.cat([cache.tokens, input_ids], dim=1)
        hidden, aux = self.trunk(tokens)
        cache.tokens, cache.pos = tokens, cache.pos + T
        return hidden[:, -T:], aux

    def param_groups(self) -> dict[str, list[nn.Module | nn.Parameter]]:  # pragma: no cover
        raise NotImplementedError

    def param_breakdown(self) -> dict[str, int]:
        return count_params(self.param_groups())

    def flops_per_token(self, seq_len: int | None = None, training: bool = False) -> int:
        """Forward matmul FLOPs per input token at sequence length ``seq_len``, summed over
        :meth:`flops_breakdown` (each stack counted at the length it runs at); 3x with ``training``."""
        forward = sum(self.flops_breakdown(seq_len).values())
        return 3 * forward if training else forward

    def state_bytes(self, seq_len: int | None = None, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes :class:`RecomputeCache` holds after ``seq_len`` tokens: the int64 token ids."""
        return 8 * (seq_len or self.config.max_seq_len)


def stack_flops(blocks, positions: int, seq_len: int) -> tuple[int, int]:
    """(mixer, FFN) forward FLOPs of ``blocks`` run over ``positions`` positions, in sequences of
    ``seq_len`` (the length each mixer's per-token cost depends on)."""
    mixer = sum(b.mixer.flops_per_token(seq_len) for b in blocks) * positions
    ffn = sum(b.ffn.flops_per_token() for b in blocks) * positions
    return mixer, ffn
