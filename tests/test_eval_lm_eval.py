"""lm-evaluation-harness is the outside reference for the native zero-shot scorer: lm-eval's own task
YAMLs (prompts, choices, targets, few-shot rendering, metrics), pointed at the same local data, run
through the adapter on the same model must give the same per-choice log-likelihoods, greedy flags and
per-item accuracies as :mod:`archifactory.eval`."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import archifactory as af
from archifactory.data.tokenizer import Tokenizer
from archifactory.eval import EvalStore, evaluate, get_task
from archifactory.eval import runner as eval_runner
from archifactory.eval.metrics import item_metrics
from archifactory.eval.scoring import ModelScorer, score_requests
from archifactory.eval.tasks import arrow_path
from archifactory.eval.lm_eval_adapter import ArchifactoryLM, run_lm_eval, task_manager

LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"
TINYSTORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "train.txt"
LIMIT = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A tiny random model with a real byte-level BPE (so lm-eval's context/continuation split matters)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = TINYSTORIES.read_text().split("\n")[:2000]
    backend.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = Tokenizer(backend, backend.token_to_id("<|endoftext|>"), "bpe-test")
    torch.manual_seed(0)
    model = af.CausalLM.from_config({"vocab_size": 400, "d_model": 32, "n_layers": 2, "max_seq_len": 96,
                                     "mixer": {"kind": "attention", "n_heads": 2},
                                     "ffn": {"kind": "swiglu", "hidden": 64}})
    run = tmp_path_factory.mktemp("lmeval") / "run"
    model.save_pretrained(run / "model")
    tokenizer.save(run / "tokenizer.json")
    return model, tokenizer, run


def _write_tasks(folder: Path) -> dict[str, str]:
    """lm-eval's own YAMLs, included unchanged except for where the data come from. Returns our task
    name -> lm-eval task name."""
    folder.mkdir(parents=True, exist_ok=True)

    def head(relative: str) -> Path:
        """The split's first rows, as an Arrow stream file like the package's (datasets then reads less)."""
        import pyarrow as pa

        with pa.memory_map(str(arrow_path(relative))) as source:
            table = pa.ipc.open_stream(source).read_all().slice(0, 2 * LIMIT)
        path = folder / (relative.replace("/", "_") + ".arrow")
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return path

    def local(name, include, files, **extra):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({
            "include": str(LM_EVAL_TASKS / include), "task": name, "tag": [], "dataset_path": "arrow",
            "dataset_name": None, "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}}, **extra}))

    local("af_arc_easy", "arc/arc_easy.yaml", {"validation": head("ai2_arc/ARC-Easy/validation")},
          test_split=None, training_split=None)
    local("af_piqa", "piqa/piqa.yaml", {"validation": head("piqa/plain_text/validation")}, training_split=None)
    local("af_sciq", "sciq/sciq.yaml", {"validation": head("sciq/none/validation")}, test_split=None,
          training_split=None)
    local("af_hellaswag", "hellaswag/hellaswag.yaml", {"validation": head("hellaswag/none/validation")},
          training_split=None)
    local("af_winogrande", "winogrande/default.yaml",
          {"validation": head("winogrande/winogrande_xl/validation")}, training_split=None)
    subject = "hails/mmlu_no_train/abstract_algebra"
    local("af_mmlu_abstract_algebra", "mmlu/default/mmlu_abstract_algebra.yaml",
          {"test": head(f"{subject}/test"), "dev": head(f"{subject}/dev")})
    local("af_mmlu_5shot", "mmlu/default/mmlu_abstract_algebra.yaml",
          {"test": head(f"{subject}/test"), "dev": head(f"{subject}/dev")}, num_fewshot=5)
    # LAMBADA: lm-eval splits the passage at its last space; the package ships the rendered requests
    rows = [{"text": i.contexts[0] + i.continuations[0]} for i in get_task("lambada").items(LIMIT)]
    (folder / "lambada.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "af_lambada.yaml").write_text(yaml.safe_dump({
        "include": str(LM_EVAL_TASKS / "lambada" / "lambada_openai.yaml"), "task": "af_lambada", "tag": [],
        "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(folder / "lambada.jsonl")}}}))
    return {"arc_easy": "af_arc_easy", "piqa": "af_piqa", "sciq": "af_sciq", "hellaswag": "af_hellaswag",
            "winogrande": "af_winogrande", "mmlu": "af_mmlu_abstract_algebra", "mmlu_5shot": "af_mmlu_5shot",
            "lambada": "af_lambada"}


def test_lm_eval_and_native_scorer_agree_per_item(bpe_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    model, tokenizer, _ = bpe_model
    names = _write_tasks(tmp_path / "tasks")
    manager = task_manager(tmp_path / "tasks", include_defaults=False)
    results = run_lm_eval(ArchifactoryLM(model=model, tokenizer=tokenizer, batch_size=5), list(names.values()),
                          LIMIT, manager)
    scorer = ModelScorer(model)
    for ours, theirs in names.items():
        task = get_task(ours)
        items = task.items(LIMIT)[:LIMIT]  # MMLU: the first subject (abstract algebra)
        requests = eval_runner.build_requests(items, tokenizer)
        samples = sorted(results[theirs].samples, key=lambda s: s["doc_id"])
        assert len(samples) == len(items) == results[theirs].n_items, ours
        loglikelihood = task.kind == "loglikelihood"
        for item, rs, sample in zip(items, requests, samples):
            native = score_requests(scorer, rs)
            reference = [tuple(r) for r in sample["filtered_resps"]]
            assert [s.logprob for s in native] == pytest.approx([r[0] for r in reference], abs=1e-5), ours
            assert [s.greedy for s in native] == [bool(r[1]) for r in reference], ours
            values = item_metrics(item, native, loglikelihood)
            assert values["acc"] == sample["acc"], ours
            if "acc_norm" in sample:
                assert values["acc_norm"] == sample["acc_norm"], ours
        if loglikelihood:  # lm-eval's perplexity = exp(-mean ll)
            native_ll = [score_requests(scorer, rs)[0].logprob for rs in requests]
            assert results[theirs].metrics["perplexity"] == pytest.approx(
                float(torch.tensor(native_ll).mean().neg().exp()), rel=1e-5)


def test_lm_eval_tasks_through_evaluate_are_stored_and_skipped(bpe_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    _, _, run = bpe_model
    _write_tasks(tmp_path / "tasks")
    records = evaluate(run, "lm_eval:af_piqa,piqa", limit=3, include_path=tmp_path / "tasks",
                       lm_eval_defaults=False, progress=False)
    by_task = {r.task: {m.metric: m for m in r.metrics} for r in records}
    assert by_task["lm_eval:af_piqa"]["acc"].value == by_task["piqa"]["acc"].value
    assert by_task["lm_eval:af_piqa"]["acc_norm"].value == by_task["piqa"]["acc_norm"].value
    assert by_task["lm_eval:af_piqa"]["acc"].null_value == by_task["piqa"]["acc"].null_value
    stored = EvalStore(run / "eval.sqlite").metrics(task="lm_eval:af_piqa")
    assert {m.metric for m in stored} >= {"acc", "acc_norm"} and stored[0].n_items == 3

    def fail(*args, **kwargs):
        raise AssertionError("a stored lm-eval evaluation ran again")

    monkeypatch.setattr("archifactory.eval.lm_eval_adapter.run_lm_eval", fail)
    evaluate(run, "lm_eval:af_piqa", limit=3, include_path=tmp_path / "tasks", lm_eval_defaults=False, progress=False)
    with pytest.raises(KeyError, match="lm-eval knows no task lm_eval:nope"):
        evaluate(run, "lm_eval:nope", include_path=tmp_path / "tasks", lm_eval_defaults=False, progress=False)
