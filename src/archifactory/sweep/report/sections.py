"""The sweep report's sections, each built by a function ``(data) -> list[Block] | None`` from
:class:`~archifactory.sweep.report.data.SweepData` (``None`` or ``[]``: the section is left out), in the
order of :data:`SECTION_BUILDERS`. A builder returns document blocks
(:mod:`archifactory.sweep.report.document`), never HTML or Markdown.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from archifactory.results import RunRecord, VariantChanges
from archifactory.sweep import stats as st
from archifactory.sweep.report import figures
from archifactory.sweep.report.data import SweepData
from archifactory.sweep.report.probes import probes_section
from archifactory.sweep.report.document import (
    Block,
    BulletList,
    Code,
    CodeBlock,
    Details,
    Mark,
    Paragraph,
    Section,
    Strong,
    Table,
)
from archifactory.sweep.report.evals import evaluation_sections
from archifactory.sweep.report.format import (
    describe_budget,
    fmt_bytes,
    fmt_ci,
    fmt_count,
    fmt_interval,
    fmt_loss,
    fmt_lr,
    fmt_p,
    fmt_signed,
    fmt_value,
    fmt_when,
    match_text,
    summarize_kernel_paths,
)

from archifactory.sweep.report.posttrain import posttrain_section  # noqa: E402

SectionBuilder = Callable[[SweepData], "list[Block] | None"]

# --------------------------------------------------------------------------------------- the tables


def _changes_text(data: SweepData, variant: str) -> str:
    if variant == data.baseline:
        return "(the baseline)"
    runs = data.runs_of(variant)
    if not runs:
        return ""
    changes = runs[0].changes
    text = ",\n".join(changes.overrides) or "(no overrides)"
    if changes.match_params:
        text += ";\niso-params: " + match_text(changes)
    return text


def stats_table(data: SweepData) -> Table:
    seq_len = data.seq_len()
    with_lr = any(r.lr is not None for r in data.all_finals)
    # a line break in a header is a space in Markdown, and so is a no-break space
    header = ["variant", "seeds", "val loss\n(95%\u00a0CI)", "bits/byte\n(95%\u00a0CI)",
              "Δ loss vs baseline\n[95%\u00a0CI]", "p\n(paired\u00a0t)", "p\n(Holm)", "significant\n(Holm)", "params",
              "active\nparams",
              "FLOPs/token\n(train)", "tokens/s", "peak\nmemory",
              f"state bytes\n(T={seq_len})" if seq_len else "state\nbytes"]
    if with_lr:
        header.insert(2, "lr")
    table = Table(header, [], numeric={i for i, h in enumerate(header) if h not in ("variant", "significant\n(Holm)")},
                  notes_header="changes")
    for variant in data.order:
        s = data.stats.get(variant)
        n_runs = len(data.runs_of(variant))
        diff = data.diff_loss.get(variant)
        if variant == data.baseline:
            delta, p, p_holm, sig = "(baseline)", "", "", ""
        elif diff is None:
            delta, p, p_holm, sig = "—", "—", "—", "no baseline run" if data.baseline else "no baseline"
        else:
            delta = f"{fmt_signed(diff.mean_diff)}\n{fmt_interval(diff.ci_low, diff.ci_high)}".strip()
            p = fmt_p(diff.p_value) if diff.tested else diff.note.split(" ")[0]
            p_holm = fmt_p(diff.p_adjusted) if diff.tested else "—"
            sig = ("yes" if diff.significant else "no") if diff.tested else diff.note
        if s is None:
            row = [variant, f"0 / {n_runs}", "—", "—", delta, p, p_holm, sig] + ["—"] * 6
        else:
            c = s.costs
            row = [variant, f"{s.n_seeds} / {n_runs}", fmt_ci(s.val_loss),
                   fmt_ci(s.val_bpb), delta, p, p_holm, sig, fmt_count(c["params"]), fmt_count(c["active_params"]),
                   fmt_count(c["flops_per_token_train"]), fmt_count(c["tokens_per_s"]), fmt_bytes(c["peak_mem_bytes"]),
                   fmt_bytes(c["state_bytes"])]
        if with_lr:
            row.insert(2, fmt_lr(s.lr) if s else "—")
        table.rows.append(row)
        table.notes.append(_changes_text(data, variant))
        cls = "baseline" if variant == data.baseline else ""
        if diff is not None and diff.tested and diff.significant:
            cls += " better" if diff.mean_diff < 0 else " worse"
        table.row_classes.append(cls.strip())
    return table


def comparison_table(data: SweepData) -> Table:
    header = ["variant", "pairs (seeds)", "Δ val loss", "95% CI", "t", "p", "p (Holm)", "significant (Holm, α=0.05)",
              "Δ bits/byte", "95% CI", "p", "p (Holm)", "significant (Holm, α=0.05)"]
    table = Table(header, [], numeric={1, 2, 3, 4, 5, 6, 8, 9, 10, 11})
    for variant in data.order:
        if variant == data.baseline or variant not in data.diff_loss:
            continue
        row = [variant]
        for i, diff in enumerate((data.diff_loss[variant], data.diff_bpb.get(variant))):
            if diff is None:
                row += ["—"] * (6 if i == 0 else 5)
                continue
            if i == 0:
                row.append(f"{diff.n_pairs} ({', '.join(map(str, diff.seeds))})")
            row += [fmt_signed(diff.mean_diff), fmt_interval(diff.ci_low, diff.ci_high)]
            if i == 0:
                row.append("—" if diff.t_statistic is None else f"{diff.t_statistic:+.3f}")
            row += [fmt_p(diff.p_value) if diff.tested else "—", fmt_p(diff.p_adjusted) if diff.tested else "—",
                    (("yes" if diff.significant else "no") if diff.tested else diff.note)]
        table.rows.append(row)
        d = data.diff_loss[variant]
        table.row_classes.append(("better" if d.mean_diff < 0 else "worse") if d.tested and d.significant else "")
    return table


def seeds_table(data: SweepData) -> Table:
    """Every finished run's final figures (the chosen lr), for checking the summary by hand."""
    header = ["variant", "seed", "lr", "run", "val loss", "bits/byte", "tokens", "wall time (s)", "stream hash"]
    table = Table(header, [], numeric={1, 2, 4, 5, 6, 7})
    by_variant = st.group_by_variant(data.finals)
    for variant in data.order:
        for r in sorted(by_variant.get(variant, []), key=lambda r: r.seed):
            table.rows.append([variant, str(r.seed), fmt_lr(r.lr), r.run_id, fmt_loss(r.val_loss),
                               fmt_loss(r.val_bpb), fmt_count(r.tokens),
                               "—" if r.elapsed_s is None else f"{r.elapsed_s:.1f}", r.stream_hash or "(none)"])
            table.row_classes.append("baseline" if variant == data.baseline else "")
    return table


