"""The Hourglass transformer (Nawrot et al. 2021, "Hierarchical Transformers Are More Efficient Language
Models"): full-length pre layers, a shortened middle stack over pooled groups of ``shorten_factor``
tokens, upsampling with a residual from before the shortening, and full-length post layers.

```
tokens -> embed -> pre blocks (T) -> shift right by s-1 -> pool groups of s -> [attention resampling]
       -> middle blocks (T/s) -> upsample (+ residual from before pooling) -> [attention resampling]
       -> post blocks (T) -> final norm -> head
```

The shift by ``s - 1`` makes the group that feeds positions ``k*s .. k*s + s - 1`` end at position
``k*s``, so no position reads a later token (the paper's §3.2 causal shift). Sequences are padded to a
multiple of ``s`` and cut back after upsampling.

Decoding is cached (:class:`HourglassCache`): every token runs the pre and post stacks one position, and
every ``s``-th token, which completes a shifted group, the pooling and the middle stack one position.

Checked against ``hourglass-transformer-pytorch`` (lucidrains) with copied weights in
``tests/test_hierarchical.py``; deliberate differences from it: one level of shortening (the package also
nests hourglasses; nest by training a middle stack of your own kind later), and any registered mixer,
FFN, norm and position encoding in the stacks (the package: LayerNorm, bias-free q/kv, a biased output
projection, a GELU MLP and learned absolute positions, which its parity test configures here).
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
from archifactory.mixers.attention import AttentionConfig
from archifactory.model.block import Block
from archifactory.model.config import ModelConfig
from archifactory.model.hierarchical import HierarchicalLM, count_params, merge_aux, stack_flops
from archifactory.nn.init import init_linear
from archifactory.registry import register_model


@register_model
class HourglassConfig(ModelConfig):
    """``n_layers`` counts every block: ``n_pre_layers`` at full length, then ``n_layers - n_pre_layers -
    n_post_layers`` (at least one) over ``ceil(T / shorten_factor)`` pooled positions, then
    ``n_post_layers`` at full length. ``layer_overrides`` index that same list."""

    kind: Literal["hourglass"] = "hourglass"
    shorten_factor: int = Field(3, ge=2, le=MAX_COUNT)
    """Tokens per pooled position of the middle stack (``k`` in the paper)."""
    n_pre_layers: int = Field(1, ge=0, le=MAX_COUNT)
    n_post_layers: int = Field(1, ge=0, le=MAX_COUNT)
    downsample: Literal["mean", "linear"] = "linear"
    """``mean``: average each group; ``linear``: concatenate the group and project (the paper's linear
    pooling, its best)."""
    upsample: Literal["repeat", "linear"] = "linear"
    """``repeat``: copy each pooled vector ``s`` times; ``linear``: project to ``s`` vectors."""
    resampling: AttentionConfig | None = None
    """Attention resampling (the paper's attention upsampling, and the reference's pre-pooling twin): a
    pre-norm layer in which each pooled vector attends to its group, and after upsampling each token
    attends to its pooled vector, each followed by ``ffn``; its heads and biases come from this config
    (``None``: no resampling)."""

    def middle_layers(self) -> range:
        return range(self.n_pre_layers, self.n_layers - self.n_post_layers)

    def short_seq_len(self) -> int:
        return math.ceil(self.max_seq_len / self.shorten_factor)

    def layer_context(self, layer_idx: int) -> BuildContext:
        ctx = self.build_context(layer_idx)
        if layer_idx in self.middle_layers():
            ctx = dataclasses.replace(ctx, max_seq_len=self.short_seq_len())
        return ctx

    @classmethod
    def contract_examples(cls) -> list[dict]:
        return [
            {"n_layers": 4, "shorten_factor": 3, "resampling": {"kind": "attention", "n_heads": 2}},
            {"n_layers": 3, "shorten_factor": 2, "downsample": "mean", "upsample": "repeat",
             "position": {"kind": "learned"}},
            # RWKV-7 with its value residual from layer 0 to the post stack; plain RWKV-7 in the middle
            {"n_layers": 4, "shorten_factor": 2, "mixer": {"kind": "rwkv7", "head_dim": 8},
             "layer_overrides": [{"layers": [1, 2], "mixer": {"kind": "rwkv7", "head_dim": 8, "value_residual": False}}]},
        ]

    def build(self) -> "HourglassLM":
        return HourglassLM(self)

    @model_validator(mode="after")
    def _check_hourglass(self):
        errors = []
        if self.n_pre_layers + self.n_post_layers >= self.n_layers:
            errors.append(
                f"n_layers: n_layers={self.n_layers} leaves no shortened layer after n_pre_layers={self.n_pre_layers} "
                f"and n_post_layers={self.n_post_layers}; raise n_layers or lower the pre/post counts"
            )
        if self.mtp_heads:
            errors.append("mtp_heads: multi-token heads are not available for model kind hourglass; set mtp_heads=0")
        if self.pretrained is not None:
            errors.append("pretrained: copying parts from a Hugging Face model is not available for model kind "
                          "hourglass; remove model.pretrained")
        middle = self.middle_layers()
        for i, layer in enumerate(self.layer_configs()):
            if getattr(layer.mixer, "value_residual", False) and (i in middle or self.n_pre_layers == 0):
                errors.append(
                    f"layers: layer {i} ({layer.mixer.kind}) has value_residual=true, but "
                    + ("it is in the shortened middle stack, whose positions are not layer 0's" if i in middle
                       else "n_pre_layers=0 leaves layer 0 in the shortened middle stack")
                    + "; set value_residual=false there, or keep such layers in the pre/post stacks"
                )
        if self.resampling is not None:
            try:
                self.resampling.check(self.build_context(0))
            except FieldError as err:
                errors.append(f"resampling.{err.field}: {err.message}")
        if errors:
            raise ValueError("\n".join(errors))
        return self


class AttentionResampler(nn.Module):
    """One pre-norm residual layer: each query attends, without a mask, to the context vectors of its own
    group, then ``ffn``. The context is used as given (not normalised), as in the reference. Every
    context vector lies at or before the positions its output feeds, so no mask is needed."""

    def __init__(self, cfg: AttentionConfig, ctx: BuildContext, ffn_cfg) -> None:
        super().__init__()
        D = ctx.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.resolved_head_dim(D)
        self.scale = cfg.scale if cfg.scale is not None else self.head_dim**-0.5
        inner = self.n_heads * self.head_dim
        self.q_proj = nn.Linear(D, inner, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, inner, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, inner, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(inner, D, bias=cfg.out_bias)
        self.norm = ctx.norm.build_for(D)
        self.ffn_norm = ctx.norm.build_for(D)
        self.ffn = ffn_cfg.build(ctx)
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            init_linear(proj, self.std)
        init_linear(self.o_proj, self.out_std)
        self.ffn.reset_parameters()
        for norm in (self.norm, self.ffn_norm):
            if hasattr(norm, "reset_parameters"):
                norm.reset_parameters()

    def forward(self, x: torch.Tensor, context: torch.Tensor):
        """``x`` (N, Lq, D) queries, ``context`` (N, Lk, D): N independent groups."""
        N, Lq, D = x.shape
        Lk = context.shape[1]
        q = self.q_proj(self.norm(x)).view(N, Lq, self.n_heads, self.head_dim).transpose(1, 2)  # (N, H, Lq, hd)
        k = self.k_proj(context).view(N, Lk, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(N, Lk, self.n_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(N, Lq, -1)
        x = x + self.o_proj(y)
        f, aux = self.ffn(self.ffn_norm(x))
        return x + f, aux

    def flops(self, n_queries: int, n_keys: int) -> int:
        """Forward FLOPs for one group of ``n_queries`` queries over ``n_keys`` context vectors."""
        D, inner = self.q_proj.in_features, self.n_heads * self.head_dim
        projections = 2 * D * inner * (2 * n_queries + 2 * n_keys)  # q and o per query, k and v per key
        scores = 4 * inner * n_queries * n_keys  # QK^T and PV
        return projections + scores + n_queries * self.ffn.flops_per_token()


@dataclasses.dataclass
class HourglassCache:
    """Decoding state: caches of every block (the middle ones advance once per ``s`` tokens), the last
    ``s`` outputs of the pre stack (the group being filled, zeros before the sequence), and the
    upsampled vectors (and the pooled one) for the positions of the current group."""

    layers: list[Any]
    ffn_layers: list[Any]
    window: torch.Tensor
    """(B, s, D) the last s outputs of the pre stack."""
    up: torch.Tensor | None = None
    """(B, s, D) the upsampled middle output for positions k*s .. k*s + s - 1."""
    short: torch.Tensor | None = None
    """(B, 1, D) the middle stack's output for the current group."""
    pos: int = 0


