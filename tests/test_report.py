"""Sweep statistics and report: numbers against scipy computed independently and closed forms, and the
HTML page opened in headless Chromium (Debian's ``chromium``), driven over the DevTools protocol."""

from __future__ import annotations

import fcntl
import html
import json
import math
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests

from archifactory.results import FinalRecord, RunRecord
from archifactory.sweep import stats as st
from archifactory.sweep.report import write_report
from archifactory.sweep.store import Store

# ------------------------------------------------------------------------------- a synthetic sweep

SEEDS = (0, 1, 2)
TOKENS_PER_STEP = 16 * 128
STEPS = 300
VOCAB = 2048
ERROR_TEXT = "exit code 1\nRuntimeError: CUDA out of memory <while> allocating & 'expert' buffers | step 120"


def run_config(variant: str, seed: int) -> dict:
    """A resolved run config shaped like ``RunConfig.model_dump(mode="json")``."""
    ffn = {"kind": "swiglu", "hidden": 352, "multiple_of": 32, "bias": False}
    mixer = {"kind": "attention", "n_heads": 4, "n_kv_heads": 4, "head_dim": None, "qk_norm": False}
    if variant == "gqa":
        mixer["n_kv_heads"] = 1
    if variant == "moe":
        ffn = {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 176, "n_shared_experts": 0}
    return {
        "name": f"{variant}-s{seed}",
        "model": {"vocab_size": VOCAB, "d_model": 128, "n_layers": 4, "mixer": mixer, "ffn": ffn, "norm": "rmsnorm",
                  "position": {"kind": "rope", "theta": 10000.0}, "layer_overrides": []},
        "data": {"corpus": {"kind": "shakespeare"}, "tokenizer": {"kind": "bpe"}, "cache_dir": None, "seed": 0},
        "optimizer": {"name": "adamw", "lr": 0.003, "betas": [0.9, 0.95], "weight_decay": 0.1},
        "schedule": {"kind": "cosine", "warmup_steps": 20, "min_lr_ratio": 0.1},
        "train": {"seq_len": 128, "batch_size": 16, "max_steps": None, "max_tokens": STEPS * TOKENS_PER_STEP,
                  "max_time_s": None, "seed": seed, "eval_every": 25, "log_every": 5},
        "out_dir": f"sweeps/demo/runs/{variant}-s{seed}",
    }


# variant -> (description, overrides, asymptotic loss, tokens/s, params, state bytes)
VARIANTS = {
    "baseline": ("", [], 3.10, 52000.0, 1_180_000, 4 * 2 * 128 * 128 * 4),
    "gqa": ("one KV head <shared>", ["model.mixer.n_kv_heads=1"], 3.115, 56000.0, 1_130_000, 4 * 2 * 32 * 128 * 4),
    "moe": ("", ["model.ffn.kind=moe", "model.ffn.n_experts=4"], 3.05, 41000.0, 1_650_000, 4 * 2 * 128 * 128 * 4),
}
FAILED = ("moe", 2)


def curves(variant: str, seed: int):
    """Power-law loss curves, seed-dependent offset and noise; eval every 25 steps, train every 5."""
    rng = np.random.default_rng(1000 * seed + sum(map(ord, variant)))
    final_floor, tps = VARIANTS[variant][2], VARIANTS[variant][3]
    # a seed's offset is mostly shared by all variants (same init seed, same stream): what pairing removes
    offset = (0.0, 0.025, -0.015)[seed] + rng.normal(0, 0.006)

    def loss_at(tokens, noise):
        return final_floor + offset + (math.log(VOCAB) - final_floor) * (1 + tokens / 1.5e4) ** -0.75 + noise

    metrics = []
    for step in range(0, STEPS + 1, 5):
        tokens, elapsed = step * TOKENS_PER_STEP, step * TOKENS_PER_STEP / tps * (1 + rng.normal(0, 0.01))
        if step:
            metrics.append({"kind": "train", "step": step, "tokens": tokens, "elapsed_s": elapsed,
                            "loss": loss_at(tokens, rng.normal(0, 0.04)), "lr": 3e-3, "tokens_per_s": tps})
        if step % 25 == 0:
            val = loss_at(tokens, rng.normal(0, 0.004))
            record = {"kind": "eval", "step": step, "tokens": tokens, "val_loss": val,
                      "val_bpb": val * 0.4321 + rng.normal(0, 0.002)}
            if step:
                record["elapsed_s"] = elapsed
            metrics.append(record)
    return metrics


