"""causal_depthwise_conv (the short convs of DeltaNet, Gated DeltaNet, Mamba-2, Hymba and Zamba2) against
torch's own F.conv1d with groups=C, in values and in every gradient, and against finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archifactory.nn.depthwise import causal_depthwise_conv


def conv1d_reference(padded, weight, bias):
    """(B, K-1+T, C) -> (B, T, C) through nn.Conv1d's depthwise layout (C, 1, K)."""
    return F.conv1d(padded.transpose(1, 2), weight.t()[:, None, :], bias, groups=weight.shape[1]).transpose(1, 2)


@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_conv1d_in_values_and_gradients(K, with_bias):
    torch.manual_seed(0)
    B, T, C = 3, 11, 7
    leaves = [torch.randn(B, K - 1 + T, C), torch.randn(K, C)] + ([torch.randn(C)] if with_bias else [])
    probe = torch.randn(B, T, C)

    def run(fn):
        args = [t.clone().requires_grad_() for t in leaves]
        y = fn(*args) if with_bias else fn(*args, None)
        (y * probe).sum().backward()
        return [y.detach()] + [a.grad for a in args]

    for got, want in zip(run(causal_depthwise_conv), run(conv1d_reference)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_match_finite_differences():
    args = [torch.randn(2, 3 + 5, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64),
            torch.randn(4, dtype=torch.float64)]
    assert torch.autograd.gradcheck(causal_depthwise_conv, [a.requires_grad_() for a in args])


def test_strided_weight_and_bf16_input():
    """A transposed (non-contiguous) weight, as Mamba-2 passes its nn.Conv1d weight, and a bf16 input
    summed in fp32 and returned in bf16."""
    padded, weight = torch.randn(2, 3 + 6, 5), torch.randn(5, 4)  # weight given as (C, K), passed as .t()
    want = conv1d_reference(padded, weight.t(), None)
    torch.testing.assert_close(causal_depthwise_conv(padded, weight.t()), want)
    got = causal_depthwise_conv(padded.bfloat16(), weight.t())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), conv1d_reference(padded.bfloat16().float(), weight.t(), None),
                               rtol=1e-2, atol=1e-2)


def test_bad_shapes_name_what_is_expected():
    with pytest.raises(ValueError, match=r"\(B, K - 1 \+ T, C\) with C = 5"):
        causal_depthwise_conv(torch.randn(2, 9, 4), torch.randn(3, 5))
