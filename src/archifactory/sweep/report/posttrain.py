"""The report's post-training section: per variant and stage, the SFT validation loss, the held-out
exact match after SFT and after GRPO (greedy, and sampled pass@1 where the runs measured it; with 95%
intervals over seeds and the paired GRPO - SFT difference), GRPO's reward and exact-match curves, and the stage fairness checks
(:mod:`archifactory.sweep.stages`). Left out when the sweep ran no post-training stage."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from archifactory.sweep import stats as st
from archifactory.sweep.report import figures
from archifactory.sweep.report.data import SweepData
from archifactory.sweep.report.document import Block, BulletList, Mark, Paragraph, Section, Strong, Table
from archifactory.sweep.report.format import fmt_ci, fmt_interval, fmt_signed
from archifactory.sweep.stages import PosttrainData

REWARD_SMOOTHING = 0.1
"""The reward curves' centered moving average spans this fraction of the logged steps."""

CHECK_TEXT = {
    "data": {"sft": "same chat data (hash of its records)", "grpo": "same task and task seed"},
    "stream": {"sft": "same conversations in the same order", "grpo": "the same prompts at every step"},
    "tokenizer": "same tokenizer (with the chat tokens)",
    "steps": "same number of optimizer steps",
    "budget": "same budget, batch and sequence length",
    "recipe": "same recipe (optimizer, schedule, stage options)",
}


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]


def _paired_gain(post: PosttrainData, variant: str, key: str = "eval_accuracy") -> st.MeanCI:
    """GRPO minus SFT of ``key`` (held-out exact match, greedy or sampled pass@1), paired by seed."""
    sft = {f.seed: getattr(f, key) for f in post.final("sft", variant)}
    gains = [getattr(f, key) - sft[f.seed] for f in post.final("grpo", variant)
             if getattr(f, key) is not None and sft.get(f.seed) is not None]
    return st.mean_ci(gains)


def _pct(ci: st.MeanCI) -> str:
    if ci.n == 0:
        return "—"
    scaled = st.MeanCI(100 * ci.mean, None if ci.low is None else 100 * ci.low,
                       None if ci.high is None else 100 * ci.high, ci.n)
    return fmt_ci(scaled, 1) + " %"


def _gain_text(gain: st.MeanCI) -> str:
    if gain.n == 0:
        return "—"
    return f"{100 * gain.mean:+.1f} %" + (f"\n{fmt_interval(100 * gain.low, 100 * gain.high, 1)}"
                                         if gain.low is not None else "")


def has_pass_at_1(post: PosttrainData) -> bool:
    """Whether any finished post-training run has a sampled pass@1 (``grpo.eval_samples`` > 0)."""
    return any(f.eval_pass_at_1 is not None for stage in post.finals.values() for f in stage)


def stage_table(data: SweepData, post: PosttrainData) -> Table:
    sampled = has_pass_at_1(post)
    header = ["variant", "SFT val loss\n(95% CI)", "exact match after SFT\n(95% CI)",
              "exact match after GRPO\n(95% CI)", "GRPO − SFT\n(paired, 95% CI)"]
    if sampled:
        header += ["pass@1 after SFT\n(sampled, 95% CI)", "pass@1 after GRPO\n(sampled, 95% CI)",
                   "GRPO − SFT pass@1\n(paired, 95% CI)"]
    header += ["final GRPO reward\n(mean)", "seeds\nSFT / GRPO"]
    rows, classes = [], []
    for variant in data.order:
        sft, grpo = post.final("sft", variant), post.final("grpo", variant)
        if not sft and not grpo:
            continue
        gain = _paired_gain(post, variant)
        rewards = [curve[-1]["reward"] for f in grpo
                   if (curve := post.curves["grpo"].get(f["run_id"])) and curve[-1].get("reward") is not None]
        row = [variant + (" ★" if variant == data.baseline else ""), fmt_ci(st.mean_ci(_values(sft, "val_loss"))),
               _pct(st.mean_ci(_values(sft, "eval_accuracy"))), _pct(st.mean_ci(_values(grpo, "eval_accuracy"))),
               _gain_text(gain)]
        if sampled:
            row += [_pct(st.mean_ci(_values(sft, "eval_pass_at_1"))), _pct(st.mean_ci(_values(grpo, "eval_pass_at_1"))),
                    _gain_text(_paired_gain(post, variant, "eval_pass_at_1"))]
        rows.append(row + [fmt_signed(float(np.mean(rewards)), 3).lstrip("+") if rewards else "—",
                           f"{len(sft)} / {len(grpo)}"])
        better = gain.low is not None and gain.low > 0
        classes.append("baseline" if variant == data.baseline else ("better" if better else ""))
    return Table(header, rows, numeric=set(range(1, len(header))), row_classes=classes)


