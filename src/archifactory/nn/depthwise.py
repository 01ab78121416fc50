"""Causal depthwise convolution over time in the (B, T, C) layout, with a hand-written backward.

The short convolutions of DeltaNet / Gated DeltaNet (fla's ``ShortConvolution``) and Mamba-2 (the conv over
``(x, B, C)``) are depthwise: channel ``c`` of the output is the cross-correlation of channel ``c`` of the
input with its own ``K`` taps. ``F.conv1d`` with ``groups=C`` computes it in the (B, C, T) layout, so the
(B, T, C) activations are transposed in and out, and on CPU its depthwise backward is slow (profile of a
Gated DeltaNet layer, fp32, one thread: conv backward + forward + transposes ~18% of the layer's forward
and backward). Here each tap is one fused multiply-add over the (B, T, C) tensor and the backward is
written out (``K`` multiply-adds for the input gradient, ``K`` products summed over (B, T) for the taps).
The result is the same function; ``tests/test_depthwise_conv.py`` holds it to ``F.conv1d`` in values and
gradients.
"""

from __future__ import annotations

import torch
from torch.overrides import handle_torch_function, has_torch_function_variadic


class _CausalDepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, padded, weight, bias):
        K = weight.shape[0]
        T = padded.shape[1] - K + 1
        first = padded[:, :T]
        y = first * weight[0] if bias is None else torch.addcmul(bias, first, weight[0])
        for j in range(1, K):
            y.addcmul_(padded[:, j : j + T], weight[j])
        ctx.save_for_backward(padded, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        padded, weight = ctx.saved_tensors
        K, T = weight.shape[0], dy.shape[1]
        d_padded = torch.zeros_like(padded)
        d_weight = torch.empty_like(weight)
        for j in range(K):
            d_padded[:, j : j + T].addcmul_(dy, weight[j])
            d_weight[j] = (dy * padded[:, j : j + T]).sum((0, 1))
        return d_padded, d_weight, dy.sum((0, 1)) if ctx.has_bias else None


def causal_depthwise_conv(padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[:, t, c] = sum_j padded[:, t + j, c] * weight[j, c] (+ bias[c])``.

    padded: (B, K - 1 + T, C), the input with its ``K - 1`` earlier steps (zeros or a cache) in front;
    weight: (K, C), tap ``j`` looking ``K - 1 - j`` steps back (``nn.Conv1d``'s depthwise weight
    ``(C, 1, K)`` is ``weight.t()``); bias: (C,) or ``None``. Returns (B, T, C) in ``padded``'s dtype,
    accumulated in at least fp32 (a bf16 input under autocast is summed in fp32, as ``conv1d`` does).

    Raises:
        ValueError: mismatched channels or fewer steps than taps.
    """
    if has_torch_function_variadic(padded, weight, bias):  # lets a TorchFunctionMode see the call (FLOP counts)
        return handle_torch_function(causal_depthwise_conv, (padded, weight, bias), padded, weight, bias)
    K, C = weight.shape
    if padded.dim() != 3 or padded.shape[2] != C or padded.shape[1] < K:
        raise ValueError(
            f"causal_depthwise_conv: padded must be (B, K - 1 + T, C) with C = {C} channels and at least "
            f"K = {K} steps; got {tuple(padded.shape)}"
        )
    acc = torch.promote_types(padded.dtype, torch.float32)
    with torch.autocast(padded.device.type, enabled=False):
        y = _CausalDepthwiseConv.apply(
            padded.to(acc), weight.to(acc), None if bias is None else bias.to(acc)
        )
    return y.to(padded.dtype)
