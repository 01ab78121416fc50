"""Post-training stages in a sweep: the spec, the plan (one recipe for every variant), the store's
stage columns and their migration, and the runner end to end (chains, evaluation, resuming)."""

import json
import sqlite3
from pathlib import Path

import pytest
import yaml

from archifactory.config import ConfigError, validate
from archifactory.results import FinalRecord, RunRecord, RunSummary
from archifactory.sweep.spec import SweepSpec, load_sweep, plan
from archifactory.sweep.store import Store

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ALPACA = SHARED / "sft" / "alpaca_en_demo.jsonl"
TINYSTORIES = SHARED / "tinystories" / "train.txt"


def base(tmp_path):
    return {
        "model": {"vocab_size": 320, "d_model": 32, "n_layers": 2, "max_seq_len": 128,
                  "mixer": {"kind": "attention", "n_heads": 2}, "ffn": {"kind": "swiglu", "hidden": 64}},
        "data": {"corpus": {"kind": "tinystories", "path": str(TINYSTORIES), "max_documents": 300},
                 "tokenizer": {"kind": "bpe"}, "cache_dir": str(tmp_path / "cache")},
        "optimizer": {"lr": 3e-3},
        "train": {"seq_len": 32, "batch_size": 8, "max_steps": 1, "eval_every": 4, "eval_tokens": 1024,
                  "log_every": 1, "checkpoint_every": 4, "threads": 1, "precision": "fp32"},
    }


SFT = {"data": {"source": str(ALPACA), "max_examples": 40, "val_fraction": 0.1},
       "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
       "train": {"seq_len": 96, "batch_size": 4, "max_steps": 2, "eval_every": 2, "checkpoint_every": 2,
                 "threads": 1, "precision": "fp32"}}
GRPO = {"task": {"name": "addition", "digits": 1},
        "grpo": {"num_generations": 4, "max_completion_length": 3, "eval_problems": 4},
        "train": {"seq_len": 64, "batch_size": 8, "max_steps": 2, "eval_every": 2, "checkpoint_every": 1,
                  "threads": 1, "precision": "fp32"}}


def spec(tmp_path, **fields):
    data = {"name": "t", "base": base(tmp_path), "seeds": [0, 1], "budget": {"tokens": 8 * 32 * 4},
            "variants": {"mqa": ["model.mixer.n_kv_heads=1"]}, "parallel": 2,
            "stages": ["pretrain", "sft", "grpo"], "sft": SFT, "grpo": GRPO, **fields}
    return validate(SweepSpec, data)


# ----------------------------------------------------------------------------------------------- spec


