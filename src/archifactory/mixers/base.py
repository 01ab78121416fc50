"""The contract every sequence mixer keeps (see the shared contract test, tests/test_mixer_contract.py).

A mixer maps ``x: (B, T, D)`` to ``(B, T, D)``. ``forward(x)`` over a whole sequence and ``forward(x, cache)``
chunk by chunk (down to one token at a time, as in generation) compute the same function.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from archifactory.config import BuildContext, Component, FieldError
from archifactory.nn.roles import ParamRole


class MixerConfig(Component):
    uses_positions: ClassVar[bool] = False
    """Whether the mixer reads the model's relative position encoding (RoPE/ALiBi); the contract test
    runs position-using mixers under every encoding."""
    owns_input_norm: ClassVar[bool] = False
    """Whether the built mixer normalises its own input (``Mixer.owns_input_norm``): it needs pre-norm blocks."""

    def reads_token_embeddings(self) -> bool:
        """Whether the built mixer takes the token embeddings (``Mixer.reads_embeddings``)."""
        return False

    def shared_block(self, d_model: int) -> tuple[str, dict] | None:
        """``(name, settings)`` of a module this mixer shares with other layers naming it; layers sharing
        a name must agree on the settings. ``None`` for a mixer that shares nothing."""
        return None

    @classmethod
    def contract_examples(cls, d_model: int) -> list["MixerConfig"]:
        """Small configs the shared contract test builds at ``d_model``; override to cover options."""
        return [cls()]


class Mixer(nn.Module):
    supports_documents: ClassVar[bool] = False
    """Whether ``forward(x, documents=ids)`` keeps packed documents apart (``ids``: (B, T), the document
    each token belongs to): no token reads an earlier document. Mixers without it are trained on padded
    rows instead of packed ones (see ``CausalLM.document_blockers``)."""

    uses_cross_layer: ClassVar[bool] = False
    """Whether ``forward(x, cache, cross_layer=d)`` takes ``d``, a dict the model creates for each forward
    call and hands to every such mixer in layer order, for connections across layers (RWKV-7's value
    residual: the layer-0 mixer stores its values there and later layers mix them in). Other mixers are
    called without it."""

    def zero_gradient_at_init(self) -> set[str]:
        """Names of parameters whose gradient is zero at initialisation by design, because a factor they
        multiply starts at zero as the published recipe has it (RWKV-7's low-rank maps: ``up(act(down x))``
        with ``down = 0``). The contract test checks that these, and only these, get no gradient at the
        first step and that they do get one after a single optimizer step."""
        return set()

    reads_embeddings: bool = False
    """Whether the mixer reads the model's token embeddings (B, T, D) at the same positions from
    ``cross_layer["embeddings"]`` (Zamba's shared block does); the model stores them there only then."""
    owns_input_norm: bool = False
    """Whether the mixer normalises its own input, so that a pre-norm block feeds it the residual stream
    unnormalised (a Zamba2 hybrid layer's norms sit inside it)."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.d_model = ctx.d_model

    def forward(self, x: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:  # pragma: no cover
        raise NotImplementedError

    def reorder_cache(self, cache: Any, index: torch.Tensor) -> Any:
        """The cache of batch rows ``index`` ((B',) int64; rows may repeat), e.g. one prefix's cache copied
        for each of several continuations (transformers' ``_reorder_cache`` for beam search is the same
        operation). The default copies rows of every tensor in the cache along dimension 0
        (:func:`select_cache_rows`); a mixer whose cache is not batch-first overrides it."""
        return select_cache_rows(cache, index)

    def init_cache(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> Any:  # pragma: no cover
        """An empty cache (KV cache or recurrent state) for ``batch_size`` sequences."""
        raise NotImplementedError

    def flops_per_token(self, seq_len: int) -> int:  # pragma: no cover
        """Forward FLOPs per token, averaged over the positions of a ``seq_len`` sequence."""
        raise NotImplementedError

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:  # pragma: no cover
        """Bytes of cache one sequence holds after ``seq_len`` tokens."""
        raise NotImplementedError

    def reset_parameters(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def param_roles(self) -> dict[str, ParamRole]:
        """Optimizer roles of the parameters this module registers itself (``nn.Parameter`` attributes),
        and of sub-layers' parameters it wants trained otherwise than their default, by dotted name.
        Plain ``nn.Linear`` / norm sub-layers need no entry. See :mod:`archifactory.nn.roles`."""
        return {}

    def kernel_path(self) -> str:
        """Which implementation ``forward`` runs (recorded by runs and benchmarks)."""
        return "torch"


def linear_flops(*layers: nn.Linear) -> int:
    """Multiply-adds of ``layers`` on one token, counted as 2 FLOPs each."""
    return sum(2 * layer.in_features * layer.out_features for layer in layers)


def padded_length(seq_len: int, chunk: int) -> int:
    """Tokens a chunked form computes for a ``seq_len`` sequence: chunks of ``min(chunk, seq_len)`` tokens,
    the last one zero-padded to full length. Chunk-form FLOP counts cover the padding, since it is computed."""
    c = max(1, min(chunk, seq_len))
    return -(-seq_len // c) * c


def check_heads_divide(n_heads: int, d_model: int, explicit_head_dim: int | None = None) -> None:
    """``n_heads`` must split ``d_model`` evenly unless the head size is given explicitly."""
    if explicit_head_dim is None and d_model % n_heads:
        valid = [h for h in range(1, min(d_model, 64) + 1) if d_model % h == 0]
        raise FieldError(
            "n_heads",
            f"n_heads={n_heads} does not divide d_model={d_model}; choose one of {valid} or set head_dim explicitly",
        )


def check_position_head_dim(ctx: BuildContext, head_dim: int, field: str, where: str = "") -> None:
    """The model's position kind must accept ``head_dim`` channels per head (RoPE needs an even count);
    otherwise a FieldError on ``field`` naming the kind (and ``where``, e.g. `` on qk_rope_head_dim=8``)."""
    try:
        ctx.position.check_head_dim(head_dim)
    except ValueError as err:
        raise FieldError(field, f"with position kind {ctx.position.kind!r}{where}: {err}") from None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision recurrences run and keep their state in: at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def select_cache_rows(cache: Any, index: torch.Tensor) -> Any:
    """A copy of ``cache`` holding batch rows ``index`` of every tensor along dimension 0 (walks
    dataclasses, lists, tuples and dicts; other values, e.g. position counters, are kept). Raises
    ``ValueError`` for a tensor without a batch dimension."""
    if isinstance(cache, torch.Tensor):
        if cache.dim() == 0:
            raise ValueError("a 0-d cache tensor has no batch dimension: override reorder_cache")
        return cache.index_select(0, index.to(cache.device))
    if dataclasses.is_dataclass(cache) and not isinstance(cache, type):
        selected = copy.copy(cache)  # keeps the type, its methods and non-field attributes
        for f in dataclasses.fields(cache):
            setattr(selected, f.name, select_cache_rows(getattr(cache, f.name), index))
        return selected
    if isinstance(cache, tuple) and hasattr(cache, "_fields"):  # a named tuple
        return type(cache)(*(select_cache_rows(c, index) for c in cache))
    if isinstance(cache, (list, tuple)):
        return type(cache)(select_cache_rows(c, index) for c in cache)
    if isinstance(cache, dict):
        return {k: select_cache_rows(v, index) for k, v in cache.items()}
    return cache
