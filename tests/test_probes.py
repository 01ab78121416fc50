"""Synthetic probes: the generators' defining properties and statistics (MQAR against Zoology's
semantics, MAD's six tasks), loss and accuracy on answer positions only, early stopping, the grid's
choice on validation examples only, the MAD score, and a probe sweep end to end."""

from pathlib import Path

import numpy as np
import pytest
import scipy.stats as sps
import torch
import torch.nn.functional as F

from archifactory.config import ConfigError, validate
from archifactory.sweep.probe_results import choose, compare_choices, mad_scores, mad_scores_by_seed
from archifactory.eval.probes.spec import ProbeSweepSpec, load_probe_spec, plan, task_settings
from archifactory.eval.probes.store import SCHEMA, ProbeRun, ProbeStore
from archifactory.eval.probes.tasks import (
    IGNORE_INDEX,
    CompressionTask,
    FuzzyRecallTask,
    InContextRecallTask,
    MemorizationTask,
    MQARTask,
    NoisyRecallTask,
    SelectiveCopyingTask,
)
from archifactory.eval.probes.train import ProbeModel, ProbeSettings, accuracy, split_rng, train_probe
from archifactory.locking import DirectoryBusyError, hold_directory
from archifactory.model.config import ModelConfig
from archifactory.train.optim import AdamWConfig
from archifactory.train.schedule import ConstantSchedule

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sweeps"


def rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------ MQAR