@pytest.mark.parametrize("fields, message", [
    ({"stages": ["pretrain", "grpo"]}, r"use \[pretrain\], \[pretrain, sft\] or \[pretrain, sft, grpo\]"),
    ({"stages": ["sft"]}, "each stage starts from the one before"),
    ({"stages": ["pretrain", "sft"]}, "grpo: a recipe is given but stages"),
    ({"sft": None}, "stages: lists sft but the spec has no sft: section"),
    ({"sft": {**SFT, "base": "runs/x"}}, "sft.base: set by the sweep for each run"),
    ({"grpo": {**GRPO, "model": "tiny"}}, "grpo.model: set by the sweep for each run"),
    ({"grpo": {**GRPO, "lr_scale": -1}}, "grpo.lr_scale: -1; give a positive number"),
    ({"sft": {**SFT, "data": {**SFT["data"], "task": {"name": "addition", "digits": 1, "seed": 1},
                               "task_examples": 10}}},
     r"sft.data.task.seed=1 differs from grpo.task's 0: .* could hold the held-out problems"),
    ({"eval": {"tasks": ["piqaa"]}}, "unknown task 'piqaa'"),
    ({"eval": {"tasks": ["piqa"], "limit": 0}}, "greater than or equal to 1"),
    ({"stages": ["pretrain"], "sft": None, "grpo": None, "eval": {"tasks": ["piqa"], "stages": ["sft"]}},
     r"eval.stages: \['sft'\] not in stages"),
])
def test_stage_spec_errors_say_what_to_change(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        spec(tmp_path, **fields)


def test_plan_gives_every_variant_the_same_recipe(tmp_path):
    s = spec(tmp_path, variants={"mqa": ["model.mixer.n_kv_heads=1"],
                                 "fast": {"overrides": ["model.ffn.hidden=96"], "lr": [6e-3]}},
             grpo={**GRPO, "lr_scale": 0.1})
    runs = plan(s, tmp_path, tmp_path / "sweep")
    by_id = {r.run_id: r for r in runs}
    assert [r.run_id for r in runs if r.variant == "mqa"] == ["mqa-s0", "mqa-s0-sft", "mqa-s0-sft-grpo", "mqa-s1",
                                                              "mqa-s1-sft", "mqa-s1-sft-grpo"]
    grpo = by_id["mqa-s1-sft-grpo"]
    assert (grpo.stage, grpo.parent, grpo.seed) == ("grpo", "mqa-s1-sft", 1)
    assert grpo.stage_config["base"] == str(tmp_path / "sweep" / "runs" / "mqa-s1-sft")
    assert by_id["mqa-s1-sft"].stage_config["base"] == str(tmp_path / "sweep" / "runs" / "mqa-s1")
    # the lr rule: GRPO at a tenth of each variant's pretraining lr; SFT at the recipe's lr for all
    assert by_id["fast-lr0.006-s0-sft-grpo"].config.optimizer.lr == pytest.approx(6e-4)
    assert by_id["baseline-s0-sft-grpo"].config.optimizer.lr == pytest.approx(3e-4)
    assert {r.config.optimizer.lr for r in runs if r.stage == "sft"} == {1e-3}

    def recipe(run):  # everything but what names the run, its starting point, seed and lr
        data = json.loads(json.dumps(run.stage_config))
        data["train"].pop("seed")
        data["optimizer"].pop("lr")
        return {k: v for k, v in data.items() if k not in ("base", "name", "out_dir")}

    for stage in ("sft", "grpo"):
        staged = [r for r in runs if r.stage == stage]
        assert len(staged) == 6 and all(recipe(r) == recipe(staged[0]) for r in staged)
        assert [r.stage_config["train"]["seed"] for r in staged] == [r.seed for r in staged]
    # stage defaults hold where the recipe names none: SFT's lr schedule is linear decay, GRPO's constant
    assert by_id["mqa-s0-sft"].config.schedule.kind == "linear"
    assert by_id["mqa-s0-sft-grpo"].config.schedule.kind == "constant"


def test_recipe_data_paths_resolve_against_the_spec_file(tmp_path):
    folder = tmp_path / "configs" / "sweeps"
    folder.mkdir(parents=True)
    (tmp_path / "chat.jsonl").write_text(ALPACA.read_text())
    data = {"name": "p", "base": base(tmp_path), "budget": {"tokens": 256}, "stages": ["pretrain", "sft"],
            "sft": {**SFT, "data": {"source": "../../chat.jsonl"}}}
    (folder / "p.yaml").write_text(yaml.safe_dump(data))
    s, root = load_sweep(folder / "p.yaml")
    sft = [r for r in plan(s, root, tmp_path / "sweep") if r.stage == "sft"][0]
    assert sft.stage_config["data"]["source"] == str((tmp_path / "chat.jsonl").resolve())


def test_a_bad_recipe_is_an_error_naming_the_variant(tmp_path):
    s = spec(tmp_path, base_overrides=["data.tokenizer.kind=bytes", "model.vocab_size=257"])
    with pytest.raises(ConfigError, match="data.tokenizer.kind=bytes cannot take the chat template's tokens"):
        plan(s, tmp_path, tmp_path / "sweep")
    s = spec(tmp_path, grpo={**GRPO, "train": {**GRPO["train"], "batch_size": 6}})
    with pytest.raises(ConfigError, match="variant 'baseline': grpo: .*must hold whole groups"):
        plan(s, tmp_path, tmp_path / "sweep")
    s = spec(tmp_path, sft={**SFT, "sft": {"packing": "sometimes"}})
    with pytest.raises(ConfigError, match="variant 'baseline': sft: .*sft.packing"):
        plan(s, tmp_path, tmp_path / "sweep")


def test_shipped_posttrain_sweeps_plan(tmp_path):
    for path in sorted((ROOT / "configs" / "sweeps").glob("posttrain*.yaml")):
        s, root = load_sweep(path)
        runs = plan(s, root, tmp_path / path.stem)
        assert s.stages == ["pretrain", "sft", "grpo"] and s.eval is not None, path
        assert {r.stage for r in runs} == {"pretrain", "sft", "grpo"}
        sft = [r for r in runs if r.stage == "sft"][0]
        if path.stem == "posttrain-demo":  # the CPU demo reads the alpaca sample from ../shared
            assert Path(sft.stage_config["data"]["source"]).samefile(ALPACA), sft.stage_config["data"]


# ---------------------------------------------------------------------------------------------- store


OLD_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, variant TEXT NOT NULL, seed INTEGER NOT NULL, lr REAL,
    is_baseline INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL DEFAULT 'pending', error TEXT,
    config_json TEXT NOT NULL, changes_json TEXT NOT NULL, run_dir TEXT NOT NULL, env_json TEXT,
    started_at REAL, finished_at REAL);
