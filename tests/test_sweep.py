"""Sweep specs, planning (budgets, iso-parameter matching, lr grids) and the runner end to end."""

import json
import sqlite3
import types
from pathlib import Path

import pytest
import torch

import archifactory as af
from archifactory.config import ConfigError, validate
from archifactory.results import FINAL_FIGURES, MetricRecord
from archifactory.sweep.report.data import read_sweep_results
from archifactory.sweep.runner import SweepRunner
from archifactory.sweep.spec import SweepSpec, load_sweep, plan, spec_yaml
from archifactory.sweep.store import Store

TINYSTORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "train.txt"


def base(tmp_path):
    return {
        "model": {"vocab_size": 257, "d_model": 32, "n_layers": 2, "max_seq_len": 64,
                  "mixer": {"kind": "attention", "n_heads": 2}, "ffn": {"kind": "swiglu", "hidden": 64}},
        "data": {"corpus": {"kind": "tinystories", "path": str(TINYSTORIES), "max_documents": 300},
                 "tokenizer": {"kind": "bytes"}, "cache_dir": str(tmp_path / "cache")},
        "optimizer": {"lr": 3e-3},
        "train": {"seq_len": 32, "batch_size": 8, "max_steps": 1, "eval_every": 4, "eval_tokens": 1024,
                  "log_every": 1, "checkpoint_every": 4, "threads": 1},
    }


def spec(tmp_path, **fields):
    data = {"name": "t", "base": base(tmp_path), "seeds": [0, 1], "budget": {"tokens": 8 * 32 * 6},
            "variants": {"mqa": ["model.mixer.n_kv_heads=1"]}, "parallel": 2, **fields}
    return validate(SweepSpec, data)


def test_plan_holds_everything_fixed_but_the_change(tmp_path):
    runs = plan(spec(tmp_path), tmp_path, tmp_path / "sweep")
    assert [r.run_id for r in runs] == ["baseline-s0", "baseline-s1", "mqa-s0", "mqa-s1"]
    b, v = runs[0].config, runs[2].config
    assert v.model.mixer.kv_heads == 1 and b.model.mixer.kv_heads == 2
    assert v.data == b.data and v.optimizer == b.optimizer and v.schedule == b.schedule
    assert all(r.config.train.max_tokens == 8 * 32 * 6 and r.config.train.max_steps is None for r in runs)
    assert [r.config.train.seed for r in runs] == [0, 1, 0, 1]
    assert len({r.config.out_dir for r in runs}) == 4
    assert runs[2].changes["overrides"] == ["model.mixer.n_kv_heads=1"]


def test_flops_budget_gives_fewer_tokens_to_costlier_variants(tmp_path):
    s = spec(tmp_path, budget={"flops": 1e9}, variants={"wide": ["model.ffn.hidden=256"]})
    runs = {r.variant: r for r in plan(s, tmp_path, tmp_path / "sweep")}
    for r in runs.values():
        with torch.device("meta"):
            model = af.CausalLM(r.config.model)
        per_token = model.flops_per_token(32, training=True)
        assert r.config.train.max_tokens == int(1e9 / per_token)
    assert runs["wide"].config.train.max_tokens < runs["baseline"].config.train.max_tokens


def test_match_params_resizes_ffn_within_tolerance(tmp_path):
    s = spec(tmp_path, match_params=True, variants={"mlp": ["model.ffn.kind=mlp", "model.ffn.hidden=32"],
                                                    "mqa": ["model.mixer.n_kv_heads=1"]})
    runs = {r.variant: r for r in plan(s, tmp_path, tmp_path / "sweep")}

    def params(r):
        with torch.device("meta"):
            return af.CausalLM(r.config.model).num_params()

    target = params(runs["baseline"])
    for name in ("mlp", "mqa"):
        assert abs(params(runs[name]) - target) <= 0.02 * target
        change = runs[name].changes["match_params"]
        assert change["params_after"] == params(runs[name]) and change["target"] == target
    assert runs["mlp"].changes["match_params"]["changed"]["model.ffn.hidden"][0] == 32
    assert runs["mlp"].config.model.ffn.hidden != 32


