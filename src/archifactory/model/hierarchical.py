"""What the hierarchical model kinds (``megabyte``, ``hourglass``) share: the ``CausalLM`` interface
(loss, logits, generation, costs, saving) over a trunk that is not one stack of equal-length blocks.

A subclass builds ``embed``, ``blocks`` (every block of every stack, so FSDP wrapping, kernel reports
and MoE statistics see them all), ``final_norm`` and ``lm_head``, and implements ``trunk(input_ids)``,
``flops_breakdown(seq_len)`` and ``param_groups()``.

Each kind decodes with its own cache (``init_cache``, ``reorder_cache``, and ``hidden_states`` with a
cache), in which every token runs one position of each stack it passes through; the shared contract
(tests/test_hierarchical.py) checks it against the full forward.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from archifactory.errors import InputError
from archifactory.model.lm import CausalLM


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

    def document_blockers(self) -> list[str]:
        return [self.blocker]

    @staticmethod
    def reorder_block_caches(blocks, layers: list, ffn_layers: list, index: torch.Tensor) -> tuple[list, list]:
        """Each block's mixer and FFN cache, rows ``index``, each asked of its own component."""
        return ([b.mixer.reorder_cache(c, index) for b, c in zip(blocks, layers)],
                [b.ffn.reorder_cache(c, index) for b, c in zip(blocks, ffn_layers)])

    def trunk(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def check_length(self, n_tokens: int) -> None:
        if self.config.position.limits_length and n_tokens > self.config.max_seq_len:
            raise InputError(
                f"{n_tokens} tokens exceed the {self.config.position.kind} position table's "
                f"max_seq_len={self.config.max_seq_len}; use shorter inputs or a larger model.max_seq_len"
            )

    def hidden_states(self, input_ids, cache=None, document_ids=None, cross_layer=None):
        """The whole forward (``cache`` None); subclasses decode with their caches."""
        if cache is not None:  # pragma: no cover - every kind overrides the cached path
            raise NotImplementedError(f"{type(self).__name__} has no cached decoding")
        self.check_length(input_ids.shape[1])
        return self.trunk(input_ids)

    def param_groups(self) -> dict[str, list[nn.Module | nn.Parameter]]:  # pragma: no cover
        raise NotImplementedError

    def param_breakdown(self) -> dict[str, int]:
        return count_params(self.param_groups())

    def flops_per_token(self, seq_len: int | None = None, training: bool = False) -> int:
        """Forward matmul FLOPs per input token at sequence length ``seq_len``, summed over
        :meth:`flops_breakdown` (each stack counted at the length it runs at); 3x with ``training``."""
        forward = sum(self.flops_breakdown(seq_len).values())
        return 3 * forward if training else forward


def stack_flops(blocks, positions: int, seq_len: int) -> tuple[int, int]:
    """(mixer, FFN) forward FLOPs of ``blocks`` run over ``positions`` positions, in sequences of
    ``seq_len`` (the length each mixer's per-token cost depends on)."""
    mixer = sum(b.mixer.flops_per_token(seq_len) for b in blocks) * positions
    ffn = sum(b.ffn.flops_per_token() for b in blocks) * positions
    return mixer, ffn