def build_sweep(sweep_dir: Path) -> dict[tuple[str, int], dict]:
    """A results store as the runner writes it; returns the final figures by (variant, seed)."""
    store = Store(sweep_dir / "results.sqlite")
    spec = ("name: demo <sweep>\nbase: configs/runs/shakespeare-tiny.yaml\nseeds: [0, 1, 2]\n"
            "budget: {tokens: 614400.0, flops: null, seconds: null}\nvariants:\n"
            "  gqa: {overrides: [model.mixer.n_kv_heads=1]}\n  moe: [model.ffn.kind=moe]\n")
    store.set_sweep("demo <sweep>", spec, {"git_sha": "0123abcd", "torch": "2.13.0", "python": "3.11.7",
                                           "device": "cpu (2 cores)"})
    finals = {}
    for variant, (description, overrides, _, tps, params, state) in VARIANTS.items():
        for seed in SEEDS:
            run_id = f"{variant}-s{seed}"
            store.add_run(run_id, variant, seed, None, variant == "baseline", run_config(variant, seed),
                          {"overrides": overrides, "description": description, "match_params": None},
                          f"sweeps/demo/runs/{run_id}")
            store.mark(run_id, "running")
            if (variant, seed) == FAILED:
                store.mark(run_id, "failed", ERROR_TEXT)
                continue
            metrics = curves(variant, seed)
            last = [m for m in metrics if m["kind"] == "eval"][-1]
            summary = {
                "val_loss": last["val_loss"], "val_bpb": last["val_bpb"], "val_ppl": math.exp(last["val_loss"]),
                "params": params, "active_params": params if variant != "moe" else 1_180_000,
                "flops_per_token_train": 6.0 * params, "tokens_per_s": tps * (1 + 0.01 * seed),
                "peak_mem_bytes": None, "state_bytes": state, "tokens": STEPS * TOKENS_PER_STEP,
                "elapsed_s": STEPS * TOKENS_PER_STEP / tps, "stream_hash": "9f3c2a1b7d6e5f40",
                "kernel_paths": {str(i): "sdpa" if i < 3 else "torch" for i in range(4)}, "device": "cpu",
                "precision": "bf16" if variant == "moe" else "fp32", "world_size": 1, "torch": "2.13.0", "python": "3.11.7",
                "corpus_fingerprint": "abc", "tokenizer_hash": "def",
            }
            store.record_results(run_id, metrics, summary)
            finals[(variant, seed)] = summary
    return finals


# ------------------------------------------------------------------------- statistics, closed forms


def test_mean_ci_matches_scipy_and_closed_form():
    x = [3.21, 3.25, 3.18, 3.30]
    ci = st.mean_ci(x)
    low, high = scipy_stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=scipy_stats.sem(x))
    assert ci.n == 4 and ci.mean == pytest.approx(np.mean(x), abs=1e-12)
    assert (ci.low, ci.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    # closed form with 3 values: mean 2, s = 1, t_{0.975,2} = sqrt(2 a^2 / (1 - a^2)), a = 0.95
    # (the Student t CDF with 2 degrees of freedom is 1/2 + t / (2 sqrt(2 + t^2)))
    t2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))
    ci = st.mean_ci([1.0, 2.0, 3.0])
    assert ci.half_width == pytest.approx(t2 / math.sqrt(3), abs=1e-12)
    assert st.mean_ci([2.5]).low is None and st.mean_ci([2.5]).n == 1
    assert st.mean_ci([2.5, 2.5]).half_width == 0.0
    assert st.mean_ci([]).n == 0


def _rows(variant, values, baseline=False, lr=None, **extra):
    return [{"run_id": f"{variant}-{lr}-s{seed}", "variant": variant, "seed": seed, "lr": lr,
             "is_baseline": int(baseline), "val_loss": v, **extra} for seed, v in values.items()]


