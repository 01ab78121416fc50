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
