"""Classic recurrent mixers, as baselines: LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of
Gers, Schmidhuber & Cummins 2000), GRU (Cho et al. 2014) and the Elman RNN (Elman 1990).

Each wraps torch's own fused module (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``, which run cuDNN on CUDA and
oneDNN or a compiled loop on CPU) with ``batch_first=True``: the input is ``(B, T, D)`` and the time axis
is dim 1. Fed (B, T, D) without ``batch_first=True``, those modules silently recur over the *batch* axis
instead, a bug seen in the wild (see the tests). The recurrence reads ``d_model`` channels and keeps
``hidden`` channels per layer; an output projection writes ``hidden -> d_model`` into the residual stream.

With PyTorch's gate layout, the equations per layer are (sigma = sigmoid, * = elementwise):

    LSTM: i, f, g, o = sigma(W_i x + U_i h + b_i), sigma(...f...), tanh(...g...), sigma(...o...)
          c_t = f * c_{t-1} + i * g,  h_t = o * tanh(c_t)
    GRU:  r, z = sigma(W_r x + b_ir + U_r h + b_hr), sigma(...z...)
          n = tanh(W_n x + b_in + r * (U_n h + b_hn)),  h_t = (1 - z) * n + z * h_{t-1}
          (the reset gate multiplies U_n h after the matrix product, as cuDNN does; Cho et al. put it before)
    RNN:  h_t = tanh(W x + b_i + U h_{t-1} + b_h)

The cache is the last hidden state (and the LSTM's cell state), ``(n_layers, B, hidden)`` each: the
fused module takes it as its initial state, so chunked or token-by-token calls continue the same recurrence.

Precision: the recurrence runs in at least fp32 with autocast off, and the cache keeps its state in fp32,
whatever the model's dtype. A state carried over thousands of steps in bf16 drifts from the full forward,
and oneDNN has no bf16 LSTM on a CPU without AVX512-BF16 (autocast would fail there with "could not create
a primitive descriptor for the LSTM forward propagation primitive"). The output projection follows the
caller's dtype and autocast like any other linear layer.

Init: input weights ``N(0, init.std)``, recurrent weights orthogonal per gate (Saxe et al. 2014) so that
the recurrence neither shrinks nor blows up the state at the start, zero biases except the LSTM forget
gate's, set to 1 so the cell remembers by default (Gers et al. 2000; Jozefowicz et al. 2015).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from archifactory.config import MAX_COUNT, BuildContext
from archifactory.mixers.base import Mixer, MixerConfig, compute_dtype
from archifactory.nn.init import init_linear, normal_
from archifactory.nn.roles import MATRIX, VECTOR
from archifactory.registry import register_mixer


class RecurrentConfig(MixerConfig):
    hidden: int | None = Field(None, ge=1)
    """Recurrent state channels per layer; ``None`` means ``d_model``."""
    n_layers: int = Field(1, ge=1, le=MAX_COUNT)
    """Stacked recurrent layers inside this one mixer (each feeds its hidden states to the next)."""
    bias: bool = True

    def build(self, ctx: BuildContext) -> "RecurrentMixer":
        return RecurrentMixer(self, ctx)

    def module_kwargs(self) -> dict:
        return {}

    @classmethod
    def contract_examples(cls, d_model: int) -> list["RecurrentConfig"]:
        return [cls(), cls(hidden=24, n_layers=2, bias=False)]


@register_mixer
class LSTMConfig(RecurrentConfig):
    kind: Literal["lstm"] = "lstm"


@register_mixer
class GRUConfig(RecurrentConfig):
    kind: Literal["gru"] = "gru"


@register_mixer
class RNNConfig(RecurrentConfig):
    """Elman RNN."""

    kind: Literal["rnn"] = "rnn"
    nonlinearity: Literal["tanh", "relu"] = "tanh"

    def module_kwargs(self) -> dict:
        return {"nonlinearity": self.nonlinearity}

    @classmethod
    def contract_examples(cls, d_model: int) -> list["RNNConfig"]:
        return [*super().contract_examples(d_model), cls(nonlinearity="relu")]


MODULES = {"lstm": (nn.LSTM, 4), "gru": (nn.GRU, 3), "rnn": (nn.RNN, 1)}  # torch module, gates per layer


@dataclasses.dataclass
class RecurrentState:
    """Last hidden state ``h`` and, for the LSTM, cell state ``c``: ``(n_layers, B, hidden)`` each."""

    h: torch.Tensor
    c: torch.Tensor | None = None


class RecurrentMixer(Mixer):
    def __init__(self, cfg: RecurrentConfig, ctx: BuildContext) -> None:
        super().__init__(ctx)
        module, self.gates = MODULES[cfg.kind]
        self.kind, self.hidden, self.n_layers = cfg.kind, cfg.hidden or ctx.d_model, cfg.n_layers
        self.rnn = module(
            ctx.d_model, self.hidden, num_layers=cfg.n_layers, bias=cfg.bias, batch_first=True, **cfg.module_kwargs()
        )
        self.out_proj = nn.Linear(self.hidden, ctx.d_model, bias=False)
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)
        self.reset_parameters()

    def param_roles(self):
        # torch's LSTM/GRU/RNN: input-to-hidden and hidden-to-hidden matrices (gate blocks stacked), and
        # biases. The output projection is an nn.Linear matrix.
        roles = {}
        for layer in range(self.n_layers):
            roles[f"rnn.weight_ih_l{layer}"] = roles[f"rnn.weight_hh_l{layer}"] = MATRIX
            if self.rnn.bias:
                roles[f"rnn.bias_ih_l{layer}"] = roles[f"rnn.bias_hh_l{layer}"] = VECTOR
        return roles

    def reset_parameters(self) -> None:
        H = self.hidden
        for layer in range(self.n_layers):
            normal_(getattr(self.rnn, f"weight_ih_l{layer}"), self.std)
            recurrent = getattr(self.rnn, f"weight_hh_l{layer}")  # (gates * H, H), gate blocks stacked
            for gate in range(self.gates):
                nn.init.orthogonal_(recurrent[gate * H : (gate + 1) * H])
            if self.rnn.bias:
                nn.init.zeros_(getattr(self.rnn, f"bias_ih_l{layer}"))
                nn.init.zeros_(getattr(self.rnn, f"bias_hh_l{layer}"))
                if self.kind == "lstm":  # gate order i, f, g, o: the second block is the forget gate
                    nn.init.ones_(getattr(self.rnn, f"bias_ih_l{layer}")[H : 2 * H])
        init_linear(self.out_proj, self.out_std)

    def reorder_cache(self, cache: RecurrentState, index: torch.Tensor) -> RecurrentState:
        """torch's RNN states are ``(n_layers, B, hidden)``: rows are taken along dimension 1."""
        index = index.to(cache.h.device)
        return dataclasses.replace(cache, h=cache.h.index_select(1, index),
                                   c=None if cache.c is None else cache.c.index_select(1, index))

    def init_cache(self, batch_size: int, device, dtype) -> RecurrentState:
        zeros = torch.zeros(self.n_layers, batch_size, self.hidden, device=device, dtype=compute_dtype(dtype))
        return RecurrentState(h=zeros, c=zeros.clone() if self.kind == "lstm" else None)

    def forward(
        self, x: torch.Tensor, cache: RecurrentState | None = None
    ) -> tuple[torch.Tensor, RecurrentState | None]:
        acc = compute_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            # x: (B, T, D) -> hidden states of the last layer (B, T, hidden), in acc
            state = None
            if cache is not None:
                state = (cache.h.to(acc), cache.c.to(acc)) if self.kind == "lstm" else cache.h.to(acc)
            h, state = self._recur(x.to(acc), state, acc)
        if cache is not None:
            cache.h, cache.c = state if self.kind == "lstm" else (state, None)
        return self.out_proj(h.to(x.dtype)), cache

    def _recur(self, x: torch.Tensor, state, acc: torch.dtype):
        """The fused module on ``x`` in ``acc``; weights stored in a lower precision (a model cast to bf16)
        are upcast for the call, and gradients flow back to them."""
        if all(p.dtype == acc for p in self.rnn.parameters()):
            return self.rnn(x, state)
        weights = {name: p.to(acc) for name, p in self.rnn.named_parameters()}
        return torch.func.functional_call(self.rnn, weights, (x, state))

    def flops_per_token(self, seq_len: int) -> int:
        # Matrix products only (2 FLOPs per multiply-add): each layer's input and recurrent weights for every
        # gate, then the output projection. Gate nonlinearities and products are O(hidden) and left out.
        total = 0
        for layer in range(self.n_layers):
            fan_in = self.d_model if layer == 0 else self.hidden
            total += 2 * self.gates * self.hidden * (fan_in + self.hidden)
        return total + 2 * self.hidden * self.d_model

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        tensors = 2 if self.kind == "lstm" else 1
        return tensors * self.n_layers * self.hidden * torch.finfo(compute_dtype(dtype)).bits // 8

    def kernel_path(self) -> str:
        return f"torch.nn.{type(self.rnn).__name__}"