def test_paired_difference_matches_ttest_rel_on_common_seeds():
    base = _rows("baseline", {0: 3.20, 1: 3.26, 2: 3.22, 3: 3.31, 7: 3.0}, baseline=True)
    var = _rows("mla", {0: 3.17, 1: 3.25, 2: 3.18, 3: 3.27, 9: 2.0})  # seeds 7 and 9 have no partner
    d = st.paired_difference(var, base)
    a, b = [3.17, 3.25, 3.18, 3.27], [3.20, 3.26, 3.22, 3.31]
    ref = scipy_stats.ttest_rel(a, b)
    ref_ci = ref.confidence_interval(0.95)
    assert d.seeds == [0, 1, 2, 3] and d.n_pairs == 4
    assert d.mean_diff == pytest.approx(np.mean(np.subtract(a, b)), abs=1e-12)
    assert d.t_statistic == pytest.approx(ref.statistic, rel=1e-10)
    assert d.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert (d.ci_low, d.ci_high) == (pytest.approx(ref_ci.low, abs=1e-12), pytest.approx(ref_ci.high, abs=1e-12))
    assert d.significant == (ref.pvalue < 0.05)


def test_paired_difference_closed_form_two_degrees_of_freedom():
    # differences 1, 2, 3: mean 2, s_d = 1, t = 2 sqrt(3), and with 2 degrees of freedom the two-sided
    # p-value is 1 - t / sqrt(2 + t^2) = 1 - sqrt(12/14)
    base = _rows("baseline", {0: 0.0, 1: 0.0, 2: 0.0}, baseline=True)
    var = _rows("v", {0: 1.0, 1: 2.0, 2: 3.0})
    d = st.paired_difference(var, base)
    assert d.t_statistic == pytest.approx(2 * math.sqrt(3), rel=1e-12)
    assert d.p_value == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-9)
    assert d.significant is False  # p = 0.074
    t2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))
    assert d.ci_low == pytest.approx(2 - t2 / math.sqrt(3), abs=1e-12)


def test_no_test_with_fewer_than_two_pairs_or_no_spread():
    base = _rows("baseline", {0: 3.2, 1: 3.3}, baseline=True)
    one = st.paired_difference(_rows("v", {1: 3.1, 5: 3.0}), base)
    assert one.n_pairs == 1 and one.p_value is None and one.significant is None and one.note.startswith("n<2")
    assert one.mean_diff == pytest.approx(-0.2)
    none = st.paired_difference(_rows("v", {4: 3.1}), base)
    assert none.n_pairs == 0 and none.mean_diff is None and none.note.startswith("n<2")
    flat = st.paired_difference(_rows("v", {0: 3.1, 1: 3.2}), base)
    assert flat.p_value is None and flat.note.startswith("zero variance")


def test_best_lr_runs_keeps_the_lowest_mean_loss_per_variant():
    finals = (_rows("baseline", {0: 3.2, 1: 3.3}, baseline=True)
              + _rows("v", {0: 3.0, 1: 3.4}, lr=1e-3)  # mean 3.2
              + _rows("v", {0: 3.1, 1: 3.2}, lr=3e-3)  # mean 3.15: kept
              + _rows("v", {0: 3.5}, lr=1e-2))
    kept, choices = st.best_lr_runs(finals)
    assert {(r["variant"], r["lr"]) for r in kept} == {("baseline", None), ("v", 3e-3)}
    assert set(choices) == {"v"} and choices["v"].chosen_lr == 3e-3
    assert choices["v"].mean_val_loss_by_lr[1e-3] == pytest.approx(3.2)
    assert choices["v"].n_seeds_by_lr == {1e-3: 2, 3e-3: 2, 1e-2: 1}
    with pytest.raises(ValueError, match="best_lr_runs"):
        st.variant_stats(finals)


def test_fairness_lists_runs_with_another_stream():
    finals = [FinalRecord.model_validate(r) for r in
              _rows("baseline", {0: 3.2, 1: 3.3}, baseline=True, stream_hash="aaa", tokens=100)
              + _rows("v", {0: 3.1}, stream_hash="aaa", tokens=100)
              + _rows("w", {0: 3.1}, stream_hash="bbb", tokens=90)]
    runs = [RunRecord(run_id=r.run_id, variant=r.variant, seed=r.seed, config={"train": {"max_tokens": 100}})
            for r in finals]
    f = st.fairness(runs, finals, "budget: {tokens: 100}\n")
    assert not f.stream_hash_identical and f.reference_hash == "aaa"
    assert [d["variant"] for d in f.differing] == ["w"]
    assert not f.tokens_identical and f.budgets_identical and f.spec_budget == {"tokens": 100}
    same = st.fairness(runs[:3], finals[:3])
    assert same.stream_hash_identical and same.tokens_identical


