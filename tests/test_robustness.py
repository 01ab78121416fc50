"""What a new user runs into: every mistake is one clear line (what, where, what to do) with a non-zero exit
and no traceback; a resumed run cannot silently change its setup; every command that takes a trained
model accepts the same forms of it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from archifactory import cli
from archifactory.cli import app
from archifactory.config import ConfigError, MAX_STEPS, MAX_TOKENS, load_yaml
from archifactory.data.tokenizer import Tokenizer
from archifactory.errors import InputError, UserError

runner = CliRunner()

WORDS = "the cat sat on a mat and then a dog ran to the park where birds sang all day long".split()


def corpus_text(n_docs: int = 120) -> str:
    """Plain deterministic documents (~60 bytes each) separated as the files corpus expects."""
    docs = [f"story {i}: " + " ".join(WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(12)) for i in range(n_docs)]
    return "\n<|doc|>\n".join(docs)


def write_run(tmp_path: Path, **train) -> Path:
    """A one-layer bytes-tokenizer run config (learned positions, max_seq_len 64) training 2 steps."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(corpus_text())
    cfg = {"name": "t", "out_dir": str(tmp_path / "run"),
           "model": {"vocab_size": 257, "d_model": 32, "n_layers": 1, "max_seq_len": 64,
                     "position": {"kind": "learned"}, "mixer": {"kind": "attention", "n_heads": 2}},
           "data": {"corpus": {"kind": "files", "paths": [str(corpus)], "separator": "<|doc|>"},
                    "tokenizer": {"kind": "bytes"}, "cache_dir": str(tmp_path / "cache")},
           "train": {"seq_len": 32, "batch_size": 2, "max_steps": 2, "eval_every": 2, "eval_tokens": 64,
                     "checkpoint_every": 1, "keep_checkpoints": 5, "log_every": 1, "threads": 1, "progress": False,
                     "precision": "fp32", **train}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_error_line(result, *expected: str) -> str:
    """The single ``error:`` line of a failed command (exit 2, no traceback), holding each of ``expected``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and "╭" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-step run (checkpoints at steps 1 and 2, final model/)."""
    tmp = tmp_path_factory.mktemp("trained")
    result = runner.invoke(app, ["train", str(write_run(tmp))])
    assert result.exit_code == 0, result.output
    return tmp / "run"


# ------------------------------------------------------------------------------- config file errors


@pytest.mark.parametrize("command", ["train", "sweep", "config", "info"])
def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, command):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: tiny\n  train: [1,\n")
    line = one_error_line(runner.invoke(app, [command, str(bad)]), f"{bad}:3:8 is not valid YAML", "fix the syntax")
    assert "^" not in line and "line 3" not in line  # PyYAML's multi-line excerpt is not copied in


def test_several_bad_fields_are_one_line_naming_the_file_and_each_field(tmp_path):
    path = write_run(tmp_path)
    args = ["train", str(path), "--set", "train.seq_len=0", "--set", "train.batch_size=-1", "--set", "optimizer.lr=-1",
            "--set", "train.eval_every=0", "--set", "train.log_every=0"]
    # every bad value came from --set: the line says so, not the file (which holds none of them)
    line = one_error_line(runner.invoke(app, args), "invalid RunConfig from the command line: ",
                          "optimizer.lr: ", "(from --set optimizer.lr=-1)", "train.seq_len: ",
                          "(and 2 more: train.eval_every, train.log_every)")
    with pytest.raises(ConfigError) as info:  # the library keeps every problem
        from archifactory.train import load_run_config

        load_run_config(path, args[3::2])
    assert len(info.value.problems) == 5 and str(info.value) == line.removeprefix("error: ")


def test_errors_print_as_one_physical_line_at_any_terminal_width(monkeypatch, tmp_path):
    monkeypatch.setattr(cli.err_console, "width", 30)
    long_name = "x" * 150
    result = runner.invoke(app, ["train", str(write_run(tmp_path)), "--set", f"name=a/{long_name}"])
    one_error_line(result, long_name, "plain name")


# --------------------------------------------------------------- every numeric option, out of range

NUMERIC_OPTIONS = {
    # command args (with a placeholder path) -> {option: values that must be refused}
    ("info", "tiny"): {"--seq-len": ["0", "-1", "16777217", "x"]},
    ("eval", "RUN", "--tasks", "piqa"): {"--limit": ["0", "-3"], "--batch-size": ["0", "2000000"],
                                         "--samples": ["0", "2000000"], "--temperature": ["-1", "nan", "inf"]},
    ("generate", "RUN"): {"--max-new-tokens": ["0", "16777217"], "--temperature": ["-0.5", "nan", "inf"],
                          "--top-k": ["0"], "--top-p": ["0", "1.5", "nan", "-1"], "--seed": ["-1", str(2**63)],
                          "--samples": ["0", str(2**20 + 1)]},
}


def numeric_options() -> set[tuple[str, str]]:
    """Every (command, option) taking a number, read from the command functions' signatures."""
    import inspect
    import typing

    import typer.models

    found = set()
    typers = [app] + [group.typer_instance for group in app.registered_groups]
    for typer_app in typers:
        for command in typer_app.registered_commands:
            name = command.name or command.callback.__name__.replace("_", "-")
            for param in inspect.signature(command.callback).parameters.values():
                annotation = param.annotation
                if isinstance(annotation, str):
                    annotation = eval(annotation, vars(cli))  # noqa: S307 (the module's own annotations)
                kinds = set(typing.get_args(annotation)) or {annotation}
                if kinds & {int, float} and isinstance(param.default, typer.models.OptionInfo):
                    decls = [d for d in (param.default.param_decls or ()) if d.startswith("--")]
                    found.add((name, decls[0] if decls else "--" + param.name.replace("_", "-")))
    return found


def test_the_table_covers_every_numeric_option():
    table = {(args[0], option) for args, options in NUMERIC_OPTIONS.items() for option in options}
    assert numeric_options() == table


@pytest.mark.parametrize(("args", "option", "value"),
                         [(a, o, v) for a, opts in NUMERIC_OPTIONS.items() for o, vs in opts.items() for v in vs])
def test_numeric_option_out_of_range_is_one_line(tmp_path, args, option, value):
    args = [str(tmp_path) if a == "RUN" else a for a in args]
    one_error_line(runner.invoke(app, [*args, f"{option}={value}"]), option)


def test_usage_mistakes_are_one_line():
    one_error_line(runner.invoke(app, ["train"]), "Missing argument 'CONFIG'", "--help")
    one_error_line(runner.invoke(app, ["info", "tiny", "--bogus"]), "No such option: --bogus")
    one_error_line(runner.invoke(app, ["no-such-command"]), "No such command")


# ------------------------------------------------------------------------------------ run bounds


@pytest.mark.parametrize(("override", "field"), [
    (f"train.max_steps={MAX_STEPS + 1}", "train.max_steps"),
    (f"train.max_tokens={MAX_TOKENS + 1}", "train.max_tokens"),
    ("train.max_time_s=1e12", "train.max_time_s"),
    (f"train.eval_tokens={MAX_TOKENS * 10}", "train.eval_tokens"),
    ("train.device=gpu", "train.device"),
    ("optimizer.betas=[0.9, 1.0]", "optimizer.betas.1"),
])
def test_run_bounds_are_config_errors(tmp_path, override, field):
    from archifactory.train import load_run_config

    with pytest.raises(ConfigError, match=rf"{re.escape(field)}: "):
        load_run_config(write_run(tmp_path), [override])


def test_sweep_budget_bounds():
    from archifactory.config import validate
    from archifactory.sweep.spec import SweepSpec

    spec = {"name": "s", "base": {}}
    for budget, field in [({"tokens": 1e16}, "budget.tokens"), ({"tokens": 0.5}, "budget.tokens"),
                          ({"seconds": 1e9}, "budget.seconds"), ({"flops": 1e31}, "budget.flops")]:
        with pytest.raises(ConfigError, match=rf"{field}: "):
            validate(SweepSpec, {**spec, "budget": budget})


# --------------------------------------------------------------------------------- resume changes


def test_resume_refuses_a_changed_setup_and_keeps_allowed_changes(tmp_path):
    path = write_run(tmp_path)
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    run = tmp_path / "run"
    before = (run / "config.yaml").read_text()
    for override, field in [("train.seq_len=16", "train.seq_len: 32 -> 16"), ("train.batch_size=4", "train.batch_size"),
                            ("data.seed=3", "data.seed"), ("model.d_model=64", "model.d_model"),
                            ("optimizer.name=sgd", "optimizer.name")]:
        result = runner.invoke(app, ["train", str(path), "--set", override, "--set", "train.max_steps=3"])
        one_error_line(result, field, "new directory", "--fresh", "--allow-config-change")
        assert (run / "config.yaml").read_text() == before  # nothing overwritten
    # extending the budget (and other settings that keep the token stream) resumes
    result = runner.invoke(app, ["train", str(path), "--set", "train.max_steps=3", "--set", "train.eval_every=3"])
    assert result.exit_code == 0 and "resumed from" in result.output, result.output
    assert load_yaml(run / "config.yaml")["train"]["max_steps"] == 3
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("kind", "train") == "train"]
    assert steps == sorted(set(steps)) and max(steps) == 3
    # asked for explicitly, a changed setup resumes (with a warning)
    result = runner.invoke(app, ["train", str(path), "--set", "train.batch_size=4", "--set", "train.max_steps=4",
                                 "--allow-config-change"])
    assert result.exit_code == 0 and "changed setup" in result.output, result.output


