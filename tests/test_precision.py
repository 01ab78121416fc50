"""Precision that fits the hardware: ``train.precision: auto`` resolves to bf16 only where the device
computes bf16 natively, checked against the processor flags the kernel reports (/proc/cpuinfo) and
against the AVX2-only stand-in for a CPU without AVX-512 (``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2``); every shipped config uses it; bf16 in a model cast to bf16 keeps decoding
precise (recurrent states in fp32, Gemma's 1 + w norm scale in fp32)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archifactory.config import load_yaml
from archifactory.nn.norms import RMSNorm
from archifactory.train.config import TrainConfig, load_run_config
from archifactory.train.precision import has_native_bf16, resolve_precision

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


x86_linux = pytest.mark.skipif(
    platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(), reason="reads x86 flags from /proc/cpuinfo"
)


def resolve_in_subprocess(env: dict[str, str]) -> str:
    # the ISA caps are read when torch loads, so each setting needs a fresh interpreter
    code = "from archifactory.train.precision import resolve_precision; print(resolve_precision('auto', 'cpu'))"
    clean = {k: v for k, v in os.environ.items() if k not in CAPS}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


@x86_linux
def test_auto_is_bf16_exactly_where_the_cpu_has_bf16_instructions():
    native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert resolve_in_subprocess({}) == ("bf16" if native else "fp32")
    # without AVX-512 (AMD Zen 3 and older) bf16 is emulated: fp32
    assert resolve_in_subprocess(AVX2_ENV) == "fp32"
    assert resolve_in_subprocess({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}) == "fp32"  # AVX-512 without BF16
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "avx2":
        assert not has_native_bf16("cpu")  # this very process runs as the AVX2-only stand-in


def test_explicit_precisions_pass_through_and_unknown_devices_get_fp32():
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision(p, "cpu") == p
    assert resolve_precision("auto", "meta") == "fp32"
    if not torch.cuda.is_available():
        assert not has_native_bf16("cuda")
    with pytest.raises(ValueError, match="train.precision='half'"):
        resolve_precision("half", "cpu")


def test_auto_is_the_default_and_every_shipped_config_uses_it():
    assert TrainConfig(max_steps=1).precision == "auto"
    runs = sorted((CONFIGS / "runs").glob("*.yaml"))
    assert runs
    for path in runs:
        data = load_yaml(path)
        if data.get("stage") in ("sft", "grpo"):  # post-training configs need their base run (test_presets)
            assert data["train"].get("precision", "auto") == "auto", path
        else:
            assert load_run_config(path).train.precision == "auto", path
    for path in sorted((CONFIGS / "sweeps").glob("*.yaml")):  # sweeps inherit their base's, unless overridden
        spec = load_yaml(path)
        overrides = [o for v in (spec.get("variants") or {}).values()
                     for o in (v.get("overrides", []) if isinstance(v, dict) else v)]
        assert not any("precision" in str(o) for o in [*spec.get("base_overrides", []), *overrides]), path


def test_probe_specs_pin_fp32_on_the_cpu_tier_and_auto_on_the_gpu_tier():
    # a probe spec's train section is its own (no base run config): a CPU-tier spec (no device stated) pins
    # fp32 so its accuracies do not depend on the CPU kind; a GPU-tier spec states its device and uses auto
    from archifactory.eval.probes.spec import ProbeTrain, load_probe_spec

    assert ProbeTrain(max_steps=1).precision == "fp32"
    probes = [p for p in sorted((CONFIGS / "sweeps").glob("*.yaml")) if load_yaml(p).get("kind") == "probe"]
    assert {p.name for p in probes} >= {"mqar.yaml", "mad.yaml", "mqar-zoology.yaml", "mad-full.yaml"}
    tiers = {}
    for path in probes:
        train = load_yaml(path)["train"]
        assert "precision" in train, f"{path}: state train.precision"
        gpu_tier = train.get("device", "cpu") != "cpu"
        assert train["precision"] == ("auto" if gpu_tier else "fp32"), path
        assert load_probe_spec(path).train.precision == train["precision"], path
        tiers[path.name] = gpu_tier
    assert tiers["mqar.yaml"] is tiers["mad.yaml"] is False and tiers["mqar-zoology.yaml"] is tiers["mad-full.yaml"] is True


# ------------------------------------------------------------------------- decoding precision in bf16


def test_unit_offset_rmsnorm_matches_gemma2_in_bf16():
    # transformers' Gemma2RMSNorm forms (1 + w) in fp32 and rounds once; ours must give the same bits
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    torch.manual_seed(0)
    ref = gemma2.Gemma2RMSNorm(64, eps=1e-6)
    ours = RMSNorm(64, 1e-6, unit_offset=True)
    with torch.no_grad():
        ref.weight.copy_(0.02 * torch.randn(64))  # small offsets: most of w is below bf16's resolution near 1
        ours.weight.copy_(ref.weight)
    ref, ours = ref.bfloat16(), ours.bfloat16()
    x = torch.randn(3, 5, 64).bfloat16()
    assert torch.equal(ours(x), ref(x))
    # the old way, w + 1 stored in bf16, is off by up to 2^-8 of the scale
    stored = RMSNorm(64, 1e-6)
    with torch.no_grad():
        stored.weight.copy_(ref.weight.float() + 1)
    assert (stored.bfloat16()(x).float() - ref(x).float()).abs().max() > 1e-2


def test_rnn_kernels_run_in_fp32_for_a_bf16_model_and_under_autocast():
    from archifactory.model.config import ModelConfig
    from archifactory.model.lm import CausalLM

    for kind in ("lstm", "gru", "rnn"):
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, max_seq_len=64, mixer={"kind": kind},
                             ffn={"kind": "swiglu", "hidden": 64}, position={"kind": "none"})
        model = CausalLM(config).eval()
        ids = torch.randint(0, 64, (2, 40))
        with torch.no_grad():
            ref = model(ids).logits
            low = model.to(torch.bfloat16)(ids).logits.float()
            cache = model.init_cache(2)
            steps = torch.cat([model(ids[:, t : t + 1], cache=cache).logits.float() for t in range(40)], dim=1)
        assert all(layer.h.dtype == torch.float32 for layer in cache.layers)  # the state stays fp32
        # bf16 weights and activations, fp32 recurrence: within bf16 rounding of the fp32 model
        assert (low - ref).abs().max() < 0.05 * ref.abs().max()
        torch.testing.assert_close(steps, low, rtol=0, atol=4 * 2**-8 * float(low.abs().max()))