def test_config_diff_flattens_and_ignores_names_and_seeds():
    base, var = run_config("baseline", 0), run_config("moe", 1)
    diff = {k: (b, v) for k, b, v in st.config_diff(var, base)}
    assert diff["model.ffn.kind"] == ("swiglu", "moe")
    assert diff["model.ffn.hidden"] == (352, st.MISSING) and diff["model.ffn.n_experts"] == (st.MISSING, 4)
    assert not any(k in diff for k in ("name", "out_dir", "train.seed"))
    assert st.flatten({"a": [{"b": 1}, 2], "c": {}}) == {"a[0].b": 1, "a[1]": 2, "c": {}}


# ----------------------------------------------------------------------------------------- report


def md_tables(markdown: str) -> list[list[list[str]]]:
    """Every table of a Markdown text as rows of cells' text, as markdown-it (CommonMark + GFM tables)
    reads them: escapes and entities resolved."""
    tables: list = []
    rows: list | None = None
    cells: list | None = None
    for token in md_parse(markdown):
        if token.type == "table_open":
            rows = []
        elif token.type == "tr_open":
            cells = []
        elif token.type == "inline" and cells is not None:
            cells.append(md_plain(token))
        elif token.type == "tr_close":
            rows.append(cells)
            cells = None
        elif token.type == "table_close":
            tables.append(rows)
    return tables


def md_parse(markdown: str):
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(markdown)


def md_plain(token) -> str:
    """The text an inline token shows (markup such as emphasis or links leaves its text behind)."""
    return "".join(c.content for c in token.children or [] if c.type in ("text", "code_inline", "softbreak"))


def table_with(tables, first_header: str, contains: str) -> list[list[str]]:
    return next(t for t in tables if t[0][0] == first_header and contains in t[0])