# ---------------------------------------------------------------------- one resolver for run dirs


def greedy(target: Path) -> str:
    result = runner.invoke(app, ["generate", str(target), "--prompt", "the cat", "--max-new-tokens", "8",
                                 "--temperature", "0"])
    assert result.exit_code == 0, result.output
    return result.output.split("sample 1", 1)[1]


def test_every_form_of_a_run_gives_the_same_model(trained, tmp_path):
    from archifactory.train.checkpoint import latest_checkpoint

    last = latest_checkpoint(trained)
    assert last.name == "step_00000002"
    text = greedy(trained)
    assert greedy(trained / "model") == text
    assert greedy(last) == text  # the last checkpoint holds the final weights
    for source in (trained, trained / "model", last):  # each form reaches the model (learned positions)
        result = runner.invoke(app, ["hf", "export", str(source), str(tmp_path / "hf")])
        one_error_line(result, "position.kind='learned'")  # reached the model: its positions have no HF class


def test_forms_that_are_not_a_model_are_one_line(trained, tmp_path):
    one_error_line(runner.invoke(app, ["generate", str(tmp_path / "missing")]), "does not exist", "run directory")
    one_error_line(runner.invoke(app, ["hf", "export", str(tmp_path), str(tmp_path / "o")]), "train the run first")
    one_error_line(runner.invoke(app, ["generate", str(trained / "config.yaml")]), "is a file")
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints" / "step_00000001").mkdir(parents=True)
    one_error_line(runner.invoke(app, ["generate", str(unfinished)]), "has not finished",
                   "checkpoints/step_00000001")