def lr_table(data: SweepData) -> Table | None:
    if not data.lr_choices:
        return None
    table = Table(["variant", "lr", "runs", "chosen on seeds", "mean final val loss", "kept"], [], numeric={1, 2, 4})
    for variant in data.order:
        choice = data.lr_choices.get(variant)
        if choice is None:
            continue
        seeds = ", ".join(map(str, choice.selection_seeds))
        where = seeds if choice.held_out else f"{seeds} (the compared seeds)"
        for lr in sorted(choice.mean_val_loss_by_lr, key=lambda v: (v is None, v or 0.0)):
            kept = "✓ lowest" if lr == choice.chosen_lr else ""
            table.rows.append([variant, fmt_lr(lr), str(choice.n_seeds_by_lr[lr]), where,
                               fmt_loss(choice.mean_val_loss_by_lr[lr]), kept])
            table.row_classes.append("chosen" if lr == choice.chosen_lr else "")
    return table


def lr_choice_text(data: SweepData) -> str:
    """How the learning rates were chosen, in words (plain text)."""
    held_out = sorted(v for v, c in data.lr_choices.items() if c.held_out)
    not_held_out = sorted(v for v, c in data.lr_choices.items() if not c.held_out)
    text = []
    if held_out:
        seeds = sorted({s for v in held_out for s in data.lr_choices[v].selection_seeds})
        text.append(f"Variants with a learning-rate grid ({', '.join(held_out)}) ran it on the lr-selection seeds "
                    f"{', '.join(map(str, seeds))}; the lr with the lowest mean final validation loss there was then "
                    "run on the compared seeds, and only those runs enter the comparison above.")
    if not_held_out:
        text.append(f"Warning: {', '.join(not_held_out)} chose the lr on the very seeds the report compares (this "
                    "sweep has no lr-selection runs), which biases the comparison in the tuned variant's favour; set "
                    "lr_selection_seeds in the sweep spec.")
    return " ".join(text)


