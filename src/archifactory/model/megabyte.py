"""MegaByte (Yu et al. 2023, "MEGABYTE: Predicting Million-byte Sequences with Multiscale Transformers"):
a global model over patches of ``patch_size`` tokens and a small local model within each patch.

Arranged as ``megabyte-pytorch`` (lucidrains) arranges it, which ``tests/test_hierarchical.py`` matches
with copied weights:

```
patch embedding: embed each token (d_local), concatenate a patch (P * d_local), norm, project to
                 d_model, norm                                                       (B, K, d_model)
global model:    [start vector, patch 0 .. patch K-1] -> n_layers blocks -> norm     (B, K+1, d_model)
                 the first K outputs (patch k sees patches < k) -> linear -> P slots of d_local
local model:     per patch k: [start vector, embed(x_kP + j) + slot_j for j < P] -> n_local_layers blocks
                 output j + 1 predicts token kP + j + 1                              (B*K, P+1, d_local)
final norm -> head (d_local -> vocab)
```

Deliberate differences from the reference: its RWKV-style token shift inside every block (half the
channels of each block input come from the previous position; not in the paper) is not applied, and
the reference test switches it off there; the stacks use any registered mixer, FFN, norm and position
encoding (the reference: RMSNorm, bias-free attention, a biased GELU MLP, rotary or learned positions).
Decoding is cached (:class:`MegaByteCache`): a token costs one local position, a completed patch one
global position. The paper's own arrangement feeds local position p the byte before it (x_{kP+p-1}) and the global
output of patch k; this one (the reference's) feeds x_{kP+p} and predicts the next byte, with a start
vector at local position 0 -- the same information, one position earlier.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from archifactory.config import MAX_COUNT, BuildContext, FieldError
from archifactory.model.block import Block
from archifactory.model.config import BlockConfig, FFNField, MixerField, ModelConfig, NormField
from archifactory.model.hierarchical import HierarchicalLM, merge_aux, stack_flops
from archifactory.nn.init import init_linear, normal_
from archifactory.nn.norms import LayerNormConfig
from archifactory.nn.roles import VECTOR
from archifactory.registry import register_model


@register_model
class MegaByteConfig(ModelConfig):
    """``d_model``, ``n_layers``, ``mixer``, ``ffn`` and ``layer_overrides`` describe the global model;
    the local model has ``n_local_layers`` blocks of width ``d_local`` (``local_mixer``/``local_ffn``,
    default: the global ones' configs built at ``d_local``). ``norm``, ``position`` and ``residual``
    apply to both; the head reads the local model, so a tied head shares the local token embedding."""

    kind: Literal["megabyte"] = "megabyte"
    patch_size: int = Field(4, ge=2, le=MAX_COUNT)
    """Tokens per patch (P)."""
    d_local: int = Field(64, ge=1, le=2**17)
    n_local_layers: int = Field(2, ge=1, le=MAX_COUNT)
    local_mixer: MixerField | None = None
    local_ffn: FFNField | None = None
    patch_norm: NormField = Field(default_factory=LayerNormConfig)
    """The two norms of the patch embedding (before and after its projection; LayerNorm as in the reference)."""

    def n_patches(self, seq_len: int) -> int:
        return math.ceil(seq_len / self.patch_size)

    def local_layer_configs(self) -> list[BlockConfig]:
        block = BlockConfig(mixer=self.local_mixer or self.mixer, ffn=self.local_ffn or self.ffn)
        return [block] * self.n_local_layers

    def global_context(self, layer_idx: int) -> BuildContext:
        return dataclasses.replace(self.build_context(layer_idx), max_seq_len=self.n_patches(self.max_seq_len) + 1)

    def local_context(self, layer_idx: int) -> BuildContext:
        return dataclasses.replace(
            self.build_context(layer_idx), d_model=self.d_local, n_layers=self.n_local_layers,
            max_seq_len=self.patch_size + 1,
        )

    @classmethod
    def contract_examples(cls) -> list[dict]:
        return [
            {"n_layers": 2, "patch_size": 4, "d_local": 16, "local_mixer": {"kind": "attention", "n_heads": 2}},
            {"n_layers": 2, "patch_size": 3, "d_local": 16, "n_local_layers": 1, "mixer": {"kind": "gla", "n_heads": 2},
             "ffn": {"kind": "moe", "n_experts": 4, "top_k": 2}, "position": {"kind": "learned"}},
            {"n_layers": 2, "patch_size": 2, "d_local": 16, "n_local_layers": 2, "mixer": {"kind": "rwkv7", "head_dim": 8}},
        ]

    def build(self) -> "MegaByteLM":
        return MegaByteLM(self)

    @model_validator(mode="after")
    def _check_megabyte(self):
        errors = []
        if self.mtp_heads:
            errors.append("mtp_heads: multi-token heads are not available for model kind megabyte; set mtp_heads=0")
        if self.pretrained is not None:
            errors.append("pretrained: copying parts from a Hugging Face model is not available for model kind "
                          "megabyte; remove model.pretrained")
        ctx = self.local_context(0)
        for path, component in (("local_mixer", self.local_mixer or self.mixer), ("local_ffn", self.local_ffn or self.ffn)):
            try:
                component.check(ctx)
            except FieldError as err:
                where = path if getattr(self, path) is not None else f"{path} (default: {path[6:]} at d_local={self.d_local})"
                errors.append(f"{where}.{err.field}: {err.message}")
        if errors:
            raise ValueError("\n".join(errors))
        return self


@dataclasses.dataclass
class MegaByteCache:
    """Decoding state: the global blocks' caches (the start vector and every completed patch fed), the
    current patch's slots from the global model, the local blocks' caches over that patch (its start
    vector and tokens fed), and the patch's token ids so far."""

    global_layers: list[Any]
    global_ffn: list[Any]
    local_layers: list[Any] = dataclasses.field(default_factory=list)
    local_ffn: list[Any] = dataclasses.field(default_factory=list)
    slots: torch.Tensor | None = None
    """(B, P, d_local) the global model's contribution to each position of the current patch."""
    patch: list[torch.Tensor] = dataclasses.field(default_factory=list)
    """(B,) token ids of the current patch so far."""
    patches: int = 0
    """Completed patches fed to the global model."""
    pos: int = 0


class MegaByteLM(HierarchicalLM):
    blocker = "megabyte patches (a patch mixes tokens across document ends)"

    def __init__(self, config: MegaByteConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        D, L, V, P = config.d_model, config.d_local, config.vocab_size, config.patch_size
        self.patch_size = P
        self.embed = nn.Embedding(V, L)  # the local model's token embedding
        self.embedding_scale = config.resolved_embedding_scale()
        self.pos_embed = None  # each stack has its own table (below), if the position encoding is absolute
        self.global_pos = config.position.build_absolute(D, config.n_patches(config.max_seq_len), config.init.std)
        self.local_pos = config.position.build_absolute(L, P, config.init.std)
        self.patch_embed = nn.Embedding(V, L)
        self.patch_in_norm = config.patch_norm.build_for(P * L)
        self.patch_proj = nn.Linear(P * L, D)
        self.patch_out_norm = config.patch_norm.build_for(D)
        self.global_start = nn.Parameter(torch.empty(D))
        self.local_start = nn.Parameter(torch.empty(L))
        global_blocks = [
            Block(layer, config.global_context(i), config.residual) for i, layer in enumerate(config.layer_configs())
        ]
        local_blocks = [
            Block(layer, config.local_context(i), config.residual) for i, layer in enumerate(config.local_layer_configs())
        ]
        self.blocks = nn.ModuleList(global_blocks + local_blocks)
        self.n_global = len(global_blocks)
        self.mtp_blocks = nn.ModuleList()
        self.global_norm = config.norm.build_for(D)
        self.global_to_local = nn.Linear(D, P * L)
        self.final_norm = config.norm.build_for(L) if config.final_norm else nn.Identity()
        self.lm_head = nn.Linear(L, V, bias=config.head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        init = self.config.init
        embedding_std = init.embedding_std if init.embedding_std is not None else init.std
        normal_(self.patch_embed.weight, embedding_std)
        for vector in (self.global_start, self.local_start):
            normal_(vector, embedding_std)
        for table in (self.global_pos, self.local_pos):
            if table is not None and hasattr(table, "reset_parameters"):
                table.reset_parameters()
        for norm in (self.patch_in_norm, self.patch_out_norm, self.global_norm):
            if hasattr(norm, "reset_parameters"):
                norm.reset_parameters()
        init_linear(self.patch_proj, init.std)
        init_linear(self.global_to_local, init.std)

    def param_roles(self):
        # the start vectors are learned inputs like embedding rows, but one each: no decay (AdamW)
        return {**super().param_roles(), "global_start": VECTOR, "local_start": VECTOR}

    def stacks(self) -> tuple[list[Block], list[Block]]:
        blocks = list(self.blocks)
        return blocks[: self.n_global], blocks[self.n_global :]

    def trunk(self, input_ids: torch.Tensor):
        B, T = input_ids.shape
        P, L = self.patch_size, self.config.d_local
        K = math.ceil(T / P)
        ids = F.pad(input_ids, (0, K * P - T)).view(B, K, P)  # padding only follows the real tokens
        g = self.patch_embed(ids).view(B, K, P * L)
        g = self.patch_out_norm(self.patch_proj(self.patch_in_norm(g)))  # (B, K, D)
        if self.global_pos is not None:
            g = g + self.global_pos(torch.arange(K, device=ids.device)).to(g.dtype)
        g = torch.cat([self.global_start.to(g.dtype).expand(B, 1, -1), g], dim=1)  # (B, K+1, D)
        global_blocks, local_blocks = self.stacks()
        aux: dict[str, torch.Tensor] = {}
        shared = {}  # each stack shares its own cross-layer values (RWKV-7's v_first): widths differ
        for block in global_blocks:
            g, _, block_aux = block(g, cross_layer=shared)
            merge_aux(aux, block_aux)
        slots = self.global_to_local(self.global_norm(g[:, :-1])).view(B * K, P, L)  # patch k: patches < k
        x = self.embed(ids).view(B * K, P, L)
        if self.embedding_scale != 1.0:
            x = x * torch.tensor(self.embedding_scale, dtype=x.dtype)
        if self.local_pos is not None:
            x = x + self.local_pos(torch.arange(P, device=ids.device)).to(x.dtype)
        x = torch.cat([self.local_start.to(x.dtype).expand(B * K, 1, -1), x + slots], dim=1)  # (B*K, P+1, L)
        shared = {}
        for block in local_blocks:
            x, _, block_aux = block(x, cross_layer=shared)
            merge_aux(aux, block_aux)
        return x[:, 1:].reshape(B, K * P, L)[:, :T], aux

    # ------------------------------------------------------------------------------- cached decoding

    def init_cache(self, batch_size: int, device=None, dtype=None) -> MegaByteCache:
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        global_blocks, _ = self.stacks()
        return MegaByteCache(
            [b.mixer.init_cache(batch_size, device, dtype) for b in global_blocks],
            [b.ffn.init_cache(batch_size, device, dtype) for b in global_blocks],
        )

    def hidden_states(self, input_ids, cache=None, document_ids=None, cross_layer=None):
        """Without a :class:`MegaByteCache`: the whole forward; with one, token by token: each token runs
        the local model one position, and a completed patch runs the global model one position."""
        if not isinstance(cache, MegaByteCache):
            return super().hidden_states(input_ids, cache, document_ids, cross_layer)
        T = input_ids.shape[1]
        self.check_length(cache.pos + T)
        return torch.stack([self._decode(input_ids[:, t], cache) for t in range(T)], dim=1), {}

    def reorder_cache(self, cache: MegaByteCache, index: torch.Tensor) -> MegaByteCache:
        """A new cache holding batch rows ``index`` ((B',) int64; rows may repeat) of ``cache``."""
        global_blocks, local_blocks = self.stacks()
        rows = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
        out = MegaByteCache(*self.reorder_block_caches(global_blocks, cache.global_layers, cache.global_ffn, index))
        out.local_layers, out.local_ffn = self.reorder_block_caches(local_blocks, cache.local_layers, cache.local_ffn, index)
        out.slots, out.patch = rows(cache.slots), [rows(t) for t in cache.patch]
        out.patches, out.pos = cache.patches, cache.pos
        return out

    def _run(self, blocks, x, layers: list, ffn_caches: list) -> torch.Tensor:
        shared = {}
        for i, block in enumerate(blocks):
            x, layers[i], _ = block(x, layers[i], ffn_caches[i], cross_layer=shared)
        return x

    def _next_patch(self, cache: MegaByteCache, g: torch.Tensor) -> None:
        """Feed one global input ``g`` (B, 1, D): its output becomes the next patch's slots, and the
        local model starts afresh on that patch with its start vector."""
        global_blocks, local_blocks = self.stacks()
        B = g.shape[0]
        out = self._run(global_blocks, g, cache.global_layers, cache.global_ffn)
        cache.slots = self.global_to_local(self.global_norm(out)).view(B, self.patch_size, self.config.d_local)
        device, dtype = g.device, self.embed.weight.dtype
        cache.local_layers = [b.mixer.init_cache(B, device, dtype) for b in local_blocks]
        cache.local_ffn = [b.ffn.init_cache(B, device, dtype) for b in local_blocks]
        start = self.local_start.to(dtype).expand(B, 1, -1)
        self._run(local_blocks, start, cache.local_layers, cache.local_ffn)
        cache.patch = []

    def _decode(self, token: torch.Tensor, cache: MegaByteCache) -> torch.Tensor:
        """(B,) token -> (B, d_local): the local model's output at its position (it predicts the next)."""
        B, P, L = token.shape[0], self.patch_size, self.config.d_local
        if cache.slots is None:  # the first token: the global model's start position gives patch 0's slots
            self._next_patch(cache, self.global_start.to(self.embed.weight.dtype).expand(B, 1, -1))
        elif len(cache.patch) == P:  # the previous patch is complete: feed it to the global model
            ids = torch.stack(cache.patch, dim=1)  # (B, P)
            g = self.patch_out_norm(self.patch_proj(self.patch_in_norm(self.patch_embed(ids).view(B, 1, P * L))))
            if self.global_pos is not None:
                g = g + self.global_pos(torch.tensor([cache.patches], device=ids.device)).to(g.dtype)
            cache.patches += 1
            self._next_patch(cache, g)
        j = len(cache.patch)
        x = self.embed(token)[:, None]
        if self.embedding_scale != 1.0:
            x = x * torch.tensor(self.embedding_scale, dtype=x.dtype)
        if self.local_pos is not None:
            x = x + self.local_pos(torch.tensor([j], device=token.device)).to(x.dtype)
        _, local_blocks = self.stacks()
        x = self._run(local_blocks, x + cache.slots[:, j : j + 1], cache.local_layers, cache.local_ffn)
        cache.patch.append(token)
        cache.pos += 1
        return x[:, 0]

    def state_bytes(self, seq_len: int | None = None, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes :class:`MegaByteCache` holds after ``seq_len`` tokens: the global caches over
        ``ceil(T / P) + 1`` positions, the local caches over at most ``P + 1``, the slots and the
        current patch's int64 ids."""
        T = seq_len or self.config.max_seq_len
        P, L = self.patch_size, self.config.d_local
        global_blocks, local_blocks = self.stacks()
        K = math.ceil(T / P)
        return (sum(b.mixer.state_bytes(K + 1, dtype) for b in global_blocks)
                + sum(b.mixer.state_bytes(P + 1, dtype) for b in local_blocks)
                + P * L * torch.finfo(dtype).bits // 8 + 8 * P)

    def param_groups(self):
        return {
            "embedding": [self.embed, self.patch_embed],
            "position": [t for t in (self.global_pos, self.local_pos) if t is not None],
            "mixer": [b.mixer for b in self.blocks],
            "ffn": [b.ffn for b in self.blocks],
            "norm": [n for b in self.blocks for n in b.norms()] + [self.global_norm, self.final_norm],
            "patch": [self.patch_in_norm, self.patch_proj, self.patch_out_norm, self.global_to_local,
                      self.global_start, self.local_start],
            "head": [self.lm_head],
        }

    def flops_breakdown(self, seq_len: int | None = None) -> dict[str, int]:
        """Forward FLOPs per input token: with ``K = ceil(T / P)`` patches, the global stack over K + 1
        positions (at that length), the local stack over K * (P + 1) positions (at length P + 1), the
        patch projection and the global-to-local projection over K positions, the head over T."""
        T = seq_len or self.config.max_seq_len
        P, D, L = self.patch_size, self.config.d_model, self.config.d_local
        K = math.ceil(T / P)
        global_blocks, local_blocks = self.stacks()
        g_mixer, g_ffn = stack_flops(global_blocks, K + 1, K + 1)
        l_mixer, l_ffn = stack_flops(local_blocks, K * (P + 1), P + 1)
        patch = K * (2 * P * L * D + 2 * D * P * L)
        head = T * 2 * self.lm_head.in_features * self.lm_head.out_features
        return {
            "mixer": (g_mixer + l_mixer) // T,
            "ffn": (g_ffn + l_ffn) // T,
            "patch": patch // T,
            "head": head // T,
        }
