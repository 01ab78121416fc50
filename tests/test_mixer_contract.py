"""The contract every registered sequence mixer keeps. A mixer added to the registry is tested here
by registering it (with ``contract_examples``): nothing to add to this file.

- causality: outputs up to t do not depend on inputs after t;
- batch independence: sequences in a batch do not mix (catches recurrences run over the batch axis,
  e.g. an ``nn.LSTM`` fed (B, T, C) without ``batch_first=True``);
- full-sequence forward == chunked and token-by-token forward with a cache (fp64 1e-6, fp32 1e-4);
- the cache holds exactly ``state_bytes`` bytes;
- every parameter gets a gradient (those declared zero at init, after one step); bf16 autocast runs and stays close to fp32.
"""

import dataclasses

import pytest
import torch

from archifactory.config import BuildContext
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import RMSNormConfig
from archifactory.nn.positions import NoPositionConfig
from archifactory.registry import MIXERS
from archifactory.registry import POSITIONS as POSITION_REGISTRY

D, B, T = 32, 2, 11
# every registered relative encoding (its first contract example), and none: a new one is covered by registering it
POSITIONS = {
    kind: cls.contract_examples()[0]
    for kind, cls in POSITION_REGISTRY.items()
    if cls.contract_examples()[0].build_relative(8, 4) is not None
}
POSITIONS["nope"] = NoPositionConfig()
CASES = [
    pytest.param(cfg, pos, id=f"{kind}-{i}-{pos}")
    for kind, cls in MIXERS.items()
    for i, cfg in enumerate(cls.contract_examples(D))
    for pos in (POSITIONS if cls.uses_positions else ["nope"])
]


def build(cfg, position: str, dtype=torch.float64):
    ctx = BuildContext(
        d_model=D, n_layers=2, layer_idx=0, max_seq_len=64, norm=RMSNormConfig(), position=POSITIONS[position],
        init=InitConfig(std=0.2),
    )
    cfg.check(ctx)
    mixer = cfg.build(ctx).to(dtype)
    # random norm weights/biases too, so that every parameter matters to the output
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return mixer


def run_chunks(mixer, x, sizes):
    cache = mixer.init_cache(x.shape[0], x.device, x.dtype)
    outs, start = [], 0
    for size in sizes:
        y, cache = mixer(x[:, start : start + size], cache)
        outs.append(y)
        start += size
    assert start == x.shape[1]
    return torch.cat(outs, dim=1), cache


def test_every_mixer_has_examples():
    assert len(MIXERS) >= 1
    for kind, cls in MIXERS.items():
        assert cls.contract_examples(D), f"{kind} has no contract examples"


@pytest.mark.parametrize(("cfg", "position"), CASES)
def test_causal(cfg, position):
    mixer = build(cfg, position)
    x = torch.randn(B, T, D, dtype=torch.float64)
    y = mixer(x)[0]
    for t in (0, 4, T - 2):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
        y2 = mixer(x2)[0]
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-12)
        assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-6, "later outputs ignore later inputs"


@pytest.mark.parametrize(("cfg", "position"), CASES)
def test_batch_rows_independent(cfg, position):
    mixer = build(cfg, position)
    x = torch.randn(3, T, D, dtype=torch.float64)
    y = mixer(x)[0]
    for b in range(3):  # every row: a recurrence over the batch axis makes all but one row depend on others
        torch.testing.assert_close(mixer(x[b : b + 1])[0][0], y[b], rtol=0, atol=1e-10)
        x2 = x.clone()
        others = [i for i in range(3) if i != b]
        x2[others] = torch.randn_like(x2[others])
        torch.testing.assert_close(mixer(x2)[0][b], y[b], rtol=0, atol=1e-10)


@pytest.mark.parametrize(("cfg", "position"), CASES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_full_equals_cached(cfg, position, dtype, tol):
    mixer = build(cfg, position, dtype)
    x = torch.randn(B, T, D, dtype=dtype)
    full = mixer(x)[0]
    steps, _ = run_chunks(mixer, x, [1] * T)
    torch.testing.assert_close(steps, full, rtol=tol, atol=tol)
    chunked, _ = run_chunks(mixer, x, [4, 1, 1, 5])
    torch.testing.assert_close(chunked, full, rtol=tol, atol=tol)


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0


@pytest.mark.parametrize(("cfg", "position"), CASES)
def test_state_bytes_match_cache(cfg, position):
    mixer = build(cfg, position)
    x = torch.randn(1, T, D, dtype=torch.float64)
    for n in (1, 4, T):
        _, cache = run_chunks(mixer, x[:, :n], [n])
        assert tensor_bytes(cache) == mixer.state_bytes(n, torch.float64)


@pytest.mark.parametrize(("cfg", "position"), CASES)
def test_gradients_reach_every_parameter(cfg, position):
    """Every parameter gets a finite, non-zero gradient at the first step, except those the mixer declares
    (``zero_gradient_at_init``: factors multiplied by a zero-initialised one, as RWKV-7 publishes its
    low-rank maps). Those get an exactly zero gradient at the first step and a non-zero one after a single
    optimizer step, so a gradient path exists; anything else without a gradient fails."""
    mixer = build(cfg, position, torch.float32)
    params = dict(mixer.named_parameters())
    delayed = mixer.zero_gradient_at_init()
    assert delayed <= params.keys(), f"zero_gradient_at_init names unknown parameters {delayed - params.keys()}"
    x = torch.randn(B, T, D, requires_grad=True)
    probe = torch.randn(B, T, D)

    def backward():
        mixer.zero_grad(set_to_none=True)
        (mixer(x)[0] * probe).sum().backward()

    backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in params.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} got a non-finite gradient"
        if name in delayed:
            assert p.grad.abs().max() == 0, f"{name} is declared zero at init but got a gradient"
        else:
            assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
    if delayed:
        torch.optim.SGD(mixer.parameters(), lr=0.1).step()
        backward()
        for name in sorted(delayed):
            assert params[name].grad.abs().sum() > 0, f"{name} still gets no gradient after one step"


@pytest.mark.parametrize(("cfg", "position"), CASES)
def test_bf16_autocast(cfg, position):
    mixer = build(cfg, position, torch.float32)
    x = torch.randn(B, T, D)
    ref = mixer(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixer(x)[0]
        y.float().square().mean().backward()
    assert torch.isfinite(y).all()
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 output deviates from fp32 by {rel:.3f}"


@pytest.mark.parametrize(("cfg", "position"), CASES)
def test_costs_positive_and_kernel_recorded(cfg, position):
    mixer = build(cfg, position)
    # (the counts themselves are checked against FlopCounterMode in tests/test_component_contract.py; they
    # need not grow with the length: a chunked form's padded last chunk costs more per token at T=11 than
    # at 44)
    assert mixer.flops_per_token(T) > 0 and mixer.flops_per_token(4 * T) > 0
    assert isinstance(mixer.kernel_path(), str) and mixer.kernel_path()