def config_diffs(data: SweepData) -> list[tuple[str, VariantChanges, list[tuple[str, Any, Any]] | None]]:
    """Per non-baseline variant: its overrides, its iso-parameter matching, and the real difference of
    its resolved config against the baseline's (for a seed both ran, at the kept lr where possible)."""
    if data.baseline is None:
        return []
    kept = {r.run_id for r in data.finals}

    def pick(variant: str, seed: int | None = None) -> RunRecord | None:
        runs = data.runs_of(variant)
        runs = sorted(runs, key=lambda r: (r.run_id not in kept, seed is not None and r.seed != seed, r.seed))
        return runs[0] if runs else None

    out = []
    for variant in data.order:
        if variant == data.baseline:
            continue
        run = pick(variant)
        if run is None:
            continue
        base = pick(data.baseline, run.seed)
        diff = None
        if base is not None:
            diff = st.config_diff(run.config, base.config)
        out.append((variant, run.changes, diff))
    return out


def fairness_rows(data: SweepData) -> list[tuple[str, str, bool | None]]:
    """``(check, finding, ok)`` lines of the fairness section."""
    f = data.fairness
    n = len(data.finals)
    rows = []
    if not n:
        return [("finished runs", "none: nothing to compare", None)]
    if f.stream_hash_identical:
        rows.append(("token stream", f"identical in all {n} finished runs (stream hash {f.reference_hash})", True))
    elif f.reference_hash is None:
        rows.append(("token stream", f"no stream hash recorded in any of the {n} finished runs: cannot tell", False))
    else:
        source = "baseline's" if data.baseline in data.stats else "most common"
        finding = (f"{len(f.differing)} of {n} runs differ from the {source} stream hash {f.reference_hash} "
                   "(or recorded none): see the list below")
        rows.append(("token stream", finding, False))
    for key, same in f.identical_fields.items():
        rows.append((key.replace("_", " "), "identical in all runs" if same else "differs between runs", same))
    tokens = sorted({t for t in f.tokens_by_run.values() if t is not None})
    if f.tokens_identical and tokens:
        rows.append(("tokens seen", f"{tokens[0]:,} in every run", True))
    else:
        low, high = (tokens[0], tokens[-1]) if tokens else (None, None)
        rows.append(("tokens seen", f"differ between runs: {low:,} to {high:,} (expected only under a time or FLOPs "
                                    "budget; see the per-run table)" if tokens else "not recorded", None))
    budgets = sorted({json.dumps(b, sort_keys=True) for b in f.budgets_by_run.values()})
    budget_text = "; ".join(", ".join(f"{k}={v}" for k, v in json.loads(b).items() if v is not None) or "none"
                            for b in budgets)
    rows.append(("run budget (train.max_steps / max_tokens / max_time_s)",
                 ("identical: " if f.budgets_identical else "differs: ") + budget_text, f.budgets_identical))
    if f.spec_budget is not None:
        rows.append(("sweep budget (spec)", describe_budget(f.spec_budget), None))
    if data.lr_choices:
        biased = sorted(v for v, c in data.lr_choices.items() if not c.held_out)
        if biased:
            rows.append(("learning-rate choice", f"{', '.join(biased)} chose the lr on the compared seeds "
                                                 "(no lr-selection runs): biased in their favour", False))
        else:
            seeds = sorted({s for c in data.lr_choices.values() for s in c.selection_seeds})
            rows.append(("learning-rate choice", f"on held-out seeds {', '.join(map(str, seeds))}, not among the "
                                                 "compared ones", True))
    return rows


def env_rows(data: SweepData) -> list[tuple[str, str]]:
    return [(str(k), "(unknown)" if v is None else fmt_value(v)) for k, v in data.sweep.env.items()]


KERNEL_COLUMNS = ["variant", "device × processes", "precision", "kernel path per layer"]


