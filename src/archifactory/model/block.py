"""One layer: a sequence mixer and an FFN, each on a residual branch, in one of four layouts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from archifactory.config import BuildContext
from archifactory.ffn.base import AuxLosses
from archifactory.model.config import BlockConfig


class Block(nn.Module):
    def __init__(self, cfg: BlockConfig, ctx: BuildContext, residual: str) -> None:
        super().__init__()
        self.residual = residual
        self.mixer = cfg.mixer.build(ctx)
        self.ffn = cfg.ffn.build(ctx)
        norm = ctx.norm
        if self.mixer.owns_input_norm and residual != "pre":
            raise ValueError(
                f"layer {ctx.layer_idx}: mixer {type(self.mixer).__name__} normalises its own input and needs "
                f"residual: pre, not {residual!r}"
            )
        self.mixer_norm = nn.Identity() if self.mixer.owns_input_norm else norm.build_for(ctx.d_model)
        # parallel blocks share one input norm (GPT-J, PaLM)
        self.ffn_norm = None if residual == "parallel" else norm.build_for(ctx.d_model)
        sandwich = residual == "sandwich"
        self.mixer_post_norm = norm.build_for(ctx.d_model) if sandwich else None
        self.ffn_post_norm = norm.build_for(ctx.d_model) if sandwich else None
        if not cfg.ffn.has_branch:  # a mixer-only layer (ffn kind none): no norm around an absent branch
            self.ffn_norm = None if residual == "parallel" else nn.Identity()
            self.ffn_post_norm = nn.Identity() if sandwich else None
        self._forward = {"pre": self._pre, "post": self._post, "sandwich": self._sandwich, "parallel": self._parallel}[
            residual
        ]

    def forward(
        self, x: torch.Tensor, cache: Any = None, ffn_cache: Any = None, documents: torch.Tensor | None = None,
        cross_layer: dict | None = None,
    ) -> tuple[torch.Tensor, Any, AuxLosses]:
        """``cache``: the mixer's; ``ffn_cache``: the FFN's, for FFNs with state (None for most);
        ``documents``: (B, T) packed-document ids for the mixer (see ``Mixer.supports_documents``);
        ``cross_layer``: the model's dict for this forward call, handed to mixers that connect layers
        (``Mixer.uses_cross_layer``, e.g. RWKV-7's value residual)."""
        return self._forward(x, cache, ffn_cache, documents, cross_layer)

    def _ffn(self, h, ffn_cache):
        return self.ffn(h) if ffn_cache is None else self.ffn(h, ffn_cache)

    def _mix(self, h, cache, documents, cross_layer):
        kwargs = {} if documents is None else {"documents": documents}
        if self.mixer.uses_cross_layer:
            kwargs["cross_layer"] = cross_layer
        return self.mixer(h, cache, **kwargs)

    def _pre(self, x, cache, ffn_cache, documents=None, cross_layer=None):
        h, cache = self._mix(self.mixer_norm(x), cache, documents, cross_layer)
        x = x + h
        f, aux = self._ffn(self.ffn_norm(x), ffn_cache)
        return x + f, cache, aux

    def _post(self, x, cache, ffn_cache, documents=None, cross_layer=None):
        h, cache = self._mix(x, cache, documents, cross_layer)
        x = self.mixer_norm(x + h)
        f, aux = self._ffn(x, ffn_cache)
        return self.ffn_norm(x + f), cache, aux

    def _sandwich(self, x, cache, ffn_cache, documents=None, cross_layer=None):
        h, cache = self._mix(self.mixer_norm(x), cache, documents, cross_layer)
        x = x + self.mixer_post_norm(h)
        f, aux = self._ffn(self.ffn_norm(x), ffn_cache)
        return x + self.ffn_post_norm(f), cache, aux

    def _parallel(self, x, cache, ffn_cache, documents=None, cross_layer=None):
        normed = self.mixer_norm(x)
        h, cache = self._mix(normed, cache, documents, cross_layer)
        f, aux = self._ffn(normed, ffn_cache)
        return x + h + f, cache, aux

    def norms(self) -> list[nn.Module]:
        return [n for n in (self.mixer_norm, self.ffn_norm, self.mixer_post_norm, self.ffn_post_norm) if n is not None]

    def reset_parameters(self) -> None:
        self.mixer.reset_parameters()
        self.ffn.reset_parameters()
        for norm in self.norms():
            if hasattr(norm, "reset_parameters"):
                norm.reset_parameters()