def test_report_numbers_match_scipy(tmp_path):
    finals = build_sweep(tmp_path)
    html_path, md_path = write_report(tmp_path)
    markdown = md_path.read_text()
    results = table_with(md_tables(markdown), "variant", "val loss (95% CI)")
    rows = {r[0]: dict(zip(results[0], r)) for r in results[1:]}
    assert list(rows) == ["baseline", "gqa", "moe"]  # baseline first, then the runner's order
    tests = {v: scipy_stats.ttest_rel([finals[(v, s)]["val_loss"] for s in SEEDS if (v, s) in finals],
                                      [finals[("baseline", s)]["val_loss"] for s in SEEDS if (v, s) in finals])
             for v in VARIANTS if v != "baseline"}
    rejected, holm, _, _ = multipletests([t.pvalue for t in tests.values()], alpha=0.05, method="holm")
    holm = dict(zip(tests, zip(holm, rejected)))
    for variant in VARIANTS:
        seeds = [s for s in SEEDS if (variant, s) in finals]
        row = rows[variant]
        assert row["seeds"] == f"{len(seeds)} / {len(SEEDS)}"
        for key, column in (("val_loss", "val loss (95% CI)"), ("val_bpb", "bits/byte (95% CI)")):
            x = [finals[(variant, s)][key] for s in seeds]
            low, high = scipy_stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=scipy_stats.sem(x))
            assert row[column] == f"{np.mean(x):.4f} ± {(high - low) / 2:.4f}"
        if variant == "baseline":
            continue
        a = [finals[(variant, s)]["val_loss"] for s in seeds]
        b = [finals[("baseline", s)]["val_loss"] for s in seeds]
        ref = scipy_stats.ttest_rel(a, b)
        ci = ref.confidence_interval(0.95)
        delta = f"{np.mean(np.subtract(a, b)):+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]"
        assert row["Δ loss vs baseline [95% CI]"] == delta
        assert row["p (paired t)"] == f"{ref.pvalue:.4f}"
        assert row["p (Holm)"] == f"{holm[variant][0]:.4f}"
        assert row["significant (Holm)"] == ("yes" if holm[variant][1] else "no")
    comparison = table_with(md_tables(markdown), "variant", "Δ bits/byte")
    for row in comparison[1:]:
        variant = row[0]
        seeds = [s for s in SEEDS if (variant, s) in finals]
        a = [finals[(variant, s)]["val_bpb"] for s in seeds]
        b = [finals[("baseline", s)]["val_bpb"] for s in seeds]
        ref = scipy_stats.ttest_rel(a, b)
        ci = ref.confidence_interval(0.95)
        mean_diff = np.mean(np.subtract(a, b))
        assert row[8:11] == [f"{mean_diff:+.4f}", f"[{ci.low:+.4f}, {ci.high:+.4f}]", f"{ref.pvalue:.4f}"]
    assert rows["moe"]["params"] == "1.65M" and rows["gqa"]["state bytes (T=128)"] == "128 KiB"
    assert rows["baseline"]["peak memory"] == "—"

    # the page's other sections
    for variant in VARIANTS:
        assert f"### {variant}" in markdown or variant == "baseline"
        assert f"| {variant} |" in markdown
    assert "moe · seed 2 (failed)" in markdown and ERROR_TEXT in markdown  # inside a code block, verbatim
    assert "✓ **token stream**: identical in all 8 finished runs (stream hash 9f3c2a1b7d6e5f40)" in markdown
    assert "614,400 tokens per run" in markdown and "0123abcd" in markdown
    assert "all 4 layers" not in markdown and "layers 0–2: sdpa; 3: torch" in markdown
    diff = table_with(md_tables(markdown), "resolved config key", "moe")
    assert ["model.ffn.kind", "swiglu", "moe"] in diff
    precision = {row[0]: row[2] for row in table_with(md_tables(markdown), "variant", "precision")[1:]}
    assert precision == {"baseline": "fp32", "gqa": "fp32", "moe": "bf16"}  # what each variant's runs resolved to
    for png in ("final", "val_loss_vs_tokens", "val_loss_vs_time", "train_loss_vs_tokens"):
        assert f"(report_files/{png}.png)" in markdown
        assert (tmp_path / "report_files" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the HTML: self-contained, every database string escaped
    page = html_path.read_text()
    assert "demo &lt;sweep&gt;" in page and "demo <sweep>" not in page
    assert "one KV head &lt;shared&gt;" in page
    assert ERROR_TEXT in html.unescape(page) and "<while>" not in page
    links = re.findall(r"""\b(?:src|href|srcset)\s*=\s*["']?([^"'\s>]*)""", page, re.IGNORECASE)
    assert len(links) == 5 and all(link.startswith("data:image/png;base64,") for link in links)
    assert "<script" not in page.lower()


def _grid_store(tmp_path, rows: dict) -> Store:
    store = Store(tmp_path / "results.sqlite")
    store.set_sweep("grid", "name: grid\n", {})
    for (variant, lr, purpose), losses in rows.items():
        for seed, loss in losses.items():
            run_id = f"{variant}-{lr}-s{seed}"
            store.add_run(run_id, variant, seed, lr, variant == "baseline", run_config("baseline", seed),
                          {"overrides": [] if lr is None else [f"optimizer.lr={lr}"], "match_params": None}, run_id,
                          purpose)
            store.record_results(run_id, [{"kind": "eval", "step": 0, "tokens": 0, "val_loss": 7.0},
                                          {"kind": "eval", "step": 10, "tokens": 2048, "elapsed_s": 1.0,
                                           "val_loss": loss}], {"val_loss": loss, "tokens": 2048})
    return store


def test_report_with_an_lr_grid_chosen_on_the_compared_seeds_warns_and_no_finished_variant(tmp_path):
    """A store from before lr-selection seeds: the grid ran on the compared seeds; the report still picks
    the lowest mean, but says the choice is biased."""
    store = _grid_store(tmp_path, {("baseline", None, "compare"): {0: 3.2, 1: 3.3},
                                   ("v", 1e-3, "compare"): {0: 3.25, 1: 3.35}, ("v", 3e-3, "compare"): {0: 3.1, 1: 3.15}})
    store.add_run("w-s0", "w", 0, None, False, run_config("gqa", 0), {"overrides": ["x=1"]}, "w-s0")
    store.mark("w-s0", "failed", None)
    _, md_path = write_report(tmp_path)
    markdown = md_path.read_text()
    lr = table_with(md_tables(markdown), "variant", "kept")
    assert ["v", "0.003", "2", "0, 1 (the compared seeds)", "3.1250", "✓ lowest"] in lr
    assert ["v", "0.001", "2", "0, 1 (the compared seeds)", "3.3000", ""] in lr
    assert "Warning: v chose the lr on the very seeds the report compares" in markdown
    assert "✗ **learning-rate choice**: v chose the lr on the compared seeds" in markdown
    results = table_with(md_tables(markdown), "variant", "val loss (95% CI)")
    v = next(r for r in results if r[0] == "v")
    assert v[3] == "0.003" and v[4].startswith("3.1250 ± ")
    assert next(r for r in results if r[0] == "w")[2] == "0 / 1"
    assert "(no error text recorded)" in markdown


def test_report_takes_the_lr_chosen_on_held_out_seeds(tmp_path):
    """The lr-selection runs (seeds 10, 11) choose 1e-3, although 3e-3 did better on the compared seeds
    0, 1: the comparison uses 1e-3, and the selection runs enter no comparison."""
    _grid_store(tmp_path, {("baseline", None, "compare"): {0: 3.2, 1: 3.3},
                           ("v", 1e-3, "lr_selection"): {10: 3.0, 11: 3.05},
                           ("v", 3e-3, "lr_selection"): {10: 3.2, 11: 3.25},
                           ("v", 1e-3, "compare"): {0: 3.3, 1: 3.35},
                           ("v", 3e-3, "compare"): {0: 3.1, 1: 3.15}})  # e.g. left from an earlier choice
    _, md_path = write_report(tmp_path)
    markdown = md_path.read_text()
    lr = table_with(md_tables(markdown), "variant", "kept")
    assert lr[1:] == [["v", "0.001", "2", "10, 11", "3.0250", "✓ lowest"], ["v", "0.003", "2", "10, 11", "3.2250", ""]]
    assert "ran it on the lr-selection seeds 10, 11" in markdown and "Warning" not in markdown
    assert "✓ **learning-rate choice**: on held-out seeds 10, 11" in markdown
    results = table_with(md_tables(markdown), "variant", "val loss (95% CI)")
    v = dict(zip(results[0], next(r for r in results if r[0] == "v")))
    assert v["lr"] == "0.001" and v["seeds"] == "2 / 4" and v["val loss (95% CI)"].startswith("3.3250 ± ")
    seeds = table_with(md_tables(markdown), "variant", "stream hash")
    assert sorted((r[0], r[1]) for r in seeds[1:]) == [("baseline", "0"), ("baseline", "1"), ("v", "0"), ("v", "1")]


def test_holm_adjusted_p_values_match_statsmodels():
    rng = np.random.default_rng(0)
    for m in (1, 2, 3, 7, 20):
        p = rng.uniform(0, 0.2, m)
        p[rng.integers(0, m)] = p[0]  # a tie
        ref = multipletests(p, alpha=0.05, method="holm")[1]
        np.testing.assert_allclose(st.holm_adjust(p), ref, rtol=0, atol=1e-15)
    assert st.holm_adjust([]) == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        st.holm_adjust([0.5, 1.5])


def test_significance_across_variants_is_decided_by_the_holm_corrected_p():
    base = {0: 3.20, 1: 3.26, 2: 3.22, 3: 3.31}
    finals = _rows("baseline", base, baseline=True)
    shifts = {"a": [-0.03, -0.028, -0.031, -0.029], "b": [-0.02, -0.025, -0.004, -0.03], "c": [0.01, -0.01, 0.0, 0.02]}
    for variant, shift in shifts.items():
        finals += _rows(variant, {s: base[s] + d for s, d in zip(base, shift)})
    finals += _rows("single", {0: 3.0})  # one pair: no test, not part of the family
    diffs = st.compare_to_baseline(finals)
    raw = [scipy_stats.ttest_rel([base[s] + d for s, d in zip(base, shifts[v])], list(base.values())).pvalue
           for v in shifts]
    rejected, holm, _, _ = multipletests(raw, alpha=0.05, method="holm")
    for (variant, d), p, q, reject in zip(diffs.items(), raw, holm, rejected):
        assert d.p_value == pytest.approx(p, rel=1e-10) and d.p_adjusted == pytest.approx(q, rel=1e-10)
        assert d.n_compared == 3 and d.significant == bool(reject)
    assert diffs["b"].p_value < 0.05 and not diffs["b"].significant  # significant only before the correction
    assert diffs["a"].significant
    assert diffs["single"].p_adjusted is None and diffs["single"].significant is None


HOSTILE_NAMES = ["cost$\\frac{$", "$x^2$", "*em* _u_ [link](http://x) `code` | pipe", "<i>tag</i> & ~~gone~~",
                 "- 1. # not a list", "a\\_b"]


def test_user_text_is_drawn_and_written_literally(tmp_path, monkeypatch):
    """Variant, sweep and error texts a user controls: no mathtext or LaTeX in plots (``$\\frac{$`` used to
    raise), no Markdown or HTML markup in the pages; each shows exactly as written."""

    import matplotlib
    import matplotlib.text

    from archifactory.sweep.report import figures

    store = Store(tmp_path / "results.sqlite")
    store.set_sweep("sweep $\\frac{$ *x*", "name: x\n", {"device": "cpu $a$ <b>"})
    for i, variant in enumerate(["baseline", *HOSTILE_NAMES]):
        for seed in (0, 1):
            run_id = f"v{i}-s{seed}"
            store.add_run(run_id, variant, seed, None, variant == "baseline", run_config("baseline", seed),
                          {"overrides": [f"model.mixer.n_heads={seed + 2}"], "description": variant,
                           "match_params": None}, run_id)
            if (i, seed) == (1, 1):
                store.mark(run_id, "failed", f"{variant} $\\frac{{$ **x**")
                continue
            metrics = curves("baseline", seed)
            last = [m for m in metrics if m["kind"] == "eval"][-1]
            store.record_results(run_id, metrics, {"val_loss": last["val_loss"] + 0.01 * i,
                                                   "val_bpb": last["val_bpb"], "tokens": STEPS * TOKENS_PER_STEP})
    drawn = []
    original_png = figures.to_png
    monkeypatch.setattr(figures, "to_png", lambda fig: (drawn.append(fig), original_png(fig))[1])
    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)  # a user's matplotlibrc may say so
    html_path, md_path = write_report(tmp_path)

    assert len(drawn) == 5
    texts = [t for fig in drawn for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    assert not [t.get_text() for t in texts if t.get_parse_math() or t.get_usetex()]
    shown = " ".join(t.get_text() for t in texts)
    for name in HOSTILE_NAMES:
        assert f"{name} (n=" in shown  # a legend entry, as written
        assert any(t.get_text() == name for t in texts)  # a tick label of the final figure

    tokens = list(md_parse(md_path.read_text()))
    assert not [t for t in tokens if t.type in ("html_block", "html_inline")]
    inline = [t.children for t in tokens if t.type == "inline"]
    assert not [c for children in inline for c in children if c.type in ("link_open", "s_open", "html_inline")]
    headings = [md_plain(tokens[i + 1]) for i, t in enumerate(tokens) if t.type == "heading_open"]
    results = table_with(md_tables(md_path.read_text()), "variant", "val loss (95% CI)")
    for name in HOSTILE_NAMES:
        assert name in headings  # "### <variant>" in the changes section
        assert name in [row[0] for row in results]
    assert "sweep $\\frac{$ *x*" in [h.removeprefix("Sweep report: ") for h in headings]

    page = html_path.read_text()
    for name in HOSTILE_NAMES:
        assert html.escape(name) in page
    assert "<i>tag</i>" not in page


# ---------------------------------------------------------------------- the page in headless Chromium

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND"]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevToolsPipe:
    """The Chrome DevTools protocol over ``--remote-debugging-pipe``: Chromium reads JSON commands from
    fd 3 and writes replies and events to fd 4, each message ended by a NUL byte (the transport
    Puppeteer's ``pipe: true`` uses). No port, no websocket library."""

    def __init__(self, chromium: str, profile: str) -> None:
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        # Chromium's ends go to fds >= 10 first, so that bash can then map them onto 3 and 4 without one
        # redirection overwriting the other's source (dash only takes one-digit fds: hence bash).
        child = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome_r, from_chrome_w)]
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)
        script = f'exec "$0" "$@" 3<&{child[0]} 4>&{child[1]} {child[0]}<&- {child[1]}>&-'
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", script, chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=child, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        for fd in child:
            os.close(fd)
        self.buffer, self.next_id, self.events = b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 20) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            event = self._read(deadline)
            if event.get("method") == method:
                return event
            self.events.append(event)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_chrome], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium over the DevTools pipe")
            chunk = os.read(self.from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe: "
                                   + self.proc.stderr.read().decode(errors="replace")[-2000:])
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            os.write(self.to_chrome, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self.to_chrome)
            os.close(self.from_chrome)
            self.proc.stderr.close()


