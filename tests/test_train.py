"""Trainer: schedules, optimizer groups, accumulation, metrics, NaN handling, exact resume after
SIGKILL, and DDP with two gloo processes."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import archifactory as af
from archifactory.train import NonFiniteLossError, Trainer, load_run_config, train
from archifactory.train.metrics import read_metrics
from archifactory.train.optim import build_optimizer, optimizer_config
from archifactory.train.schedule import ConstantSchedule, CosineSchedule, LinearSchedule, WSDSchedule, lr_multiplier

TINYSTORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "train.txt"
MODEL = {"vocab_size": 257, "d_model": 32, "n_layers": 2, "max_seq_len": 64,
         "mixer": {"kind": "attention", "n_heads": 2}, "ffn": {"kind": "swiglu", "hidden": 64}}


def run_config(tmp_path, name="run", **train):
    return {
        "name": name,
        "model": MODEL,
        "data": {"corpus": {"kind": "tinystories", "path": str(TINYSTORIES), "max_documents": 400},
                 "tokenizer": {"kind": "bytes"}, "cache_dir": str(tmp_path / "cache")},
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        # fp32 unless a test asks otherwise: these tests compare runs to 1e-5, and precision=auto would pick
        # bf16 on a CPU with native bf16 (and fp32 on one without)
        "train": {"seq_len": 32, "batch_size": 8, "max_steps": 12, "eval_every": 6, "eval_tokens": 2048,
                  "log_every": 1, "checkpoint_every": 4, "threads": 1, "progress": False, "precision": "fp32",
                  **train},
        "out_dir": str(tmp_path / name),
    }


# --------------------------------------------------------------------------------------------- schedule


def test_cosine_schedule_values_in_optimizer_steps():
    cfg = CosineSchedule(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(cfg, 0, 110) == pytest.approx(1 / 11)
    assert lr_multiplier(cfg, 9, 110) == pytest.approx(10 / 11)
    assert lr_multiplier(cfg, 10, 110) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 60, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert lr_multiplier(cfg, 110, 110) == pytest.approx(0.1)
    assert lr_multiplier(cfg, 35, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_linear_wsd_constant_and_warmup_fraction():
    lin = LinearSchedule(warmup_steps=0, min_lr_ratio=0.0)
    assert [lr_multiplier(lin, s, 100) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    wsd = WSDSchedule(warmup_steps=0, decay_fraction=0.2, min_lr_ratio=0.1)
    assert lr_multiplier(wsd, 79, 100) == 1.0
    assert lr_multiplier(wsd, 90, 100) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_multiplier(wsd, 100, 100) == pytest.approx(0.1)
    const = ConstantSchedule(warmup_fraction=0.1)
    assert lr_multiplier(const, 4, 100) == pytest.approx(5 / 11) and lr_multiplier(const, 50, 100) == 1.0


# -------------------------------------------------------------------------------------------- optimizers


def test_weight_decay_follows_declared_roles():
    model = af.CausalLM(af.load_model_config({**MODEL, "mixer": {"kind": "attention", "n_heads": 2, "qkv_bias": True},
                                              "tie_embeddings": False}))
    names = {id(p): n for n, p in model.named_parameters()}

    def decayed(opt):
        return {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}

    plain = decayed(build_optimizer(model, optimizer_config({"name": "adamw", "weight_decay": 0.1})))
    assert "blocks.0.mixer.q_proj.weight" in plain and "lm_head.weight" in plain
    assert not plain & {"embed.weight", "blocks.0.mixer.q_proj.bias", "final_norm.weight"}
    with_tables = decayed(build_optimizer(model, optimizer_config({"name": "adamw", "decay_embeddings": True})))
    assert with_tables == plain | {"embed.weight"}


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "muon", "lion", "soap", "ademamix", "adopt", "mars",
                                  "adam_mini", "schedulefree_adamw"])
def test_every_optimizer_reduces_the_loss(name):
    torch.manual_seed(0)
    model = af.CausalLM(af.load_model_config(MODEL))
    lr = {"sgd": 0.3, "lion": 3e-4, "muon": 1e-2, "schedulefree_adamw": 1e-2}.get(name, 3e-3)
    opt = build_optimizer(model, optimizer_config({"name": name, "lr": lr}))
    if hasattr(opt, "train"):
        opt.train()
    ids = torch.randint(0, 257, (4, 33))
    first = None
    for _ in range(15):
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    if hasattr(opt, "eval"):
        opt.eval()
    assert model(ids[:, :-1], ids[:, 1:]).loss.item() < first - 0.1


# ---------------------------------------------------------------------------------------------- trainer


def test_an_empty_validation_split_is_an_error_at_setup(tmp_path):
    cfg = run_config(tmp_path)
    cfg["data"]["corpus"]["val_fraction"] = 0.0
    with pytest.raises(af.ConfigError, match=r"validation split has 0 tokens .*seq_len=32.*val_fraction above 0.0"):
        Trainer(load_run_config(cfg)).setup()


def test_a_validation_split_shorter_than_one_window_is_scored_whole(tmp_path):
    from archifactory.data.corpora import FilesCorpus

    path = tmp_path / "docs.jsonl"
    train_docs = [json.dumps({"text": f"Story {i}: once upon a time there was a small cat who liked fish."})
                  for i in range(60)]
    corpus = FilesCorpus(paths=[str(path)], val_fraction=0.05)
    short = next(t for t in (f"Val {k}: the end." for k in range(1000)) if corpus.is_validation(t))
    train_docs = [d for d in train_docs if not corpus.is_validation(json.loads(d)["text"])]
    path.write_text("\n".join([*train_docs, json.dumps({"text": short})]) + "\n")
    cfg = run_config(tmp_path, max_steps=2, eval_every=2)
    cfg["data"]["corpus"] = {"kind": "files", "paths": [str(path)], "val_fraction": 0.05}
    summary = train(load_run_config(cfg))
    # bytes tokenizer: the split is the document and its end-of-document id, 1 + len targets, 32 > len
    n = len(short.encode()) + 1
    assert n - 1 < 32 and math.isfinite(summary["val_loss"])
    model = af.CausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    ids = torch.tensor([list(short.encode()) + [256]])
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(ids[:, :-1]).logits[0], ids[0, 1:])
    assert summary["val_loss"] == pytest.approx(float(ref), rel=1e-5)
    assert summary["val_bpb"] == pytest.approx(float(ref) * (n - 1) / (n - 2) / math.log(2), rel=1e-5)


def test_train_run_writes_everything(tmp_path):
    cfg = load_run_config(run_config(tmp_path, precision="auto"))  # the default, resolved and recorded
    summary = train(cfg)
    run = tmp_path / "run"
    for name in ("config.yaml", "tokenizer.json", "data.json", "metrics.jsonl", "summary.json", "model/model.safetensors"):
        assert (run / name).is_file(), name
    assert load_run_config(run / "config.yaml") == cfg
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for key in ("tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_bytes", "elapsed_s"):
        assert key in steps[0]
    assert steps[-1]["tokens"] == 12 * 8 * 32
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6, 12] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    # bytes tokenizer: every target is one byte except the end-of-document id (zero bytes)
    from archifactory.data.loader import eval_batches
    from archifactory.data.shards import ShardSet

    shards = ShardSet(Path(json.loads((run / "data.json").read_text())["shards"]), {})
    shards.manifest = json.loads((shards.directory / "manifest.json").read_text())
    batches = list(eval_batches(shards.tokens("val"), shards.token_bytes("val"), 32, 8, 2048))
    targets = torch.cat([y.flatten() for _, y, _ in batches])
    n_bytes = int((targets != 256).sum())
    assert n_bytes == sum(int(b.sum()) for _, _, b in batches)
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] * targets.numel() / n_bytes / math.log(2), rel=1e-9)
    assert summary["steps"] == 12 and summary["stream_hash"] and summary["kernel_paths"] == {"0": "torch.sdpa", "1": "torch.sdpa"}
    from archifactory.train.precision import resolve_precision

    assert cfg.train.precision == "auto" and summary["precision"] == resolve_precision("auto", "cpu")
    assert json.loads((run / "summary.json").read_text())["precision"] == summary["precision"]
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step_00000008", "step_00000012"]  # keep_checkpoints=2
    model = af.CausalLM.from_pretrained(run / "model")
    assert model.config == cfg.model


def test_budget_by_tokens_and_lr_follows_schedule(tmp_path):
    cfg = load_run_config(run_config(tmp_path, max_steps=None, max_tokens=5 * 8 * 32 - 1))
    train(cfg)
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(steps) == 5
    expected = [3e-3 * lr_multiplier(cfg.schedule, s, 5) for s in range(5)]
    assert [r["lr"] for r in steps] == pytest.approx(expected)


def test_gradient_accumulation_matches_full_batch(tmp_path):
    full = train(load_run_config(run_config(tmp_path, "full", max_steps=4)))
    accum = train(load_run_config(run_config(tmp_path, "accum", max_steps=4, micro_batch_size=2)))
    a = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["kind"] == "train"]
    b = [r["loss"] for r in read_metrics(tmp_path / "accum" / "metrics.jsonl") if r["kind"] == "train"]
    assert a == pytest.approx(b, abs=1e-5)
    assert full["stream_hash"] != "" and full["tokens"] == accum["tokens"]


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(load_run_config(run_config(tmp_path, max_steps=20, checkpoint_every=2)), resume=False)
    original = Trainer.train_step

    def poisoned(self):
        if self.step == 5:  # during step 6 as metrics.jsonl numbers it
            with torch.no_grad():
                self.model.embed.weight[0, 0] = float("nan")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 6 of run .*: loss became nan, so the update was not applied; .*step_00000004 \(step 4\)") as err:
        trainer.run()
    assert "bf16" not in str(err.value) and "fp16" not in str(err.value)  # an fp32 run: no precision advice
    last = tmp_path / "run" / "checkpoints" / "step_00000004"
    assert (last / "model.safetensors").is_file()
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(last / "model.safetensors").values())
    (record,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "nonfinite"]
    assert record["step"] == 6 and record["action"] == "stopped" and math.isnan(record["loss"])


def _infinite_gradient_at(monkeypatch, steps):
    """Make the gradient of one weight infinite (the loss stays finite) during the given steps, numbered
    as in metrics.jsonl; records the weights and optimizer state before and after each train_step."""
    original = Trainer.train_step
    seen = []

    def poisoned(self):
        hook = None
        if self.step + 1 in steps:
            hook = self.model.blocks[0].ffn.down_proj.weight.register_hook(lambda g: g * float("inf"))
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        state_before = {k: v.clone() for k, v in self.optimizer.state_dict()["state"].get(0, {}).items()}
        try:
            out = original(self)
        finally:
            if hook is not None:
                hook.remove()
        after = self.model.state_dict()
        state_after = self.optimizer.state_dict()["state"].get(0, {})
        unchanged = all(torch.equal(before[k], after[k]) for k in before) and all(
            torch.equal(state_before[k], state_after[k]) for k in state_before)
        seen.append((self.step + 1, out[2], unchanged))
        return out

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    return seen


def test_infinite_gradient_is_never_applied_and_the_named_checkpoint_is_good(tmp_path, monkeypatch, capsys):
    # the case: lr=10, no warmup, no clipping, a checkpoint every 2 steps, gradient norm inf at step 7
    data = run_config(tmp_path, max_steps=20, checkpoint_every=2, grad_clip=None)
    data["optimizer"]["lr"], data["schedule"]["warmup_steps"] = 10.0, 0
    seen = _infinite_gradient_at(monkeypatch, {7})
    with pytest.raises(NonFiniteLossError, match=r"step 7 of run .*: gradient norm became inf, so the update was not applied; .*"
                                                 r"step_00000006 \(step 6\).*train.grad_clip=1.0") as err:
        train(load_run_config(data))
    assert "bf16" not in str(err.value)
    assert seen[-1] == (7, False, True)  # step 7 left weights and optimizer state untouched
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    (record,) = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "nonfinite"]
    assert record["step"] == 7 and record["grad_norm"] == float("inf") and math.isfinite(record["loss"])
    # the named checkpoint is good: the run resumes from it (weights and optimizer state finite) and finishes
    monkeypatch.undo()
    data["train"]["max_steps"] = 9
    data["optimizer"]["lr"] = 1e-3
    capsys.readouterr()
    summary = train(load_run_config(data))
    assert summary["steps"] == 9 and math.isfinite(summary["val_loss"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000006 at step 6" in out
    assert "with a changed config: optimizer.lr: 10.0 -> 0.001; train.max_steps: 20 -> 9" in out
    # metrics.jsonl: the resumed steps once each, and the record of why the run was restarted kept
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == sorted({r["step"] for r in records if r["kind"] == "train"})
    assert [(r["step"], r["grad_norm"]) for r in records if r["kind"] == "nonfinite"] == [(7, float("inf"))]


def test_skip_drops_nonfinite_steps_and_stops_after_too_many_in_a_row(tmp_path, monkeypatch):
    seen = _infinite_gradient_at(monkeypatch, {3, 4})
    summary = train(load_run_config(run_config(tmp_path, "skip", max_steps=8, nonfinite="skip")))
    assert [(step, applied, unchanged) for step, applied, unchanged in seen if not applied] == [(3, False, True),
                                                                                               (4, False, True)]
    assert summary["steps"] == 8 and summary["skipped_steps"] == 2 and math.isfinite(summary["val_loss"])
    records = read_metrics(tmp_path / "skip" / "metrics.jsonl")
    assert [(r["step"], r["action"]) for r in records if r["kind"] == "nonfinite"] == [(3, "skipped"), (4, "skipped")]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 5, 6, 7, 8]
    monkeypatch.undo()
    _infinite_gradient_at(monkeypatch, set(range(3, 100)))
    with pytest.raises(NonFiniteLossError, match=r"step 5 of run .*: gradient norm became inf, so the update was not applied \(3 steps in a row\)"):
        train(load_run_config(run_config(tmp_path, "stuck", max_steps=20, nonfinite="skip", max_consecutive_skips=3)))


def test_fp16_scaler_overflow_is_skipped_and_advice_fits_precision(tmp_path, monkeypatch):
    seen = _infinite_gradient_at(monkeypatch, {2})
    trainer = Trainer(load_run_config(run_config(tmp_path, "fp16", max_steps=4, precision="fp16")))
    summary = trainer.run()  # an overflow with a finite loss is the gradient scaler's signal: skipped, scale lowered
    assert summary["skipped_steps"] == 1 and seen[1] == (2, False, True)
    assert trainer.scaler.get_scale() == 2.0**16 / 2  # halved once (GradScaler's backoff_factor 0.5)
    monkeypatch.undo()
    original = Trainer.train_step

    def nan_weights(self):
        if self.step == 2:
            with torch.no_grad():
                self.model.embed.weight.fill_(float("nan"))
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", nan_weights)
    with pytest.raises(NonFiniteLossError, match=r"step 3 of run .*: loss became nan and the weights are non-finite \(embed.weight\).*precision=bf16"):
        train(load_run_config(run_config(tmp_path, "fp16b", max_steps=6, precision="fp16", nonfinite="skip")))


def test_nonfinite_optimizer_state_is_never_checkpointed(tmp_path, monkeypatch):
    original = Trainer.train_step

    def poisoned(self):
        out = original(self)
        if self.step == 2:  # finishing step 3: an overflowed second moment, weights still finite
            next(iter(self.optimizer.state.values()))["exp_avg_sq"].fill_(float("inf"))
        return out

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"optimizer state .*exp_avg_sq.*nothing was saved.*step_00000002"):
        train(load_run_config(run_config(tmp_path, max_steps=8, checkpoint_every=2)))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000002"]


def test_vocab_too_small_is_a_config_error(tmp_path):
    data = run_config(tmp_path)
    data["model"] = {**MODEL, "vocab_size": 200}
    with pytest.raises(af.ConfigError, match=r"model.vocab_size=200 is smaller than the tokenizer's vocabulary \(257\)"):
        train(load_run_config(data))


def test_budget_required():
    with pytest.raises(af.ConfigError, match="give a budget"):
        load_run_config({"model": MODEL, "train": {"max_steps": None}})


# ---------------------------------------------------------------------------------- resume after SIGKILL


def _cli(*args, env=None):
    return [sys.executable, "-m", "archifactory.cli", *args]


def _losses(path):
    by_step = {}
    for r in read_metrics(path):
        if r["kind"] == "train":
            by_step[r["step"]] = r["loss"]  # a resumed run rewrites the steps after its checkpoint
    return by_step


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    steps = 60
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(tmp_path, "killed", max_steps=steps, checkpoint_every=5, eval_every=1000)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli("train", str(config)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(_losses(metrics)) >= 12:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(metrics))
    assert killed_at < steps
    done = subprocess.run(_cli("train", str(config)), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    reference = tmp_path / "ref.yaml"
    reference.write_text(yaml.safe_dump(run_config(tmp_path, "ref", max_steps=steps, checkpoint_every=5, eval_every=1000)))
    subprocess.run(_cli("train", str(reference)), env=env, check=True, capture_output=True)
    resumed, uninterrupted = _losses(metrics), _losses(tmp_path / "ref" / "metrics.jsonl")
    assert sorted(resumed) == list(range(1, steps + 1))
    assert resumed == uninterrupted  # bitwise: every step's loss is the same float
    # one line per record: the killed run's records after its last checkpoint were dropped, not repeated
    assert "dropped" in done.stdout and "after step" in done.stdout, done.stdout

    def history(path):
        return [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(path)]

    assert history(metrics) == history(tmp_path / "ref" / "metrics.jsonl")


def test_a_fresh_start_removes_the_earlier_checkpoints_so_a_resume_continues_it(tmp_path, capsys):
    """--fresh over a run with checkpoints past the new start's progress: before, pruning kept the earlier
    run's later checkpoints over the new one's, and a resume after a stop (a kill) continued, or called
    finished, the earlier run."""
    from archifactory.train import checkpoint as ckpt

    data = run_config(tmp_path, max_steps=12, checkpoint_every=4, keep_checkpoints=2, eval_every=4)
    data["schedule"] = {"kind": "constant", "warmup_steps": 0}  # the same rate whatever the budget
    run = tmp_path / "run"
    train(load_run_config(data))
    uninterrupted = [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run / "metrics.jsonl")]
    capsys.readouterr()
    # start over and stop at step 8 (a budget of 8 steps stands in for a kill there)
    train(load_run_config({**data, "train": {**data["train"], "max_steps": 8}}), resume=False)
    out = capsys.readouterr().out
    assert "removed 2 of an earlier start of this run (step_00000008, step_00000012" in out, out
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step_00000004", "step_00000008"]
    train(load_run_config(data))
    assert f"resumed from {run / 'checkpoints' / 'step_00000008'} at step 8" in capsys.readouterr().out
    history = [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run / "metrics.jsonl")]
    assert history == uninterrupted  # the fresh start, continued: every step of the run, each once


def test_a_fresh_start_stopped_in_its_final_evaluation_is_not_finished_with_the_earlier_summary(tmp_path, monkeypatch):
    """--fresh over a finished run, stopped after its last checkpoint (a kill during the final evaluation):
    before, the resume found the earlier start's summary.json and model/ for the same step and called the run
    finished with them, so model/ and the summary were not those of the checkpoints beside them."""
    from safetensors.torch import load_file

    data = run_config(tmp_path, max_steps=8, checkpoint_every=4, eval_every=3)  # step 8: final evaluation
    run = tmp_path / "run"
    train(load_run_config(data))
    earlier = json.loads((run / "summary.json").read_text())
    again = {**data, "train": {**data["train"], "seed": 1}}  # another start: other weights
    evaluate = Trainer.evaluate

    def killed_in_final_evaluation(self):
        if self.step == 8:
            raise KeyboardInterrupt
        return evaluate(self)

    monkeypatch.setattr(Trainer, "evaluate", killed_in_final_evaluation)
    with pytest.raises(KeyboardInterrupt):
        train(load_run_config(again), resume=False)
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    summary = train(load_run_config(again))
    assert summary.val_loss != earlier["val_loss"]
    final = load_file(run / "model" / "model.safetensors")
    trained = load_file(run / "checkpoints" / "step_00000008" / "model.safetensors")
    assert final.keys() == trained.keys() and all(torch.equal(final[k], trained[k]) for k in final)
    last_eval = [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "eval"][-1]
    assert last_eval["step"] == 8 and last_eval["val_loss"] == summary.val_loss


# ----------------------------------------------------------------------------------------- distributed


def test_two_gloo_processes_match_one_process(tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(run_config(tmp_path, "ddp", max_steps=5, eval_every=1000)))
    single = tmp_path / "single.yaml"
    single.write_text(yaml.safe_dump(run_config(tmp_path, "single", max_steps=5, eval_every=1000)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli("train", str(single)), env=env, check=True, capture_output=True)
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
         "-m", "archifactory.cli", "train", str(config)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = _losses(tmp_path / "single" / "metrics.jsonl"), _losses(tmp_path / "ddp" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert [a[s] for s in a] == pytest.approx([b[s] for s in a], abs=1e-5)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2


def test_fsdp2_two_processes_match_one_process_and_resume(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single.yaml"
    single.write_text(yaml.safe_dump(run_config(tmp_path, "single", max_steps=6, eval_every=1000)))
    subprocess.run(_cli("train", str(single)), env=env, check=True, capture_output=True)
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(run_config(tmp_path, "fsdp", max_steps=6, eval_every=1000, parallel="fsdp",
                                                checkpoint_every=3)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29532",
              "-m", "archifactory.cli", "train", str(config)]
    first = subprocess.run([*launch, "--set", "train.max_steps=3"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)  # resumes at step 3
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    a, b = _losses(tmp_path / "single" / "metrics.jsonl"), _losses(tmp_path / "fsdp" / "metrics.jsonl")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [a[s] for s in sorted(a)] == pytest.approx([b[s] for s in sorted(a)], abs=1e-5)
    model = af.CausalLM.from_pretrained(tmp_path / "fsdp" / "model")
    assert model.num_params() == af.CausalLM.from_pretrained(tmp_path / "single" / "model").num_params()


def test_bf16_fp16_and_compile_paths_train(tmp_path):
    eager = train(load_run_config(run_config(tmp_path, "eager", max_steps=3, eval_every=1000)))
    compiled = train(load_run_config(run_config(tmp_path, "compiled", max_steps=3, eval_every=1000, compile=True)))
    a = _losses(tmp_path / "eager" / "metrics.jsonl")
    b = _losses(tmp_path / "compiled" / "metrics.jsonl")
    assert [a[s] for s in (1, 2, 3)] == pytest.approx([b[s] for s in (1, 2, 3)], abs=1e-4)
    assert eager["tokens"] == compiled["tokens"]
    for precision in ("bf16", "fp16"):
        summary = train(load_run_config(run_config(tmp_path, precision, max_steps=3, precision=precision)))
        losses = _losses(tmp_path / precision / "metrics.jsonl")
        assert all(math.isfinite(v) for v in losses.values()) and math.isfinite(summary["val_loss"])
        assert abs(losses[1] - a[1]) < 0.05  # the same first batch and init, lower precision


def test_wall_time_budget_stops_and_schedules_by_time(tmp_path):
    summary = train(load_run_config(run_config(tmp_path, "timed", max_steps=None, max_time_s=3.0, eval_every=1000)))
    records = [r for r in read_metrics(tmp_path / "timed" / "metrics.jsonl") if r["kind"] == "train"]
    assert summary["steps"] == len(records) >= 2
    assert 3.0 <= summary["elapsed_s"] < 10.0
    assert records[-1]["lr"] < records[len(records) // 2]["lr"]  # the cosine follows elapsed time


# ------------------------------------------------------------------------------ MoE bias balancing per step

MOE_MODEL = {**MODEL, "ffn": {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 16,
                              "balance_loss_weight": 0.0, "bias_balancing": True, "bias_update_rate": 0.02}}
# trains a run config (argv[1]) and saves every process's routing biases to argv[2]/bias_rank{RANK}.pt
BIAS_DUMP = """
import os, sys, torch
from archifactory.train import Trainer, load_run_config
trainer = Trainer(load_run_config(sys.argv[1]), resume=False)
trainer.run()
biases = {n: b.cpu() for n, b in trainer.model.named_buffers() if n.endswith("routing_bias")}
torch.save(biases, os.path.join(sys.argv[2], "bias_rank" + os.environ.get("RANK", "0") + ".pt"))
"""


def test_moe_bias_balancing_once_per_step_over_micro_batches_and_processes(tmp_path):
    """DeepSeek-V3's bias update uses the whole step's expert loads: one process with the full batch,
    4 accumulated micro-batches, and 2 processes (DDP x 2 micro-batches each, FSDP) end with the same
    biases on every process and the same losses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = tmp_path / "bias_dump.py"
    script.write_text(BIAS_DUMP)
    variants = {"full": ({}, 1), "accum": ({"micro_batch_size": 2}, 1),
                "ddp": ({"micro_batch_size": 2}, 2), "fsdp": ({"parallel": "fsdp"}, 2)}
    biases, losses = {}, {}
    for port, (name, (extra, procs)) in enumerate(variants.items(), start=29533):
        data = run_config(tmp_path, name, max_steps=4, eval_every=1000, checkpoint_every=1000, **extra)
        data["model"] = MOE_MODEL
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(data))
        out = tmp_path / f"{name}-bias"
        out.mkdir()
        if procs == 1:  # in this process: the same script, without an interpreter start
            trainer = Trainer(load_run_config(config), resume=False)
            trainer.run()
            torch.save({n: b for n, b in trainer.model.named_buffers() if n.endswith("routing_bias")},
                       out / "bias_rank0.pt")
        else:
            done = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={port}",
                 str(script), str(config), str(out)], env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
        biases[name] = [torch.load(out / f"bias_rank{r}.pt") for r in range(procs)]
        losses[name] = _losses(tmp_path / name / "metrics.jsonl")
    reference = biases["full"][0]
    assert set(reference) == {"blocks.0.ffn.routing_bias", "blocks.1.ffn.routing_bias"}
    # 4 steps of +-rate (or 0 at exactly mean load): the bias moved, by at most 4 * rate
    assert all(0 < float(b.abs().max()) <= 4 * 0.02 + 1e-7 for b in reference.values())
    differ = [f"{name} rank {rank} {key}: {got[key].tolist()} != {reference[key].tolist()}"
              for name, per_rank in biases.items() for rank, got in enumerate(per_rank) for key in reference
              if not torch.equal(got[key], reference[key])]
    assert not differ, "\n".join(differ)
    for name in variants:
        assert sorted(losses[name]) == [1, 2, 3, 4]
        assert [losses[name][s] for s in (1, 2, 3, 4)] == pytest.approx([losses["full"][s] for s in (1, 2, 3, 4)],
                                                                         abs=1e-5), name
