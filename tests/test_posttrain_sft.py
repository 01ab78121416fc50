"""SFT: data formats, the chat template (against transformers' renderer), chat tokens and vocabulary
resizing, the assistant-only loss mask, token-weighted gradient accumulation, packing that keeps
conversations apart, and SFT runs (validation loss, exact resume, CLI, chat generation)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from archifactory.config import ConfigError
from archifactory.model.config import load_model_config
from archifactory.model.lm import IGNORE_INDEX, CausalLM
from archifactory.posttrain.chat import (
    CHAT_TOKENS,
    CHATML_TEMPLATE,
    IM_END,
    ChatTemplate,
    add_chat_tokens,
    chat_reply,
    resize_vocab,
)
from archifactory.posttrain.formats import conversations, load_records, to_messages
from archifactory.posttrain.sft import SFTTrainer, load_sft_config, sft, task_records
from archifactory.posttrain.sft_data import SFTLoader, collate, tokenize_conversations

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sft" / "alpaca_en_demo.jsonl"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A pretrained run stand-in: a 512-id byte-level BPE trained on the alpaca sample, and the tiny
    preset (vocabulary 512) saved as the run's final model."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    base = tmp_path_factory.mktemp("base")
    records = load_records(str(ALPACA))[:300]
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([r["instruction"] + "\n" + r["output"] for r in records], trainer=trainer)
    backend.save(str(base / "tokenizer.json"))
    torch.manual_seed(0)
    CausalLM(load_model_config("tiny", ["vocab_size=512"])).save_pretrained(base / "model")
    return base


@pytest.fixture(scope="module")
def chat_tokenizer(base_run):
    from archifactory.data.tokenizer import Tokenizer

    return add_chat_tokens(Tokenizer.load(base_run / "tokenizer.json"))


# ------------------------------------------------------------------------------------------------ formats


def test_alpaca_sample_reads_as_conversations():
    records = load_records(str(ALPACA))
    assert len(records) == 999
    convs = conversations(records)
    assert all(c[-1]["role"] == "assistant" and c[-2]["role"] == "user" for c in convs)
    with_input = next(i for i, r in enumerate(records) if r["input"])
    assert convs[with_input][0]["content"] == records[with_input]["instruction"] + "\n\n" + records[with_input]["input"]


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"instruction": "Add.", "input": "2, 3", "output": "5", "system": "S"},
         [("system", "S"), ("user", "Add.\n\n2, 3"), ("assistant", "5")]),
        ({"prompt": "Q", "completion": "A"}, [("user", "Q"), ("assistant", "A")]),
        ({"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
          "completion": [{"role": "assistant", "content": "A"}]}, [("system", "S"), ("user", "Q"), ("assistant", "A")]),
        ({"messages": CONVERSATION}, [(m["role"], m["content"]) for m in CONVERSATION]),
        ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
         [("user", "Q"), ("assistant", "A")]),
        ({"question": "1+1?", "solution": "One and one make 2. \\boxed{2}", "answer": "2"},
         [("user", "1+1?"), ("assistant", "One and one make 2. \\boxed{2}")]),
        ({"messages": [{"role": "user", "content": "Q"}], "reasoning": " think ", "answer": "A"},
         [("user", "Q"), ("assistant", "<think>\nthink\n</think>\n\nA")]),
    ],
)
def test_formats_become_messages(record, expected):
    assert [(m["role"], m["content"]) for m in to_messages(record)] == expected


def test_dolphin_r1_drops_the_thinking_trace_on_request():
    record = {"messages": [{"role": "user", "content": "Q"}], "reasoning": "long thought", "answer": "A"}
    assert to_messages(record, "dolphin_r1", keep_reasoning=False)[-1] == {"role": "assistant", "content": "A"}


@pytest.mark.parametrize(
    "record, message",
    [
        ({"text": "plain"}, "cannot tell the format"),
        ({"messages": [{"role": "user", "content": "Q"}]}, "no assistant turn"),
        ({"messages": [{"role": "robot", "content": "Q"}, {"role": "assistant", "content": "A"}]}, "role 'robot'"),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                       {"role": "user", "content": "more?"}]}, "ends with a user turn"),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "system", "content": "S"},
                       {"role": "assistant", "content": "A"}]}, "only the first message"),
    ],
)
def test_bad_records_are_one_line_errors(record, message):
    with pytest.raises(ValueError, match=message):
        conversations([{"instruction": "ok", "output": "ok"}, record])
    with pytest.raises(ValueError, match="SFT record 1"):
        conversations([{"instruction": "ok", "output": "ok"}, record])


def test_local_json_jsonl_and_parquet_give_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = load_records(str(ALPACA))[:5]
    (tmp_path / "a.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    assert load_records(str(tmp_path / "a.json")) == records
    assert load_records(str(tmp_path / "a.parquet")) == records
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not valid JSON"):
        load_records(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_records(str(tmp_path / "missing.jsonl"))
    # anything else is a hub dataset for `datasets.load_dataset`: a hub-style folder of data files here
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    assert load_records(str(tmp_path / "hub"), split="train") == records
    with pytest.raises(RuntimeError, match="could not load dataset 'no/such-dataset'"):
        load_records("no/such-dataset")


# ----------------------------------------------------------------------------------- template and tokens


def test_template_renders_as_transformers_apply_chat_template(chat_tokenizer):
    from transformers import PreTrainedTokenizerFast

    tokenizer, _, _ = chat_tokenizer
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    template = ChatTemplate()
    for messages, prompt in ((CONVERSATION, False), (CONVERSATION[:2], True), (CONVERSATION[1:4], True)):
        expected = hf.apply_chat_template(messages, chat_template=CHATML_TEMPLATE, tokenize=False,
                                          add_generation_prompt=prompt)
        assert template.render(messages, add_generation_prompt=prompt) == expected
    assert template.render(CONVERSATION[1:3]) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"


def test_assistant_mask_matches_transformers_generation_mask(chat_tokenizer):
    """transformers marks assistant tokens from ``{% generation %}`` blocks; the same template with the
    blocks around each assistant turn must give our mask, token for token."""
    from transformers import PreTrainedTokenizerFast

    tokenizer, _, _ = chat_tokenizer
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    marked = (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
        "{%- generation -%}{{ message['content'] + '<|im_end|>' + '\\n' }}{%- endgeneration -%}"
        "{%- else -%}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{%- endif -%}{%- endfor -%}"
    )
    out = hf.apply_chat_template(CONVERSATION, chat_template=marked, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    encoded = ChatTemplate().encode(CONVERSATION, tokenizer)
    assert encoded.ids == list(out["input_ids"])
    assert [int(a) for a in encoded.assistant] == list(out["assistant_masks"])
    trained = tokenizer.decode([i for i, a in zip(encoded.ids, encoded.assistant) if a])
    assert trained == "Hello!<|im_end|>\nIt is 4.<|im_end|>\n"


def test_chat_tokens_are_new_ids_and_resizing_keeps_old_rows(base_run, chat_tokenizer):
    from archifactory.data.tokenizer import Tokenizer

    old = Tokenizer.load(base_run / "tokenizer.json")
    tokenizer, ids, new = chat_tokenizer
    assert sorted(new) == sorted(ids.values()) == list(range(old.vocab_size, old.vocab_size + len(CHAT_TOKENS)))
    assert set(new).isdisjoint(old.backend.get_vocab().values())
    text = "<|im_start|>user\nhello world<|im_end|>"
    assert tokenizer.encode(text)[0] == ids["<|im_start|>"] and tokenizer.encode(text)[-1] == ids[IM_END]
    assert tokenizer.encode("hello world") == old.encode("hello world")  # ordinary text unchanged
    # the same markers added again keep their ids (a tokenizer that has them is not grown)
    again, ids_again, new_again = add_chat_tokens(tokenizer)
    assert ids_again == ids and new_again == [] and again.vocab_size == tokenizer.vocab_size

    model = CausalLM.from_pretrained(base_run / "model")
    # a model with 2 unused rows beyond the tokenizer: the first two markers land in them and are re-initialised
    wide = CausalLM(load_model_config("tiny", ["vocab_size=514", "tie_embeddings=false", "head_bias=true"]))
    for m in (model, wide):
        resized = resize_vocab(m, tokenizer.vocab_size, new)
        kept = [i for i in range(m.config.vocab_size) if i not in new]
        assert resized.embed.weight.shape[0] == resized.lm_head.weight.shape[0] == tokenizer.vocab_size
        assert torch.equal(resized.embed.weight[kept], m.embed.weight[kept])
        assert torch.equal(resized.lm_head.weight[kept], m.lm_head.weight[kept])
        mean = m.embed.weight[: old.vocab_size].mean(0)
        assert torch.allclose(resized.embed.weight[new], mean.expand(len(new), -1))
        body = {k: v for k, v in m.state_dict().items() if "embed" not in k and "lm_head" not in k}
        assert all(torch.equal(resized.state_dict()[k], v) for k, v in body.items())
        x = torch.tensor([tokenizer.encode("hello world")])
        assert torch.allclose(resized(x).logits[..., kept], m(x).logits[..., kept], atol=1e-6)


# -------------------------------------------------------------------------------------- mask and batches


def test_assistant_only_targets_and_the_switch(chat_tokenizer):
    tokenizer, _, _ = chat_tokenizer
    template = ChatTemplate()
    (masked,), _ = tokenize_conversations([CONVERSATION], template, tokenizer, 256)
    (full,), _ = tokenize_conversations([CONVERSATION], template, tokenizer, 256, assistant_only_loss=False)
    ids = template.encode(CONVERSATION, tokenizer).ids
    assert masked.inputs.tolist() == full.inputs.tolist() == ids[:-1]
    assert full.targets.tolist() == ids[1:]
    trained = [t for t in masked.targets.tolist() if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Hello!<|im_end|>\nIt is 4.<|im_end|>\n"
    # cut at seq_len: a conversation cut before its answer is dropped
    examples, stats = tokenize_conversations([CONVERSATION], template, tokenizer, 6)
    assert examples == [] and stats.truncated == 1 and stats.dropped == 1


def test_loader_is_seeded_covers_each_epoch_and_packs_within_seq_len(chat_tokenizer):
    tokenizer, ids, _ = chat_tokenizer
    convs = conversations(load_records(str(ALPACA))[:40])
    examples, _ = tokenize_conversations(convs, ChatTemplate(), tokenizer, 384)
    packed = SFTLoader(examples, 384, 4, seed=3, pad_id=ids[IM_END], pack=True)
    rows = packed.epoch_rows(0)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert all(sum(len(examples[i].inputs) for i in row) <= 384 for row in rows)
    assert len(rows) < len(examples)  # several conversations share rows
    again = SFTLoader(examples, 384, 4, seed=3, pad_id=ids[IM_END], pack=True)
    assert torch.equal(again.batch(7).input_ids, packed.batch(7).input_ids)  # random access by index
    assert packed.stream_hash(5) == again.stream_hash(5)
    assert packed.stream_hash(5) != SFTLoader(examples, 384, 4, seed=4, pad_id=0, pack=True).stream_hash(5)
    b = packed.batch(0)
    assert b.input_ids.shape == (4, 384) and b.document_ids is not None
    assert packed.n_targets([0]) == b.n_targets
    two_ranks = [SFTLoader(examples, 384, 4, 3, ids[IM_END], True, rank=r, world_size=2).batch(0) for r in (0, 1)]
    assert torch.equal(torch.cat([t.input_ids for t in two_ranks]), b.input_ids)


def test_packed_conversations_give_the_loss_each_gives_alone(chat_tokenizer):
    """Attention masked between documents and positions restarted (learned absolute positions here, to
    test the restart): each conversation's summed loss in a packed row equals its loss alone."""
    tokenizer, ids, _ = chat_tokenizer
    examples, _ = tokenize_conversations(conversations(load_records(str(ALPACA))[:3]), ChatTemplate(), tokenizer, 60)
    for overrides in ([], ["position.kind=learned"], ["mixer.window=8", "mixer.logit_softcap=30"], ["position.kind=alibi"]):
        torch.manual_seed(0)
        model = CausalLM(load_model_config("tiny", ["vocab_size=516", "max_seq_len=200", "n_layers=2", *overrides]))
        batch = collate([examples], ids[IM_END], length=200, pack=True)
        logits = model(batch.input_ids, document_ids=batch.document_ids).logits
        nll = torch.nn.functional.cross_entropy(logits[0], batch.targets[0], reduction="none")
        unmasked = model(batch.input_ids).logits[0]
        at = 0
        for e in examples:
            n = len(e.inputs)
            alone = model(torch.from_numpy(e.inputs)[None]).logits[0]
            per_token = torch.nn.functional.cross_entropy(alone, torch.from_numpy(e.targets), reduction="none")
            assert torch.allclose(nll[at : at + n].sum(), per_token.sum(), rtol=1e-5), overrides
            assert torch.allclose(nll[at : at + n], per_token, atol=1e-5), overrides
            if at > 0:  # without the document mask the later conversations read the earlier ones
                assert (unmasked[at : at + n] - alone).abs().max() > 1e-2, overrides
            at += n


