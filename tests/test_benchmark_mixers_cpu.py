"""benchmarks/mixers_cpu.py measures every registered mixer, and each builds at the benchmark's shapes.

(No timings here: speed claims live in benchmarks/, see benchmarks/README.md.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import archifactory as af
from archifactory.registry import MIXERS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mixers_cpu.py"


@pytest.fixture(scope="module")
def bench():
    if str(SCRIPT.parent) not in sys.path:  # the script imports its neighbour benchmarks/_common.py
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("mixers_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def test_default_run_covers_every_registered_mixer(bench):
    kinds = bench.benchmark_kinds()
    assert len(kinds) == len(set(kinds))
    assert set(kinds) | {bench.BASELINE["kind"]} == set(MIXERS.kinds())
    # the mixers issue 12 added are registered, hence measured
    assert {"rwkv7", "diff_attention", "dilated_attention", "zamba2"} <= set(kinds)


def test_unknown_kind_is_refused_with_the_valid_ones(bench):
    with pytest.raises(ValueError, match="not_a_mixer.*valid: .*rwkv7"):
        bench.benchmark_kinds(["rwkv7", "not_a_mixer"])
    assert bench.benchmark_kinds(["gla"]) == ["gla"]


@pytest.mark.parametrize("kind", sorted(MIXERS.kinds()))
def test_every_mixer_builds_at_the_benchmark_shapes(bench, kind):
    mixer = bench.BASELINE if kind == "attention" else {"kind": kind}
    model = af.CausalLM(af.load_model_config(bench.model_config(mixer)))
    breakdown = model.flops_breakdown(bench.T)
    # the training FLOPs the table reports: 3x the forward's matmuls, of which the mixer is a part
    assert model.flops_per_token(bench.T, training=True) == 3 * sum(breakdown.values())
    assert breakdown["mixer"] > 0


def test_rows_cover_every_mixer_and_lay_out_hybrid_layer_kinds(bench):
    """Every kind gets a row with itself on every layer; zamba2 (a hybrid layer in a Mamba-2 stack) also a
    row laid out as the zamba2-tiny preset lays it out (same stack kind, same period)."""
    kinds = bench.benchmark_kinds()
    rows = bench.benchmark_rows(kinds)
    assert rows[0].mixer == bench.BASELINE and rows[0].layout == bench.EVERY_LAYER
    every_layer = [r.mixer["kind"] for r in rows[1:] if r.layout == bench.EVERY_LAYER]
    assert every_layer == kinds and not any(r.layer_overrides for r in rows if r.layout == bench.EVERY_LAYER)
    laid_out = [r for r in rows if r.layout != bench.EVERY_LAYER]
    assert [r.layer_overrides[0]["mixer"]["kind"] for r in laid_out] == sorted(bench.LAYOUTS)
    preset = af.load_model_config("zamba2-tiny")
    zamba = bench.LAYOUTS["zamba2"]
    assert (preset.mixer.kind, preset.layer_overrides[0].every) == (zamba.stack, zamba.every)
    assert preset.layer_overrides[0].mixer.kind == "zamba2"
    (row,) = laid_out
    model = af.CausalLM(af.load_model_config(bench.model_config(row.mixer, row.layer_overrides)))
    assert [type(block.mixer).__name__ for block in model.blocks] == ["Mamba2", "Mamba2", "Zamba2Hybrid", "Mamba2"]
    assert "layers [2] of 0..3" in row.layout
    # its FLOPs lie between the Mamba-2 stack's and the all-zamba2 model's
    flops = {name: af.CausalLM(af.load_model_config(bench.model_config({"kind": name}))).flops_per_token(bench.T)
             for name in ("mamba2", "zamba2")}
    assert flops["mamba2"] < model.flops_per_token(bench.T) < flops["zamba2"]
