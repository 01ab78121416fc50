"""Contracts for every registered component (mixers, FFNs, norms, positional encodings). A component
added to a registry is tested here by registering it (with ``contract_examples``); nothing to add here.

For every component:
- the same seed gives a bitwise identical ``state_dict``;
- ``reset_parameters()`` re-initialises every parameter and persistent buffer: after they are all
  overwritten with NaN, it restores the values it draws from the same RNG state (a parameter that only
  ``__init__`` sets, or one left as ``torch.empty``, stays NaN and fails);
- the analytic ``flops_per_token`` equals an independent count, ``FlopCounterMode`` with the rules of
  ``tests/flop_reference.py``, up to 2 FLOPs per token. Both sides count matmul-like work (linear
  layers, batched products, convolutions, triangular solves, attention over the pairs its mask allows)
  and neither counts elementwise work (activations, norms, softmax, gates, decays, RoPE), so the only
  slack is the integer rounding of per-token means (``int()`` of e.g. (T + 1) / 2 keys, once per term).
  Norms and positional encodings are elementwise or lookups: their analytic count is 0 (the model's
  count leaves them out) and the independent count must agree. Relative encodings are counted inside
  the attention mixers, which are checked under every registered one.

Norms: output dtype and shape equal the input's (fp64, fp32, bf16; (B, T, D) and per-head
(B, H, T, hd)), tokens are normalised independently, bf16 autocast stays close to fp32.
Positions: absolute tables give (T, D) in the module's dtype, a chunk at an offset (cached decoding)
equals the same rows of the full sequence, the table covers ``max_seq_len`` positions; relative
encodings keep q/k dtype and shape, rotate (or bias) a chunk at an offset exactly as the full sequence;
and every registered encoding changes what the model computes.
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from flop_reference import measured_flops
from torch import nn

import archifactory as af
from archifactory.config import BuildContext
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import RMSNormConfig
from archifactory.nn.positions import ALiBi, NoPositionConfig, Rotary
from archifactory.registry import FFNS, MIXERS, NORMS, POSITIONS

D, HEAD_DIM, N_HEADS, MAX_LEN = 32, 8, 4, 64
FLOP_LENGTHS = (1, 13)  # one token; a length that leaves the examples' chunked forms a padded last chunk


def context(position=None) -> BuildContext:
    return BuildContext(
        d_model=D, n_layers=2, layer_idx=0, max_seq_len=MAX_LEN, norm=RMSNormConfig(),
        position=position if position is not None else NoPositionConfig(), init=InitConfig(std=0.2),
    )


def relative_positions() -> dict[str, object]:
    """The first example of every registered position kind that gives attention a relative encoding,
    plus NoPE: the encodings position-using mixers are checked under."""
    found = {kind: cls.contract_examples()[0] for kind, cls in POSITIONS.items()}
    chosen = {kind: cfg for kind, cfg in found.items() if cfg.build_relative(HEAD_DIM, N_HEADS) is not None}
    return {**chosen, "none": NoPositionConfig()}


# ---------------------------------------------------------------------------------- the components


class Case:
    """One component to build: ``make()`` returns the module; ``flops(module, T)`` returns (analytic,
    measured) FLOPs per token over T tokens."""

    def __init__(self, name: str, make: Callable[[], nn.Module], flops: Callable | None) -> None:
        self.name, self.make, self.flops = name, make, flops

    def __repr__(self) -> str:
        return self.name


def _mixer_flops(module, T):
    x = torch.randn(1, T, D, dtype=torch.float64)
    return module.flops_per_token(T), measured_flops(module, x) / T


def _ffn_flops(module, T):
    x = torch.randn(1, T, D, dtype=torch.float64)
    return module.flops_per_token(), measured_flops(module, x) / T


def _norm_flops(module, T):
    return 0, measured_flops(module, torch.randn(1, T, D, dtype=torch.float64)) / T


def _absolute_flops(module, T):
    return 0, measured_flops(module, torch.arange(T)) / T


def component_cases() -> list[Case]:
    cases = []
    for kind, cls in MIXERS.items():
        for i, cfg in enumerate(cls.contract_examples(D)):
            for pos_kind, pos in (relative_positions() if cls.uses_positions else {"none": NoPositionConfig()}).items():
                cases.append(Case(f"mixer-{kind}-{i}-{pos_kind}", lambda cfg=cfg, pos=pos: cfg.build(context(pos)), _mixer_flops))
    for kind, cls in FFNS.items():
        for i, cfg in enumerate(cls.contract_examples(D)):
            cases.append(Case(f"ffn-{kind}-{i}", lambda cfg=cfg: cfg.build(context()), _ffn_flops))
    for kind, cls in NORMS.items():
        for i, cfg in enumerate(cls.contract_examples()):
            cases.append(Case(f"norm-{kind}-{i}", lambda cfg=cfg: cfg.build_for(D), _norm_flops))
    for kind, cls in POSITIONS.items():
        for i, cfg in enumerate(cls.contract_examples()):
            if cfg.build_absolute(D, MAX_LEN, 0.02) is not None:
                cases.append(Case(f"position-{kind}-{i}-absolute", lambda cfg=cfg: cfg.build_absolute(D, MAX_LEN, 0.02),
                                  _absolute_flops))
            if cfg.build_relative(HEAD_DIM, N_HEADS) is not None:  # FLOPs: inside the attention mixers
                cases.append(Case(f"position-{kind}-{i}-relative", lambda cfg=cfg: cfg.build_relative(HEAD_DIM, N_HEADS), None))
    return cases


CASES = component_cases()


def seeded(case: Case, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return case.make().double()


def test_every_registry_is_covered():
    names = [c.name for c in CASES]
    for prefix, registry in (("mixer", MIXERS), ("ffn", FFNS), ("norm", NORMS), ("position", POSITIONS)):
        for kind in registry.kinds():
            if prefix == "position" and kind == "none":
                continue  # NoPE builds no module
            assert any(n.startswith(f"{prefix}-{kind}-") for n in names), f"{prefix} {kind} has no contract case"


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_same_seed_same_state_dict(case):
    a, b = seeded(case, 0).state_dict(), seeded(case, 0).state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{case.name}: {name} differs between two builds with seed 0"


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_reset_parameters_restores_every_parameter(case):
    module = seeded(case, 0)
    state = {n: t for n, t in module.state_dict().items() if t.is_floating_point()}
    if not state:
        assert not list(module.parameters()), f"{case.name} has parameters but no floating state"
        return
    assert hasattr(module, "reset_parameters"), f"{case.name} ({type(module).__name__}) has no reset_parameters()"
    torch.manual_seed(1)
    module.reset_parameters()
    expected = {n: t.clone() for n, t in module.state_dict().items() if t.is_floating_point()}
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.fill_(float("nan"))
    torch.manual_seed(1)
    module.reset_parameters()
    after = module.state_dict()
    for name, value in expected.items():
        assert not after[name].isnan().any(), f"{case.name}: reset_parameters() leaves {name} untouched"
        assert torch.equal(after[name], value), f"{case.name}: reset_parameters() does not restore {name}"


@pytest.mark.parametrize("case", [c for c in CASES if c.flops is not None], ids=repr)
def test_flops_per_token_match_flop_counter(case):
    module = seeded(case, 0)
    for T in FLOP_LENGTHS:
        analytic, measured = case.flops(module, T)
        assert abs(analytic - measured) <= 2, (
            f"{case.name} at T={T}: flops_per_token = {analytic}, FlopCounterMode counts {measured:.1f} per token"
        )


def test_model_flops_per_token_match_flop_counter():
    """The model's count is the sum of its components' plus the head: checked on a hybrid with MoE."""
    config = af.load_model_config({
        "vocab_size": 50, "d_model": D, "n_layers": 3, "max_seq_len": MAX_LEN, "mixer": {"kind": "attention", "n_heads": 4},
        "ffn": {"kind": "swiglu", "hidden": 24}, "position": {"kind": "learned"}, "norm": "layernorm",
        "layer_overrides": [{"layers": [1], "mixer": {"kind": "mamba2", "head_dim": 8, "d_state": 8, "chunk_size": 4},
                             "ffn": {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 8}}],
    })
    model = af.CausalLM(config).double()
    for T in FLOP_LENGTHS:
        measured = measured_flops(model, torch.randint(0, 50, (1, T))) / T
        assert abs(model.flops_per_token(T) - measured) <= 2 * config.n_layers, (T, model.flops_per_token(T), measured)


# ------------------------------------------------------------------------------------------------ norms

NORM_CASES = [pytest.param(cfg, id=f"{kind}-{i}") for kind, cls in NORMS.items() for i, cfg in enumerate(cls.contract_examples())]


@pytest.mark.parametrize("cfg", NORM_CASES)
@pytest.mark.parametrize("shape", [(2, 5, D), (2, 3, 5, D)], ids=["BTD", "BHTd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_norm_keeps_dtype_and_shape_and_tokens_apart(cfg, shape, dtype):
    torch.manual_seed(0)
    norm = cfg.build_for(D).to(dtype)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = (3 * torch.randn(shape, dtype=torch.float64) + 1).to(dtype)
    y = norm(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    x2 = x.clone()
    x2[..., 2, :] = torch.randn_like(x2[..., 2, :])  # another token: normalisation is per token
    y2 = norm(x2)
    keep = [i for i in range(shape[-2]) if i != 2]
    assert torch.equal(y2[..., keep, :], y[..., keep, :])


@pytest.mark.parametrize("cfg", NORM_CASES)
def test_norm_bf16_autocast_close_to_fp32(cfg):
    torch.manual_seed(0)
    norm = cfg.build_for(D)
    x = 3 * torch.randn(2, 5, D) + 1
    ref = norm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x.bfloat16())
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < 0.02, f"bf16 deviates from fp32 by {rel:.3f}"


# -------------------------------------------------------------------------------------------- positions

POSITION_EXAMPLES = [(f"{kind}-{i}", cfg) for kind, cls in POSITIONS.items() for i, cfg in enumerate(cls.contract_examples())]
ABSOLUTE_CASES = [pytest.param(cfg, id=name) for name, cfg in POSITION_EXAMPLES if cfg.build_absolute(D, MAX_LEN, 0.02) is not None]
RELATIVE_CASES = [pytest.param(cfg, id=name) for name, cfg in POSITION_EXAMPLES if cfg.build_relative(HEAD_DIM, N_HEADS) is not None]
POSITION_CASES = [pytest.param(cfg, id=name) for name, cfg in POSITION_EXAMPLES if cfg.kind != "none"]


@pytest.mark.parametrize("cfg", ABSOLUTE_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_absolute_positions_dtype_shape_and_cached_rows(cfg, dtype):
    module = cfg.build_absolute(D, MAX_LEN, 0.02).to(dtype)
    T = 12
    full = module(torch.arange(T))
    assert full.shape == (T, D) and full.dtype == dtype
    assert len({tuple(row.tolist()) for row in full}) == T, "two positions get the same vector"
    for start, n in ((0, 1), (5, 1), (3, 4), (11, 1)):  # a chunk at an offset, as in cached decoding
        assert torch.equal(module(torch.arange(start, start + n)), full[start : start + n])
    assert module(torch.arange(MAX_LEN)).shape == (MAX_LEN, D)  # the table covers max_seq_len (the model checks the range)


@pytest.mark.parametrize("cfg", RELATIVE_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_relative_positions_dtype_shape_and_cached_rows(cfg, dtype):
    module = cfg.build_relative(HEAD_DIM, N_HEADS)
    T = 12
    torch.manual_seed(0)
    q = torch.randn(2, N_HEADS, T, HEAD_DIM, dtype=torch.float64).to(dtype)
    k = torch.randn(2, 2, T, HEAD_DIM, dtype=torch.float64).to(dtype)  # grouped keys: fewer heads
    positions = torch.arange(T)
    if isinstance(module, Rotary):
        q_full, k_full = module(q, k, positions)
        assert q_full.dtype == k_full.dtype == dtype and q_full.shape == q.shape and k_full.shape == k.shape
        for start, n in ((0, 1), (5, 1), (3, 4), (11, 1)):
            s = slice(start, start + n)
            q_part, k_part = module(q[:, :, s], k[:, :, s], positions[s])
            assert torch.equal(q_part, q_full[:, :, s]) and torch.equal(k_part, k_full[:, :, s])
    elif isinstance(module, ALiBi):
        full = module.bias(positions, positions)
        assert full.shape == (N_HEADS, T, T) and full.dtype == torch.float32  # attention casts it to its dtype
        for start, n in ((0, 1), (5, 1), (3, 4)):
            s = slice(start, start + n)
            assert torch.equal(module.bias(positions[s], positions[: start + n]), full[:, s, : start + n])
    else:  # attention refuses other types (relative_position_parts), so a new one must come with a check here
        pytest.fail(f"{cfg.kind} builds a {type(module).__name__}; add its checks to this contract")


@pytest.mark.parametrize("cfg", POSITION_CASES)
def test_every_position_encoding_changes_the_model(cfg):
    """A registered encoding that nothing applies would silently train a NoPE model."""
    def logits(position):
        torch.manual_seed(0)
        config = af.load_model_config({"vocab_size": 50, "d_model": D, "n_layers": 1, "max_seq_len": MAX_LEN,
                                       "mixer": {"kind": "attention", "n_heads": N_HEADS}, "position": position})
        return af.CausalLM(config)(torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(1))).logits

    assert not torch.allclose(logits(cfg.model_dump()), logits({"kind": "none"}), atol=1e-6)
