"""``archifactory``: a small command line over config files and ``--set key=value`` overrides."""

from __future__ import annotations

import errno
import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from archifactory.config import MAX_SEQ_LEN, MAX_TEMPERATURE, ConfigError, to_yaml
from archifactory.errors import UserError


class OneLineUsageErrors(TyperGroup):
    """The command group, with command-line mistakes (an option out of its range, a missing argument,
    an unknown option) printed as one ``error:`` line like every other user error, not typer's box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as err:
            # click's exception types (typer vendors its own copy in newer releases): matched by shape
            name = type(err).__name__
            if name == "NoArgsIsHelpError":  # the help was printed already
                sys.exit(err.exit_code)
            if name == "Abort":
                _print_error("aborted")
                sys.exit(1)
            if not (callable(getattr(err, "format_message", None)) and isinstance(getattr(err, "exit_code", None), int)):
                raise  # a bug: keep the traceback
            ctx = getattr(err, "ctx", None)
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            _print_error(f"{err.format_message()}{hint}")
            sys.exit(err.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    help="Fair, controlled ablations of small decoder language models.",
)
hf_app = typer.Typer(no_args_is_help=True, help="Convert models to and from Hugging Face transformers.")
app.add_typer(hf_app, name="hf")
console = Console()
err_console = Console(stderr=True)

SetOption = typer.Option(None, "--set", "-s", help="Override a config field: key.path=value (repeatable).")
AllowConfigChangeOption = typer.Option(
    False, "--allow-config-change", help="Resume even though the config changes the token stream, the batch or "
    "the model (seq_len, batch_size, data, model): the run then mixes two setups.")
DEBUG_ENV = "ARCHIFACTORY_DEBUG"
"""Set to 1 (or pass ``--debug``) to see the traceback of user errors too."""


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of every error.")) -> None:
    """Fair, controlled ablations of small decoder language models."""
    if debug:
        os.environ[DEBUG_ENV] = "1"  # also reaches the training subprocesses of a sweep
    warnings.showwarning = _show_warning


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The project's warnings (:class:`~archifactory.errors.ArchifactoryWarning`) as one ``warning: ...``
    line on stderr, like the trainer's; any other warning in Python's format (a library's, with file:line)."""
    from archifactory.errors import ArchifactoryWarning

    if not issubclass(category, ArchifactoryWarning):
        return _python_showwarning(message, category, filename, lineno, file, line)
    from rich.markup import escape

    err_console.print(f"[yellow]warning:[/] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True)


def _print_error(message: str) -> None:
    """``error: message`` on stderr as one physical line (never wrapped at the terminal's width)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False,
                      soft_wrap=True)


def _check_float(option: str, value: float | None, low: float, high: float, low_open: bool = False,
                 note: str = "") -> None:
    """One ``error:`` line unless ``value`` is in [low, high] (``(low, high]`` with ``low_open``); NaN is
    named as such (the option is checked here, not by click, whose range message called NaN too large)."""
    if value is None:
        return
    allowed = f"{'(' if low_open else '['}{low:g}, {high:g}]{note}"
    if value != value:
        _fail(f"{option} nan is not a number (NaN); give a value in {allowed}")
    if not (low < value if low_open else low <= value) or not value <= high:
        _fail(f"{option} {value:g} is out of range; give a value in {allowed}")


def _fail(message: str) -> None:
    _print_error(message)
    raise typer.Exit(code=2)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def user_error_message(err: BaseException) -> str | None:
    """The one-line message for an error the user caused and can fix, or ``None`` for a bug (whose
    traceback must stay visible)."""
    import torch

    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        where = f" writing {err.filename}" if err.filename else ""
        return f"no space left on the device{where} ({err.strerror}); free some space or choose another directory"
    if isinstance(err, FileExistsError):  # e.g. an output directory given as the path of an existing file
        return f"{err.filename} exists and is not a directory ({err.strerror}); choose another output directory"
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return str(err)
    # torch's CPU allocator reports a failed allocation as a plain RuntimeError
    cpu_alloc = isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)) or cpu_alloc:
        detail = str(err).splitlines()[0] if str(err) else "no detail"
        return (f"out of memory ({type(err).__name__}: {detail}); lower train.batch_size (or set "
                "train.micro_batch_size), train.seq_len or the model's size")
    return None


def guarded(command: Callable) -> Callable:
    """Run a command so that a user error prints one line and exits with status 2 (the traceback with
    ``--debug``); other exceptions propagate with their traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as err:
            message = user_error_message(err)
            if message is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            _fail(message)

    return run


def _locate(path: Path, checkpoints: bool = True):
    """The shared resolver of a trained model given as a run directory, its model/ folder, a checkpoint
    (unless ``checkpoints`` is false) or a saved model directory (:func:`archifactory.train.locate.locate_model`)."""
    from archifactory.train.locate import locate_model

    return locate_model(path, checkpoints)


def _run_dir_of(path: Path) -> Path:
    """The run directory for a command that continues a run (sft, grpo): RUN or RUN/model."""
    from archifactory.errors import InputError

    try:
        located = _locate(path)
    except InputError:
        return path  # the stage's own checks say what is missing and what to do
    if located.run_dir is None or located.checkpoint is not None:
        _fail(f"{path}: give the finished run's directory (runs/NAME), which holds model/ and tokenizer.json")
    return located.run_dir


def _load(model: str, overrides: Optional[List[str]]):
    from archifactory.model.config import load_model_config

    return load_model_config(model, overrides or [])


@app.command()
@guarded
def presets() -> None:
    """List the model presets under configs/models/."""
    from archifactory.model.presets import configs_dir, preset_names

    for name in preset_names():
        console.print(f"{name}\t{configs_dir() / 'models' / (name + '.yaml')}", highlight=False)


@app.command()
@guarded
def config(
    model: str = typer.Argument(..., help="Preset name or model YAML file."),
    set_: Optional[List[str]] = SetOption,
) -> None:
    """Print the fully resolved model config as YAML (defaults filled in, overrides applied)."""
    console.print(to_yaml(_load(model, set_)), highlight=False, end="")


@app.command()
@guarded
def info(
    model: str = typer.Argument(..., help="Preset name or model YAML file."),
    set_: Optional[List[str]] = SetOption,
    seq_len: Optional[int] = typer.Option(
        None, min=1, max=MAX_SEQ_LEN, help="Sequence length for FLOPs and cache size (default max_seq_len)."
    ),
) -> None:
    """Parameters by component, FLOPs per token and cache bytes of a model config."""
    import torch

    cfg = _load(model, set_)
    with torch.device("meta"):  # counts need shapes only: nothing is allocated
        lm = cfg.build()
    T = cfg.max_seq_len if seq_len is None else seq_len
    table = Table(title=f"{model}: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("fwd FLOPs/token", justify="right")
    flops = lm.flops_breakdown(T)
    for name, count in lm.param_breakdown().items():
        table.add_row(name, f"{count:,}", f"{flops[name]:,}" if name in flops else "")
    table.add_row("total", f"{lm.num_params():,}", f"{lm.flops_per_token(T):,}", style="bold")
    console.print(table)
    console.print(f"active parameters per token: {lm.active_params():,}")
    console.print(f"training FLOPs per token at T={T}: {lm.flops_per_token(T, training=True):,}")
    console.print(f"cache per sequence at T={T} (bf16): {lm.state_bytes(T, torch.bfloat16):,} bytes")
    console.print(f"mixer kernels: {sorted(set(lm.kernel_paths().values()))}")


@app.command()
@guarded
def train(
    config_path: Path = typer.Argument(..., metavar="CONFIG", help="Run config YAML (see configs/runs/)."),
    set_: Optional[List[str]] = SetOption,
    fresh: bool = typer.Option(False, "--fresh", help="Remove the run directory's checkpoints and start over."),
    allow_config_change: bool = AllowConfigChangeOption,
) -> None:
    """Train one run to its budget, resuming from the run directory's latest checkpoint."""
    from archifactory.config import load_yaml
    from archifactory.train import load_run_config
    from archifactory.train import train as run_training

    stage = load_yaml(config_path).get("stage")
    if stage == "sft":  # post-training run configs
        return _run_sft(config_path, set_ or [], fresh, allow_config_change)
    if stage == "grpo":
        return grpo(config_path, "addition", None, set_ or [], fresh, allow_config_change)
    cfg = load_run_config(config_path, set_ or [])
    run_training(cfg, resume=not fresh, console=console, allow_config_change=allow_config_change)


@app.command()
@guarded
def sweep(
    spec_path: Path = typer.Argument(..., metavar="SWEEP", help="Sweep spec YAML (see configs/sweeps/)."),
    set_: Optional[List[str]] = SetOption,
    out: Optional[Path] = typer.Option(None, "--dir", help="Sweep directory (default sweeps/<name>)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the planned runs and exit."),
    report_after: bool = typer.Option(True, "--report/--no-report", help="Write the report when done."),
) -> None:
    """Run a baseline and its one-change variants over seeds at equal budget; re-running resumes. A spec
    with ``kind: probe`` runs synthetic probes (MQAR, MAD's tasks) instead."""
    from archifactory.eval.probes.spec import is_probe_spec
    from archifactory.sweep.runner import describe_plan, run_sweep
    from archifactory.sweep.spec import load_sweep

    if is_probe_spec(spec_path):
        return _probe_sweep(spec_path, set_ or [], out, dry_run, report_after)
    spec, root = load_sweep(spec_path, set_ or [])
    sweep_dir = out or Path("sweeps") / spec.name
    if dry_run:
        console.print(describe_plan(spec, root, sweep_dir), highlight=False)
        return
    run_sweep(spec, root, sweep_dir, console=console)
    if report_after:
        _write_report(sweep_dir)


def _probe_sweep(spec_path: Path, overrides: List[str], out: Optional[Path], dry_run: bool, report_after: bool) -> None:
    from archifactory.eval.probes.runner import describe_probe_plan, run_probe_sweep
    from archifactory.eval.probes.spec import load_probe_spec

    spec = load_probe_spec(spec_path, overrides)
    if dry_run:
        console.print(describe_probe_plan(spec), highlight=False)
        return
    sweep_dir = run_probe_sweep(spec, out or Path("sweeps") / spec.name, console=console)
    if report_after:
        _write_report(sweep_dir)


def _write_report(sweep_dir: Path) -> None:
    from archifactory.sweep.report import write_report

    html, md = write_report(sweep_dir)
    console.print(f"report: {html.resolve()}\n        {md.resolve()}", highlight=False)


@app.command()
@guarded
def report(sweep_dir: Path = typer.Argument(..., help="A sweep directory (with results.sqlite).")) -> None:
    """Write report.html and report.md for a sweep, from its results database alone."""
    if not (sweep_dir / "results.sqlite").is_file():
        _fail(f"{sweep_dir / 'results.sqlite'} not found: run `archifactory sweep` first")
    from archifactory.sweep.store import StoreDamagedError

    try:
        _write_report(sweep_dir)
    except StoreDamagedError as err:
        if not (sweep_dir / "runs").is_dir():  # a probe sweep: no run directories to record again from
            from archifactory.sweep.store import PROBE_RECOVERY

            err = StoreDamagedError(err.path, err.reason, PROBE_RECOVERY)
        _fail(f"{err}; then write the report again")


@app.command("eval")
@guarded
def eval_(
    target: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory, its model/ folder, or a saved "
                                  "model directory."),
    tasks: str = typer.Option(..., "--tasks", "-t", help="Comma-separated tasks: "
                              "lambada, piqa, arc_easy, arc_challenge, sciq, hellaswag, winogrande, mmlu, mmlu_5shot, "
                              "humaneval_bpb, humaneval (pass@k); lm_eval:NAME runs an lm-evaluation-harness task."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Score only the first N items of each task."),
    tokenizer: Optional[Path] = typer.Option(None, help="tokenizer.json (default: the run's)."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    batch_size: int = typer.Option(16, min=1, max=2**20, help="Sequences per forward pass."),
    force: bool = typer.Option(False, "--force", help="Evaluate again even if the store has the result."),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="Folder of lm-eval task YAMLs."),
    samples: int = typer.Option(1, min=1, max=2**20, help="humaneval: completions per problem (greedy when 1)."),
    temperature: float = typer.Option(0.8, help=f"humaneval: sampling temperature when samples > 1, in "
                                      f"[0, {MAX_TEMPERATURE:g}]."),
    share_prefix: bool = typer.Option(False, "--share-prefix", help="Score each item's choices from one cached "
                                      "pass over their shared context (same scores; faster for long contexts)."),
) -> None:
    """Score a trained run or saved model on zero-shot tasks; results go to RUN_DIR/eval.sqlite and
    evaluations already stored are skipped."""
    from archifactory.eval import evaluate
    from archifactory.integrity import CorruptFileError

    _check_float("--temperature", temperature, 0.0, MAX_TEMPERATURE)
    if include_path is not None and not include_path.is_dir():
        _fail(f"--include-path {include_path}: no such folder; give the folder that holds the lm-eval task YAMLs")
    if tokenizer is not None and not tokenizer.is_file():
        _fail(f"--tokenizer {tokenizer}: no such file; give a tokenizer.json (or leave it out to use the run's)")
    located = _locate(target, checkpoints=False)  # evaluate() resolves the path the same way
    try:
        evaluate(target, tasks, limit, tokenizer=tokenizer, device=device, batch_size=batch_size, force=force,
                 include_path=include_path, samples=samples, temperature=temperature, share_prefix=share_prefix,
                 console=console)
    except CorruptFileError as err:
        _fail(f"{err}; {located.repair_advice()}")
    except (ConfigError, FileNotFoundError, KeyError, ValueError, ModuleNotFoundError) as err:
        _fail(str(err).strip("'\""))


@app.command()
@guarded
def sft(
    source: Path = typer.Argument(..., metavar="RUN_DIR", help="A pretrained run directory, or an SFT run config "
                                  "YAML (stage: sft)."),
    data: Optional[str] = typer.Option(None, help="Chat data: a .json/.jsonl/.parquet file or a hub dataset name."),
    data_format: str = typer.Option("auto", "--format", help="auto | messages | dolphin_r1 | prompt_completion | "
                                    "alpaca | limo"),
    out: Optional[Path] = typer.Option(None, "--out", help="SFT run directory (default RUN_DIR/sft)."),
    set_: Optional[List[str]] = SetOption,
    fresh: bool = typer.Option(False, "--fresh", help="Remove the SFT run directory's checkpoints and start over."),
    allow_config_change: bool = AllowConfigChangeOption,
) -> None:
    """Supervised fine-tuning of a pretrained run on chat data, with the project's chat template."""
    if source.is_file():
        if data is not None:
            _fail("--data is for a run directory; an SFT config names its data in data.source")
        return _run_sft(source, set_ or [], fresh, allow_config_change)
    source = _run_dir_of(source)
    if data is None:
        _fail("give the chat data: archifactory sft RUN_DIR --data FILE")
    config = {"name": f"{source.name}-sft", "base": str(source), "data": {"source": data, "format": data_format},
              "out_dir": str(out or source / "sft")}
    _run_sft(config, set_ or [], fresh, allow_config_change)


def _run_sft(source, overrides: List[str], fresh: bool, allow_config_change: bool = False) -> None:
    from archifactory.posttrain.sft import load_sft_config
    from archifactory.posttrain.sft import sft as run_sft
    from archifactory.train import NonFiniteLossError

    try:
        cfg = load_sft_config(source, overrides)
        run_sft(cfg, resume=not fresh, console=console, allow_config_change=allow_config_change)
    except (ConfigError, FileNotFoundError, ValueError, NonFiniteLossError) as err:
        _fail(str(err))


@app.command()
@guarded
def grpo(
    source: Path = typer.Argument(..., metavar="RUN_DIR", help="An SFT run directory, or a GRPO run config YAML "
                                  "(stage: grpo)."),
    task: str = typer.Option("addition", help="addition | multiplication | countdown | gsm8k (with --set task.data=...)."),
    out: Optional[Path] = typer.Option(None, "--out", help="GRPO run directory (default RUN_DIR/grpo)."),
    set_: Optional[List[str]] = SetOption,
    fresh: bool = typer.Option(False, "--fresh", help="Remove the GRPO run directory's checkpoints and start over."),
    allow_config_change: bool = AllowConfigChangeOption,
) -> None:
    """Reinforcement on a verifiable task (GRPO) from an SFT run."""
    from archifactory.posttrain.grpo import grpo as run_grpo
    from archifactory.posttrain.grpo import load_grpo_config
    from archifactory.train import NonFiniteLossError

    if source.is_file():
        config = source
    else:
        source = _run_dir_of(source)
        config = {"name": f"{source.name}-grpo", "base": str(source), "task": {"name": task},
                  "out_dir": str(out or source / "grpo")}
    try:
        run_grpo(load_grpo_config(config, set_ or []), resume=not fresh, console=console,
                 allow_config_change=allow_config_change)
    except (ConfigError, FileNotFoundError, ValueError, NonFiniteLossError) as err:
        _fail(str(err))


@app.command()
@guarded
def generate(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory, its model/ folder, one of its "
                                   "checkpoints/step_N folders, or a saved model directory with tokenizer.json."),
    prompt: str = typer.Option("", help="Text to continue; empty starts from the end-of-document token."),
    max_new_tokens: int = typer.Option(200, min=1, max=MAX_SEQ_LEN),
    temperature: float = typer.Option(0.8, help=f"In [0, {MAX_TEMPERATURE:g}]; 0: greedy."),
    top_k: Optional[int] = typer.Option(None, min=1),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass, in (0, 1]."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1 - 2**20),
    samples: int = typer.Option(1, min=1, max=2**20, help="How many continuations."),
    chat: bool = typer.Option(False, "--chat", help="Treat --prompt as a user message and answer it with the "
                              "run's chat template (an SFT run)."),
    system: Optional[str] = typer.Option(None, help="With --chat: a system message."),
) -> None:
    """Sample text from a trained run's model."""
    from archifactory.data.tokenizer import Tokenizer
    from archifactory.integrity import CorruptFileError
    from archifactory.train.checkpoint import CheckpointError
    from archifactory.train.locate import check_tokenizer_fits

    _check_float("--temperature", temperature, 0.0, MAX_TEMPERATURE, note=" (0: greedy)")
    _check_float("--top-p", top_p, 0.0, 1.0, low_open=True, note=" (1 keeps every token; leave it out to not truncate)")
    located = _locate(run_dir)
    try:
        model = located.load()
        tokenizer = Tokenizer.load(located.require_tokenizer())
    except (CorruptFileError, CheckpointError) as err:
        _fail(f"{err}; {located.repair_advice()}")
    check_tokenizer_fits(tokenizer, model.config.vocab_size, located.tokenizer_path)
    if chat:
        from archifactory.posttrain.chat import ChatTemplate, chat_reply
        from archifactory.train.locate import train_command

        template_dir = located.tokenizer_path.parent
        try:
            template = ChatTemplate.load(template_dir)
        except FileNotFoundError as err:
            _fail(str(err))
        except CorruptFileError as err:  # the run's setup writes its template (another checkpoint reads the same)
            _fail(f"{err}; `{train_command(template_dir)}` writes it again" if template_dir == located.run_dir
                  else f"{err}; {located.repair_advice()}")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        for i in range(samples):
            reply = chat_reply(model, tokenizer, template, messages, max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed + i)
            console.rule(f"sample {i + 1}")
            console.print(reply, highlight=False, markup=False)
        return
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    for i in range(samples):
        out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed + i, eos_token_id=tokenizer.eos_id)
        text = tokenizer.decode(out[1:].tolist()).replace("<|endoftext|>", "")
        console.rule(f"sample {i + 1}")
        console.print(text, highlight=False, markup=False)