def test_lr_grid_is_chosen_on_seeds_the_comparison_does_not_use_and_bad_variants(tmp_path):
    grid = {"mqa": {"overrides": ["model.mixer.n_kv_heads=1"], "lr": [1e-3, 3e-3]}}
    with pytest.raises(ConfigError, match=r"variants.mqa.lr: an lr grid needs lr_selection_seeds"):
        spec(tmp_path, variants=grid)
    with pytest.raises(ConfigError, match=r"lr_selection_seeds: seed\(s\) \[1\] are also compared"):
        spec(tmp_path, variants=grid, lr_selection_seeds=[1, 10])
    s = spec(tmp_path, variants=grid, lr_selection_seeds=[10, 11])
    runs = plan(s, tmp_path, tmp_path / "sweep")  # before the choice: the grid on the selection seeds only
    mqa = [(r.run_id, r.seed, r.config.optimizer.lr, r.purpose) for r in runs if r.variant == "mqa"]
    assert mqa == [("mqa-lr0.001-s10", 10, 1e-3, "lr_selection"), ("mqa-lr0.001-s11", 11, 1e-3, "lr_selection"),
                   ("mqa-lr0.003-s10", 10, 3e-3, "lr_selection"), ("mqa-lr0.003-s11", 11, 3e-3, "lr_selection")]
    assert {(r.variant, r.seed, r.purpose) for r in runs if r.variant != "mqa"} == {("baseline", 0, "compare"),
                                                                                     ("baseline", 1, "compare")}
    after = plan(s, tmp_path, tmp_path / "sweep", chosen_lrs={"mqa": 3e-3})
    compared = [(r.run_id, r.seed, r.config.optimizer.lr) for r in after if r.variant == "mqa" and r.purpose == "compare"]
    assert compared == [("mqa-lr0.003-s0", 0, 3e-3), ("mqa-lr0.003-s1", 1, 3e-3)]
    single = spec(tmp_path, variants={"slow": {"overrides": [], "lr": [1e-4]}})  # one lr: no grid, no selection
    assert [(r.run_id, r.purpose) for r in plan(single, tmp_path, tmp_path / "s") if r.variant == "slow"] == [
        ("slow-lr0.0001-s0", "compare"), ("slow-lr0.0001-s1", "compare")]
    with pytest.raises(ConfigError, match=r"(?s)variant .typo.: .*model.mixer.nheads: unknown key"):
        plan(spec(tmp_path, variants={"typo": ["model.mixer.nheads=2"]}), tmp_path, tmp_path / "s")
    with pytest.raises(ConfigError, match="exactly one of tokens, flops or seconds"):
        validate(SweepSpec, {"name": "x", "base": {}, "budget": {"tokens": 1, "seconds": 2}})
    with pytest.raises(ConfigError, match="repeats a seed"):
        validate(SweepSpec, {"name": "x", "base": {}, "budget": {"tokens": 1}, "seeds": [1, 1]})


def test_runner_records_results_failures_and_skips_finished_runs(tmp_path):
    s = spec(tmp_path, variants={"mqa": ["model.mixer.n_kv_heads=1"], "broken": ["model.vocab_size=100"]})
    sweep_dir = tmp_path / "sweep"
    counts = SweepRunner(s, tmp_path, sweep_dir).run()
    assert counts["done"] == 4 and counts["failed"] == 2
    store = Store(sweep_dir / "results.sqlite")
    runs = {r["run_id"]: r for r in store.runs()}
    assert runs["broken-s0"]["status"] == "failed" and "vocab_size=100 is smaller" in runs["broken-s0"]["error"]
    finals = store.finals()
    assert {f["run_id"] for f in finals} == {"baseline-s0", "baseline-s1", "mqa-s0", "mqa-s1"}
    assert len({f["stream_hash"] for f in finals}) == 1  # every run read the identical token stream
    assert all(f["tokens"] == 8 * 32 * 6 for f in finals)
    evals = store.metrics("mqa-s1", "eval")
    assert [e["step"] for e in evals] == [0, 4, 6] and all(e["val_loss"] > 0 for e in evals)
    assert store.sweep().name == "t" and "git_sha" in store.sweep().env
    log = sweep_dir / "runs" / "baseline-s0" / "train.log"
    before = log.read_text()
    counts = SweepRunner(s, tmp_path, sweep_dir).run()  # finished runs are skipped, failed ones retried
    assert log.read_text() == before and counts["done"] == 4
    # trainer -> store -> report under one set of names: summary.json's keys are the final columns and the
    # records' fields, with the same values; the report reads the store's records as they are
    assert {r[1] for r in sqlite3.connect(sweep_dir / "results.sqlite").execute("PRAGMA table_info(final)")} == {
        "run_id", *FINAL_FIGURES, "summary_json"}
    assert {r[1] for r in sqlite3.connect(sweep_dir / "results.sqlite").execute("PRAGMA table_info(metrics)")} == set(
        MetricRecord.model_fields)
    report = read_sweep_results(sweep_dir)
    assert report.all_finals == finals and report.runs == store.runs()
    for final in finals:
        written = json.loads((sweep_dir / "runs" / final.run_id / "summary.json").read_text())
        assert set(FINAL_FIGURES) - {"eval_accuracy", "eval_pass_at_1"} <= set(written)  # a pretraining run: no exact match
        assert {f: final[f] for f in written if f in FINAL_FIGURES} == {f: written[f] for f in FINAL_FIGURES if f in written}
        assert final.summary.model_dump(exclude_unset=True) == written and runs[final.run_id].env == final.summary.env()
        config = runs[final.run_id].config
        with torch.device("meta"):  # the model's own count, not the trainer's
            model = af.CausalLM(af.ModelConfig.model_validate(config["model"]))
        assert final.flops_per_token_train == model.flops_per_token(32, training=True)
        assert runs[final.run_id].env.kernel_paths == {str(k): v for k, v in model.kernel_paths().items()}
    # run again with another recipe for a finished run: refused before anything is stored, since the run would
    # be skipped as done and reported under the new recipe; where runs live and how fast they ran may change
    changed = spec(tmp_path, variants={"mqa": ["model.mixer.n_kv_heads=1", "train.grad_clip=0.5"],
                                       "broken": ["model.vocab_size=100"]})
    stored = store.runs()
    with pytest.raises(ConfigError, match=r"run mqa-s0 finished under another recipe \(train.grad_clip: 1.0 -> 0.5\)"
                                          r".*new --dir"):
        SweepRunner(changed, tmp_path, sweep_dir).plan()
    assert store.runs() == stored and store.sweep().spec_yaml == spec_yaml(s)
    faster = spec(tmp_path, variants={"mqa": ["model.mixer.n_kv_heads=1"], "broken": ["model.vocab_size=100"]},
                  threads_per_run=2, parallel=1)
    assert len(SweepRunner(faster, tmp_path, sweep_dir).plan()) == 6