@pytest.mark.parametrize("overrides", [["mixer.kind=mamba2"], ["mixer.kind=kv_shift"], ["mixer.kind=mla"],
                                       ["ffn.kind=rwkv6_channel_mix"]])
def test_parts_that_cannot_keep_documents_apart_refuse_packed_rows(overrides):
    model = CausalLM(load_model_config("tiny", ["vocab_size=64", *overrides]))
    assert model.document_blockers()
    x = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="give one document per row"):
        model(x, document_ids=torch.zeros_like(x))


# ------------------------------------------------------------------------------------------------ runs


def sft_config(base, tmp_path, name="sft", **train):
    return {
        "name": name,
        "base": str(base),
        "data": {"source": str(ALPACA), "max_examples": 60, "val_fraction": 0.1},
        "optimizer": {"lr": 1e-3},
        "train": {"seq_len": 128, "batch_size": 4, "max_steps": 4, "eval_every": 2, "checkpoint_every": 2,
                  "log_every": 1, "threads": 1, "progress": False, "precision": "fp32", **train},
        "out_dir": str(tmp_path / name),
    }


def test_task_examples_join_the_records_and_never_hold_a_test_problem(base_run, tmp_path):
    from archifactory.posttrain.tasks import TaskConfig

    task = {"name": "addition", "digits": 1, "test_fraction": 0.2}
    cfg = sft_config(base_run, tmp_path, "task", max_steps=1)
    cfg["data"].update(task=task, task_examples=300, val_fraction=0.0)
    trainer = SFTTrainer(load_sft_config(cfg), resume=False)
    trainer.setup()
    info = json.loads((tmp_path / "task" / "data.json").read_text())
    assert info["records"] == 60 + 300 and info["task_records"] == 300
    built = TaskConfig(**task).build()
    examples = task_records(TaskConfig(**task), 300)
    assert examples[5] == {"instruction": built.problem(5).prompt, "input": "", "output": built.problem(5).answer}
    for record in examples:  # the reference answer is the sum
        a, b = record["instruction"].removeprefix("What is ").removesuffix("?").split(" + ")
        assert int(record["output"]) == int(a) + int(b)
    held_out = {built.problem(i, "test").prompt for i in range(300)}
    assert held_out.isdisjoint(r["instruction"] for r in examples)
    trainer.metrics.close()
    for bad, message in (({"task": task}, "go together"), ({"task_examples": 5}, "go together"),
                         ({"task": {"name": "countdown"}, "task_examples": 5}, "no reference solution")):
        cfg = sft_config(base_run, tmp_path)
        cfg["data"].update(bad)
        with pytest.raises(ConfigError, match=message):
            load_sft_config(cfg)