def kernel_rows(data: SweepData) -> list[tuple[str, str, str, str]]:
    """Per variant: device(s), the precision the runs resolved to (``auto`` -> bf16 or fp32) and the
    kernel paths its runs recorded (distinct values joined); in a probe sweep, its probe runs'."""
    out = []
    if data.is_probe_sweep:
        variants = list(dict.fromkeys(r.variant for r in data.probe_runs))
        runs_of = {v: [r for r in data.probe_runs if r.variant == v] for v in variants}
    else:
        variants, runs_of = data.order, {v: data.runs_of(v) for v in data.order}
    for variant in variants:
        envs = [r.env for r in runs_of[variant] if r.env is not None]
        if not envs:
            out.append((variant, "—", "—", "—"))
            continue
        devices = sorted({f"{e.device} ×{e.world_size or 1}" for e in envs})
        precisions = sorted({e.precision or "(not recorded)" for e in envs})
        paths = sorted({summarize_kernel_paths(e.kernel_paths) for e in envs})
        out.append((variant, ", ".join(devices), ", ".join(precisions), " | ".join(paths)))
    return out


def headline(data: SweepData) -> list[str]:
    """One sentence per variant: what the paired comparison says (plain text)."""
    lines = []
    for variant in data.order:
        if variant == data.baseline:
            continue
        s, d = data.stats.get(variant), data.diff_loss.get(variant)
        if s is None:
            lines.append(f"{variant}: no finished run.")
            continue
        if d is None:
            lines.append(f"{variant}: val loss {fmt_ci(s.val_loss)} (no baseline to compare with).")
            continue
        if d.mean_diff is None:
            lines.append(f"{variant}: val loss {fmt_ci(s.val_loss)}; no seed in common with the baseline: "
                         "no comparison.")
            continue
        word = "lower" if d.mean_diff < 0 else "higher"
        text = f"{variant}: val loss {abs(d.mean_diff):.4f} {word} than the baseline over {d.n_pairs} paired seed(s)"
        if d.tested:
            verdict = "significant" if d.significant else "not significant"
            text += (f", p = {fmt_p(d.p_value)}, Holm-corrected over {d.n_compared} comparison(s) "
                     f"p = {fmt_p(d.p_adjusted)} ({verdict} at α = {d.alpha:g}).")
        else:
            text += f"; {d.note}."
        lines.append(text)
    return lines




def counts_text(data: SweepData) -> str:
    done = sum(r.status == "done" for r in data.runs)
    return (f"{len(data.order)} variants, {len(data.runs)} runs: {done} finished, {len(data.failed)} failed, "
            f"{len(data.unfinished)} not finished")


# ------------------------------------------------------------------------------------- the sections


def summary_blocks(data: SweepData) -> list[Block]:
    """Under the title: when, how many runs, the baseline, and one sentence per variant."""
    blocks: list[Block] = [Paragraph([f"Created {fmt_when(data.sweep.created_at)} · {counts_text(data)} · baseline ",
                                      Code(data.baseline or "(none)")], "meta")]
    lines = headline(data)
    if lines:
        blocks.append(BulletList(lines, "summary"))
    return blocks


def results_section(data: SweepData) -> list[Block]:
    blocks: list[Block] = [
        stats_table(data),
        Paragraph("Mean ± half width of the 95% Student-t interval over seeds. Δ is variant − baseline, paired by "
                  "seed (negative: lower loss than the baseline); p from a two-sided paired t-test, and "
                  f"Holm-corrected over the {data.n_compared()} variant(s) tested against the baseline; significant "
                  "when the corrected p is below α = 0.05. Seeds: finished / registered runs. Costs are means over "
                  "seeds; in the HTML page a green (red) left edge marks a significantly lower (higher) loss.",
                  "legend"),
    ]
    comparison = comparison_table(data)
    if comparison.rows:
        blocks.append(Section("Paired comparison with the baseline", [comparison]))
    return [Section("Results", blocks)]


def plots_section(data: SweepData) -> list[Block]:
    return [Section("Plots", list(figures.loss_figures(data)))]


def lr_section(data: SweepData) -> list[Block] | None:
    lrs = lr_table(data)
    if lrs is None:
        return None
    lrs.fit = True
    return [Section("Learning-rate choice", [Paragraph(lr_choice_text(data)), lrs])]