def test_mqar_keys_values_and_answers_follow_zoology():
    task = MQARTask(vocab_size=512, seq_len=64, num_kv_pairs=8, train_examples=1, test_examples=1)
    d = task.generate(2000, rng())
    V, P = 512, 8
    keys, values = d.inputs[:, 0:2 * P:2], d.inputs[:, 1:2 * P:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert all(len(set(row)) == P for row in keys), "a key repeats within a sequence"
    assert all(len(set(row)) == P for row in values)
    for x, y, k, v in zip(d.inputs, d.targets, keys, values):
        pos = np.flatnonzero(y != IGNORE_INDEX)
        assert len(pos) == P and (pos >= 2 * P).all() and ((pos - 2 * P) % 2 == 0).all()
        kv = dict(zip(k.tolist(), v.tolist()))
        assert sorted(x[pos].tolist()) == sorted(kv), "every key is queried exactly once"
        assert [kv[q] for q in x[pos]] == y[pos].tolist(), "each query's answer is its key's value, shown earlier"
    assert (d.train_targets == d.targets).all(), "MQAR trains on the answers only (Zoology's -100 labels)"


def test_mqar_filler_is_uniform_random_or_zero():
    task = MQARTask(vocab_size=128, seq_len=64, num_kv_pairs=4, train_examples=1, test_examples=1)
    d = task.generate(3000, rng(1))
    filler = np.ones_like(d.inputs, dtype=bool)
    filler[:, :8] = False
    filler[d.targets != IGNORE_INDEX] = False
    counts = np.bincount(d.inputs[filler], minlength=128)
    assert sps.chisquare(counts).pvalue > 1e-3  # uniform over the whole vocabulary, 0 included
    quiet = task.model_copy(update={"random_non_queries": False}).generate(100, rng(1))
    filler = np.ones_like(quiet.inputs, dtype=bool)
    filler[:, :8] = False
    filler[quiet.targets != IGNORE_INDEX] = False
    assert (quiet.inputs[filler] == 0).all()


def gaps_of(task, d):
    """Per row, the gap of each key (in key order): (query offset - 2P) / 2."""
    P = task.num_kv_pairs
    keys = d.inputs[:, 0:2 * P:2]
    out = np.empty_like(keys)
    for r in range(len(d.inputs)):
        pos = np.flatnonzero(d.targets[r] != IGNORE_INDEX)
        where = {int(d.inputs[r, p]): (p - 2 * P) // 2 for p in pos}
        out[r] = [where[int(k)] for k in keys[r]]
    return out


def test_mqar_gap_law_is_the_power_law_a_001():
    task = MQARTask(vocab_size=256, seq_len=64, num_kv_pairs=4, power_a=0.01, train_examples=1, test_examples=1)
    # the exact law, from its definition: p(g) ∝ a (g+1)^(a-1) on g = 0 .. (64 - 8)/2 - 1 = 27
    g = np.arange(28)
    expected = 0.01 * (g + 1.0) ** (0.01 - 1)
    expected /= expected.sum()
    np.testing.assert_allclose(task.gap_probabilities(), expected, rtol=1e-12)
    assert expected[0] == pytest.approx(1 / sum((k + 1.0) ** -0.99 for k in range(28)), rel=1e-12)
    gaps = gaps_of(task, task.generate(20000, rng(2)))
    first = np.bincount(gaps[:, 0], minlength=28)  # the first draw of sampling without replacement has law p
    assert sps.chisquare(first, expected * first.sum()).pvalue > 1e-3
    # and the test can tell: the same counts are far from uniform gaps
    assert sps.chisquare(first).pvalue < 1e-12
    assert (np.sort(gaps, axis=1)[:, 1:] != np.sort(gaps, axis=1)[:, :-1]).all(), "gaps drawn without replacement"


def test_mqar_second_gap_follows_successive_sampling():
    """P(second gap = j) = sum_i p_i p_j / (1 - p_i): sampling without replacement in proportion to the
    weights left (numpy's ``choice(replace=False, p=p)``, which Zoology calls)."""
    task = MQARTask(vocab_size=256, seq_len=24, num_kv_pairs=2, power_a=0.3, train_examples=1, test_examples=1)
    p = task.gap_probabilities()
    second = np.array([sum(p[i] * p[j] / (1 - p[i]) for i in range(len(p)) if i != j) for j in range(len(p))])
    gaps = gaps_of(task, task.generate(20000, rng(3)))
    counts = np.bincount(gaps[:, 1], minlength=len(p))
    assert sps.chisquare(counts, second * counts.sum()).pvalue > 1e-3
    numpy_reference = np.array([rng(5 + i).choice(len(p), 2, replace=False, p=p)[1] for i in range(4000)])
    assert sps.chisquare(np.bincount(numpy_reference, minlength=len(p)), second * 4000).pvalue > 1e-3


def test_mqar_rejects_impossible_settings():
    with pytest.raises(ValueError, match="vocab_size=64 must exceed seq_len=64"):
        MQARTask(vocab_size=64, seq_len=64, train_examples=1, test_examples=1)
    with pytest.raises(ValueError, match="seq_len >= 4 \\* num_kv_pairs = 80"):
        MQARTask(vocab_size=512, seq_len=64, num_kv_pairs=20, train_examples=1, test_examples=1)


# ------------------------------------------------------------------------------------------ MAD tasks


@pytest.mark.parametrize("cls", [InContextRecallTask, NoisyRecallTask])
def test_in_context_recall_answers_were_shown_earlier(cls):
    task = cls(train_examples=1, test_examples=1)
    d = task.generate(300, rng(4))
    ns = task.non_special()
    assert d.inputs.shape == (300, task.seq_len - 1)
    assert (d.train_targets == np.concatenate([d.inputs[:, 1:], d.train_targets[:, -1:]], axis=1)).all(), \
        "MAD trains on every next token"
    for x, y in zip(d.inputs, d.targets):
        pos = np.flatnonzero(y != IGNORE_INDEX)
        assert pos[-1] == len(x) - 1, "the final query's answer is due at the last position"
        for t in pos:
            k, v = x[t], y[t]
            assert k < ns // 2 and ns // 2 <= v < ns
            earlier = [j for j in range(0, t - 1) if x[j] == k and x[j + 1] == v]
            assert earlier, "every query's answer is present earlier"
        pairs = {}
        for j in range(0, len(x) - 1, 2):
            if x[j] < ns // 2:
                assert pairs.setdefault(x[j], x[j + 1]) == x[j + 1], "a key keeps its value within a row"


def test_noisy_recall_noise_rate_and_tokens():
    task = NoisyRecallTask(train_examples=1, test_examples=1)
    d = task.generate(400, rng(5))
    ns = task.non_special()
    slots = d.inputs[:, 0:-1:2]  # the first token of each two-token slot but the final query's
    noise = slots >= ns
    assert ((d.inputs[:, 1:-1:2] >= ns) == noise).all(), "noise fills whole slots"
    assert (d.targets[:, 1:-1:2][noise] == IGNORE_INDEX).all() and (d.targets[:, 0:-1:2][noise] == IGNORE_INDEX).all()
    n_slots = noise.size - len(d.inputs)  # one slot per row is kept free of noise
    assert sps.binomtest(int(noise.sum()), n_slots, 0.2).pvalue > 1e-3
    assert d.inputs.max() < task.vocab_size


def test_fuzzy_recall_query_motif_and_value_appear_earlier():
    task = FuzzyRecallTask(train_examples=1, test_examples=1)
    d = task.generate(200, rng(6), split="test")
    assert d.inputs.shape == (200, task.seq_len)
    ns = task.non_special()
    for x, y in zip(d.inputs, d.targets):
        pos = np.flatnonzero(y != IGNORE_INDEX)
        value = y[pos[pos >= len(x) - task.v_motif_size]]  # the final answer: the probe's value motif
        start = len(x) - len(value)  # x[start] is the key's last token (the value is due after it)
        key = x[start - task.k_motif_size + 1:start + 1]
        assert (key < ns // 2).all() and len(set(key.tolist())) == task.k_motif_size, "test keys have the full size"
        pair = np.concatenate([key, value])
        row = x[:start - task.k_motif_size + 1]
        assert any((row[j:j + len(pair)] == pair).all() for j in range(len(row) - len(pair) + 1)), \
            "the probe's key and value appear earlier, side by side"


def test_selective_copying_answers_are_the_tokens_in_order():
    task = SelectiveCopyingTask(train_examples=1, test_examples=1)
    d = task.generate(200, rng(7))
    T, n, V = task.seq_len, task.num_tokens_to_copy, task.vocab_size
    assert (d.inputs[:, T - n - 1] == V - 1).all() and (d.inputs[:, T - n:] == V - 2).all()
    assert (d.targets[:, :T - n] == IGNORE_INDEX).all()
    for x, y in zip(d.inputs, d.targets):
        content = x[:T - n - 1]
        assert (content != V - 1).all() and (content == V - 2).sum() == T - 2 * n - 1
        assert (y[T - n:] == content[content != V - 2]).all()
        assert content[-1] != V - 2, "blanks go before the last token to copy, never after"
    assert (d.train_targets == d.targets).all()


def test_compression_and_memorization():
    comp = CompressionTask(train_examples=1, test_examples=1)
    d = comp.generate(50, rng(8))
    assert comp.autoencoder and (d.targets == d.inputs).all() and (d.inputs[:, -1] == comp.vocab_size - 1).all()
    assert (d.inputs[:, :-1] < comp.vocab_size - 1).all()
    mem = MemorizationTask(train_examples=1, test_examples=1)
    keys, values = mem.kv_map()
    assert len(set(keys.tolist())) == len(keys) == 127 and len(set(values.tolist())) == len(values)
    facts = dict(zip(keys.tolist(), values.tolist()))
    for split, seed in (("train", 0), ("test", 1)):
        d = mem.generate(100, rng(seed), split)
        assert (d.inputs[:, 1::2] == 255).all() and (d.targets[:, 0::2] == IGNORE_INDEX).all()
        assert all(facts[k] == v for k, v in zip(d.inputs[:, 0::2].ravel().tolist(), d.targets[:, 1::2].ravel().tolist()))


def test_splits_draw_independent_examples():
    task = MQARTask(vocab_size=8192, seq_len=64, num_kv_pairs=4, train_examples=1, test_examples=1)
    valid = task.generate(500, split_rng(0, 1, "valid"))
    test = task.generate(500, split_rng(0, 1, "test"))
    again = task.generate(500, split_rng(0, 1, "test"))
    assert (test.inputs == again.inputs).all()
    assert not {r.tobytes() for r in valid.inputs} & {r.tobytes() for r in test.inputs}


# ---------------------------------------------------------------------------------- model and training


def tiny_model(vocab=64, seq=32, ffn="none"):
    return ModelConfig(vocab_size=vocab, d_model=16, n_layers=2, max_seq_len=seq,
                       mixer={"kind": "attention", "n_heads": 2}, ffn={"kind": ffn})


def test_loss_and_accuracy_only_on_answer_positions():
    torch.manual_seed(0)
    task = MQARTask(vocab_size=64, seq_len=32, num_kv_pairs=4, train_examples=1, test_examples=1)
    d = task.generate(8, rng(9))
    model = ProbeModel(tiny_model())
    x, y = torch.from_numpy(d.inputs), torch.from_numpy(d.targets)
    logits, labels, _ = model.answer_logits(x, y)
    assert logits.shape == (8 * 4, 64)
    full = model.lm(x).logits  # every position's logits, then torch's own ignore_index
    reference = F.cross_entropy(full.flatten(0, 1), y.flatten(), ignore_index=-100)
    torch.testing.assert_close(F.cross_entropy(logits, labels), reference)
    mask = y != -100
    manual = (full.argmax(-1)[mask] == y[mask]).float().mean().item()
    acc, loss = accuracy(model, d, 3, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    assert acc == pytest.approx(manual) and loss == pytest.approx(reference.item(), rel=1e-5)


def test_mixer_only_layers_have_no_ffn_parameters():
    model = ProbeModel(tiny_model())
    with_mlp = ProbeModel(tiny_model(ffn="mlp"))
    names = [n for n, _ in model.named_parameters()]
    assert not any("ffn" in n for n in names), names
    per_block_mixer = sum(p.numel() for p in model.lm.blocks[0].mixer.parameters())
    per_block_norm = sum(p.numel() for p in model.lm.blocks[0].mixer_norm.parameters())
    assert model.lm.num_params() == 64 * 16 + 2 * (per_block_mixer + per_block_norm) + 16  # + final norm
    assert with_mlp.lm.num_params() > model.lm.num_params()


def settings(**fields):
    base = dict(batch_size=16, max_steps=40, eval_every=5, early_stop=None, optimizer=AdamWConfig(lr=3e-3),
                schedule=ConstantSchedule(), grad_clip=1.0, precision="fp32")
    return ProbeSettings(**{**base, **fields})


def data_for(task, n=64):
    return {s: task.generate(n, split_rng(0, 0, s), s) for s in ("train", "valid", "test")}


def test_early_stop_ends_the_run_at_the_first_evaluation_past_the_threshold():
    task = CompressionTask(vocab_size=4, seq_len=8, train_examples=64, test_examples=64)
    data = data_for(task)
    model = tiny_model(vocab=4, seq=8)
    full = train_probe(model, task, data, settings(max_steps=20), seed=0)
    assert full.steps == 20 and not full.stopped_early and [h["step"] for h in full.history] == [5, 10, 15, 20]
    threshold = full.history[1]["valid_acc"]  # reached by the second evaluation at the latest
    stopped = train_probe(model, task, data, settings(max_steps=20, early_stop=threshold), seed=0)
    first = next(h["step"] for h in full.history if h["valid_acc"] >= threshold)
    assert stopped.steps == first < 20 and stopped.stopped_early
    untimed = [{k: v for k, v in h.items() if k != "elapsed_s"} for h in (*stopped.history, *full.history)]
    assert untimed[:len(stopped.history)] == untimed[len(stopped.history):2 * len(stopped.history)], \
        "the same run up to the stop"
    assert stopped.valid_acc >= threshold


def test_a_probe_learns_memorization():
    task = MemorizationTask(vocab_size=16, seq_len=8, train_examples=256, test_examples=64)
    result = train_probe(tiny_model(vocab=16, seq=8, ffn="mlp"), task, data_for(task, 256),
                         settings(max_steps=150, eval_every=50, optimizer=AdamWConfig(lr=1e-2)), seed=0)
    assert result.test_acc > 0.9, result.history


# --------------------------------------------------------------------------------- choice and MAD score


def run(variant, task, setting, lr, wd, seed, valid, test, width=64):
    return ProbeRun(run_id=f"{variant}-{task}-{setting}-{lr}-{wd}-{seed}", variant=variant, width=width, task=task,
                    setting=setting, lr=lr, weight_decay=wd, seed=seed, status="done", valid_acc=valid, test_acc=test)


def test_grid_choice_uses_validation_accuracy_never_test():
    runs = [
        # lr 1e-3: best on validation; lr 1e-2: best on test (a choice on test would take it)
        run("a", "mqar", "baseline", 1e-3, 0.0, 0, 0.90, 0.60), run("a", "mqar", "baseline", 1e-3, 0.0, 1, 0.80, 0.70),
        run("a", "mqar", "baseline", 1e-2, 0.0, 0, 0.70, 0.99), run("a", "mqar", "baseline", 1e-2, 0.0, 1, 0.80, 0.99),
    ]
    (c,) = choose(runs)
    assert (c.lr, c.weight_decay) == (1e-3, 0.0) and c.valid_acc == pytest.approx(0.85)
    assert c.test.mean == pytest.approx(0.65) and c.test_by_seed == {0: 0.60, 1: 0.70}
    t = sps.t.ppf(0.975, 1) * np.std([0.6, 0.7], ddof=1) / np.sqrt(2)
    assert (c.test.low, c.test.high) == (pytest.approx(0.65 - t), pytest.approx(0.65 + t))
    # a grid point missing a seed cannot be chosen
    partial = runs[:3] + [run("a", "mqar", "baseline", 1e-2, 0.0, 1, 1.0, 0.99).model_copy(update={"status": "failed"})]
    (c,) = choose(partial, n_grid=2)
    assert c.lr == 1e-3 and not c.complete


def test_mad_score_is_mean_over_settings_then_tasks():
    runs = []
    for task, setting, acc in [("recall", "baseline", 1.0), ("recall", "vocab_size=32", 0.5),
                               ("recall", "seq_len=256", 0.3), ("copy", "baseline", 0.8)]:
        for wd, bonus in ((0.0, 0.0), (0.1, -0.1)):  # wd 0.0 is best on validation everywhere
            for seed in (0, 1):
                runs.append(run("gla", task, setting, 1e-3, wd, seed, valid=acc + bonus, test=acc + bonus))
    (score,) = mad_scores(choose(runs))
    assert score.per_task == {"recall": pytest.approx((1.0 + 0.5 + 0.3) / 3), "copy": pytest.approx(0.8)}
    assert score.settings == {"recall": 3, "copy": 1}
    assert score.mean == pytest.approx(((1.0 + 0.5 + 0.3) / 3 + 0.8) / 2)


def test_probe_comparison_with_the_baseline_matches_scipy_and_statsmodels():
    from statsmodels.stats.multitest import multipletests

    # three variants x three seeds, two settings of one task and one of another; each variant's wd 0.0 is
    # best on validation, so its chosen test accuracies are the wd-0.0 runs' (wd 0.1 would be the best on test)
    acc = {("base", 0): 0.50, ("base", 1): 0.60, ("base", 2): 0.55,
           ("good", 0): 0.71, ("good", 1): 0.78, ("good", 2): 0.74,
           ("same", 0): 0.52, ("same", 1): 0.57, ("same", 2): 0.58}
    settings = [("recall", "baseline", 0.0), ("recall", "vocab_size=32", -0.2), ("copy", "baseline", 0.1)]
    runs = []
    for variant in ("base", "good", "same"):
        for task, setting, shift in settings:
            for seed in range(3):
                x = acc[(variant, seed)] + shift
                runs.append(run(variant, task, setting, 1e-3, 0.0, seed, valid=x, test=x))
                runs.append(run(variant, task, setting, 1e-3, 0.1, seed, valid=x - 0.05, test=x + 0.2))
    comparisons = compare_choices(choose(runs), "base")
    by_label = {c.label: c for c in comparisons}
    assert set(by_label) == {"recall d=64", "recall (vocab_size=32) d=64", "copy d=64", "MAD score d=64"}
    c = by_label["recall (vocab_size=32) d=64"]
    assert set(c.diffs) == {"good", "same"} and c.values["good"].mean == pytest.approx(np.mean([0.51, 0.58, 0.54]))
    raw = {}
    for variant in ("good", "same"):
        a = [acc[(variant, s)] - 0.2 for s in range(3)]
        b = [acc[("base", s)] - 0.2 for s in range(3)]
        test = sps.ttest_rel(a, b)
        raw[variant] = test.pvalue
        d = c.diffs[variant]
        assert d.mean_diff == pytest.approx(np.mean(a) - np.mean(b))
        assert d.t_statistic == pytest.approx(test.statistic) and d.p_value == pytest.approx(test.pvalue)
    holm = multipletests([raw["good"], raw["same"]], method="holm")[1]
    assert [c.diffs[v].p_adjusted for v in ("good", "same")] == pytest.approx(list(holm))
    assert c.diffs["good"].significant and not c.diffs["same"].significant and c.diffs["good"].n_compared == 2
    # the MAD score per seed: per task the mean over its settings, then the mean over tasks; paired like the rest
    per_seed = mad_scores_by_seed(choose(runs))
    expected = {s: ((acc[("good", s)] + acc[("good", s)] - 0.2) / 2 + acc[("good", s)] + 0.1) / 2 for s in range(3)}
    assert per_seed[("good", 64)] == pytest.approx(expected)
    (score,) = [m for m in mad_scores(choose(runs)) if m.variant == "good"]
    assert by_label["MAD score d=64"].values["good"].mean == pytest.approx(score.mean)
    base_scores = [per_seed[("base", 64)][s] for s in range(3)]
    test = sps.ttest_rel([expected[s] for s in range(3)], base_scores)
    assert by_label["MAD score d=64"].diffs["good"].p_value == pytest.approx(test.pvalue)
    # one seed: the difference stands alone, without a test
    one = compare_choices(choose([r for r in runs if r.seed == 0]), "base")
    d = next(c for c in one if c.label == "copy d=64").diffs["good"]
    assert d.mean_diff == pytest.approx(0.21) and not d.tested and d.note.startswith("n<2")


# ------------------------------------------------------------------------------------------ spec, sweep


def test_shipped_probe_specs_plan():
    zoology = load_probe_spec(CONFIGS / "mqar-zoology.yaml")
    assert zoology.widths == [64, 128, 256, 512]
    shapes = {(s.task.seq_len, s.task.num_kv_pairs, s.task.vocab_size) for s in task_settings(zoology)}
    assert shapes == {(64, 4, 8192), (128, 8, 8192), (256, 16, 8192), (512, 64, 8192)}
    jobs = plan(zoology)
    assert {j.model.n_layers for j in jobs} == {2} and {j.model.ffn.kind for j in jobs} == {"none"}
    mqar = load_probe_spec(CONFIGS / "mqar.yaml")
    kinds = {j.model.mixer.kind for j in plan(mqar)}
    assert kinds == {"attention", "linear_attn", "retnet", "gla", "mamba2", "rwkv6", "deltanet", "gated_deltanet"}
    assert len(mqar.widths) == 2
    for name in ("mad.yaml", "mad-full.yaml"):
        mad = load_probe_spec(CONFIGS / name)
        assert {e.task.kind for e in mad.tasks.values()} == {"in_context_recall", "fuzzy_recall", "noisy_recall",
                                                             "selective_copying", "compression", "memorization"}
    plan(load_probe_spec(CONFIGS / "mad.yaml"))  # (tests/test_presets.py builds every shipped spec's models)
    full = load_probe_spec(CONFIGS / "mad-full.yaml")
    assert full.grid.lr == [1e-4, 5e-4, 1e-3] and full.grid.weight_decay == [0.0, 0.1]
    settings_per_task = {}
    for s in task_settings(full):
        settings_per_task[s.task_name] = settings_per_task.get(s.task_name, 0) + 1
    assert settings_per_task == {"in_context_recall": 11, "fuzzy_recall": 11, "noisy_recall": 14,
                                 "selective_copying": 13, "compression": 11, "memorization": 6}


def test_task_data_streams_keep_their_names():
    # a setting's data stream is named by a hash of its task's JSON (TaskSetting.data_key): moving a field
    # of a task config (a shared base class, a reordering) would silently give every sweep other examples.
    # These are the keys of each task's defaults as the probe results so far were generated with.
    from archifactory.eval.probes.spec import TaskSetting

    before = {"mqar": 2466010234, "in_context_recall": 2110533155, "noisy_recall": 1377559153,
              "fuzzy_recall": 672084657, "selective_copying": 2999153245, "compression": 2962167062,
              "memorization": 114778726}
    tasks = {cls().kind: cls() for cls in (MQARTask, InContextRecallTask, NoisyRecallTask, FuzzyRecallTask,
                                           SelectiveCopyingTask, CompressionTask, MemorizationTask)}
    assert {kind: TaskSetting(kind, "baseline", task).data_key for kind, task in tasks.items()} == before


def test_spec_errors_name_the_field():
    base = {"kind": "probe", "name": "p", "model": {"n_layers": 2}, "variants": {"a": []},
            "tasks": {"m": {"task": {"kind": "mqar", "vocab_size": 128}}}, "grid": {"lr": [1e-3]},
            "train": {"max_steps": 2}}
    validate(ProbeSweepSpec, base)
    with pytest.raises(ConfigError, match="tasks.m.changes.size: not a field of task kind 'mqar'"):
        validate(ProbeSweepSpec, {**base, "tasks": {"m": {"task": {"kind": "mqar"}, "changes": {"size": [1]}}}})
    with pytest.raises(ConfigError, match="model.vocab_size: set by each task"):
        validate(ProbeSweepSpec, {**base, "model": {"n_layers": 2, "vocab_size": 10}})
    with pytest.raises(ConfigError, match="baseline: 'b' is not one of the variants \\(a\\)"):
        validate(ProbeSweepSpec, {**base, "baseline": "b"})
    assert validate(ProbeSweepSpec, {**base, "variants": {"a": [], "c": []}}).baseline_variant == "a"
    assert validate(ProbeSweepSpec, {**base, "variants": {"a": [], "c": []}, "baseline": "c"}).baseline_variant == "c"
    with pytest.raises(ConfigError, match="grid: lr: .* repeats a value"):
        validate(ProbeSweepSpec, {**base, "grid": {"lr": [1e-3, 1e-3]}})
    spec = validate(ProbeSweepSpec, {**base, "variants": {"bad": ["mixer.n_heads=3"]}, "widths": [64]})
    with pytest.raises(ConfigError, match="variant 'bad' at width 64"):
        plan(spec)


def test_probe_sweep_records_resumes_and_locks(tmp_path):
    from archifactory.eval.probes.runner import ProbeRunner

    spec = validate(ProbeSweepSpec, {
        "kind": "probe", "name": "p", "model": {"n_layers": 1, "ffn": {"kind": "none"},
                                                "mixer": {"kind": "attention", "n_heads": 1}},
        "widths": [8, 16], "variants": {"attention": [], "deltanet": ["mixer={kind: deltanet, n_heads: 1}"]},
        "tasks": {"mqar": {"task": {"kind": "mqar", "vocab_size": 64, "seq_len": 16, "num_kv_pairs": 2,
                                    "train_examples": 32, "test_examples": 16}}},
        "grid": {"lr": [1e-3, 1e-2]}, "train": {"batch_size": 8, "max_steps": 2, "eval_every": 1}, "parallel": 1})
    sweep = tmp_path / "sweep"
    with hold_directory(sweep, ".sweep.lock", "sweep directory", "wait"):
        with pytest.raises(DirectoryBusyError):
            ProbeRunner(spec, sweep).run()
    assert ProbeRunner(spec, sweep).run() == {"done": 8, "failed": 0}
    store = ProbeStore(sweep / "results.sqlite")
    rows = store.probe_runs()
    assert len(rows) == 8 and all(r.status == "done" and r.steps == 2 and r.test_examples == 16 for r in rows)
    assert store.sweep()["name"] == "p" and len(store.history(rows[0].run_id)) == 2
    before = {r.run_id: r.test_acc for r in rows}
    assert ProbeRunner(spec, sweep).run() == {"done": 8, "failed": 0}  # nothing to do: resumed, not rerun
    assert {r.run_id: r.test_acc for r in store.probe_runs()} == before
    choices = choose(store.probe_runs())
    assert {(c.variant, c.width) for c in choices} == {(v, w) for v in ("attention", "deltanet") for w in (8, 16)}

    from archifactory.sweep.report import write_report

    _, md = write_report(sweep)
    text = md.read_text()
    assert "## Synthetic probes" in text and "## Results" not in text and "## Fairness" not in text
    table = text[text.index("### mqar"):].split("\n\n")[1].splitlines()
    assert table[0].startswith("| variant | d=8 test acc (95% CI) | d=16 test acc (95% CI) |")
    by_variant = {c.variant: c for c in choices if c.width == 16}
    row = next(line for line in table if line.startswith("| deltanet |"))
    assert row.split(" | ")[2] == f"{by_variant['deltanet'].test.mean:.3f}"
    assert (sweep / "report_files" / "probe_accuracy_vs_width.png").stat().st_size > 1000
    # the paired comparison with the baseline (the first variant): one seed, so a difference without a test
    section = text[text.index("### Paired comparison with the baseline"):text.index("### Every probe run")]
    assert "Baseline: attention." in section and (sweep / "report_files" / "probe_overview.png").stat().st_size > 1000
    rows = [line for line in section.splitlines() if line.startswith("| test acc d=16 ↑ | deltanet |")]
    diff = by_variant["deltanet"].test.mean - by_variant["attention"].test.mean
    assert len(rows) == 1 and rows[0].split(" | ")[4] == f"{diff:+.4f}" and "one paired seed: no test" in rows[0]
    # every run records the kernel path each layer's mixer ran, as the model it trained reports it, and the
    # report's kernel-path table shows them per variant
    from archifactory.model.lm import CausalLM
    from archifactory.sweep.report.document import md_cell
    from archifactory.sweep.report.format import summarize_kernel_paths

    expected = {j.run_id: {str(k): v for k, v in CausalLM(j.model).kernel_paths().items()} for j in plan(spec)}
    assert {r.run_id: r.env.kernel_paths for r in store.probe_runs()} == expected
    devices = {r.env.device for r in store.probe_runs()}
    device = devices.pop()
    assert not devices and device.startswith("cpu (") and {r.env.precision for r in store.probe_runs()} == {"fp32"}
    env_table = text[text.index("### Devices, precision and kernel paths per variant"):].split("\n\n")[1]
    for variant in ("attention", "deltanet"):
        paths = {summarize_kernel_paths(p) for rid, p in expected.items() if rid.startswith(variant)}
        assert len(paths) == 1 and paths != {"—"}
        line = next(x for x in env_table.splitlines() if x.startswith(f"| {variant} |"))
        assert line == f"| {variant} | {md_cell(device)} ×1 | fp32 | {md_cell(paths.pop())} |", line
    # a failed run's error is in the report, not only in results.sqlite
    store.probe_failed("deltanet-d8-mqar-lr0.01-wd0-s0", "Traceback (most recent call last):\n  File x\nValueError: boom")
    _, md = write_report(sweep)
    failed = md.read_text().split("### Failed probe runs")[1]
    assert "deltanet-d8-mqar-lr0.01-wd0-s0 (failed)" in failed and "ValueError: boom" in failed


def test_probe_store_written_before_env_json_opens_and_migrates(tmp_path):
    import sqlite3

    from archifactory.results import RunEnv

    path = tmp_path / "results.sqlite"
    old_schema = SCHEMA.replace(",\n    env_json TEXT\n", "\n")
    assert "env_json" not in old_schema
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO probe_runs (run_id, variant, width, task, setting, task_json, lr, weight_decay, seed, "
                   "status, valid_acc, test_acc) VALUES ('r', 'a', 8, 'mqar', 'baseline', '{}', 0.001, 0, 0, 'done', "
                   "0.5, 0.25)")
    (old,) = ProbeStore(path, read_only=True).probe_runs()  # read-only: read as it is, env empty
    assert (old.test_acc, old.env) == (0.25, None)
    store = ProbeStore(path)  # for writing: the column is added
    with sqlite3.connect(path) as db:
        assert "env_json" in {r[1] for r in db.execute("PRAGMA table_info(probe_runs)")}
    env = RunEnv(device="cpu", precision="fp32", kernel_paths={"0": "torch.sdpa"}, world_size=1)
    store.probe_done("r", {"valid_acc": 0.75, "test_acc": 0.5, "test_loss": 1.0, "steps": 2, "examples": 16,
                           "stopped_early": False, "elapsed_s": 1.0, "params": 10, "test_examples": 8,
                           "history": [], "env": env})
    (new,) = store.probe_runs()
    assert new.test_acc == 0.5 and new.env == env
