"""Pretrained and frozen modules (ArchiFactory's ``freeze_lm_modules``): a run whose ``model.pretrained``
names a local Hugging Face model directory starts with that model's embedding / head / final norm
(compared with transformers' own tensors), keeps frozen ones bit for bit through training with no
optimizer state for them, and records what was loaded in its config."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import archifactory as af  # noqa: E402
from archifactory.config import ConfigError  # noqa: E402
from archifactory.train import Trainer, load_run_config  # noqa: E402

TINYSTORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "train.txt"
D = 32


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama and the BPE tokenizer its embedding rows belong to, saved as one HF directory."""
    path = tmp_path_factory.mktemp("hf_llama")
    text = TINYSTORIES.read_text(encoding="utf-8")[:20000]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    tok.save(str(path / "tokenizer.json"))
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=D, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.copy_(1 + 0.3 * torch.randn(D))  # not the fresh model's ones
    model.save_pretrained(path)
    return path


def run_config(tmp_path, hf_dir, pretrained, tie=False, **extra):
    vocab = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True).vocab_size
    return {
        "name": "frozen",
        "model": {"vocab_size": vocab, "d_model": D, "n_layers": 2, "max_seq_len": 64, "tie_embeddings": tie,
                  "mixer": {"kind": "attention", "n_heads": 2}, "ffn": {"kind": "swiglu", "hidden": 64},
                  "pretrained": pretrained},
        "data": {"corpus": {"kind": "tinystories", "path": str(TINYSTORIES), "max_documents": 200},
                 "tokenizer": {"kind": "hf", "name_or_path": str(hf_dir)}, "cache_dir": str(tmp_path / "cache")},
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "train": {"seq_len": 32, "batch_size": 4, "max_steps": 3, "eval_every": 3, "eval_tokens": 512,
                  "checkpoint_every": 3, "threads": 1, "progress": False, "precision": "fp32"},
        "out_dir": str(tmp_path / "run"),
        **extra,
    }


def test_frozen_pretrained_modules_are_loaded_kept_and_get_no_optimizer_state(tmp_path, hf_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    expected = {"embed.weight": hf.model.embed_tokens.weight, "lm_head.weight": hf.lm_head.weight,
                "final_norm.weight": hf.model.norm.weight}
    cfg = load_run_config(run_config(tmp_path, hf_dir, {"path": str(hf_dir),
                                                        "modules": ["embedding", "head", "final_norm"]}))
    trainer = Trainer(cfg, resume=False)
    trainer.setup()
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for name, value in expected.items():
        assert torch.equal(start[name], value.detach())
    frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert frozen == set(expected)
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for n, p in trainer.model.named_parameters() if n in frozen)
    trainer.run()
    after = dict(trainer.model.named_parameters())
    for name in start:
        assert torch.equal(after[name].detach(), start[name]) is (name in frozen), name
    # no optimizer state for frozen parameters: in memory, and in the state dict checkpoints store
    state_ids = {id(p) for p in trainer.optimizer.state}
    assert not any(id(after[n]) in state_ids for n in frozen)
    n_trainable = sum(p.requires_grad for p in trainer.model.parameters())
    assert len(trainer.optimizer.state_dict()["state"]) == n_trainable == len(after) - len(frozen)
    # the run's config records what was loaded (the report's config diff reads it)
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    assert str(hf_dir) in recorded and "final_norm" in recorded
    # the saved model rebuilds frozen, without reading the HF directory again
    reloaded = af.CausalLM.from_pretrained(tmp_path / "run" / "model")
    assert not reloaded.embed.weight.requires_grad and torch.equal(reloaded.embed.weight, start["embed.weight"])


def test_unfrozen_pretrained_embedding_trains_and_tied_head_follows(tmp_path, hf_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    cfg = load_run_config(run_config(tmp_path, hf_dir, {"path": str(hf_dir), "modules": ["embedding"],
                                                        "freeze": False}, tie=True))
    trainer = Trainer(cfg, resume=False)
    trainer.setup()
    assert torch.equal(trainer.model.embed.weight.detach(), hf.model.embed_tokens.weight)
    assert trainer.model.lm_head.weight is trainer.model.embed.weight
    assert all(p.requires_grad for p in trainer.model.parameters())
    trainer.run()
    assert not torch.equal(trainer.model.embed.weight.detach(), hf.model.embed_tokens.weight)


def test_pretrained_modules_errors_name_the_field(tmp_path, hf_dir):
    # the tokenizer must be the pretrained model's
    data = run_config(tmp_path, hf_dir, {"path": str(hf_dir)})
    data["data"]["tokenizer"] = {"kind": "bytes"}
    with pytest.raises(ConfigError, match="model.pretrained.path=.*data.tokenizer"):
        load_run_config(data)
    # a tied head is the embedding
    with pytest.raises(ConfigError, match="pretrained.modules: with tie_embeddings=true"):
        load_run_config(run_config(tmp_path, hf_dir, {"path": str(hf_dir), "modules": ["head"]}, tie=True))
    # shapes must agree with the HF model
    wrong = run_config(tmp_path, hf_dir, {"path": str(hf_dir)})
    wrong["model"]["d_model"] = 48
    trainer = Trainer(load_run_config(wrong), resume=False)
    with pytest.raises(ValueError, match="model.d_model=48 but the pretrained model"):
        trainer.setup()
    # and so must the final norm's kind
    ln = run_config(tmp_path, hf_dir, {"path": str(hf_dir), "modules": ["final_norm"]})
    ln["model"]["norm"] = {"kind": "layernorm"}
    with pytest.raises(ValueError, match="model.norm=.*differs from the final norm"):
        Trainer(load_run_config(ln), resume=False).setup()


def test_the_report_config_diff_shows_what_was_loaded(tmp_path, hf_dir):
    from archifactory.sweep.stats import config_diff

    spec = {"path": str(hf_dir), "modules": ["embedding", "final_norm"], "freeze": True}
    variant = load_run_config(run_config(tmp_path, hf_dir, spec)).model_dump(mode="json")
    base = load_run_config(run_config(tmp_path, hf_dir, None)).model_dump(mode="json")
    rows = {key: (old, new) for key, old, new in config_diff(variant, base)}
    loaded = {key: new for key, (old, new) in rows.items() if key.startswith("model.pretrained")}
    assert str(hf_dir) in repr(loaded) and "final_norm" in repr(loaded) and True in loaded.values(), rows