def _config(post: PosttrainData, stage: str) -> dict[str, Any]:
    """A stage's resolved run config (its first registered run's; the recipe is the same for all)."""
    for run in post.runs.get(stage, []):
        config = run.config
        if config:
            return config
    return {}


def _lr_text(post: PosttrainData, stage: str, config: dict[str, Any]) -> str:
    scale = (post.spec.get(stage) or {}).get("lr_scale")
    if scale:
        return f"lr {scale:g} x the variant's pretraining lr"
    return f"lr {(config.get('optimizer') or {}).get('lr', '?'):g}"


def recipe_text(post: PosttrainData) -> list[str]:
    lines = []
    sft, grpo = _config(post, "sft"), _config(post, "grpo")
    if sft:
        train, data, opts = sft.get("train") or {}, sft.get("data") or {}, sft.get("sft") or {}
        length = (f"{opts['num_train_epochs']:g} epochs" if opts.get("num_train_epochs")
                  else f"{train.get('max_steps')} steps")
        task = data.get("task") or {}
        examples = (f" + the first {data.get('task_examples')} training problems of {task.get('name')} "
                    f"({task.get('digits')} digits) with their answers" if task else "")
        first = f", first {data['max_examples']} records" if data.get("max_examples") else ""
        lines.append(f"SFT: {Path(str(data.get('source', '?'))).name} ({data.get('format', 'auto')} format{first})"
                     f"{examples}, {length} of "
                     f"{train.get('batch_size')} rows x {train.get('seq_len')} tokens, loss on assistant tokens "
                     f"{'only' if opts.get('assistant_only_loss', True) else 'and prompts'}, "
                     + _lr_text(post, "sft", sft))
    if grpo:
        task, opts, train = grpo.get("task") or {}, grpo.get("grpo") or {}, grpo.get("train") or {}
        lines.append(f"GRPO: {task.get('name')} ({task.get('digits')} digits, task seed {task.get('seed')}), "
                     f"{train.get('max_steps')} steps of {train.get('batch_size')} completions "
                     f"({opts.get('num_generations')} per prompt, {opts.get('num_iterations', 1)} update(s) each, "
                     f"loss {opts.get('loss_type')}), " + _lr_text(post, "grpo", grpo)
                     + f"; exact match: greedy answers to {opts.get('eval_problems')} held-out problems "
                     f"(drawn from the {task.get('test_fraction', 0.1):g} share of problems that training never draws)"
                     + (f"; pass@1: the share of correct answers among {opts['eval_samples']} completions per "
                        f"held-out problem sampled as in the rollouts (temperature {opts.get('temperature', 1.0):g}"
                        + (f", top-k {opts['top_k']}" if opts.get("top_k") else "") + ")"
                        if opts.get("eval_samples") else "")
                     + constant_answer_text(task, opts.get("eval_problems")))
    return lines


def constant_answer(task: dict[str, Any], n: int) -> tuple[str, float] | None:
    """The most common reference answer among the first ``n`` held-out problems of ``task`` (a GRPO
    run's ``task`` section) and its share: the exact match of a model that ignores the question. ``None``
    for a task whose problems cannot be rebuilt here (countdown's answers are expressions; gsm8k's data
    missing)."""
    from collections import Counter

    from archifactory.posttrain.tasks import TaskConfig

    if not n or task.get("name") == "countdown":
        return None
    try:
        built = TaskConfig(**task).build()
        answers = Counter(built.problem(i, "test").answer for i in range(int(n)))
    except (ValueError, TypeError, OSError, RuntimeError, ImportError):  # a task it cannot rebuild: no line
        return None
    answer, count = answers.most_common(1)[0]
    return answer, count / int(n)


def constant_answer_text(task: dict[str, Any], n: int | None) -> str:
    found = constant_answer(task, n or 0)
    if found is None:
        return ""
    answer, share = found
    return (f"; answering {answer} to every question would score {100 * share:.1f} % on them, so an exact "
            "match near that need not mean the model reads the question")


def fairness_rows(post: PosttrainData) -> list[list]:
    items = []
    for stage, check in post.fairness.items():
        for name, text in CHECK_TEXT.items():
            ok = check.identical(name)
            finding = text[stage] if isinstance(text, dict) else text
            if not ok:
                finding += f" — differs: {', '.join(check.differing(name))}"
            items.append([Mark(ok), " ", Strong(f"{stage} {name}"), f": {finding}"])
        lrs = sorted({lr for lr in check.lr_by_run.values() if lr is not None})
        if len(lrs) > 1:
            items.append([Mark(None), " ", Strong(f"{stage} lr"),
                          f": follows each variant's pretraining lr (lr_scale): {', '.join(f'{x:g}' for x in lrs)}"])
    return items