class HourglassLM(HierarchicalLM):
    blocker = "hourglass shortening (pooling mixes tokens across document ends)"

    def __init__(self, config: HourglassConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        D, V, s = config.d_model, config.vocab_size, config.shorten_factor
        self.shorten_factor = s
        self.embed = nn.Embedding(V, D)
        self.embedding_scale = config.resolved_embedding_scale()
        self.pos_embed = config.position.build_absolute(D, config.max_seq_len, config.init.std)
        self.blocks = nn.ModuleList(
            Block(layer, config.layer_context(i), config.residual) for i, layer in enumerate(config.layer_configs())
        )
        middle = config.middle_layers()
        self.n_pre, self.n_middle = middle.start, len(middle)
        self.mtp_blocks = nn.ModuleList()
        self.downsample = nn.Linear(s * D, D) if config.downsample == "linear" else None
        self.upsample = nn.Linear(D, s * D) if config.upsample == "linear" else None
        ctx = config.build_context(0)
        self.down_resampler = self.up_resampler = None
        if config.resampling is not None:
            self.down_resampler = AttentionResampler(config.resampling, ctx, config.ffn)
            self.up_resampler = AttentionResampler(config.resampling, ctx, config.ffn)
        self.final_norm = config.norm.build_for(D) if config.final_norm else nn.Identity()
        self.lm_head = nn.Linear(D, V, bias=config.head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for layer in (self.downsample, self.upsample):
            if layer is not None:
                init_linear(layer, self.config.init.std)
        for resampler in (self.down_resampler, self.up_resampler):
            if resampler is not None:
                resampler.reset_parameters()

    def stacks(self) -> tuple[list[Block], list[Block], list[Block]]:
        blocks = list(self.blocks)
        end = self.n_pre + self.n_middle
        return blocks[: self.n_pre], blocks[self.n_pre : end], blocks[end:]

    def trunk(self, input_ids: torch.Tensor):
        B, T = input_ids.shape
        s = self.shorten_factor
        x = self.embed(input_ids)
        if self.embedding_scale != 1.0:
            x = x * torch.tensor(self.embedding_scale, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(T, device=input_ids.device)).to(x.dtype)
        pre, middle, post = self.stacks()
        aux: dict[str, torch.Tensor] = {}
        # cross-layer values (RWKV-7's v_first) go from layer 0 to the full-length post stack too; the
        # shortened middle stack has other positions (the config refuses value residuals there)
        full_length: dict = {}
        for block in pre:
            x, _, block_aux = block(x, cross_layer=full_length)
            merge_aux(aux, block_aux)
        D = x.shape[-1]
        K = math.ceil(T / s)
        x = F.pad(x, (0, 0, 0, K * s - T))  # (B, K*s, D)
        residual = x
        groups = F.pad(x, (0, 0, s - 1, 0))[:, : K * s].view(B, K, s, D)  # causal shift by s - 1
        if self.downsample is not None:
            short = self.downsample(groups.reshape(B, K, s * D))  # (B, K, D)
        else:
            short = groups.mean(dim=2)
        if self.down_resampler is not None:
            short, block_aux = self.down_resampler(short.reshape(B * K, 1, D), groups.reshape(B * K, s, D))
            short = short.view(B, K, D)
            merge_aux(aux, block_aux)
        shared = {}
        for block in middle:
            short, _, block_aux = block(short, cross_layer=shared)
            merge_aux(aux, block_aux)
        if self.upsample is not None:
            up = self.upsample(short).view(B, K * s, D)
        else:
            up = short.repeat_interleave(s, dim=1)
        x = up + residual
        if self.up_resampler is not None:
            x, block_aux = self.up_resampler(x.view(B * K, s, D), short.view(B * K, 1, D))
            x = x.view(B, K * s, D)
            merge_aux(aux, block_aux)
        x = x[:, :T]
        for block in post:
            x, _, block_aux = block(x, cross_layer=full_length)
            merge_aux(aux, block_aux)
        return x, aux

    # ------------------------------------------------------------------------------- cached decoding

    def init_cache(self, batch_size: int, device=None, dtype=None) -> HourglassCache:
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return HourglassCache(
            [b.mixer.init_cache(batch_size, device, dtype) for b in self.blocks],
            [b.ffn.init_cache(batch_size, device, dtype) for b in self.blocks],
            torch.zeros(batch_size, self.shorten_factor, self.config.d_model, device=device, dtype=dtype),
        )

    def hidden_states(self, input_ids, cache=None, document_ids=None, cross_layer=None):
        """Without a :class:`HourglassCache`: the whole forward; with one, token by token: each token runs
        the pre and post stacks one position, and every ``s``-th token (position k*s, which completes the
        shifted group k) runs the pooling and the middle stack one position."""
        if not isinstance(cache, HourglassCache):
            return super().hidden_states(input_ids, cache, document_ids, cross_layer)
        T = input_ids.shape[1]
        self.check_length(cache.pos + T)
        return torch.stack([self._decode(input_ids[:, t], cache) for t in range(T)], dim=1), {}

    def reorder_cache(self, cache: HourglassCache, index: torch.Tensor) -> HourglassCache:
        """A new cache holding batch rows ``index`` ((B',) int64; rows may repeat) of ``cache``."""
        rows = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
        layers, ffn_layers = self.reorder_block_caches(self.blocks, cache.layers, cache.ffn_layers, index)
        return HourglassCache(layers, ffn_layers, rows(cache.window), rows(cache.up), rows(cache.short), cache.pos)

    def _decode(self, token: torch.Tensor, cache: HourglassCache) -> torch.Tensor:
        B, s, D, t = token.shape[0], self.shorten_factor, self.config.d_model, cache.pos
        x = self.embed(token)[:, None]
        if self.embedding_scale != 1.0:
            x = x * torch.tensor(self.embedding_scale, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.tensor([t], device=token.device)).to(x.dtype)
        blocks = list(enumerate(self.blocks))
        end = self.n_pre + self.n_middle
        full_length: dict = {}
        for i, block in blocks[: self.n_pre]:
            x, cache.layers[i], _ = block(x, cache.layers[i], cache.ffn_layers[i], cross_layer=full_length)
        cache.window = torch.cat([cache.window[:, 1:], x], dim=1)  # positions t-s+1 .. t
        if t % s == 0:  # the shifted group k = t / s is complete
            group = cache.window
            short = self.downsample(group.reshape(B, 1, s * D)) if self.downsample is not None else group.mean(1, keepdim=True)
            if self.down_resampler is not None:
                short, _ = self.down_resampler(short, group)
            shared = {}
            for i, block in blocks[self.n_pre : end]:
                short, cache.layers[i], _ = block(short, cache.layers[i], cache.ffn_layers[i], cross_layer=shared)
            cache.short = short
            cache.up = self.upsample(short).view(B, s, D) if self.upsample is not None else short.expand(B, s, D)
        j = t % s
        x = cache.up[:, j : j + 1] + x
        if self.up_resampler is not None:
            x, _ = self.up_resampler(x, cache.short)
        for i, block in blocks[end:]:
            x, cache.layers[i], _ = block(x, cache.layers[i], cache.ffn_layers[i], cross_layer=full_length)
        cache.pos += 1
        return x[:, 0]

    def state_bytes(self, seq_len: int | None = None, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes :class:`HourglassCache` holds after ``seq_len`` tokens: the pre and post caches over T
        positions, the middle ones over ``ceil(T / s)``, the window and upsampled vectors (2s + 1 of D)."""
        T = seq_len or self.config.max_seq_len
        pre, middle, post = self.stacks()
        K = math.ceil(T / self.shorten_factor)
        return (sum(b.mixer.state_bytes(T, dtype) for b in pre + post)
                + sum(b.mixer.state_bytes(K, dtype) for b in middle)
                + (2 * self.shorten_factor + 1) * self.config.d_model * torch.finfo(dtype).bits // 8)

    def param_groups(self):
        resampling = [m for m in (self.downsample, self.upsample, self.down_resampler, self.up_resampler) if m]
        return {
            "embedding": [self.embed],
            "position": [self.pos_embed] if self.pos_embed is not None else [],
            "mixer": [b.mixer for b in self.blocks],
            "ffn": [b.ffn for b in self.blocks],
            "norm": [n for b in self.blocks for n in b.norms()] + [self.final_norm],
            "resampling": resampling,
            "head": [self.lm_head],
        }

    def flops_breakdown(self, seq_len: int | None = None) -> dict[str, int]:
        """Forward FLOPs per input token: the pre and post stacks over T positions, the middle stack over
        ``K = ceil(T / s)`` (at sequence length K), pooling/upsampling projections and resampling layers
        over the padded ``K * s`` positions, and the head over T."""
        T = seq_len or self.config.max_seq_len
        s, D = self.shorten_factor, self.config.d_model
        K = math.ceil(T / s)
        pre, middle, post = self.stacks()
        mixer, ffn = stack_flops(pre + post, T, T)
        mid_mixer, mid_ffn = stack_flops(middle, K, K)
        resampling = 0
        if self.downsample is not None:
            resampling += K * 2 * s * D * D
        if self.upsample is not None:
            resampling += K * 2 * D * s * D
        if self.down_resampler is not None:
            resampling += K * (self.down_resampler.flops(1, s) + self.up_resampler.flops(s, 1))
        head = T * 2 * self.lm_head.in_features * self.lm_head.out_features
        return {
            "mixer": (mixer + mid_mixer) // T,
            "ffn": (ffn + mid_ffn) // T,
            "resampling": resampling // T,
            "head": head // T,
        }