@pytest.mark.parametrize("name,digits", [("addition", 1), ("addition", 2), ("multiplication", 2)])
def test_task_sft_targets_are_what_grpo_prompts_for_and_its_checker_accepts(chat_tokenizer, name, digits):
    """The SFT conversation of a task problem starts with exactly the token ids GRPO and the held-out exact
    match prompt with (ChatTemplate.generation_prompt), its trained tokens are the reference answer then
    <|im_end|>, and the task's checker accepts that answer, which is the operands' sum / product as Python
    computes it: a model that reproduces its SFT targets scores on the GRPO checker (no format mismatch)."""
    import re

    from archifactory.posttrain.tasks import TaskConfig

    tokenizer, ids, _ = chat_tokenizer
    template, task = ChatTemplate(), TaskConfig(name=name, digits=digits, test_fraction=0.2)
    built = task.build()
    records = task_records(task, 40)
    for i, messages in enumerate(conversations(records)):
        problem = built.problem(i)
        a, op, b = re.fullmatch(r"What is (\d+) ([+*]) (\d+)\?", problem.prompt).groups()
        assert int(problem.answer) == (int(a) + int(b) if op == "+" else int(a) * int(b))
        assert len(a) == len(b) == digits, problem.prompt
        prompt = template.generation_prompt([{"role": "user", "content": problem.prompt}], tokenizer)
        encoded = template.encode(messages, tokenizer)
        assert encoded.ids[: len(prompt)] == prompt, (problem.prompt, encoded.ids, prompt)
        trained = [t for t, m in zip(encoded.ids, encoded.assistant) if m]
        assert trained == encoded.ids[len(prompt):], "only the answer turn is trained"
        end = trained.index(ids[IM_END])
        answer = tokenizer.decode(trained[:end])
        assert answer == problem.answer and built.correct(answer, problem)
        assert not built.correct(str(int(problem.answer) + 1), problem)