def test_recipe_changes_leave_out_where_and_how_fast_a_run_ran():
    from archifactory.sweep.runner import recipe_changes

    old = {"name": "a", "out_dir": "/old/sweep/runs/a", "base": "/old/sweep/runs/p",
           "data": {"source": "/old/checkout/data.jsonl", "cache_dir": "c1"}, "optimizer": {"lr": 1e-3},
           "train": {"threads": 1, "progress": True, "seq_len": 64}}
    new = {"name": "a", "out_dir": "/new/runs/a", "base": "/new/runs/p",
           "data": {"source": "/new/checkout/data.jsonl", "cache_dir": "c2"}, "optimizer": {"lr": 3e-3},
           "train": {"threads": 2, "progress": False, "seq_len": 128, "eval_samples_added_since": 0}}
    assert recipe_changes(old, new) == ["optimizer.lr: 0.001 -> 0.003", "train.seq_len: 64 -> 128"]
    assert recipe_changes(old, old) == []
    assert recipe_changes({"data": {"source": "data.jsonl"}}, {"data": {"source": "other.jsonl"}}) == [
        "data.source: 'data.jsonl' -> 'other.jsonl'"]


def test_runner_chooses_the_lr_on_selection_seeds_then_runs_it_on_the_compared_seeds(tmp_path):
    s = spec(tmp_path, seeds=[0], lr_selection_seeds=[5],
             variants={"mqa": {"overrides": ["model.mixer.n_kv_heads=1"], "lr": [1e-4, 3e-3]}})
    sweep_dir = tmp_path / "sweep"
    counts = SweepRunner(s, tmp_path, sweep_dir).run()
    assert counts == {"done": 4, "failed": 0}
    store = Store(sweep_dir / "results.sqlite")
    finals = {f["run_id"]: f for f in store.finals()}
    assert {r: f["purpose"] for r, f in finals.items()} == {
        "baseline-s0": "compare", "mqa-lr0.0001-s5": "lr_selection", "mqa-lr0.003-s5": "lr_selection",
        "mqa-lr0.003-s0": "compare"}
    # the higher lr trains further in 6 steps: lower selection loss, so it is the one run on seed 0
    assert finals["mqa-lr0.003-s5"]["val_loss"] < finals["mqa-lr0.0001-s5"]["val_loss"]
    from archifactory.sweep.report import write_report

    _, md = write_report(sweep_dir)
    assert "on held-out seeds 5, not among the compared ones" in md.read_text()


