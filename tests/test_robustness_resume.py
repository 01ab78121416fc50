"""A new user's second pass: resuming a finished run (or one past its budget), generating past the context
a model was built for, and the small things (NaN options, booleans for numbers, where a bad value came
from, advice for a copied run directory, warnings as one line)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import yaml
from test_robustness import one_error_line, runner, write_run

from archifactory.cli import app
from archifactory.errors import ArchifactoryWarning, InputError
from archifactory.model.config import load_model_config
from archifactory.model.lm import CausalLM

# ----------------------------------------------------------------------------- resuming a finished run


def test_resuming_a_finished_run_trains_nothing_and_says_so(tmp_path):
    path = write_run(tmp_path)
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    run = tmp_path / "run"
    metrics, weights = (run / "metrics.jsonl").read_bytes(), (run / "model" / "model.safetensors").read_bytes()
    summary = json.loads((run / "summary.json").read_text())

    # before: "0/2 loss nan 0 tok/s", a second final evaluation line and a rewritten model, exit 0
    result = runner.invoke(app, ["train", str(path), "--set", "train.progress=true"])
    assert result.exit_code == 0, result.output
    assert f"already at step 2 of max_steps 2: nothing to train ({run}" in result.output
    assert "nan" not in result.output.lower() and "tok/s" not in result.output
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert (run / "model" / "model.safetensors").read_bytes() == weights
    assert json.loads((run / "summary.json").read_text()) == summary
    # known finished before anything is prepared or written: the data cache is not rebuilt, no file touched
    shutil.rmtree(tmp_path / "cache")
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0 and "nothing to train" in result.output, result.output
    assert not (tmp_path / "cache").exists()
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()} == stamps

    # a checkpoint past the budget: refused before anything is written (before: "done: step 2", exit 0)
    config = (run / "config.yaml").read_text()
    result = runner.invoke(app, ["train", str(path), "--set", "train.max_steps=1"])
    one_error_line(result, "step_00000002 is at step 2, past the run's budget of max_steps 1", "nothing to train",
                   "at least 2 steps", "--fresh")
    assert (run / "config.yaml").read_text() == config
    result = runner.invoke(app, ["train", str(path), "--set", "train.max_steps=null", "--set", "train.max_tokens=64"])
    one_error_line(result, "is at step 2, past the run's budget of max_tokens 64 (1 step)")

    # finished steps but a damaged final model: written again from the last checkpoint, nothing trained
    (run / "model" / "model.safetensors").write_bytes(weights[:-8] + b"\0" * 8)
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0 and "writing the final evaluation and model" in result.output, result.output
    assert (run / "model" / "model.safetensors").read_bytes() == weights
    train_steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["kind"] == "train"]
    assert train_steps == [1, 2]
    eval_steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["kind"] == "eval"]
    assert eval_steps == sorted(set(eval_steps)), eval_steps  # the final evaluation, written again, once


@pytest.mark.parametrize("damage", ["flip tokenizer.json", "drop tokenizer.json", "drop data.json",
                                    "cut data.json"])
def test_a_finished_runs_damaged_setup_files_are_written_again_by_the_command_the_advice_names(tmp_path, damage):
    """A damaged tokenizer.json of a finished run: generate's advice names `archifactory train RUN/config.yaml`;
    before, that command returned "nothing to train" at once and left the file damaged."""
    path = write_run(tmp_path)
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    run = tmp_path / "run"
    name = damage.split()[1]
    original, weights = (run / name).read_bytes(), (run / "model" / "model.safetensors").read_bytes()
    if damage.startswith("flip"):
        at = len(original) // 2
        (run / name).write_bytes(original[:at] + bytes([original[at] ^ 1]) + original[at + 1:])
        line = one_error_line(runner.invoke(app, ["generate", str(run), "--prompt", "a"]), "is damaged")
        assert f"archifactory train {run / 'config.yaml'}" in line, line
    elif damage.startswith("cut"):  # no checksum: read as JSON (eval takes its unigram null model from it)
        (run / name).write_bytes(original[: len(original) // 2])
    else:
        (run / name).unlink()
    result = runner.invoke(app, ["train", str(run / "config.yaml")])
    assert result.exit_code == 0 and "nothing to train" in result.output, result.output
    assert (run / name).read_bytes() == original and (run / "model" / "model.safetensors").read_bytes() == weights
    assert runner.invoke(app, ["generate", str(run), "--prompt", "a", "--max-new-tokens", "2"]).exit_code == 0


@pytest.mark.parametrize("damage", ["garbled", "missing"])
def test_a_finished_run_with_a_damaged_config_yaml_is_not_taken_as_finished_early(tmp_path, damage):
    """The early "nothing to train" rests on config.yaml, the run's checked record of its setup: before, a
    finished run whose config.yaml was damaged or missing took any config (a changed model too) as finished,
    exit 0, and left config.yaml as it was (``generate RUN/checkpoints/...`` then fails on it)."""
    path = write_run(tmp_path)
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    run = tmp_path / "run"
    config, weights = (run / "config.yaml").read_text(), (run / "model" / "model.safetensors").read_bytes()
    if damage == "garbled":
        (run / "config.yaml").write_text("name: [unclosed\n")
    else:
        (run / "config.yaml").unlink()
    damaged = (run / "config.yaml").read_bytes() if damage == "garbled" else None
    changed = runner.invoke(app, ["train", str(path), "--set", "model.d_model=48"])  # other weights' shapes
    one_error_line(changed, f"checkpoint {run / 'checkpoints' / 'step_00000002'} was trained with another setup: "
                   "model.d_model: 32 -> 48")
    # refused before anything is written (before the early return: config.yaml was overwritten with
    # d_model 48, and the run's own config was then refused as "48 -> 32")
    if damage == "garbled":
        assert (run / "config.yaml").read_bytes() == damaged
    else:
        assert not (run / "config.yaml").exists()
    result = runner.invoke(app, ["train", str(path)])  # the run's own config: written again, nothing trained
    assert result.exit_code == 0 and "nothing to train" in result.output, result.output
    assert (run / "config.yaml").read_text() == config
    assert (run / "model" / "model.safetensors").read_bytes() == weights
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"] == [1, 2]


def test_a_resumed_run_shows_its_progress_from_the_checkpoint_without_nan(tmp_path):
    path = write_run(tmp_path)
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    result = runner.invoke(app, ["train", str(path), "--set", "train.max_steps=3", "--set", "train.progress=true"])
    assert result.exit_code == 0 and "resumed from" in result.output, result.output
    assert "nan" not in result.output.lower() and "done: step 3" in result.output


# ------------------------------------------------------------------------ generating past the context


def small_model(**parts) -> CausalLM:
    data = {"vocab_size": 32, "d_model": 16, "n_layers": 2, "max_seq_len": 16,
            "mixer": {"kind": "attention", "n_heads": 2}, **parts}
    torch.manual_seed(0)
    return CausalLM(load_model_config(data))


REFUSED = {
    "rope": {"position": {"kind": "rope"}},
    "rope linear scaling": {"position": {"kind": "rope", "scaling": {"type": "linear", "factor": 2.0}}},
    "learned": {"position": {"kind": "learned"}},
    "sinusoidal": {"position": {"kind": "sinusoidal"}},
    "rope in one attention layer of a recurrent model": {
        "mixer": {"kind": "gla", "n_heads": 2}, "position": {"kind": "rope"},
        "layer_overrides": [{"layers": [1], "mixer": {"kind": "attention", "n_heads": 2}}]},
}
WARNED = {
    "alibi": {"position": {"kind": "alibi"}},
    "none (NoPE)": {"position": {"kind": "none"}},
    "rope dynamic NTK": {"position": {"kind": "rope", "scaling": {"type": "dynamic", "factor": 2.0,
                                                                  "original_max_seq_len": 8}}},
    "recurrent mixers only (rope unused)": {"mixer": {"kind": "gla", "n_heads": 2}, "position": {"kind": "rope"}},
}


@pytest.mark.parametrize("parts", REFUSED.values(), ids=REFUSED.keys())
def test_generation_past_max_seq_len_is_refused_where_positions_do_not_extrapolate(parts):
    model = small_model(**parts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # up to max_seq_len: no warning
        assert model.generate([1, 2, 3], 13, temperature=0).shape == (16,)
    with pytest.raises(InputError, match=r"prompt \(3 tokens\) \+ max_new_tokens \(14\) exceeds max_seq_len=16.*"
                                         r"give max_new_tokens <= 13"):
        model.generate([1, 2, 3], 14, temperature=0)


@pytest.mark.parametrize("parts", WARNED.values(), ids=WARNED.keys())
def test_generation_past_max_seq_len_warns_once_where_positions_extrapolate(parts):
    model = small_model(**parts)
    with pytest.warns(ArchifactoryWarning, match=r"exceeds max_seq_len=16: generating past the model's context"):
        out = model.generate([1, 2, 3], 30, temperature=0)
    assert out.shape == (33,)  # it did generate past the context
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model
        model.generate([1, 2, 3], 30, temperature=0)


def test_cli_generate_refuses_past_a_rope_models_context(tmp_path):
    path = write_run(tmp_path, max_steps=1)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["position"] = {"kind": "rope"}
    path.write_text(yaml.safe_dump(cfg))
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0, "train"
    run = tmp_path / "run"
    # before: --max-new-tokens 5000 ran on past max_seq_len=64 without a word
    result = runner.invoke(app, ["generate", str(run), "--prompt", "the cat", "--max-new-tokens", "5000"])
    one_error_line(result, "prompt (8 tokens) + max_new_tokens (5000) exceeds max_seq_len=64",
                   "rope positions past it were never trained", "give max_new_tokens <= 56")
    assert runner.invoke(app, ["generate", str(run), "--prompt", "the cat", "--max-new-tokens", "56"]).exit_code == 0
    # (generate --chat: tests/test_posttrain_sft.py, on an SFT run)


# ------------------------------------------------------------------------------------ small things


@pytest.mark.parametrize("args", [["generate", "RUN", "--top-p", "nan"], ["generate", "RUN", "--temperature", "nan"],
                                  ["eval", "RUN", "--tasks", "piqa", "--temperature", "nan"]])
def test_nan_options_are_named_nan(tmp_path, args):
    args = [str(tmp_path) if a == "RUN" else a for a in args]
    one_error_line(runner.invoke(app, args), f"{args[-2]} nan is not a number (NaN)")


def test_sampling_names_nan():
    from archifactory.model.sampling import sample_next

    with pytest.raises(InputError, match=r"top_p=nan is not a number \(NaN\)"):
        sample_next(torch.zeros(1, 4), 1.0, top_p=float("nan"))
    with pytest.raises(InputError, match=r"temperature=nan is not a number \(NaN\)"):
        sample_next(torch.zeros(1, 4), float("nan"))


@pytest.mark.parametrize(("override", "field"), [
    ("d_model=true", "d_model"), ("init.std=yes", "init.std"), ("mixer.n_heads=false", "mixer.n_heads"),
    ("embedding_scale=on", "embedding_scale"), ("layer_overrides=[{layers: [true]}]", "layer_overrides.0.layers"),
])
def test_a_boolean_is_not_a_number(override, field):
    """pydantic reads true as 1: --set d_model=true built a model of width 1."""
    result = runner.invoke(app, ["config", "tiny", "--set", override])
    one_error_line(result, f"{field}: expected a number, got the boolean", f"(from --set {override})")
    assert runner.invoke(app, ["config", "tiny", "--set", "final_norm=false", "--set", "tie_embeddings=no"]).exit_code == 0


def test_errors_say_whether_the_value_came_from_the_command_line_or_the_file(tmp_path):
    result = runner.invoke(app, ["config", "tiny", "--set", "mixer.n_heads=7"])
    line = one_error_line(result, "invalid ModelConfig from the command line", "(from --set mixer.n_heads=7)")
    assert "tiny.yaml" not in line  # before: "invalid ModelConfig in configs/models/tiny.yaml: ..."
    model = tmp_path / "m.yaml"
    model.write_text(yaml.safe_dump({**load_model_config("tiny").model_dump(mode="json"), "vocab_size": 1}))
    line = one_error_line(runner.invoke(app, ["config", str(model), "--set", "norm.eps=-1"]), f"in {model}")
    assert "(from --set norm.eps=-1)" in line and "norm.eps: " in line  # each problem says where it came from
    assert "vocab_size: Input should be greater than or equal to 2;" in line or line.rstrip().endswith(
        "vocab_size: Input should be greater than or equal to 2")
    path = write_run(tmp_path)
    one_error_line(runner.invoke(app, ["train", str(path), "--set", "train.batch_size=true"]),
                   "invalid RunConfig from the command line", "train.batch_size: expected a number",
                   "(from --set train.batch_size=true)")


def test_damaged_files_of_a_copied_run_name_the_command_for_that_copy(tmp_path):
    path = write_run(tmp_path)
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    original, copy = tmp_path / "run", tmp_path / "copy"
    shutil.copytree(original, copy)
    weights = (copy / "model" / "model.safetensors").read_bytes()
    (copy / "model" / "model.safetensors").write_bytes(weights[:-8] + b"\0" * 8)
    # before: "re-running `archifactory train` on the run's config.yaml writes it again", which trained the
    # original's directory (the copy's config.yaml names it in out_dir)
    command = f"archifactory train {copy / 'config.yaml'} --set out_dir={copy}"
    for args in (["generate", str(copy)], ["hf", "export", str(copy), str(tmp_path / "hf")],
                 ["eval", str(copy), "--tasks", "piqa"]):
        one_error_line(runner.invoke(app, args), "is damaged", f"`{command}` writes the run's final files again")
    before = (original / "metrics.jsonl").read_bytes()
    result = runner.invoke(app, command.split()[1:])
    assert result.exit_code == 0 and "writing the final evaluation and model" in result.output, result.output
    assert (copy / "model" / "model.safetensors").read_bytes() == weights
    assert (original / "metrics.jsonl").read_bytes() == before  # the original was not touched
    # the run's own directory needs no --set out_dir
    (original / "model" / "model.safetensors").write_bytes(b"x")
    one_error_line(runner.invoke(app, ["generate", str(original)]),
                   f"`archifactory train {original / 'config.yaml'}` writes")


def test_cache_rebuild_warnings_are_one_warning_line(tmp_path):
    path = write_run(tmp_path, max_steps=1)
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    (shards,) = (tmp_path / "cache" / "shards").iterdir()
    data = (shards / "train.bin").read_bytes()
    (shards / "train.bin").write_bytes(data[: len(data) // 2])
    result = runner.invoke(app, ["train", str(path), "--fresh"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "rebuilding it from the corpus" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: "), result.output
    assert "UserWarning" not in result.output and ".py:" not in result.output


# ------------------------------------------------------------- a resume with a new learning rate


def logged_lrs(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["lr"] for row in rows if row["kind"] == "train"}


def test_a_resume_with_a_changed_lr_trains_at_the_new_rate(tmp_path):
    # the divergence advice is "lower optimizer.lr and resume": before, the checkpoint's optimizer state
    # restored the old peak rate, so the resumed run diverged again at the same rate
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path = write_run(tmp_path / "a", max_steps=2)
    assert runner.invoke(app, ["train", str(path), "--set", "optimizer.lr=1e-2"]).exit_code == 0
    result = runner.invoke(app, ["train", str(path), "--set", "optimizer.lr=1e-5", "--set", "train.max_steps=4"])
    assert result.exit_code == 0 and "resumed from" in result.output, result.output
    # the reference: a fresh run at the new rate, same schedule and budget
    fresh = write_run(tmp_path / "b", max_steps=4)
    assert runner.invoke(app, ["train", str(fresh), "--set", "optimizer.lr=1e-5"]).exit_code == 0
    resumed, reference = logged_lrs(tmp_path / "a" / "run"), logged_lrs(tmp_path / "b" / "run")
    assert resumed[3] == pytest.approx(reference[3], rel=1e-12) and resumed[4] == pytest.approx(reference[4], rel=1e-12)
    assert resumed[3] < 1e-4


@pytest.mark.parametrize("field", ["optimizer.lr", "optimizer.muon_lr"])
def test_a_learning_rate_beyond_float32_is_a_config_error(tmp_path, field):
    # before: optimizer.lr=1e308 validated and then raised an overflow RuntimeError inside torch.optim.Adam
    path = write_run(tmp_path)
    overrides = (["--set", "optimizer.name=muon"] if "muon" in field else []) + ["--set", f"{field}=1e308"]
    one_error_line(runner.invoke(app, ["train", str(path), *overrides]), field, "1000000")