# Runs in the page after it loaded: each image decoded (HTMLImageElement.decode() rejects a broken image)
# and has a natural size.
IMAGES_CHECK = """(async () => {
  const images = Array.from(document.images);
  const decoded = await Promise.all(images.map(img => img.decode().then(() => true, () => false)));
  return {title: document.title, readyState: document.readyState,
          h2: Array.from(document.querySelectorAll("h2")).map(h => h.textContent),
          images: images.map((img, i) => ({alt: img.alt, decoded: decoded[i], complete: img.complete,
                                           width: img.naturalWidth, height: img.naturalHeight,
                                           data: img.src.startsWith("data:image/png;base64,")})),
          scripts: document.scripts.length,
          overflowing: Array.from(document.querySelectorAll(".scroll"))
                            .filter(box => box.scrollWidth > box.clientWidth).length,
          bodyWidth: document.body.scrollWidth, tables: document.querySelectorAll("table").length};
})()"""


def open_in_chromium(page: Path) -> tuple[dict, list[dict]]:
    """Load ``page`` headless; return the in-page check's result and the errors seen (exceptions, console
    or log errors, failed or non-local requests)."""
    chromium = chromium_binary()
    with tempfile.TemporaryDirectory() as profile:
        cdp = DevToolsPipe(chromium, profile)
        try:
            target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                cdp.send(f"{domain}.enable", session=session)
            cdp.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
            nav = cdp.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            assert "errorText" not in nav, nav
            cdp.wait_event("Page.loadEventFired")
            result = cdp.send("Runtime.evaluate", {"expression": IMAGES_CHECK, "awaitPromise": True,
                                                   "returnByValue": True}, session=session)
            assert "exceptionDetails" not in result, result
            errors = []
            for event in cdp.events:
                method, params = event.get("method"), event.get("params", {})
                if (method in ("Runtime.exceptionThrown", "Network.loadingFailed")
                        or (method == "Log.entryAdded" and params["entry"]["level"] == "error")
                        or (method == "Runtime.consoleAPICalled" and params.get("type") == "error")
                        or (method == "Network.requestWillBeSent"
                            and not params["request"]["url"].startswith(("file:", "data:")))):
                    errors.append(event)
            return result["result"]["value"], errors
        finally:
            cdp.close()


# CI installs Chromium and sets ARCHIFACTORY_REQUIRE_CHROMIUM=1, so there the test fails instead of skipping.
@pytest.mark.skipif(
    chromium_binary() is None and not os.environ.get("ARCHIFACTORY_REQUIRE_CHROMIUM"),
    reason="Chromium is not installed (Debian: apt-get install chromium)",
)
def test_report_page_loads_in_headless_chromium(tmp_path):
    build_sweep(tmp_path)
    html_path, _ = write_report(tmp_path)
    result, errors = open_in_chromium(html_path)
    assert errors == []
    assert result["title"] == "Sweep report: demo <sweep>" and result["readyState"] == "complete"
    assert result["scripts"] == 0 and result["tables"] >= 5
    assert result["h2"] == ["Results", "Plots", "What each variant changes", "Failed and unfinished runs",
                            "Fairness", "Environment"]
    assert len(result["images"]) == 5
    for image in result["images"]:
        assert image["data"] and image["complete"] and image["decoded"], image
        assert image["width"] > 400 and image["height"] > 200, image
    assert result["bodyWidth"] <= 1280, "the page scrolls sideways: a table or image overflows"
    assert result["overflowing"] == 0, "a table is wider than the page at 1280 px"