CREATE TABLE metrics (run_id TEXT NOT NULL, kind TEXT NOT NULL, step INTEGER NOT NULL, tokens INTEGER,
    elapsed_s REAL, loss REAL, lr REAL, tokens_per_s REAL, val_loss REAL, val_bpb REAL,
    PRIMARY KEY (run_id, kind, step));
CREATE TABLE final (run_id TEXT PRIMARY KEY, val_loss REAL, val_bpb REAL, val_ppl REAL, params INTEGER,
    active_params INTEGER, flops_per_token REAL, tokens_per_s REAL, peak_mem_bytes INTEGER, state_bytes INTEGER,
    tokens INTEGER, elapsed_s REAL, stream_hash TEXT, summary_json TEXT);
INSERT INTO runs (run_id, variant, seed, status, config_json, changes_json, run_dir)
    VALUES ('baseline-s0', 'baseline', 0, 'done', '{}', '{}', 'runs/baseline-s0');
INSERT INTO final (run_id, val_loss) VALUES ('baseline-s0', 2.5);
"""


def test_a_store_from_before_stages_is_migrated_and_read(tmp_path):
    path = tmp_path / "results.sqlite"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.close()
    old = Store(path, read_only=True)  # read as it is: every run a pretraining run
    assert [(r["run_id"], r["stage"], r["purpose"]) for r in old.finals()] == [("baseline-s0", "pretrain", "compare")]
    assert old.finals(stage="sft") == [] and old.runs()[0]["parent_run_id"] is None
    store = Store(path)  # opened for writing: the columns are added with their defaults
    columns = {row[1]: row for row in sqlite3.connect(path).execute("PRAGMA table_info(runs)")}
    assert columns["stage"][4] == "'pretrain'" and columns["stage"][3] == 1  # default, NOT NULL
    assert "parent_run_id" in columns and "purpose" in columns
    assert store.runs()[0]["stage"] == "pretrain" and store.finals()[0]["val_loss"] == 2.5
    store.add_run("baseline-s0-sft", "baseline", 0, None, True, {}, {}, "runs/x", stage="sft",
                  parent_run_id="baseline-s0")
    assert [r["run_id"] for r in store.runs()] == ["baseline-s0"]
    assert [(r["run_id"], r["parent_run_id"]) for r in store.runs(stage="sft")] == [("baseline-s0-sft", "baseline-s0")]
    assert len(store.runs(stage=None)) == 2
    with pytest.raises(ValueError, match="a sft run needs a parent run"):
        store.add_run("y", "baseline", 0, None, True, {}, {}, "runs/y", stage="sft")
    with pytest.raises(ValueError, match="stage='dpo'"):
        store.add_run("y", "baseline", 0, None, True, {}, {}, "runs/y", stage="dpo", parent_run_id="x")


def test_a_store_with_the_old_final_column_names_is_read_and_renamed_in_place(tmp_path):
    # stores written before final.flops_per_token / final.exact_match took the summary's names
    # (flops_per_token_train, eval_accuracy): read under the new names read-only, renamed when opened for writing
    path = tmp_path / "results.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        db.execute("ALTER TABLE final ADD COLUMN exact_match REAL")
        db.execute("UPDATE final SET flops_per_token=6e6, exact_match=0.25, summary_json=?",
                   ('{"flops_per_token_train": 6e6, "steps": 7}',))
    (old,) = Store(path, read_only=True).finals()
    assert (old.flops_per_token_train, old.eval_accuracy, old.summary.steps) == (6e6, 0.25, 7)
    store = Store(path)
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(final)")}
    assert {"flops_per_token_train", "eval_accuracy", "eval_pass_at_1"} <= columns
    assert not {"flops_per_token", "exact_match"} & columns
    (final,) = store.finals()
    assert (final.flops_per_token_train, final.eval_accuracy, final.val_loss) == (6e6, 0.25, 2.5)
    store.record_results("baseline-s0", [], {"flops_per_token_train": 5e6, "val_loss": 2.0})
    assert store.finals()[0].flops_per_token_train == 5e6


def test_grpo_results_give_the_sft_run_its_starting_exact_match(tmp_path):
    store = Store(tmp_path / "results.sqlite")
    store.add_run("b-s0", "baseline", 0, None, True, {}, {}, "r0")
    store.add_run("b-s0-sft", "baseline", 0, None, True, {}, {}, "r1", stage="sft", parent_run_id="b-s0")
    store.add_run("b-s0-sft-grpo", "baseline", 0, None, True, {}, {}, "r2", stage="grpo", parent_run_id="b-s0-sft")
    store.record_results("b-s0-sft", [{"kind": "eval", "step": 4, "val_loss": 3.0}], {"val_loss": 3.0})
    metrics = [{"kind": "eval", "step": 0, "eval_accuracy": 0.125, "eval_pass_at_1": 0.0625},
               {"kind": "grpo", "step": 1, "reward": 0.5, "pass_rate": 0.25, "completion_length": 3.0, "kl": 0.0,
                "clip_fraction": 0.0},
               {"kind": "eval", "step": 2, "eval_accuracy": 0.375}]
    store.record_results("b-s0-sft-grpo", metrics, {"eval_accuracy": 0.375})
    finals = {f["run_id"]: f for f in store.finals(stage=None)}
    assert finals["b-s0-sft"].eval_accuracy == 0.125 and finals["b-s0-sft-grpo"].eval_accuracy == 0.375
    assert finals["b-s0-sft"].eval_pass_at_1 == 0.0625 and finals["b-s0-sft-grpo"].eval_pass_at_1 is None
    curve = store.metrics("b-s0-sft-grpo", "grpo")
    assert [(m["step"], m["reward"], m["pass_rate"]) for m in curve] == [(1, 0.5, 0.25)]
    assert [m["eval_accuracy"] for m in store.metrics("b-s0-sft-grpo", "eval")] == [0.125, 0.375]


# --------------------------------------------------------------------------------------------- runner


def test_runner_chains_the_stages_evaluates_each_and_restarts_where_it_stopped(tmp_path, capsys):
    from archifactory.eval.store import EvalStore
    from archifactory.sweep.runner import SweepRunner

    s = spec(tmp_path, seeds=[0], eval={"tasks": ["piqa"], "limit": 2, "stages": ["pretrain", "grpo"]})
    sweep_dir = tmp_path / "sweep"
    counts = SweepRunner(s, tmp_path, sweep_dir).run()
    assert counts == {"done": 6, "failed": 0}
    out = capsys.readouterr().out  # each evaluation shows on the console, not only in its log
    assert f"evaluating mqa-s0: piqa (limit 2); log {sweep_dir / 'runs' / 'mqa-s0' / 'eval.log'}" in out
    assert "evaluated mqa-s0 in " in out and "evaluated mqa-s0-sft-grpo in " in out
    assert "mqa-s0 piqa: acc=" in out  # and its scores
    store = Store(sweep_dir / "results.sqlite")
    runs = {r["run_id"]: r for r in store.runs(stage=None)}
    assert {r: (v["stage"], v["parent_run_id"]) for r, v in runs.items()} == {
        "baseline-s0": ("pretrain", None), "baseline-s0-sft": ("sft", "baseline-s0"),
        "baseline-s0-sft-grpo": ("grpo", "baseline-s0-sft"), "mqa-s0": ("pretrain", None),
        "mqa-s0-sft": ("sft", "mqa-s0"), "mqa-s0-sft-grpo": ("grpo", "mqa-s0-sft")}
    sft = {f["run_id"]: f for f in store.finals(stage="sft")}
    grpo = {f["run_id"]: f for f in store.finals(stage="grpo")}
    assert all(f["val_loss"] > 0 for f in sft.values())
    assert all(0 <= f.eval_accuracy <= 1 for f in [*sft.values(), *grpo.values()])
    # the same SFT data order and the same GRPO prompts for both variants
    assert len({f["stream_hash"] for f in sft.values()}) == 1 and len({f["stream_hash"] for f in grpo.values()}) == 1
    assert [m["step"] for m in store.metrics("mqa-s0-sft-grpo", "grpo")] == [1, 2]
    # the SFT model's exact match is the GRPO run's evaluation before its first update
    start = store.metrics("mqa-s0-sft-grpo", "eval")[0]
    assert start["step"] == 0 and sft["mqa-s0-sft"].eval_accuracy == start.eval_accuracy
    from archifactory.sweep.stages import stage_fairness

    for stage in ("sft", "grpo"):
        check = stage_fairness(stage, store.runs(stage=stage), store.finals(stage=stage))
        assert check.ok and len(check.run_ids) == 2, check.values
    evaluated = {(m.run_id, m.task) for m in EvalStore(sweep_dir / "results.sqlite").metrics()}
    assert evaluated == {(r, "piqa") for r in ("baseline-s0", "mqa-s0", "baseline-s0-sft-grpo", "mqa-s0-sft-grpo")}

    # killed during GRPO: its row is not done and its final model is gone; the sweep resumes only that run
    store.mark("mqa-s0-sft-grpo", "running")
    import shutil

    shutil.rmtree(sweep_dir / "runs" / "mqa-s0-sft-grpo" / "model")
    logs = {r: (sweep_dir / "runs" / r / "train.log").read_text() for r in runs}
    eval_log = (sweep_dir / "runs" / "mqa-s0" / "eval.log").read_text()
    assert SweepRunner(s, tmp_path, sweep_dir).run() == {"done": 6, "failed": 0}
    changed = {r for r in runs if (sweep_dir / "runs" / r / "train.log").read_text() != logs[r]}
    assert changed == {"mqa-s0-sft-grpo"}
    assert "resum" in (sweep_dir / "runs" / "mqa-s0-sft-grpo" / "train.log").read_text()[len(logs["mqa-s0-sft-grpo"]):]
    assert (sweep_dir / "runs" / "mqa-s0" / "eval.log").read_text() == eval_log  # stored evaluations skipped


def test_a_failed_stage_stops_its_chain(tmp_path):
    from archifactory.sweep.runner import SweepRunner

    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    s = spec(tmp_path, seeds=[0], variants={}, sft={**SFT, "data": {"source": str(tmp_path / "broken.jsonl")}})
    assert SweepRunner(s, tmp_path, tmp_path / "sweep").run() == {"done": 1, "failed": 2}
    runs = {r["run_id"]: r for r in Store(tmp_path / "sweep" / "results.sqlite").runs(stage=None)}
    assert "broken.jsonl" in runs["baseline-s0-sft"]["error"]
    assert runs["baseline-s0-sft-grpo"]["error"] == "not run: its sft run baseline-s0-sft failed"


def test_a_missing_data_file_is_refused_when_the_sweep_is_planned(tmp_path):
    from archifactory.sweep.runner import SweepRunner

    s = spec(tmp_path, seeds=[0], variants={}, sft={**SFT, "data": {"source": "../shared/nowhere.jsonl"}})
    with pytest.raises(ConfigError, match=r"sft.data.source: ../shared/nowhere.jsonl is not a file, relative to the "
                                          r"spec's directory .* or to the working directory"):
        SweepRunner(s, tmp_path, tmp_path / "sweep").run()
    assert not (tmp_path / "sweep" / "runs").exists()  # nothing trained before the refusal


def test_stage_fairness_names_the_run_that_got_another_recipe():
    from archifactory.sweep.stages import stage_fairness

    def run(rid, lr=1e-3, steps=10, data="d1", max_steps=10):
        config = {"name": rid, "base": f"runs/{rid[:-4]}", "optimizer": {"name": "adamw", "lr": lr},
                  "train": {"seed": int(rid[-5]), "max_steps": max_steps, "batch_size": 4}, "sft": {"packing": "auto"}}
        summary = RunSummary(corpus_fingerprint=data, tokenizer_hash="t", steps=steps)
        return (RunRecord(run_id=rid, variant=rid[0], seed=int(rid[-5]), config=config),
                FinalRecord(run_id=rid, variant=rid[0], seed=int(rid[-5]), stream_hash="s" + data, summary=summary))

    fair = [run("a-s0-sft"), run("b-s1-sft"), run("c-s0-sft")]
    check = stage_fairness("sft", *zip(*fair))
    assert check.ok and check.lr_by_run == {"a-s0-sft": 1e-3, "b-s1-sft": 1e-3, "c-s0-sft": 1e-3}
    unfair = [run("a-s0-sft"), run("b-s1-sft", data="d2"), run("c-s0-sft", lr=2e-3, steps=9, max_steps=9)]
    check = stage_fairness("sft", *zip(*unfair))
    assert not check.ok
    assert check.differing("data") == check.differing("stream") == ["b-s1-sft"]
    assert check.differing("recipe") == check.differing("steps") == check.differing("budget") == ["c-s0-sft"]
    assert check.identical("tokenizer")
    # with the lr_scale rule the lr follows the variant: not a difference of recipe
    check = stage_fairness("sft", *zip(run("a-s0-sft"), run("c-s0-sft", lr=2e-3)), lr_follows_variant=True)
    assert check.ok and check.lr_by_run["c-s0-sft"] == 2e-3


def test_gpu_recipe_plans_and_builds_30m_models(tmp_path):
    """The GPU recipe is planned (no training): every variant ~30M parameters (matched), three stages,
    the same recipe for all; the models are built (on the meta device) with their chat vocabulary."""
    import torch

    from archifactory.model.lm import CausalLM
    from archifactory.sweep.runner import describe_plan

    s, root = load_sweep(ROOT / "configs" / "sweeps" / "posttrain-gpu.yaml")
    runs = plan(s, root, tmp_path / "sweep")
    assert len({r.variant for r in runs}) == 4 and s.seeds == [0, 1, 2]
    assert len(runs) == 4 * 3 * 3
    for run in runs:
        if run.stage != "pretrain":
            continue
        with torch.device("meta"):
            params = CausalLM(run.config.model).num_params()
        assert 28e6 < params < 33e6, (run.run_id, params)
        assert run.config.train.max_tokens == 6e8
    sft = [r for r in runs if r.stage == "sft"]
    assert all(r.stage_config["data"]["source"] == "cognitivecomputations/dolphin-r1" for r in sft)
    assert {r.config.optimizer.lr for r in sft} == {1e-4}  # a tenth of every variant's pretraining lr
    grpo = [r for r in runs if r.stage == "grpo"]
    assert {r.config.grpo.num_iterations for r in grpo} == {2} and {r.config.train.batch_size for r in grpo} == {256}
    text = describe_plan(s, root, tmp_path / "sweep")
    assert "baseline-s2-sft-grpo:" in text and "from: baseline-s2-sft" in text


# --------------------------------------------------------------------------------------------- report


def build_stage_store(sweep_dir: Path, pass_at_1: bool = False) -> dict:
    """A store with two variants x three seeds through pretrain, SFT and GRPO (figures made up, not trained)."""
    store = Store(sweep_dir / "results.sqlite")
    spec = {"name": "pt", "base": "x.yaml", "seeds": [0, 1, 2], "budget": {"tokens": 1000},
            "stages": ["pretrain", "sft", "grpo"], "sft": {"data": {"source": "chat.jsonl"}, "train": {"max_steps": 4}},
            "grpo": {"task": {"name": "addition", "digits": 1}, "train": {"max_steps": 3}, "lr_scale": 0.1}}
    store.set_sweep("pt", yaml.safe_dump(spec), {})
    rng = __import__("random").Random(0)
    figures = {}
    for variant in ("baseline", "mqa"):
        for seed in (0, 1, 2):
            pre, sft, grpo = f"{variant}-s{seed}", f"{variant}-s{seed}-sft", f"{variant}-s{seed}-sft-grpo"
            config = {"name": pre, "optimizer": {"lr": 3e-3}, "train": {"seed": seed, "max_tokens": 1000}}
            store.add_run(pre, variant, seed, None, variant == "baseline", config, {}, pre)
            store.record_results(pre, [{"kind": "eval", "step": 4, "tokens": 1000, "val_loss": 5.0}],
                                 {"val_loss": 5.0, "stream_hash": "p"})
            for stage, run_id, parent, lr in (("sft", sft, pre, 3e-4), ("grpo", grpo, sft, 3e-4 if variant ==
                                                                                   "baseline" else 2e-4)):
                cfg = {"name": run_id, "base": parent, "optimizer": {"lr": lr, "name": "adamw"},
                       "train": {"seed": seed, "max_steps": 4 if stage == "sft" else 3, "batch_size": 8, "seq_len": 64}}
                cfg |= ({"data": {"source": "/data/chat.jsonl", "format": "auto"}, "sft": {}} if stage == "sft" else
                        {"task": {"name": "addition", "digits": 1, "seed": 0},
                         "grpo": {"num_generations": 4, "loss_type": "dapo", "eval_problems": 64,
                                  **({"eval_samples": 8, "temperature": 0.7} if pass_at_1 else {})}})
                store.add_run(run_id, variant, seed, None, variant == "baseline", cfg, {}, run_id, stage=stage,
                              parent_run_id=parent)
            val = round(4.0 + rng.random(), 4)
            store.record_results(sft, [{"kind": "eval", "step": s, "val_loss": val + 1 - s / 4} for s in (0, 2, 4)],
                                 {"val_loss": val, "corpus_fingerprint": "d", "tokenizer_hash": "t", "steps": 4,
                                  "stream_hash": "s"})
            start, end = rng.randrange(0, 10) / 100, rng.randrange(10, 40) / 100
            sampled = (rng.randrange(0, 20) / 160, rng.randrange(10, 60) / 160) if pass_at_1 else (None, None)
            metrics = [{"kind": "eval", "step": 0, "eval_accuracy": start, "eval_pass_at_1": sampled[0]},
                       {"kind": "eval", "step": 3, "eval_accuracy": end, "eval_pass_at_1": sampled[1]}]
            metrics += [{"kind": "grpo", "step": s, "reward": 0.1 * s, "pass_rate": 0.05 * s, "completion_length": 3,
                         "kl": 0.0, "clip_fraction": 0.0} for s in (1, 2, 3)]
            store.record_results(grpo, metrics, {"eval_accuracy": end, "eval_pass_at_1": sampled[1],
                                                 "corpus_fingerprint": "task", "tokenizer_hash": "t",
                                                 "steps": 3, "stream_hash": "g"})
            figures[(variant, seed)] = {"val_loss": val, "sft_em": start, "grpo_em": end, "sft_p1": sampled[0],
                                        "grpo_p1": sampled[1]}
    return figures


def test_report_shows_each_stage_with_intervals_over_seeds(tmp_path):
    import numpy as np
    from scipy import stats as scipy_stats

    from archifactory.sweep.report import write_report
    from test_report import md_tables, table_with

    figures = build_stage_store(tmp_path)
    html, md = write_report(tmp_path)
    text = md.read_text()
    table = table_with(md_tables(text), "variant", "exact match after GRPO (95% CI)")
    rows = {r[0].rstrip(" ★"): dict(zip(table[0], r)) for r in table[1:]}
    assert list(rows) == ["baseline", "mqa"]

    def ci(x, scale=1.0, digits=4):
        x = np.asarray(x) * scale
        low, high = scipy_stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=scipy_stats.sem(x))
        return f"{x.mean():.{digits}f} ± {(high - low) / 2:.{digits}f}"

    for variant, row in rows.items():
        got = [figures[(variant, s)] for s in (0, 1, 2)]
        assert row["SFT val loss (95% CI)"] == ci([g["val_loss"] for g in got])
        assert row["exact match after SFT (95% CI)"] == ci([g["sft_em"] for g in got], 100, 1) + " %"
        assert row["exact match after GRPO (95% CI)"] == ci([g["grpo_em"] for g in got], 100, 1) + " %"
        gain = [g["grpo_em"] - g["sft_em"] for g in got]
        low, high = scipy_stats.t.interval(0.95, 2, loc=np.mean(gain), scale=scipy_stats.sem(gain))
        assert row["GRPO − SFT (paired, 95% CI)"] == f"{100 * np.mean(gain):+.1f} % [{100 * low:+.1f}, {100 * high:+.1f}]"
        assert row["final GRPO reward (mean)"] == "0.300" and row["seeds SFT / GRPO"] == "3 / 3"
    assert "pass@1" not in text  # runs without grpo.eval_samples: greedy exact match only
    assert "(report_files/grpo_curves.png)" in text and "(report_files/sft_val_loss.png)" in text
    assert "SFT: chat.jsonl (auto format), 4 steps of 8 rows" in text
    assert "GRPO: addition (1 digits, task seed 0), 3 steps of 8 completions" in text
    # the exact match of answering the most common held-out answer every time, counted here from the task
    from collections import Counter

    from archifactory.posttrain.tasks import ArithmeticTask

    task = ArithmeticTask("+", digits=1, seed=0)
    answer, count = Counter(task.problem(i, "test").answer for i in range(64)).most_common(1)[0]
    assert f"answering {answer} to every question would score {100 * count / 64:.1f} %" in text
    assert "lr 0.1 x the variant's pretraining lr" in text
    # the GRPO lr follows each variant's pretraining lr (lr_scale): listed, not a failed check
    assert "pretraining lr (lr\\_scale): 0.0002, 0.0003" in text
    assert "✗" not in text.split("Post-training fairness")[1].split("##")[0]
    # the pretraining sections still see only the pretraining runs
    results = table_with(md_tables(text), "variant", "val loss (95% CI)")
    assert [r[3] for r in results[1:]] == ["3 / 3", "3 / 3"] or all("3 / 3" in r for r in results[1:])


def test_report_shows_sampled_pass_at_1_beside_greedy_exact_match(tmp_path, monkeypatch):
    import numpy as np
    from scipy import stats as scipy_stats

    from archifactory.sweep.report import figures as report_figures
    from archifactory.sweep.report import write_report
    from test_report import md_tables, table_with

    drawn = []  # every figure the report renders
    to_png = report_figures.to_png
    monkeypatch.setattr(report_figures, "to_png", lambda fig: drawn.append(fig) or to_png(fig))
    figures = build_stage_store(tmp_path, pass_at_1=True)
    text = write_report(tmp_path)[1].read_text()
    # the GRPO curves plot shares in %, as the table gives them: the step-0 point is the seeds' mean x 100
    panels = {ax.get_ylabel(): ax for fig in drawn for ax in fig.axes}
    for label, key in (("exact match (%)", "sft_em"), ("pass@1 (%)", "sft_p1")):
        line = next(line for line in panels[label].get_lines() if line.get_label().startswith("baseline"))
        assert line.get_ydata()[0] == pytest.approx(100 * np.mean([figures[("baseline", s)][key] for s in (0, 1, 2)]))
    assert "pass rate (%)" in panels
    table = table_with(md_tables(text), "variant", "pass@1 after GRPO (sampled, 95% CI)")
    rows = {r[0].rstrip(" ★"): dict(zip(table[0], r)) for r in table[1:]}
    for variant, row in rows.items():
        got = [figures[(variant, s)] for s in (0, 1, 2)]
        for column, key in (("pass@1 after SFT (sampled, 95% CI)", "sft_p1"), ("pass@1 after GRPO (sampled, 95% CI)", "grpo_p1")):
            x = 100 * np.array([g[key] for g in got])
            low, high = scipy_stats.t.interval(0.95, 2, loc=x.mean(), scale=scipy_stats.sem(x))
            assert row[column] == f"{x.mean():.1f} ± {(high - low) / 2:.1f} %"
        gain = 100 * np.array([g["grpo_p1"] - g["sft_p1"] for g in got])
        low, high = scipy_stats.t.interval(0.95, 2, loc=gain.mean(), scale=scipy_stats.sem(gain))
        assert row["GRPO − SFT pass@1 (paired, 95% CI)"] == f"{gain.mean():+.1f} % [{low:+.1f}, {high:+.1f}]"
        assert row["exact match after SFT (95% CI)"].endswith("%")  # the greedy columns stay
    assert "pass@1: the share of correct answers among 8 completions per held-out problem sampled as in the " \
           "rollouts (temperature 0.7)" in text
