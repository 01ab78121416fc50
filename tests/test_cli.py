"""The command line: resolved configs, model info, overrides and errors."""

import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from archifactory.cli import app
from archifactory.config import ConfigError

runner = CliRunner()


def test_config_prints_resolved_yaml_with_overrides():
    result = runner.invoke(app, ["config", "tiny", "--set", "mixer.n_kv_heads=1", "--set", "position.kind=alibi"])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.output)
    assert data["mixer"]["n_kv_heads"] == 1 and data["position"] == {"kind": "alibi"}
    assert data["ffn"]["kind"] == "swiglu"


def test_info_reports_params_and_flops():
    result = runner.invoke(app, ["info", "tiny"])
    assert result.exit_code == 0, result.output
    assert "951,424" in result.output and "training FLOPs per token" in result.output


def test_presets_lists_files():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0 and "llama-26m" in result.output


def test_config_error_is_clear_and_exits_2():
    result = runner.invoke(app, ["info", "tiny", "--set", "mixer.n_heads=3"])
    assert result.exit_code == 2
    assert "mixer.n_heads" in result.output and "does not divide d_model=128" in result.output
    result = runner.invoke(app, ["config", "missing.yaml"])
    assert result.exit_code == 2 and "not found" in result.output


def test_hf_round_trip_through_cli(tmp_path):
    import torch

    import archifactory as af

    model = af.CausalLM.from_config("tiny", ["n_layers=2"])
    model.save_pretrained(tmp_path / "ours")
    assert runner.invoke(app, ["hf", "export", str(tmp_path / "ours"), str(tmp_path / "hf")]).exit_code == 0
    result = runner.invoke(app, ["hf", "import", str(tmp_path / "hf"), str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    back = af.CausalLM.from_pretrained(tmp_path / "back")
    ids = torch.randint(0, 2048, (1, 7))
    torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- user errors: one line, exit 2

TINYSTORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "train.txt"


def run_yaml(tmp_path, corpus_text: str | None = None, **train) -> Path:
    """A one-layer run on a local text (or the TinyStories sample), bytes tokenizer, two steps."""
    if corpus_text is not None:
        (tmp_path / "corpus.txt").write_text(corpus_text)
    corpus = {"kind": "files", "paths": [str(tmp_path / "corpus.txt")], "separator": "<|doc|>"} \
        if corpus_text is not None else {"kind": "tinystories", "path": str(TINYSTORIES), "max_documents": 200}
    cfg = {"name": "t", "out_dir": str(tmp_path / "run"),
           "model": {"vocab_size": 257, "d_model": 32, "n_layers": 1, "max_seq_len": 64,
                     "mixer": {"kind": "attention", "n_heads": 2}},
           "data": {"corpus": corpus, "tokenizer": {"kind": "bytes"}, "cache_dir": str(tmp_path / "cache")},
           "train": {"seq_len": 32, "batch_size": 2, "max_steps": 2, "eval_every": 2, "eval_tokens": 64,
                     "threads": 1, "progress": False, **train}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_one_line_error(result, *expected: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for text in expected:
        assert text in errors[0], errors[0]


@pytest.mark.parametrize(
    ("corpus", "overrides", "expected"),
    [
        ("tiny doc", [], ["training split has 9 tokens", "train.seq_len=32"]),  # 8 bytes + end of document
        ("", [], ["gave no training text"]),
        (None, ["data.corpus.val_fraction=0"], ["validation split has 0 tokens", "data.corpus.val_fraction"]),
        (None, ["model.position.kind=learned", "train.seq_len=65"], ["train.seq_len=65 exceeds model.max_seq_len=64"]),
        # RoPE trained past max_seq_len would give a model that generate and eval refuse at its own length
        (None, ["model.position.kind=rope", "train.seq_len=65"],
         ["train.seq_len=65 exceeds model.max_seq_len=64: the model's rope positions", "raise model.max_seq_len"]),
        (None, ["data.seed=-1"], ["data.seed: Input should be greater than or equal to 0"]),
        (None, ["train.seed=18446744073709551616"], ["train.seed: Input should be less than or equal to"]),
        (None, ["name=../escape"], ["name: '../escape' contains a path separator"]),
    ],
)
def test_train_user_errors_are_one_line(tmp_path, corpus, overrides, expected):
    args = ["train", str(run_yaml(tmp_path, corpus))]
    for override in overrides:
        args += ["--set", override]
    assert_one_line_error(runner.invoke(app, args), *expected)


def test_set_model_to_a_preset_as_the_file_allows(tmp_path):
    from archifactory.train.config import load_run_config

    cfg = load_run_config(run_yaml(tmp_path), ["model=hymba-tiny", "model.n_layers=5"])
    assert cfg.model.mixer.kind == "hymba" and cfg.model.n_layers == 5 and cfg.model.d_model == 128
    result = runner.invoke(app, ["train", str(run_yaml(tmp_path)), "--set", "model=nosuch-preset"])
    assert result.exit_code == 2 and "nosuch-preset" in result.output and "Traceback" not in result.output


def test_longer_training_rows_than_max_seq_len_where_positions_extrapolate():
    from archifactory.config import validate
    from archifactory.train.config import RunConfig

    cfg = {"name": "r", "model": {"vocab_size": 257, "d_model": 32, "n_layers": 1, "max_seq_len": 64,
                                  "mixer": {"kind": "attention", "n_heads": 2}},
           "train": {"seq_len": 128, "batch_size": 2, "max_steps": 2}}
    # as generation allows (and warns): ALiBi and NoPE extrapolate by design, recurrent mixers use no positions
    for position in ("alibi", "none"):
        validate(RunConfig, {**cfg, "model": {**cfg["model"], "position": {"kind": position}}})
    validate(RunConfig, {**cfg, "model": {**cfg["model"], "mixer": {"kind": "gla"}, "position": {"kind": "rope"}}})
    with pytest.raises(ConfigError, match="positions past max_seq_len do not extrapolate"):
        validate(RunConfig, {**cfg, "model": {**cfg["model"], "position": {"kind": "rope"}}})


def test_fla_backend_without_cuda_is_one_line(tmp_path):
    import torch

    from archifactory.mixers.kernels import fla_installed

    args = ["train", str(run_yaml(tmp_path)), "--set", "model.mixer.kind=gla", "--set", "model.mixer.backend=fla"]
    result = runner.invoke(app, args)
    if torch.cuda.is_available() and fla_installed():
        assert result.exit_code == 0, result.output  # the kernel exists here: the run trains
    else:
        assert_one_line_error(result, "backend='fla' needs a CUDA device")


def test_disk_full_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    import errno

    import archifactory.train.trainer as trainer

    monkeypatch.setenv("ARCHIFACTORY_DEBUG", "")  # restored (unset) after the test, which --debug sets

    def full(config, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(trainer, "dump_config", full)
    assert_one_line_error(runner.invoke(app, ["train", str(run_yaml(tmp_path))]), "no space left", "config.yaml")

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(trainer, "dump_config", bug)
    result = runner.invoke(app, ["train", str(run_yaml(tmp_path))])
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)
    result = runner.invoke(app, ["--debug", "info", "tiny", "--set", "mixer.n_heads=3"])  # traceback on request
    assert result.exit_code == 1 and isinstance(result.exception, ConfigError)


def test_argument_and_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert_one_line_error(runner.invoke(app, ["train", str(bad)]), "latin1.yaml is not UTF-8 text")
    assert_one_line_error(runner.invoke(app, ["config", str(bad)]), "not UTF-8")
    for seq_len in ("-1", "0"):
        result = runner.invoke(app, ["info", "tiny", "--seq-len", seq_len])
        assert result.exit_code == 2 and "--seq-len" in result.output
    assert runner.invoke(app, ["info", "tiny", "--seq-len", "16"]).exit_code == 0
    assert_one_line_error(runner.invoke(app, ["generate", str(tmp_path), "--top-p", "0"]), "--top-p 0 is out of range; give a value in (0, 1]")
    assert_one_line_error(runner.invoke(app, ["generate", str(tmp_path)]), "neither a run directory", "train the run first")
    assert_one_line_error(runner.invoke(app, ["report", str(tmp_path)]), "results.sqlite")


def test_output_directory_that_is_a_file_is_one_line(tmp_path):
    taken = tmp_path / "taken.yaml"
    taken.write_text("x: 1\n")
    result = runner.invoke(app, ["train", str(run_yaml(tmp_path)), "--set", f"out_dir={taken}"])
    assert_one_line_error(result, "taken.yaml exists and is not a directory", "choose another output directory")