def test_eval_names_a_missing_include_path(trained, tmp_path):
    missing = tmp_path / "no-such-folder"
    one_error_line(runner.invoke(app, ["eval", str(trained), "--tasks", "lm_eval:x", "--include-path", str(missing)]),
                   f"--include-path {missing}: no such folder")


def test_generate_beyond_learned_positions_is_one_line(trained):
    # prompt: end-of-document + 7 bytes = 8 tokens; the learned table has 64 rows
    result = runner.invoke(app, ["generate", str(trained), "--prompt", "the cat", "--max-new-tokens", "100"])
    one_error_line(result, "exceeds max_seq_len=64", "learned position table", "max_new_tokens <= 56")
    assert runner.invoke(app, ["generate", str(trained), "--prompt", "the cat", "--max-new-tokens", "56"]).exit_code == 0


# ------------------------------------------------------------------------- errors raised in training


def test_training_and_checkpoint_errors_are_user_errors(trained, tmp_path):
    from archifactory.train import NonFiniteLossError
    from archifactory.train.checkpoint import CheckpointError, load_checkpoint

    assert issubclass(NonFiniteLossError, UserError) and issubclass(CheckpointError, UserError)
    assert issubclass(InputError, UserError)
    damaged = tmp_path / "step_00000001"
    import shutil

    shutil.copytree(trained / "checkpoints" / "step_00000001", damaged)
    (damaged / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="state.pt"):
        from archifactory.model.lm import CausalLM
        from archifactory.model.config import load_model_config

        load_checkpoint(damaged, CausalLM(load_model_config(load_yaml(trained / "config.yaml")["model"])), "cpu")


def test_divergence_is_one_line(tmp_path):
    path = write_run(tmp_path, max_steps=6, grad_clip=None)
    result = runner.invoke(app, ["train", str(path), "--set", "optimizer.lr=1e6", "--set", "schedule.warmup_steps=0"])
    line = one_error_line(result, "training stopped", "lower optimizer.lr")
    assert "fp16" not in line and "bf16" not in line  # advice fits the fp32 run
    # lr 1e6 (the largest allowed) makes step 2's weights finite but huge: step 3's gradient is NaN. Resuming
    # from step 2 with a sane lr (which the resume now applies) fails at once, since the gradient at those
    # weights is NaN whatever the rate, and the message then says that checkpoint has diverged, not that it
    # is good.
    assert "checkpoints/step_00000002 (step 2)" in line, line
    result = runner.invoke(app, ["train", str(path), "--set", "optimizer.lr=1e-3", "--set", "schedule.warmup_steps=0"])
    line = one_error_line(result, "step 3 ", "checkpoints/step_00000002, holds finite weights that have already "
                          "diverged", "step_00000002 to resume from step_00000001")
    assert "the rate at this step was 0.000775" in line, line  # the resumed step ran at the new rate


