"""An independent count of a module's forward FLOPs, for the component contracts: PyTorch's
``FlopCounterMode`` (it counts matmul-like ops: mm, bmm, addmm, convolution, ...), with two additions.

- ``F.scaled_dot_product_attention`` is counted as ``2 * B * H * pairs * (qk_dim + v_dim)`` where ``pairs``
  is the number of (query, key) pairs its mask allows (``is_causal``, a boolean mask, or the finite
  entries of an additive one), whichever backend runs it. This is the convention of the analytic counts
  (useful work; block-sparse kernels such as FlashAttention skip masked blocks), and it covers the CPU
  flash kernel that ``FlopCounterMode`` has no formula for, and the math kernel that it counts at T^2.
- :func:`archifactory.nn.depthwise.causal_depthwise_conv` (elementwise multiply-adds inside, which
  ``FlopCounterMode`` does not see): ``2 * B * T * C * K``, what it counts for the same depthwise
  ``F.conv1d`` (``groups=C``).
- ``torch.linalg.solve_triangular`` with an n x n matrix and k right-hand columns: ``n^2 k`` FLOPs
  (n(n-1)/2 multiply-adds and n divisions per column).

Run modules in float64: recurrent layers (``nn.LSTM``/``nn.GRU``) then decompose into mm ops that the
counter sees, instead of oneDNN's fused fp32 kernel that it does not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from archifactory.nn.depthwise import causal_depthwise_conv


def attention_pairs(query, key, is_causal: bool = False, attn_mask=None) -> float:
    """Mean number of (query, key) pairs per (batch, head) that the mask allows."""
    *lead, Tq, _ = query.shape
    Tk = key.shape[-2]
    if attn_mask is not None:
        allowed = attn_mask if attn_mask.dtype == torch.bool else torch.isfinite(attn_mask)
        shape = torch.broadcast_shapes(allowed.shape, (*lead, Tq, Tk))
        return float(allowed.expand(shape).sum()) / math.prod(shape[:-2])
    if is_causal:  # top-left aligned, as torch defines it: query i sees keys 0..i
        return float(sum(min(Tk, i + 1) for i in range(Tq)))
    return float(Tq * Tk)


class _CountAttention(TorchFunctionMode):
    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter, self.counted_inside, self.useful = counter, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is causal_depthwise_conv:
            out = func(*args, **kwargs)
            self.useful += 2 * out.numel() * args[1].shape[0]  # (B, T, C) outputs, K taps each
            return out
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        bound = {**dict(zip(names, args)), **kwargs}
        q, k, v = bound["query"], bound["key"], bound["value"]
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        self.counted_inside += self.counter.get_total_flops() - before
        pairs = attention_pairs(q, k, bound.get("is_causal", False), bound.get("attn_mask"))
        batch_heads = math.prod(q.shape[:-2])
        self.useful += int(2 * batch_heads * pairs * (q.shape[-1] + v.shape[-1]))
        return out


def _solve_triangular_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    n, k = a_shape[-1], b_shape[-1]
    return math.prod(b_shape[:-2]) * n * n * k


def measured_flops(fn, *args, **kwargs) -> int:
    """Forward FLOPs of ``fn(*args, **kwargs)`` by the rules above."""
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.linalg_solve_triangular: _solve_triangular_flops})
    with counter:
        attention = _CountAttention(counter)
        with attention:
            fn(*args, **kwargs)
    return counter.get_total_flops() - attention.counted_inside + attention.useful