def test_accumulation_gives_the_full_batch_gradient(base_run, tmp_path):
    """Micro-batches are weighted by their trained tokens: four micro-batches of 1 row give the gradient
    of one batch of 4 rows, which is the gradient of (summed loss over trained tokens / their number)."""
    grads = []
    for micro in (4, 1):
        trainer = SFTTrainer(load_sft_config(sft_config(base_run, tmp_path, f"acc{micro}", micro_batch_size=micro)),
                             resume=False)
        trainer.setup()
        for index in range(trainer.accum):
            trainer.micro_loss(index).backward()
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        if micro == 4:
            batch = trainer.loader.batch(0)
            trainer.model.zero_grad()
            logits = trainer.model(batch.input_ids, document_ids=batch.document_ids).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="sum")
            (loss / batch.n_targets).backward()
            by_hand = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
        trainer.metrics.close()
    for name, g in grads[0].items():
        assert torch.allclose(g, by_hand[name], atol=1e-6)
        assert torch.allclose(grads[1][name], g, atol=1e-6), name


def test_sft_run_learns_resumes_exactly_and_chats(base_run, tmp_path):
    summary = sft(sft_config(base_run, tmp_path))
    run = tmp_path / "sft"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert summary["packing"] is True and 0 < summary["val_conversations"] <= 6 and summary["stage"] == "sft"
    assert (run / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    # resume: drop the last checkpoint and the final model, train again from step 2
    uninterrupted = CausalLM.from_pretrained(run / "model").state_dict()
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    shutil.rmtree(run / "model")
    resumed = sft(sft_config(base_run, tmp_path))
    assert resumed["stream_hash"] == summary["stream_hash"] and resumed["val_loss"] == summary["val_loss"]
    model = CausalLM.from_pretrained(run / "model")
    assert all(torch.equal(uninterrupted[k], v) for k, v in model.state_dict().items())

    from archifactory.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(run / "tokenizer.json")
    reply = chat_reply(model, tokenizer, ChatTemplate.load(run), [{"role": "user", "content": "Name a color."}],
                       max_new_tokens=8, temperature=0)
    assert isinstance(reply, str) and "<|im_start|>" not in reply


def test_recurrent_base_pads_instead_of_packing(tmp_path, base_run):
    base = tmp_path / "base_mamba"
    shutil.copytree(base_run, base, ignore=shutil.ignore_patterns("model"))
    CausalLM(load_model_config("tiny", ["vocab_size=512", "mixer.kind=mamba2"])).save_pretrained(base / "model")
    cfg = sft_config(base, tmp_path, max_steps=1)
    trainer = SFTTrainer(load_sft_config(cfg), resume=False)
    trainer.setup()
    assert trainer.packing is False and trainer.loader.batch(0).document_ids is None
    trainer.metrics.close()
    with pytest.raises(Exception, match="sft.packing=on, but packed conversations cannot be kept apart by layer 0 mixer Mamba2"):
        SFTTrainer(load_sft_config({**cfg, "sft": {"packing": "on"}}), resume=False).setup()


def test_a_base_run_whose_tokenizer_has_more_ids_than_its_model_is_refused(base_run, tmp_path):
    """Another model's tokenizer.json in the base run (more ids than its model): before, SFT grew the model to
    the tokenizer's size and trained on ids the model never saw, silently (generate and eval refuse it)."""
    from tokenizers import Tokenizer as HFTokenizer

    from archifactory.errors import InputError

    other = tmp_path / "other"
    shutil.copytree(base_run, other)
    ids = HFTokenizer.from_file(str(other / "tokenizer.json")).get_vocab_size()
    CausalLM(load_model_config("tiny", [f"vocab_size={ids - 256}"])).save_pretrained(other / "model")
    with pytest.raises(InputError, match=rf"tokenizer.json: the tokenizer has {ids} ids but the model's "
                                         rf"vocab_size is {ids - 256}: pass the tokenizer the model was trained with"):
        load_sft_config({"base": str(other), "data": {"source": str(ALPACA)}})


def test_cli_sft_and_generate_chat(base_run, tmp_path):
    from archifactory.cli import app

    runner = CliRunner()
    out = tmp_path / "cli_sft"
    result = runner.invoke(app, ["sft", str(base_run), "--data", str(ALPACA), "--out", str(out),
                                 "--set", "data.max_examples=20", "--set", "train.max_steps=1",
                                 "--set", "train.seq_len=64", "--set", "train.batch_size=2",
                                 "--set", "train.progress=false"])
    assert result.exit_code == 0, result.output
    assert "done: step 1" in result.output and "nan" not in result.output  # SFT has no bits/byte
    assert (out / "model" / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert "stage: sft" in (out / "config.yaml").read_text()
    # resuming the finished run trains nothing and says so; a changed setup needs --allow-config-change
    args = ["sft", str(out / "config.yaml")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "already at step 1 of max_steps 1: nothing to train" in result.output, result.output
    assert "nan" not in result.output
    result = runner.invoke(app, [*args, "--set", "train.seq_len=32", "--set", "train.max_steps=2"])
    assert result.exit_code == 2 and "--allow-config-change" in result.output, result.output
    result = runner.invoke(app, [*args, "--set", "train.seq_len=32", "--set", "train.max_steps=2",
                                 "--allow-config-change"])
    assert result.exit_code == 0 and "changed setup" in result.output, result.output
    result = runner.invoke(app, ["train", str(out / "config.yaml"), "--set", "train.max_steps=1"])
    assert result.exit_code == 2 and "is at step 2, past the run's budget of max_steps 1" in result.output
    result = runner.invoke(app, ["generate", str(out), "--chat", "--prompt", "Say hi.", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    # a damaged chat template: one line naming it and the command that writes it again, which does
    template = (out / "chat_template.jinja").read_bytes()
    (out / "chat_template.jinja").write_bytes(template.replace(b"{%", b"{", 1))
    result = runner.invoke(app, ["generate", str(out), "--chat", "--prompt", "Say hi.", "--max-new-tokens", "5"])
    assert result.exit_code == 2 and "chat_template.jinja is damaged" in result.output, result.output
    assert f"archifactory train {out / 'config.yaml'}" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["train", str(out / "config.yaml")])
    assert result.exit_code == 0 and "nothing to train" in result.output, result.output
    assert (out / "chat_template.jinja").read_bytes() == template
    # a run written before templates had checksums (no sidecar), its template damaged: the advice of a
    # checkpoint names the same command, and that command writes the template again (it did not: the run
    # counted as finished and the error came back)
    (out / "chat_template.jinja.checksum").unlink()
    (out / "chat_template.jinja").write_bytes(template[:100])
    step = sorted((out / "checkpoints").iterdir())[-1]
    result = runner.invoke(app, ["generate", str(step), "--chat", "--prompt", "Say hi.", "--max-new-tokens", "5"])
    assert result.exit_code == 2 and "chat_template.jinja is damaged (TemplateSyntaxError" in result.output
    assert f"archifactory train {out / 'config.yaml'}" in result.output, result.output
    result = runner.invoke(app, ["train", str(out / "config.yaml")])
    assert result.exit_code == 0 and "nothing to train" in result.output, result.output
    assert (out / "chat_template.jinja").read_bytes() == template
    assert (out / "chat_template.jinja.checksum").is_file()
    # a deleted one: the same command (was: "not a chat (SFT) run; run `archifactory sft` first")
    (out / "chat_template.jinja").unlink()
    result = runner.invoke(app, ["generate", str(out), "--chat", "--prompt", "Say hi.", "--max-new-tokens", "5"])
    assert result.exit_code == 2 and f"chat_template.jinja is missing; `archifactory train {out / 'config.yaml'}`" \
        in result.output, result.output
    result = runner.invoke(app, ["train", str(out / "config.yaml")])
    assert result.exit_code == 0 and (out / "chat_template.jinja").read_bytes() == template, result.output
    # the tiny preset's RoPE positions end at max_seq_len 256: --chat refuses to run past it, as generate does
    result = runner.invoke(app, ["generate", str(out), "--chat", "--prompt", "Say hi.", "--max-new-tokens", "5000"])
    assert result.exit_code == 2 and "exceeds max_seq_len=256" in result.output, result.output
    result = runner.invoke(app, ["generate", str(base_run), "--chat", "--prompt", "Say hi."])
    assert result.exit_code == 2 and "chat_template.jinja" in result.output
    result = runner.invoke(app, ["sft", str(tmp_path / "nowhere"), "--data", str(ALPACA)])
    assert result.exit_code == 2 and "pretrain the base run" in result.output


def test_sft_configs_take_the_sft_defaults_unless_given(base_run, tmp_path):
    cfg = load_sft_config({"base": str(base_run), "data": {"source": str(ALPACA)}})
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("adamw", 3e-4, 0.0)
    assert (cfg.schedule.kind, cfg.schedule.min_lr_ratio) == ("linear", 0.0)
    assert cfg.model.vocab_size == 516 and cfg.stage == "sft"
    given = load_sft_config({"base": str(base_run), "data": {"source": str(ALPACA)}}, ["optimizer.lr=0.01"])
    assert (given.optimizer.lr, given.optimizer.weight_decay) == (0.01, 0.0)  # an override refines the SFT default
    muon = load_sft_config({"base": str(base_run), "data": {"source": str(ALPACA)}}, ["optimizer.name=muon"])
    assert muon.optimizer.name == "muon"


def test_num_train_epochs_sets_the_steps(base_run, tmp_path):
    """One conversation per row (packing off): 1.5 epochs of n conversations at 4 rows per step is
    ceil(1.5 n / 4) steps, whatever train.max_steps says."""
    cfg = sft_config(base_run, tmp_path, "epochs", max_steps=1000, eval_every=1000, checkpoint_every=1000)
    cfg["data"]["max_examples"] = 24
    cfg["sft"] = {"packing": "off", "num_train_epochs": 1.5}
    summary = sft(cfg)
    n = summary["train_conversations"]
    assert n == 24 - summary["val_conversations"] - summary["dropped"]
    assert summary["steps"] == math.ceil(1.5 * n / 4)
    assert 1.5 <= summary["epochs"] < 1.5 + 4 / n


def test_example_sft_config_loads_from_the_repository_root(base_run, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # its paths are relative to the repository root, as `archifactory sft` runs there
    cfg = load_sft_config(root / "configs" / "runs" / "sft-alpaca.yaml", [f"base={base_run}"])
    assert cfg.stage == "sft" and Path(cfg.data.source).resolve().samefile(ALPACA)
    assert cfg.sft.assistant_only_loss and cfg.model.vocab_size == 516