PERCENT = 100.0
"""Shares (pass rate, exact match, pass@1) are plotted in %, as the table gives them."""


def _bands(data: SweepData, post: PosttrainData, stage: str, kind: str, key: str, window: float | None,
           scale: float = 1.0):
    bands = {}
    for variant in data.order:
        seeds = []
        for f in post.final(stage, variant):
            x, y = figures._xy(post.curves[kind].get(f["run_id"], []), "step", key)
            y = scale * y
            if window:
                y = figures.smooth(y, max(1, round(window * len(y))))
            seeds.append((x, y))
        band = figures.mean_band(seeds)
        if band is not None:
            bands[variant] = (band, len(seeds))
    return bands


def curves_figure(data: SweepData, post: PosttrainData, panels: list[tuple]) -> bytes | None:
    """One panel per ``(stage, kind, key, ylabel, title, smoothing[, scale])``: the mean over seeds per
    variant of ``scale`` x the value against the step, with the seeds' min-max band."""
    drawn = [(p, _bands(data, post, *p[:3], *p[5:])) for p in panels]
    drawn = [(p, b) for p, b in drawn if b]
    if not drawn:
        return None
    fig, axes = figures.new_figure(5.5 * len(drawn), 3.8, len(drawn))
    for ax, ((stage, kind, key, ylabel, title, *_), bands) in zip(axes, drawn):
        for variant, ((x, mean, low, high), n) in bands.items():
            color, is_base = data.color(variant), variant == data.baseline
            ax.plot(x, mean, color=color, linewidth=2.2 if is_base else 1.6, marker="." if len(x) < 30 else None,
                    label=f"{variant}{' ★' if is_base else ''} (n={n})", zorder=3 if is_base else 2)
            if n > 1:
                ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)
        ax.set_xlabel(f"{stage.upper()} step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8.5, frameon=False)
    return figures.to_png(fig)


def posttrain_section(data: SweepData) -> list[Block] | None:
    post = getattr(data, "posttrain", None)
    if post is None or not post.stages:
        return None
    blocks: list[Block] = []
    sampled = has_pass_at_1(post)
    recipe = recipe_text(post)
    if recipe:
        blocks += [Paragraph("Every compared run was continued with the same recipe:"), BulletList(recipe)]
    blocks += [stage_table(data, post), Paragraph(
        "Mean ± half width of the 95% Student-t interval over seeds. Exact match after SFT is the GRPO run's "
        "evaluation before its first update (the same held-out problems, greedy decoding); GRPO − SFT is "
        "paired by seed." + (" pass@1 likewise, from sampled completions: the policy GRPO optimises, which "
                             "greedy decoding need not follow." if sampled else "")
        + " Final GRPO reward: the last step's mean reward (correctness plus any format reward). "
        "A green left edge: the greedy exact match's paired gain has its interval above 0.", "legend")]
    grpo_fig = figures.figure_block(
        "grpo_curves", "GRPO: reward and held-out exact match",
        f"Mean reward per step (smoothed over {REWARD_SMOOTHING:.0%} of the steps), pass rate of the sampled "
        "completions, and greedy exact match on the held-out problems at each evaluation (step 0: the SFT "
        "model)" + (", and their sampled pass@1" if sampled else "")
        + "; the line is the mean over seeds, the band spans the seeds' minimum to maximum.",
        lambda: curves_figure(data, post, [
            ("grpo", "grpo", "reward", "mean reward", "reward", REWARD_SMOOTHING),
            ("grpo", "grpo", "pass_rate", "pass rate (%)", "pass rate of the samples", REWARD_SMOOTHING, PERCENT),
            ("grpo", "grpo_eval", "eval_accuracy", "exact match (%)", "held-out exact match (greedy)", None,
             PERCENT),
            *([("grpo", "grpo_eval", "eval_pass_at_1", "pass@1 (%)", "held-out pass@1 (sampled)", None, PERCENT)]
              if sampled else [])]))
    sft_fig = figures.figure_block(
        "sft_val_loss", "SFT: validation loss",
        "Cross-entropy per trained (assistant) token on the held-out conversations; mean over seeds, band "
        "from the seeds' minimum to maximum.",
        lambda: curves_figure(data, post, [("sft", "sft_eval", "val_loss", "val loss (nats/token)",
                                            "SFT validation loss", None)]))
    blocks += [f for f in (grpo_fig, sft_fig) if f is not None]
    rows = fairness_rows(post)
    if rows:
        blocks.append(Section("Post-training fairness", [BulletList(rows, "checks")]))
    return [Section("Post-training", blocks)]
