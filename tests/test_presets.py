"""Every YAML under configs/ loads and builds; presets have the sizes their names promise."""

from pathlib import Path

import pytest
import torch

import archifactory as af
from archifactory.config import load_yaml
from archifactory.model.presets import configs_dir

YAMLS = sorted(configs_dir().rglob("*.yaml"))


def test_configs_found():
    assert {p.stem for p in YAMLS} >= {"tiny", "small", "llama-26m", "gpt2-124m"}


def stage_base(tmp_path: Path) -> Path:
    """A finished run directory a post-training config can start from: a tiny model, its tokenizer and the
    chat template (an SFT run's files; an SFT config reads only the first three)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    from archifactory.posttrain.chat import ChatTemplate

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["a tiny corpus"], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.save(str(tmp_path / "tokenizer.json"))
    af.CausalLM.from_config({"vocab_size": 300, "d_model": 32, "n_layers": 1, "max_seq_len": 256,
                             "mixer": {"kind": "attention", "n_heads": 2}}).save_pretrained(tmp_path / "model")
    ChatTemplate().save(tmp_path)
    return tmp_path


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(configs_dir())))
def test_every_yaml_loads_and_builds(path: Path, tmp_path: Path):
    data = load_yaml(path)
    if path.parent.name == "runs" and data.get("stage") in ("sft", "grpo"):
        from archifactory.posttrain.grpo import load_grpo_config
        from archifactory.posttrain.sft import load_sft_config

        load = load_sft_config if data["stage"] == "sft" else load_grpo_config
        cfg = load(path, [f"base={stage_base(tmp_path)}"])  # its base run replaced by a tiny one
        assert cfg.stage == data["stage"] and cfg.train.precision == "auto"
        with torch.device("meta"):
            assert cfg.model.build().num_params() > 0
    elif path.parent.name == "models":
        cfg = af.load_model_config(path)
        with torch.device("meta"):
            model = cfg.build()
        assert model.num_params() > 0
    elif path.parent.name == "runs":
        from archifactory.train import load_run_config

        cfg = load_run_config(path)
        with torch.device("meta"):
            assert cfg.model.build().num_params() > 0
    elif path.parent.name == "sweeps" and data.get("kind") == "probe":
        from archifactory.eval.probes.spec import load_probe_spec, plan

        models = {job.model.model_dump_json(): job.model for job in plan(load_probe_spec(path))}
        for model in models.values():
            with torch.device("meta"):
                assert af.CausalLM(model).num_params() > 0
    elif path.parent.name == "sweeps":
        from archifactory.sweep.spec import load_sweep, plan

        spec, root = load_sweep(path)
        for run in plan(spec, root, Path("/nonexistent")):
            with torch.device("meta"):
                assert run.config.model.build().num_params() > 0
    else:
        pytest.fail(f"no loader for {path}: add one to this test")
    assert data


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("tiny", 0.8e6, 1.2e6), ("small", 9e6, 11e6), ("llama-26m", 25e6, 27e6), ("gpt2-124m", 124e6, 125e6)],
)
def test_preset_sizes(name, low, high):
    with torch.device("meta"):
        model = af.CausalLM.from_config(name)
    assert low <= model.num_params() <= high


def test_gpt2_124m_matches_published_count():
    # GPT-2 small with tied embeddings: 124,439,808 parameters (the figure transformers reports).
    with torch.device("meta"):
        assert af.CausalLM.from_config("gpt2-124m").num_params() == 124_439_808


def test_llama_26m_is_the_transformerlm_config():
    cfg = af.load_model_config("llama-26m")
    assert (cfg.n_layers, cfg.d_model, cfg.vocab_size) == (8, 512, 6400)
    assert (cfg.mixer.n_heads, cfg.mixer.kv_heads) == (8, 2)
    assert cfg.position.theta == 1e6 and cfg.ffn.kind == "swiglu" and cfg.norm.kind == "rmsnorm"
    assert cfg.residual == "pre"


def test_tiny_builds_for_real_and_trains_a_step():
    model = af.CausalLM.from_config("tiny")
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    out = model(ids[:, :-1], ids[:, 1:])
    out.loss.backward()
    assert abs(out.ce_loss.item() - torch.log(torch.tensor(2048.0)).item()) < 0.5  # ~uniform at init