def test_shipped_sweeps_plan(tmp_path):
    root = Path(__file__).resolve().parents[1] / "configs" / "sweeps"
    paths = sorted(root.glob("*.yaml"))
    assert {p.stem for p in paths} >= {"demo"}
    from archifactory.eval.probes.spec import is_probe_spec

    for path in paths:
        if is_probe_spec(path):  # kind: probe (tests/test_probes.py plans them)
            continue
        spec_, where = load_sweep(path)
        runs = plan(spec_, where, tmp_path / path.stem)
        # the post-training demo compares two variants (issue 11: "two or three") over three seeds, so the
        # paired GRPO - SFT interval has two degrees of freedom within its 25-minute budget
        variants, seeds = (2, 3) if path.stem == "posttrain-demo" else (3, 2)
        assert len({r.variant for r in runs}) >= variants, path
        assert len(spec_.seeds) >= seeds, path


def test_submitit_executor_hands_runs_to_a_scheduler(tmp_path):
    pytest.importorskip("submitit")
    s = spec(tmp_path, seeds=[0], variants={}, executor="submitit",
             submitit={"cluster": "local", "timeout_min": 10})
    sweep_dir = tmp_path / "sweep"
    counts = SweepRunner(s, tmp_path, sweep_dir).run()
    assert counts["done"] == 1
    assert any((sweep_dir / "submitit").iterdir())  # the scheduler's job folder
    final = Store(sweep_dir / "results.sqlite").finals()[0]
    assert final["run_id"] == "baseline-s0" and final["tokens"] == 8 * 32 * 6


def test_rerun_resumes_an_interrupted_run_from_its_checkpoint(tmp_path):
    from archifactory.train import train

    s = spec(tmp_path, seeds=[0], variants={})
    sweep_dir = tmp_path / "sweep"
    runner = SweepRunner(s, tmp_path, sweep_dir)
    (run,) = runner.plan()
    # the sweep was killed after this run's checkpoint at step 4 (of 6): the run directory holds it
    partial = run.config.model_copy(deep=True)
    partial.train = partial.train.model_copy(update={"max_tokens": None, "max_steps": 4, "progress": False})
    train(partial)
    runner.store.mark(run.run_id, "running")
    counts = SweepRunner(s, tmp_path, sweep_dir).run()
    assert counts["done"] == 1
    assert "resumed from" in (sweep_dir / "runs" / "baseline-s0" / "train.log").read_text()
    final = Store(sweep_dir / "results.sqlite").finals()[0]
    assert final["tokens"] == 8 * 32 * 6


def test_lr_grids_do_not_repeat_a_value():
    spec = {"name": "s", "base": {}, "budget": {"tokens": 1}, "lr_selection_seeds": [10]}
    for grid in ([1e-3, 1e-3], [1e-3, 1.0000001e-3]):  # the second pair would share run names (lr0.001)
        with pytest.raises(ConfigError, match=r"variants.v.lr: .* repeats a learning rate"):
            validate(SweepSpec, {**spec, "variants": {"v": {"lr": grid}}})
    assert validate(SweepSpec, {**spec, "variants": {"v": {"lr": [1e-3, 1.1e-3]}}}).variants["v"].lr == [1e-3, 1.1e-3]


def test_progress_bars_count_every_row_and_fill_when_done(tmp_path):
    """Train rows come every log_every steps: the bar follows the last row of any kind (the final
    evaluation carries the final tokens), and a finished run's bar is full even when its budget is
    not in steps (SFT epochs, a time budget)."""
    import json as json_

    from archifactory.train.config import TrainConfig

    class Bars:
        def __init__(self):
            self.calls = []

        def update(self, task, **fields):
            self.calls.append(fields)

    rows = [{"kind": "train", "step": 290, "tokens": 290 * 2048, "loss": 4.0, "tokens_per_s": 1.0},
            {"kind": "eval", "step": 293, "tokens": 293 * 2048, "val_loss": 4.1}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json_.dumps(r) for r in rows) + "\n")
    train = TrainConfig(seq_len=128, batch_size=16, max_tokens=600_000, log_every=10)
    run = types.SimpleNamespace(run_id="r", config=types.SimpleNamespace(out_dir=str(tmp_path), train=train))
    runner = SweepRunner.__new__(SweepRunner)
    runner._finished_shown = set()
    bars = Bars()
    runner._update(bars, {"r": 0}, [run], {})
    assert bars.calls[-1]["completed"] == 293 * 2048 and bars.calls[-1]["total"] == 600_000
    runner._update(bars, {"r": 0}, [run], {"r": "done"})
    assert bars.calls[-1]["completed"] == bars.calls[-1]["total"] == 293 * 2048 and bars.calls[-1]["status"] == "done"