@hf_app.command("import")
@guarded
def hf_import(
    source: Path = typer.Argument(..., help="A local Hugging Face model directory (config.json + weights)."),
    out: Path = typer.Argument(..., help="Directory to write the archifactory model to."),
) -> None:
    """Convert a local Hugging Face model (Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, GPT-2, Gemma 2,
    DeepSeek-V3 with dense FFNs, Bamba)."""
    from archifactory.model.hf import load_hf

    try:
        model = load_hf(source)
    except (ValueError, OSError) as err:
        _fail(str(err))
    model.save_pretrained(out)
    console.print(f"wrote {out} ({model.num_params():,} parameters)")


@hf_app.command("export")
@guarded
def hf_export(
    source: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory, its model/ folder, one of its "
                                  "checkpoints/step_N folders, or a saved model directory."),
    out: Path = typer.Argument(..., help="Directory to write the Hugging Face model to."),
) -> None:
    """Export an archifactory model as a transformers directory; the class (Llama, Mistral, Qwen2, Qwen3,
    Mixtral, Qwen3-MoE, Gemma 2, GPT-2, DeepSeek-V3, Bamba) is the first that represents the model exactly."""
    from archifactory.integrity import CorruptFileError
    from archifactory.model.hf import save_hf
    from archifactory.train.checkpoint import CheckpointError

    located = _locate(source)
    try:
        model = located.load()
        save_hf(model, out)
    except (CorruptFileError, CheckpointError) as err:
        _fail(f"{err}; {located.repair_advice()}")
    except (ValueError, OSError, ConfigError) as err:
        _fail(str(err))
    console.print(f"wrote {out}")


if __name__ == "__main__":  # pragma: no cover
    app()
