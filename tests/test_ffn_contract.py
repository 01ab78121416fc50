"""The contract every registered FFN keeps. An FFN added to the registry is tested here by registering it
(with ``contract_examples``): nothing to add to this file.

- causality: outputs up to t do not depend on inputs after t (an FFN with state, such as RWKV's token
  shift, may read earlier tokens, never later ones);
- batch independence: sequences in a batch do not mix;
- full-sequence forward == chunked and token-by-token forward with the FFN's cache (``init_cache``;
  ``None`` for a position-wise FFN), fp64 1e-10;
- every parameter gets a gradient; bf16 autocast runs and stays close to fp32;
- ``active_params() <= `` the parameter count, equal unless some parameters sit idle per token (MoE).

``test_the_contract_catches_an_ffn_that_reads_the_next_token`` registers a deliberately leaky FFN and
checks that the causality check rejects it.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from torch import nn

from archifactory.config import BuildContext
from archifactory.ffn.base import FFN, FFNConfig
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import RMSNormConfig
from archifactory.nn.positions import NoPositionConfig
from archifactory.registry import FFNS

D, B, T = 32, 2, 11


def contract_cases() -> list:
    """Every registered FFN with a branch (``none``, the absent FFN, has its own test below)."""
    return [pytest.param(cfg, id=f"{kind}-{i}") for kind, cls in FFNS.items() if cls.has_branch
            for i, cfg in enumerate(cls.contract_examples(D))]


CASES = contract_cases()


def build(cfg: FFNConfig, dtype=torch.float64) -> FFN:
    ctx = BuildContext(
        d_model=D, n_layers=2, layer_idx=0, max_seq_len=64, norm=RMSNormConfig(), position=NoPositionConfig(),
        init=InitConfig(std=0.2),
    )
    cfg.check(ctx)
    ffn = cfg.build(ctx).to(dtype)
    with torch.no_grad():  # random vector parameters too, so that every parameter matters to the output
        for p in ffn.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return ffn


def run_chunks(ffn: FFN, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Feed ``x`` in chunks of ``sizes`` tokens, carrying the FFN's cache as the model does."""
    cache = ffn.init_cache(x.shape[0], x.device, x.dtype)
    outs, start = [], 0
    for size in sizes:
        part = x[:, start : start + size]
        outs.append((ffn(part) if cache is None else ffn(part, cache))[0])
        start += size
    assert start == x.shape[1]
    return torch.cat(outs, dim=1)


# ------------------------------------------------------------------------------------ the checks


@torch.no_grad()
def check_causal(cfg: FFNConfig) -> None:
    ffn = build(cfg)
    x = torch.randn(B, T, D, dtype=torch.float64)
    y = ffn(x)[0]
    for t in range(T - 1):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
        y2 = ffn(x2)[0]
        # fp64, 1e-12: an MoE groups tokens by expert, so other tokens may change the matmul blocking
        changed = float((y2[:, : t + 1] - y[:, : t + 1]).abs().max())
        assert changed <= 1e-12, f"output {t} changed (by {changed:.2e}) when inputs after {t} changed"
        assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-6, "later outputs ignore later inputs"


def check_batch_rows_independent(cfg: FFNConfig) -> None:
    ffn = build(cfg)
    x = torch.randn(3, T, D, dtype=torch.float64)
    y = ffn(x)[0]
    for b in range(3):
        torch.testing.assert_close(ffn(x[b : b + 1])[0][0], y[b], rtol=0, atol=1e-12)
        x2 = x.clone()
        others = [i for i in range(3) if i != b]
        x2[others] = torch.randn_like(x2[others])
        torch.testing.assert_close(ffn(x2)[0][b], y[b], rtol=0, atol=1e-12)


