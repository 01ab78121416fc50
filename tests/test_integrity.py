"""Damaged files are detected and never used: checkpoints, token shards and their manifest, tokenizer
files, saved models, the results database and metrics.jsonl. Each case is either a one-line error that
names the file and what to do, or a safe recovery (an older intact checkpoint, a rebuilt cache entry, a
skipped metrics line), checked against the undamaged result."""

import errno
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import archifactory as af
from archifactory.cli import app
from archifactory.data.corpora import TinyStoriesCorpus
from archifactory.data.shards import build_shards
from archifactory.data.tokenizer import BPETokenizerConfig, HFTokenizerConfig, Tokenizer
from archifactory.integrity import CorruptFileError, file_digest, mismatch
from archifactory.sweep.runner import SweepRunner
from archifactory.sweep.store import Store, StoreDamagedError
from archifactory.train import Trainer, load_run_config, train
from archifactory.train import checkpoint as ckpt
from archifactory.train.metrics import MetricsWriter, read_metrics
from test_sweep import spec
from test_train import TINYSTORIES, run_config


def _flip(path, at=None):
    """Flip one byte (default: the middle of the file); the size stays the same."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _train_losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


def test_digest_detects_a_flipped_byte_and_truncation(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(np.arange(100_000, dtype=np.uint16).tobytes())
    record = file_digest(path)
    assert record["bytes"] == 200_000 and mismatch(path, record) is None
    _flip(path, at=12_345)
    assert "checksum" in mismatch(path, record)
    _truncate(path)
    assert mismatch(path, record) == "f.bin has 100,000 bytes, 200,000 were written"


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("damage", ["flip weights", "flip state", "truncate weights", "truncate state",
                                    "drop state", "garble checksums"])
def test_damaged_checkpoint_is_passed_over_for_the_newest_intact_one(tmp_path, damage, capsys):
    data = run_config(tmp_path, max_steps=8, checkpoint_every=2, keep_checkpoints=3, eval_every=100)
    train(load_run_config(data))
    uninterrupted = _train_losses(tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "step_00000008"
    name = "state.pt" if "state" in damage else "model.safetensors"
    if damage.startswith("flip"):
        _flip(newest / name)
    elif damage.startswith("truncate"):
        _truncate(newest / name)
    elif damage == "drop state":
        (newest / name).unlink()
    else:
        (newest / "checksums.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000008 is damaged"):
        ckpt.load_checkpoint(newest, af.CausalLM(load_run_config(data).model), "cpu")
    capsys.readouterr()
    train(load_run_config(data))
    out = capsys.readouterr().out
    assert "step_00000008 is damaged" in out and "step_00000006 at step 6" in out
    # resuming from step 6 retrains steps 7-8 to exactly the uninterrupted run's losses, logged once
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert _train_losses(tmp_path / "run") == uninterrupted
    assert not ckpt.verify_checkpoint(newest)  # rewritten whole


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    data = run_config(tmp_path, max_steps=4, checkpoint_every=2, eval_every=100)
    train(load_run_config(data))
    for path in ckpt.checkpoint_dirs(tmp_path / "run"):
        _truncate(path / "model.safetensors")
    data["train"]["max_steps"] = 6
    with pytest.raises(ckpt.CheckpointError, match=r"no intact checkpoint in .*checkpoints \(damaged: step_00000004, "
                                                   r"step_00000002\); delete that folder or pass --fresh"):
        train(load_run_config(data))
    assert train(load_run_config(data), resume=False)["steps"] == 6  # --fresh


def test_disk_full_while_checkpointing_leaves_nothing_half_written(tmp_path, monkeypatch):
    data = run_config(tmp_path, max_steps=6, checkpoint_every=2, eval_every=100)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step_00000004" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(load_run_config(data))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]  # no .step_00000004.tmp left
    monkeypatch.undo()
    out = train(load_run_config(data))  # space freed: the next run resumes from step 2 and finishes
    assert out["steps"] == 6 and sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000006"]


# ---------------------------------------------------------------------------------------- token shards


@pytest.fixture()
def corpus_and_tokenizer(tmp_path):
    corpus = TinyStoriesCorpus(path=str(TINYSTORIES), max_documents=200)
    return corpus, BPETokenizerConfig().load_or_train(corpus, tmp_path, 300), tmp_path


@pytest.mark.parametrize("damage", ["truncate train.bin", "flip train.bin", "empty val.bin", "flip doc starts",
                                    "garble manifest bytes", "change manifest count", "drop manifest"])
def test_damaged_shards_are_rebuilt_never_read(corpus_and_tokenizer, damage):
    corpus, tok, cache = corpus_and_tokenizer
    shards = build_shards(corpus, tok, cache)
    intact = {split: np.array(shards.tokens(split)) for split in ("train", "val")}
    d = shards.directory
    if damage == "truncate train.bin":
        _truncate(d / "train.bin", keep=0.9)
    elif damage == "flip train.bin":
        _flip(d / "train.bin")
    elif damage == "empty val.bin":
        (d / "val.bin").write_bytes(b"")
    elif damage == "flip doc starts":
        _flip(d / "train_doc_starts.npy", at=-3)
    elif damage == "garble manifest bytes":
        _flip(d / "manifest.json", at=0)
    elif damage == "change manifest count":
        m = json.loads((d / "manifest.json").read_text())
        m["splits"]["train"]["tokens"] -= 100
        (d / "manifest.json").write_text(json.dumps(m))
    else:
        (d / "manifest.json").unlink()
    with pytest.warns(UserWarning, match=rf"token shard cache entry {d}.*; rebuilding it from the corpus"):
        rebuilt = build_shards(corpus, tok, cache)
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(rebuilt.tokens(split)), intact[split])
    assert not [p for p in d.parent.iterdir() if p.name != d.name]  # no damaged or temporary entry left


def test_a_shard_changed_after_checking_is_refused_when_read(corpus_and_tokenizer):
    corpus, tok, cache = corpus_and_tokenizer
    shards = build_shards(corpus, tok, cache)
    _truncate(shards.directory / "train.bin", keep=0.5)
    with pytest.raises(ValueError, match=r"token shard .*train.bin has .* bytes, its manifest says .*delete"):
        shards.tokens("train")


def test_training_on_a_truncated_shard_reads_the_intact_stream(tmp_path):
    intact = train(load_run_config(run_config(tmp_path, "a", max_steps=2, eval_every=100)))
    shards = json.loads((tmp_path / "a" / "data.json").read_text())["shards"]
    _truncate(tmp_path / "cache" / "shards" / shards.split("/")[-1] / "train.bin", keep=0.7)
    with pytest.warns(UserWarning, match="train.bin has"):
        again = train(load_run_config(run_config(tmp_path, "b", max_steps=2, eval_every=100)))
    assert again["stream_hash"] == intact["stream_hash"] and again["val_loss"] == intact["val_loss"]


# ------------------------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("damage", [_flip, _truncate])
def test_damaged_cached_tokenizer_is_trained_again(corpus_and_tokenizer, damage):
    corpus, tok, cache = corpus_and_tokenizer
    (path,) = (cache / "tokenizers").glob("*.json")
    damage(path)
    with pytest.warns(UserWarning, match=rf"tokenizer file {path} is damaged.*training it again"):
        again = BPETokenizerConfig().load_or_train(corpus, cache, 300)
    assert again.fingerprint() == tok.fingerprint() and Tokenizer.load(path).fingerprint() == tok.fingerprint()


def test_damaged_tokenizer_file_is_a_clear_error(corpus_and_tokenizer, tmp_path):
    corpus, tok, cache = corpus_and_tokenizer
    path = tmp_path / "run" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(path)
    assert Tokenizer.load(path).fingerprint() == tok.fingerprint()
    text = path.read_text()
    path.write_text(text.replace('"<|endoftext|>"', '"<|endoftexx|>"', 1))  # valid JSON, changed content
    with pytest.raises(CorruptFileError, match=r"tokenizer file .*tokenizer.json is damaged .*checksum"):
        Tokenizer.load(path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_bytes(b"\xff\xfe not json")  # a user's own file: no checksum
    with pytest.raises(CorruptFileError, match=r"tokenizer file .*hf/tokenizer.json cannot be read"):
        HFTokenizerConfig(name_or_path=str(tmp_path / "hf")).load_or_train(corpus, cache, 300)


# ------------------------------------------------------------------------------- saved model and the CLI


def test_damaged_saved_model_and_tokenizer_give_one_line_cli_errors(tmp_path):
    train(load_run_config(run_config(tmp_path, max_steps=2, eval_every=100)))
    run = tmp_path / "run"
    cli = CliRunner()
    assert cli.invoke(app, ["generate", str(run), "--max-new-tokens", "3"]).exit_code == 0
    _flip(run / "tokenizer.json")
    result = cli.invoke(app, ["generate", str(run), "--max-new-tokens", "3"])
    output = "".join(result.output.split())  # rich wraps long lines, even inside a path
    assert result.exit_code == 2 and "tokenizer.jsonisdamaged" in output and "Traceback" not in output
    _truncate(run / "model" / "model.safetensors")
    result = cli.invoke(app, ["generate", str(run), "--max-new-tokens", "3"])
    output = "".join(result.output.split())
    assert result.exit_code == 2 and "model.safetensorshas" in output
    assert f"`archifactorytrain{run}/config.yaml`writestherun'sfinalfilesagain" in output  # the run's own dir


# ----------------------------------------------------------------------------- results database, metrics


def test_damaged_results_database_is_an_error_for_the_report_and_recovered_by_the_sweep(tmp_path, capsys):
    s = spec(tmp_path, seeds=[0], variants={})
    sweep_dir = tmp_path / "sweep"
    assert SweepRunner(s, tmp_path, sweep_dir).run()["done"] == 1
    before = Store(sweep_dir / "results.sqlite").finals()
    db = sweep_dir / "results.sqlite"
    db.write_bytes(b"\x00" * 100 + db.read_bytes()[100:])  # the SQLite header is gone
    with pytest.raises(StoreDamagedError, match=r"results database .*results.sqlite is damaged"):
        Store(db)
    result = CliRunner().invoke(app, ["report", str(sweep_dir)])
    output = "".join(result.output.split())
    assert result.exit_code == 2 and "isdamaged" in output  # what the sweep does, in the sweep's words
    assert "re-runningthesweep" in output and "movesitasidetoresults.sqlite.damaged-<time>" in output
    steps_before = len(_train_losses(sweep_dir / "runs" / "baseline-s0"))
    capsys.readouterr()
    assert SweepRunner(s, tmp_path, sweep_dir).run()["done"] == 1  # recovered, not retrained
    said = " ".join(capsys.readouterr().out.split())
    assert "is damaged" in said and "moved it aside to results.sqlite.damaged-" in said and "nothing is retrained" in said
    assert len(_train_losses(sweep_dir / "runs" / "baseline-s0")) == steps_before
    after = Store(db).finals()
    assert [(f["run_id"], f["val_loss"], f["tokens"]) for f in after] == [
        (f["run_id"], f["val_loss"], f["tokens"]) for f in before]
    assert list(sweep_dir.glob("results.sqlite.damaged-*"))


def test_damaged_metrics_lines_are_skipped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path, [], tmp_path, {})
    for step in (1, 2, 3):
        writer.write({"kind": "train", "step": step, "loss": 1.0 / step})
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b'{"kind": "tr\xff\xfe garbage\n' + lines[1] + lines[2] + b'{"kind": "train", "st')
    MetricsWriter(path, [], tmp_path, {}).write({"kind": "train", "step": 4, "loss": 0.25})  # after a partial line
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipped 2 damaged line\(s\) \(2, 5\)"):
        records = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert all(math.isfinite(r["loss"]) for r in records)


def test_a_restarted_run_drops_the_metrics_records_it_writes_again_and_keeps_damaged_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path, [], tmp_path, {})
    for step in (0, 1, 2, 3):
        writer.write({"kind": "train", "step": step, "loss": 1.0})
        writer.write({"kind": "eval", "step": step, "val_loss": 2.0})
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b'{"kind": "tr\xff garbage\n' + b"".join(lines[1:]))
    assert writer.keep_through(2) == 2  # resumed from step 2: steps 3.. are trained again
    assert [(r["kind"], r["step"]) for r in read_metrics(path, warn=lambda _: None)] == [
        (kind, step) for step in (0, 1, 2) for kind in ("train", "eval")]
    assert b"garbage\n" in path.read_bytes()  # a damaged line before the end: left as it was
    writer.write({"kind": "eval", "step": 2, "val_loss": 1.5}, replace=True)  # step 2 evaluated again
    records = read_metrics(path, warn=lambda _: None)
    assert [(r["kind"], r["step"], r.get("val_loss")) for r in records if r["kind"] == "eval"] == [
        ("eval", 0, 2.0), ("eval", 1, 2.0), ("eval", 2, 1.5)]
    assert writer.keep_through(None) == 6 and read_metrics(path, warn=lambda _: None) == []  # starting over
    assert not list(tmp_path.glob("*.tmp"))
    # a torn last line (the kill came while it was written, after the last checkpoint) goes; a nonfinite
    # record stays (why the run was restarted) and, met again, keeps one line
    writer.write({"kind": "nonfinite", "step": 5, "loss": float("inf")})
    writer.write({"kind": "train", "step": 6, "loss": 1.0})
    path.write_bytes(path.read_bytes() + b'{"kind": "train", "st')
    assert writer.keep_through(3) == 2
    assert [(r["kind"], r["step"]) for r in read_metrics(path)] == [("nonfinite", 5)]
    writer.write({"kind": "nonfinite", "step": 5, "loss": float("nan")}, replace=True)
    assert len(read_metrics(path)) == 1
    disabled = MetricsWriter(tmp_path / "other.jsonl", [], tmp_path, {}, enabled=False)  # a non-main process
    assert disabled.keep_through(None) == 0 and not (tmp_path / "other.jsonl").exists()