def test_the_resolver_maps_every_form_to_its_run(trained, tmp_path):
    from archifactory.train.locate import locate_model

    last = trained / "checkpoints" / "step_00000002"
    assert locate_model(trained) == locate_model(trained / "model")  # same run, same weights, same eval store
    assert locate_model(trained).run_dir == trained and locate_model(trained).tokenizer_path == trained / "tokenizer.json"
    assert locate_model(last).run_dir == trained and locate_model(last).checkpoint == last
    alone = tmp_path / "saved"
    locate_model(trained).load().save_pretrained(alone)
    assert locate_model(alone).run_dir is None and locate_model(alone).tokenizer_path is None
    with pytest.raises(InputError, match="no tokenizer.json .*; copy the model's tokenizer.json beside its weights"):
        locate_model(alone).require_tokenizer()
    # a saved model's tokenizer beside it or in the folder holding it, for every command alike (eval too)
    from archifactory.eval.runner import load_target

    with pytest.raises(FileNotFoundError, match=f"no tokenizer.json in {alone} or {tmp_path}: pass --tokenizer"):
        load_target(alone)
    shutil.copyfile(trained / "tokenizer.json", tmp_path / "tokenizer.json")
    assert locate_model(alone).tokenizer_path == tmp_path / "tokenizer.json"
    assert load_target(alone).tokenizer.fingerprint() == Tokenizer.load(tmp_path / "tokenizer.json").fingerprint()
    shutil.copyfile(trained / "tokenizer.json", alone / "tokenizer.json")
    assert locate_model(alone).tokenizer_path == alone / "tokenizer.json"  # beside the weights comes first
    assert locate_model(last).tokenizer_path == trained / "tokenizer.json"
    a, b = locate_model(last).load(), locate_model(trained).load()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_the_resolver_reads_dot_and_dotdot_as_the_folders_they_stand_for(trained, tmp_path, monkeypatch):
    """``.`` and ``..`` have no name and a lexical parent of ``.``: before, ``generate .`` inside a saved model
    looked for its tokenizer in ``.`` twice, and inside RUN/model or a checkpoint did not see the run."""
    from archifactory.train.locate import locate_model

    alone = tmp_path / "saved"
    locate_model(trained).load().save_pretrained(alone)
    shutil.copyfile(trained / "tokenizer.json", tmp_path / "tokenizer.json")  # in the folder holding it
    (alone / "sub").mkdir()
    last = trained / "checkpoints" / "step_00000002"
    for folder, given in ((alone, "."), (alone / "sub", ".."), (trained / "model", "."), (last, ".")):
        monkeypatch.chdir(folder)
        expected = locate_model(folder if given == "." else folder.parent)  # the same folder, named
        found = locate_model(given)
        for field in ("run_dir", "model_dir", "checkpoint", "tokenizer_path"):
            a, b = getattr(found, field), getattr(expected, field)
            assert (a and a.resolve()) == (b and b.resolve()), (folder, given, field, a, b)
        assert found.tokenizer_path is not None
    monkeypatch.chdir(alone)
    result = runner.invoke(app, ["generate", ".", "--prompt", "a", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output


def test_generate_and_eval_refuse_a_tokenizer_with_more_ids_than_the_model(trained, tmp_path):
    """The tokenizer found beside a model may not be its own: one with more ids than the model's vocabulary
    is refused by every command alike (before, generate raised IndexError on a prompt using them)."""
    from archifactory.model.lm import CausalLM
    from archifactory.train.locate import locate_model

    tokenizer = Tokenizer.load(trained / "tokenizer.json")
    model = locate_model(trained).load()
    smaller = tokenizer.vocab_size - 1
    config = model.config.model_copy(update={"vocab_size": smaller})
    CausalLM(config).save_pretrained(tmp_path / "saved")
    shutil.copyfile(trained / "tokenizer.json", tmp_path / "tokenizer.json")  # in the folder holding it
    prompt = "a"  # generate starts it with the end-of-document id, here the tokenizer's last: past the model's
    assert tokenizer.eos_id == smaller
    message = f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {smaller}"
    for command in (["generate", str(tmp_path / "saved"), "--prompt", prompt, "--max-new-tokens", "2"],
                    ["eval", str(tmp_path / "saved"), "--tasks", "lambada", "--limit", "1"]):
        one_error_line(runner.invoke(app, command), f"{tmp_path / 'tokenizer.json'}: {message}")
    model.save_pretrained(tmp_path / "own")  # its own vocabulary: generates
    result = runner.invoke(app, ["generate", str(tmp_path / "own"), "--prompt", prompt, "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_sampling_refuses_a_temperature_that_is_not_a_finite_non_negative_number(temperature):
    from archifactory.model.sampling import sample_next

    with pytest.raises(InputError, match="temperature"):
        sample_next(torch.zeros(1, 5), temperature=temperature)