def changes_section(data: SweepData) -> list[Block]:
    diffs = config_diffs(data)
    blocks: list[Block] = [] if diffs else [Paragraph("No variant besides the baseline.")]
    for variant, changes, diff in diffs:
        part: list[Block] = []
        if changes.description:
            part.append(Paragraph(changes.description))
        if changes.overrides:
            part += [Paragraph("Overrides:"), BulletList([[Code(o)] for o in changes.overrides], "overrides")]
        else:
            part.append(Paragraph("No overrides recorded."))
        if changes.match_params:
            part.append(Paragraph(["Iso-parameter matching: ", Code(match_text(changes))]))
        if diff is None:
            part.append(Paragraph("No baseline config to compare with."))
        elif not diff:
            part.append(Paragraph("The resolved config is identical to the baseline's (apart from name, output "
                                  "directory and seed)."))
        else:
            rows = [[k, fmt_value(b), fmt_value(v)] for k, b, v in diff]
            part.append(Table(["resolved config key", "baseline", variant], rows,
                              cell_class={0: "changes", 1: "changes", 2: "changes"}, fit=True))
        blocks.append(Section(variant, part, css_class="variant-diff"))
    return [Section("What each variant changes", blocks)]


def failures_section(data: SweepData) -> list[Block]:
    blocks: list[Block] = []
    if not data.failed and not data.unfinished:
        blocks.append(Paragraph("None: every registered run finished."))
    for run in data.failed:
        lr = f" · lr {fmt_lr(run.lr)}" if run.lr is not None else ""
        blocks.append(Section(f"{run.variant} · seed {run.seed}{lr}", [
            Paragraph(["Run ", Code(run.run_id), " in ", Code(run.run_dir), ":"], "meta"),
            CodeBlock(run.error or "(no error text recorded)"),
        ], badge="failed"))
    if data.unfinished:
        rows = [[r.variant, str(r.seed), fmt_lr(r.lr), r.run_id, r.status] for r in data.unfinished]
        blocks.append(Section("Not finished", [Table(["variant", "seed", "lr", "run", "status"], rows, {1, 2},
                                                     fit=True)]))
    return [Section("Failed and unfinished runs", blocks)]


def fairness_section(data: SweepData) -> list[Block]:
    blocks: list[Block] = [BulletList([[Mark(ok), " ", Strong(check), f": {finding}"]
                                       for check, finding, ok in fairness_rows(data)], "checks")]
    if data.fairness.differing:
        rows = [[d["variant"], str(d["seed"]), d["run_id"], d["stream_hash"] or "(none)"]
                for d in data.fairness.differing]
        blocks.append(Section("Runs whose token stream differs",
                              [Table(["variant", "seed", "run", "stream hash"], rows, {1}, fit=True)]))
    blocks.append(Details("Per-run final figures (kept lr)", [seeds_table(data)]))
    return [Section("Fairness", blocks)]


def environment_section(data: SweepData) -> list[Block]:
    blocks: list[Block] = []
    env = env_rows(data)
    if env:
        blocks.append(Table(["sweep environment", "value"], [[k, v] for k, v in env], cell_class={1: "changes"},
                            fit=True))
    blocks.append(Section("Devices, precision and kernel paths per variant",
                          [Table(KERNEL_COLUMNS, [list(r) for r in kernel_rows(data)], cell_class={3: "changes"},
                                 fit=True)]))
    if data.sweep.spec_yaml:
        blocks.append(Details("Sweep spec (YAML)", [CodeBlock(data.sweep.spec_yaml, "yaml")]))
    return [Section("Environment", blocks)]


def _language_model_runs(builder: SectionBuilder) -> SectionBuilder:
    """``builder``, left out of a probe sweep's report (its sections compare language-model runs on loss)."""
    return lambda data: None if data.is_probe_sweep else builder(data)


SECTION_BUILDERS: list[tuple[str, SectionBuilder]] = [
    ("summary", _language_model_runs(summary_blocks)),
    ("results", _language_model_runs(results_section)),
    ("probes", probes_section),
    ("plots", _language_model_runs(plots_section)),
    ("lr_choice", _language_model_runs(lr_section)),
    ("posttrain", _language_model_runs(posttrain_section)),
    ("evaluation", evaluation_sections),
    ("changes", _language_model_runs(changes_section)),
    ("failures", _language_model_runs(failures_section)),
    ("fairness", _language_model_runs(fairness_section)),
    ("environment", environment_section),
]
"""The report's sections, in page order: ``(name, builder)``. A builder returns the blocks it adds (usually
one :class:`~archifactory.sweep.report.document.Section`, or several) or ``None`` to leave its part out."""