def check_full_equals_cached(cfg: FFNConfig) -> None:
    ffn = build(cfg)
    x = torch.randn(B, T, D, dtype=torch.float64)
    full = ffn(x)[0]
    torch.testing.assert_close(run_chunks(ffn, x, [1] * T), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(run_chunks(ffn, x, [4, 1, 1, 5]), full, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------ the tests


def test_every_ffn_has_examples():
    assert len(FFNS) >= 1
    for kind, cls in FFNS.items():
        assert cls.contract_examples(D), f"{kind} has no contract examples"


@pytest.mark.parametrize("cfg", CASES)
def test_causal(cfg):
    check_causal(cfg)


@pytest.mark.parametrize("cfg", CASES)
def test_batch_rows_independent(cfg):
    check_batch_rows_independent(cfg)


@pytest.mark.parametrize("cfg", CASES)
def test_full_equals_cached(cfg):
    check_full_equals_cached(cfg)


@pytest.mark.parametrize("cfg", CASES)
def test_gradients_reach_every_parameter(cfg):
    ffn = build(cfg, torch.float32)
    x = torch.randn(B, T, D, requires_grad=True)
    y, aux = ffn(x)
    ((y * torch.randn_like(y)).sum() + sum(aux.values(), torch.zeros(()))).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in ffn.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("cfg", CASES)
def test_bf16_autocast(cfg):
    ffn = build(cfg, torch.float32)
    x = torch.randn(B, T, D)
    ref = ffn(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ffn(x)[0]
        y.float().square().mean().backward()
    assert torch.isfinite(y).all()
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 output deviates from fp32 by {rel:.3f}"


@pytest.mark.parametrize("cfg", CASES)
def test_active_params_at_most_params(cfg):
    ffn = build(cfg)
    total = sum(p.numel() for p in ffn.parameters())
    assert 0 < ffn.active_params() <= total
    assert ffn.flops_per_token() > 0


# --------------------------------------------------------------------- the contract catches a leak


class LeakyFFNConfig(FFNConfig):
    """Deliberately wrong: y_t = W x_{t+1}, a stateful-looking FFN that reads the next token."""

    kind: Literal["leaky_next_token"] = "leaky_next_token"

    def build(self, ctx: BuildContext) -> "LeakyFFN":
        return LeakyFFN(ctx.d_model)


class LeakyFFN(FFN):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.proj.weight, std=0.2)

    def forward(self, x: torch.Tensor):
        following = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)  # x_{t+1}: the leak
        return self.proj(x + following), {}

    def flops_per_token(self) -> int:
        return 2 * self.proj.in_features * self.proj.out_features


def test_the_contract_catches_an_ffn_that_reads_the_next_token(monkeypatch):
    monkeypatch.setitem(FFNS._classes, "leaky_next_token", LeakyFFNConfig)  # registered for this test only
    leaky = [case.values[0] for case in contract_cases() if case.values[0].kind == "leaky_next_token"]
    assert len(leaky) == 1  # registering it is enough to put it under the contract
    with pytest.raises(AssertionError, match=r"output 0 changed \(by .*\) when inputs after 0 changed"):
        check_causal(leaky[0])
    with pytest.raises(AssertionError):
        check_full_equals_cached(leaky[0])
    check_batch_rows_independent(leaky[0])  # (it does keep rows apart: the other checks are not blanket failures)


def test_no_ffn_makes_a_mixer_only_block():
    """``ffn: {kind: none}``: the block is x + mixer(norm(x)) exactly (Zoology's identity state mixer),
    with no FFN norm or parameter left unused."""
    from archifactory.model.block import Block
    from archifactory.model.config import ModelConfig

    cfg = ModelConfig(vocab_size=16, d_model=D, n_layers=1, mixer={"kind": "attention", "n_heads": 2},
                      ffn={"kind": "none"})
    torch.manual_seed(0)
    block = Block(cfg.layer_configs()[0], cfg.build_context(0), "pre").double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    y, _, aux = block(x)
    mixed, _ = block.mixer(block.mixer_norm(x))
    torch.testing.assert_close(y, x + mixed, rtol=0, atol=0)
    assert not aux and not any(n.startswith(("ffn", "ffn_norm")) for n, _ in block.named_parameters())
