"""flash-linear-attention kernels (``backend: fla``) against the torch cores, on CUDA.

For every registered mixer with a ``backend`` field: the same weights run on both backends, and the
outputs, the final recurrent state (read from the cache) and every gradient (input and parameters) are
compared with an fp64 run of the torch core. A kernel passes if its error is no more than
``FACTOR`` times the torch core's own error at the same precision, or below a floor set by the precision
the kernel computes in (Triton's ``tl.dot`` takes fp32 inputs as tf32, unit roundoff 2^-11 ~ 4.9e-4;
bf16's is 2^-8 ~ 3.9e-3). Cases: fp32 and bf16 autocast; sequence lengths that are and are not multiples
of the chunk size (64); a batch of 1; a second chunk that starts from the first one's state.

Skipped without CUDA and flash-linear-attention. The first run autotunes fla's Triton kernels, which took
minutes per kernel family on an H200 (cached afterwards, ``FLA_CACHE_RESULTS``); run it with
``-n 8 --dist loadgroup`` so each mixer's cases share one worker and the families compile in parallel. ``FLA_KERNEL_REPORT=path.jsonl`` writes every measured
error, one JSON line per case (the figures quoted in ``mixers/kernels.py``).
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

from archifactory.config import BuildContext
from archifactory.mixers.kernels import FLA_VERIFIED, fla_installed
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import RMSNormConfig
from archifactory.nn.positions import RoPEConfig
from archifactory.registry import MIXERS

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and fla_installed()), reason="needs CUDA and flash-linear-attention"
)

D = 256
FACTOR = 4.0
FLOOR = {torch.float32: 4e-3, torch.bfloat16: 4e-2}  # ~8x and ~10x the unit roundoff of tf32 / bf16
FLA_KINDS = [kind for kind, cls in MIXERS.items() if "backend" in cls.model_fields]
SHAPES = [(2, 128), (2, 100), (1, 77)]  # (B, T): a multiple of the chunk size, not one, and a batch of 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(kind: str, backend: str, dtype=torch.float32):
    ctx = BuildContext(d_model=D, n_layers=2, layer_idx=0, max_seq_len=256, norm=RMSNormConfig(),
                       position=RoPEConfig(), init=InitConfig())
    cfg = MIXERS.get(kind)(backend=backend)
    cfg.check(ctx)
    torch.manual_seed(0)
    mixer = cfg.build(ctx)
    with torch.no_grad():  # perturb vectors too (norm gains, decays, biases), so every parameter matters
        gen = torch.Generator().manual_seed(1)
        for p in mixer.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return mixer.to(device="cuda", dtype=dtype)


def find_state(cache) -> torch.Tensor:
    """The recurrent state tensor a cache holds (the field the fla kernel writes)."""
    for name in ("state", "ssm"):
        value = getattr(cache, name, None)
        if isinstance(value, torch.Tensor):
            return value
        if value is not None:  # a composite cache (Hymba: attention + SSM)
            return find_state(value)
    raise AssertionError(f"no recurrent state in {type(cache).__name__}")


def run(mixer, x: torch.Tensor, weight: torch.Tensor, autocast: torch.dtype | None):
    """Outputs, final state after two chunks, and gradients of ``(y * weight).sum()``."""
    x = x.detach().clone().requires_grad_(True)
    mixer.zero_grad(set_to_none=True)
    context = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with context:
        y = mixer(x)[0]
        (y.float() * weight).sum().backward()
        with torch.no_grad():
            half = x.shape[1] // 2
            cache = mixer.init_cache(x.shape[0], x.device, x.dtype)
            y1, cache = mixer(x[:, :half], cache)
            y2, cache = mixer(x[:, half:], cache)  # starts from the first chunk's state
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in mixer.named_parameters()})
    return {"y": y.detach(), "y_chunked": torch.cat([y1, y2], 1), "state": find_state(cache)}, grads


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.double().norm().item()
    return (a.double() - ref.double()).norm().item() / max(scale, 1e-30)


def compare(kind: str, dtype_name: str, B: int, T: int) -> list[dict]:
    """One row per compared tensor: the torch core's and the fla kernel's error against fp64."""
    low = DTYPES[dtype_name]
    ref_mixer = build(kind, "torch", torch.float64)
    torch.manual_seed(2)
    x = torch.randn(B, T, D, device="cuda", dtype=torch.float64)
    weight = torch.randn(B, T, D, device="cuda", dtype=torch.float64)
    ref_out, ref_grads = run(ref_mixer, x, weight, None)
    results = {}
    for backend in ("torch", "fla"):
        mixer = build(kind, backend)
        try:
            results[backend] = run(mixer, x.float(), weight.float(), None if low == torch.float32 else low)
        except Exception as err:  # a kernel that raises is a result: recorded, then the test fails on it
            return [{"mixer": kind, "dtype": dtype_name, "B": B, "T": T, "tensor": "-", "backend": backend,
                     "error": f"{type(err).__name__}: {err}"[:500], "ok": False}]
    rows = []
    for group, index in (("out", 0), ("grad", 1)):
        ref = (ref_out, ref_grads)[index]
        for name, value in ref.items():
            if value is None:
                continue
            row = {"mixer": kind, "dtype": dtype_name, "B": B, "T": T, "tensor": f"{group}.{name}"}
            for backend in ("torch", "fla"):
                got = results[backend][index][name]
                row[backend] = float("inf") if got is None else rel(got, value)
            row["limit"] = max(FACTOR * row["torch"], FLOOR[low])
            row["ok"] = bool(row["fla"] <= row["limit"])
            rows.append(row)
    return rows


def report(rows: list[dict]) -> None:
    path = os.environ.get("FLA_KERNEL_REPORT")
    if path:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.xdist_group(k)) for k in FLA_KINDS])
def test_fla_matches_torch_core(kind, dtype_name, B, T):
    rows = compare(kind, dtype_name, B, T)
    report(rows)
    bad = [r["error"] if "error" in r else f"{r['tensor']}: fla {r['fla']:.2e} > {r['limit']:.2e} (torch {r['torch']:.2e})"
           for r in rows if not r["ok"]]
    assert not bad, f"{kind} {dtype_name} B={B} T={T}: " + "; ".join(bad)


@pytest.mark.parametrize("kind", FLA_KINDS)
def test_auto_uses_fla_only_where_verified(kind):
    mixer = build(kind, "auto")
    path = mixer.kernel_path()
    assert path.startswith("fla.") == (path.removeprefix("fla.") in FLA_VERIFIED)
