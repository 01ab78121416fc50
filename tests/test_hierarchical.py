"""Hierarchical model kinds (MegaByte, Hourglass): logits equal the PyPI reference implementations'
with copied weights, causality, generation, FLOPs against a hand count and an independent counter, the
model-kind registry, training with checkpoint resume, and the shipped byte-level sweep."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from archifactory.config import ConfigError
from archifactory.ffn.mlp import MLPConfig
from archifactory.mixers.attention import AttentionConfig
from archifactory.model.config import ModelConfig, load_model_config
from archifactory.model.hourglass import HourglassConfig, HourglassLM
from archifactory.model.lm import CausalLM
from archifactory.model.megabyte import MegaByteConfig, MegaByteLM
from archifactory.nn.norms import LayerNormConfig, RMSNormConfig
from archifactory.nn.positions import LearnedPositionConfig, RoPEConfig
from archifactory.registry import MODELS
from flop_reference import measured_flops

ROOT = Path(__file__).resolve().parents[1]


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm gains, biases and start vectors too), so no copy slip hides."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


# ------------------------------------------------------------------------------------------ Hourglass


def hourglass_pair(resampling: bool, sampling: str, depth=(1, 2, 1), s=3):
    hg = pytest.importorskip("hourglass_transformer_pytorch.hourglass_transformer_pytorch")
    # the package's pad_to_multiple uses `math` without importing it (any length not a multiple of s)
    hg.math = math
    reference = hg.HourglassTransformerLM(
        num_tokens=50, dim=32, max_seq_len=40, depth=depth, shorten_factor=s, heads=2, dim_head=16,
        attn_resampling=resampling, updown_sample_type=sampling,
    ).eval()
    attention = AttentionConfig(n_heads=2, head_dim=16, out_bias=True)
    config = HourglassConfig(
        vocab_size=50, d_model=32, n_layers=sum(depth), n_pre_layers=depth[0], n_post_layers=depth[2],
        shorten_factor=s, max_seq_len=40, mixer=attention, ffn=MLPConfig(activation="gelu", bias=True),
        norm=LayerNormConfig(), position=LearnedPositionConfig(), tie_embeddings=False, head_bias=True,
        downsample="linear" if sampling == "linear" else "mean", upsample="linear" if sampling == "linear" else "repeat",
        resampling=attention if resampling else None,
    )
    ours = HourglassLM(config).eval()
    _randomize(reference)
    ref = dict(reference.named_parameters())
    state: dict[str, torch.Tensor] = {
        "embed.weight": ref["token_emb.weight"], "pos_embed.weight": ref["pos_emb.weight"],
        "final_norm.weight": ref["transformer.norm_out.weight"], "final_norm.bias": ref["transformer.norm_out.bias"],
        "lm_head.weight": ref["to_logits.weight"], "lm_head.bias": ref["to_logits.bias"],
    }

    def layer(src: str, dst: str, mixer: str) -> None:
        inner = 32
        kv = ref[f"{src}.0.fn.to_kv.weight"]
        state.update({
            f"{dst}.{mixer}.q_proj.weight": ref[f"{src}.0.fn.to_q.weight"],
            f"{dst}.{mixer}.k_proj.weight": kv[:inner], f"{dst}.{mixer}.v_proj.weight": kv[inner:],
            f"{dst}.{mixer}.o_proj.weight": ref[f"{src}.0.fn.to_out.weight"],
            f"{dst}.{mixer}.o_proj.bias": ref[f"{src}.0.fn.to_out.bias"],
            f"{dst}.ffn.up_proj.weight": ref[f"{src}.1.fn.0.weight"], f"{dst}.ffn.up_proj.bias": ref[f"{src}.1.fn.0.bias"],
            f"{dst}.ffn.down_proj.weight": ref[f"{src}.1.fn.3.weight"],
            f"{dst}.ffn.down_proj.bias": ref[f"{src}.1.fn.3.bias"],
        })
        for norm, name in (("0", "mixer_norm" if mixer == "mixer" else "norm"), ("1", "ffn_norm")):
            for p in ("weight", "bias"):
                state[f"{dst}.{name}.{p}"] = ref[f"{src}.{norm}.norm.{p}"]

    stacks = [("pre_transformer", 0, depth[0]), ("valley_transformer", depth[0], depth[1]),
              ("post_transformer", depth[0] + depth[1], depth[2])]
    for name, start, n in stacks:
        for i in range(n):
            layer(f"transformer.{name}.layers.{i}", f"blocks.{start + i}", "mixer")
    if sampling == "linear":
        for part in ("downsample", "upsample"):
            state[f"{part}.weight"] = ref[f"transformer.{part}.proj.weight"]
            state[f"{part}.bias"] = ref[f"transformer.{part}.proj.bias"]
    if resampling:
        # the resampler's attention keys are flat (no `mixer.` level)
        for src, dst in (("pre", "down_resampler"), ("post", "up_resampler")):
            layer(f"transformer.attn_resampling_{src}_valley.layers.0", dst, "")
        state = {k.replace("..", "."): v for k, v in state.items()}
    ours.load_state_dict(state, strict=True)  # every parameter mapped, none left over
    return reference, ours


@pytest.mark.parametrize("resampling", [False, True])
@pytest.mark.parametrize("sampling", ["naive", "linear"])
def test_hourglass_matches_reference_with_copied_weights(resampling, sampling):
    reference, ours = hourglass_pair(resampling, sampling)
    for T in (30, 31, 40):  # a multiple of s=3 and two lengths that pad
        ids = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, reference(ids), atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------- MegaByte


def megabyte_pair(P=4, L=24, D=32, depth=(2, 2), position="rope"):
    mb = pytest.importorskip("MEGABYTE_pytorch.megabyte")
    reference = mb.MEGABYTE(
        num_tokens=50, dim=(D, L), depth=depth, max_seq_len=(10, P), dim_head=8, heads=2,
        rel_pos=position == "rope", pos_emb=position == "learned",
    ).eval()
    _randomize(reference)
    config = MegaByteConfig(
        vocab_size=50, d_model=D, n_layers=depth[0], d_local=L, n_local_layers=depth[1], patch_size=P,
        max_seq_len=10 * P, mixer=AttentionConfig(n_heads=2, head_dim=8), ffn=MLPConfig(activation="gelu", bias=True),
        # the reference's RMSNorm divides by max(rms, 1e-8); a tiny eps inside the root is the same to fp32
        norm=RMSNormConfig(eps=1e-12), position=RoPEConfig() if position == "rope" else LearnedPositionConfig(),
        tie_embeddings=False, head_bias=True,
    )
    ours = MegaByteLM(config).eval()
    ref = dict(reference.named_parameters())
    state = {
        "embed.weight": ref["token_embs.0.weight"], "patch_embed.weight": ref["token_embs.1.0.weight"],
        "patch_in_norm.weight": ref["token_embs.1.2.weight"], "patch_in_norm.bias": ref["token_embs.1.2.bias"],
        "patch_proj.weight": ref["token_embs.1.3.weight"], "patch_proj.bias": ref["token_embs.1.3.bias"],
        "patch_out_norm.weight": ref["token_embs.1.4.weight"], "patch_out_norm.bias": ref["token_embs.1.4.bias"],
        "global_start": ref["start_tokens.0"], "local_start": ref["start_tokens.1"],
        "global_norm.weight": ref["transformers.0.norm.g"], "final_norm.weight": ref["transformers.1.norm.g"],
        "global_to_local.weight": ref["to_next_transformer_projections.0.1.weight"],
        "global_to_local.bias": ref["to_next_transformer_projections.0.1.bias"],
        "lm_head.weight": ref["to_logits.weight"], "lm_head.bias": ref["to_logits.bias"],
    }
    if position == "learned":
        state["global_pos.weight"] = ref["pos_embs.0.weight"]
        state["local_pos.weight"] = ref["pos_embs.1.weight"]
    for stage, offset, n, width in ((0, 0, depth[0], D), (1, depth[0], depth[1], L)):
        for i in range(n):
            src, dst = f"transformers.{stage}.layers.{i}", f"blocks.{offset + i}"
            kv = ref[f"{src}.0.to_kv.weight"]
            state.update({
                f"{dst}.mixer_norm.weight": ref[f"{src}.0.norm.g"],
                f"{dst}.mixer.q_proj.weight": ref[f"{src}.0.to_q.weight"],
                f"{dst}.mixer.k_proj.weight": kv[:16], f"{dst}.mixer.v_proj.weight": kv[16:],
                f"{dst}.mixer.o_proj.weight": ref[f"{src}.0.to_out.weight"],
                f"{dst}.ffn_norm.weight": ref[f"{src}.1.0.g"],
                f"{dst}.ffn.up_proj.weight": ref[f"{src}.1.1.weight"], f"{dst}.ffn.up_proj.bias": ref[f"{src}.1.1.bias"],
                f"{dst}.ffn.down_proj.weight": ref[f"{src}.1.4.weight"],
                f"{dst}.ffn.down_proj.bias": ref[f"{src}.1.4.bias"],
            })
    ours.load_state_dict(state, strict=True)
    return mb, reference, ours


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_megabyte_matches_reference_with_copied_weights(position, monkeypatch):
    mb, reference, ours = megabyte_pair(position=position)
    ids = torch.randint(0, 50, (2, 38), generator=torch.Generator().manual_seed(0))  # 38: the last patch pads
    with torch.no_grad():
        shifted = reference(ids)
        monkeypatch.setattr(mb, "token_shift", lambda t: t)  # the one deliberate difference (module docstring)
        plain = reference(ids)
        logits = ours(ids).logits
    torch.testing.assert_close(logits, plain, atol=2e-5, rtol=2e-5)
    assert (logits - shifted).abs().max() > 1e-2  # and the token shift is a real difference, not a no-op


# ------------------------------------------------- the contract every registered model kind keeps

BASE = {"vocab_size": 61, "d_model": 32, "n_layers": 2, "max_seq_len": 48, "mixer": {"kind": "attention", "n_heads": 4},
        "ffn": {"kind": "swiglu", "hidden": 48}}
# every registered model kind, each of its contract examples: a new kind is tested by registering it
EXAMPLES = {f"{kind}-{i}": {**BASE, "kind": kind, **example}
            for kind, cls in MODELS.items() for i, example in enumerate(cls.contract_examples())}


def build(name: str) -> CausalLM:
    torch.manual_seed(0)
    model = load_model_config(EXAMPLES[name]).build()
    _randomize(model, 1)
    return model.eval()


@pytest.mark.parametrize("name", EXAMPLES)
def test_causal_and_every_parameter_gets_a_gradient(name):
    model = build(name)
    ids = torch.randint(0, 61, (2, 23))
    changed = ids.clone()
    changed[:, 11:] = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    # position 10 reads tokens 0..10 only (up to rounding: chunked mixers multiply masked entries by 0)
    torch.testing.assert_close(a[:, :11], b[:, :11], atol=1e-5, rtol=0)
    assert (a[:, 11:] - b[:, 11:]).abs().max() > 1e-3
    model.train()
    model(ids, targets=torch.roll(ids, -1, 1)).loss.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent


@pytest.mark.parametrize("name", EXAMPLES)
def test_cached_decoding_and_greedy_generation_equal_the_full_forward(name):
    model = build(name)
    ids = torch.randint(0, 61, (2, 17))
    full = model(ids).logits
    cache = model.init_cache(2)
    parts = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 17)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    prompt = ids[:, :3]
    out = model.generate(prompt, max_new_tokens=9, temperature=0)
    loop = prompt
    for _ in range(9):
        loop = torch.cat([loop, model(loop).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, loop)
    # one prefix's cache copied for three continuations (shared-prefix scoring) == each row's full forward
    prefix = model.init_cache(1)
    model(ids[:1, :6], cache=prefix)
    rows = model.reorder_cache(prefix, torch.zeros(3, dtype=torch.long))
    continuations = torch.randint(0, 61, (3, 7))
    continued = model(continuations, cache=rows).logits
    whole = model(torch.cat([ids[:1, :6].expand(3, -1), continuations], 1)).logits[:, 6:]
    torch.testing.assert_close(continued, whole, atol=1e-5, rtol=1e-5)
    if model.document_blockers():  # a kind that cannot mask packed documents refuses them
        with pytest.raises(ValueError, match="cannot be kept apart"):
            model(ids, document_ids=torch.zeros_like(ids))


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("T", [48, 29])
def test_flops_match_an_independent_count(name, T):
    model = build(name).double()
    ids = torch.randint(0, 61, (1, T))
    measured = measured_flops(model, ids) / T
    assert abs(model.flops_per_token(T) - measured) <= 4  # four parts, each rounded down per token
    assert model.flops_per_token(T, training=True) == 3 * model.flops_per_token(T)


def test_flops_hand_count():
    """Closed forms written out from the architecture, not from the code."""
    V, D, T = 61, 32, 48
    # Hourglass: 1 pre + 2 middle + 1 post attention (4 heads of 8) + SwiGLU(48) layers, s=3, linear up/down
    config = load_model_config({**BASE, "kind": "hourglass", "n_layers": 4, "shorten_factor": 3})
    proj, swiglu = 4 * 2 * D * D, 3 * 2 * D * 48
    scores = lambda n: 4 * D * (n + 1) / 2 * n  # QK^T + PV over a causal sequence of n (summed over positions)
    K = 16
    total = (2 * T * (proj + swiglu) + 2 * scores(T)          # pre + post at full length
             + 2 * K * (proj + swiglu) + 2 * scores(K)        # middle stack over K = T / 3
             + K * 2 * (3 * D) * D + K * 2 * D * (3 * D)      # linear pooling and upsampling
             + T * 2 * D * V)                                 # head
    assert config.build().flops_per_token(T) == int(total / T)
    # MegaByte: P=4 -> K=12 patches; global 2 layers over 13 positions, local 2 layers (d_local 16,
    # 2 heads of 8, SwiGLU(48)) over 12 x 5 positions; patch and global-to-local projections; head
    config = load_model_config({**BASE, "kind": "megabyte", "n_layers": 2, "patch_size": 4, "d_local": 16,
                                "n_local_layers": 2, "local_mixer": {"kind": "attention", "n_heads": 2}})
    L, P, K = 16, 4, 12
    local_proj, local_swiglu = 4 * 2 * L * L, 3 * 2 * L * 48
    local_scores = lambda n: 4 * L * (n + 1) / 2 * n
    total = (2 * (K + 1) * (proj + swiglu) + 2 * scores(K + 1)
             + 2 * K * (P + 1) * (local_proj + local_swiglu) + 2 * K * local_scores(P + 1)
             + K * 2 * (P * L) * D + K * 2 * D * (P * L)
             + T * 2 * L * V)
    assert abs(config.build().flops_per_token(T) - total / T) <= 4


def test_cache_bytes_hand_count():
    config = load_model_config({**BASE, "kind": "hourglass", "n_layers": 4, "shorten_factor": 3})
    # bf16 K and V of 4 heads x 8: pre + post over 48 positions, the 2 middle layers over 16; the window,
    # the upsampled group and the pooled vector (7 x 32 in bf16)
    assert config.build().state_bytes(48, torch.bfloat16) == 2 * 48 * 128 + 2 * 16 * 128 + 7 * 32 * 2
    config = load_model_config({**BASE, "kind": "megabyte", "n_layers": 2, "patch_size": 4, "d_local": 16,
                                "local_mixer": {"kind": "attention", "n_heads": 2}})
    # bf16 K and V: global 2 layers x 4 heads x 8 over 12 patches + start; local 2 layers x 2 heads x 8
    # over a patch + start; the (4, 16) slots in bf16; the patch's 4 int64 ids
    expected = 2 * (2 * 4 * 8 * 2) * 13 + 2 * (2 * 2 * 8 * 2) * 5 + 4 * 16 * 2 + 4 * 8
    assert config.build().state_bytes(48, torch.bfloat16) == expected


# -------------------------------------------------------------------------------- registry and config


def test_model_kinds_registry_and_config_round_trip(tmp_path):
    assert {"transformer", "megabyte", "hourglass"} <= set(MODELS.kinds())
    plain = load_model_config("tiny")
    assert type(plain) is ModelConfig and "kind" not in plain.model_dump()  # plain configs dump as before
    hourglass = load_model_config("tiny", ["kind=hourglass", "shorten_factor=2"])
    assert isinstance(hourglass, HourglassConfig)
    assert (hourglass.d_model, hourglass.n_layers) == (plain.d_model, plain.n_layers)  # kind switch keeps fields
    model = hourglass.build()
    _randomize(model)
    model.save_pretrained(tmp_path / "m")
    loaded = CausalLM.from_pretrained(tmp_path / "m")
    assert type(loaded) is HourglassLM
    ids = torch.randint(0, 100, (1, 9))
    torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="unknown model kind 'bytenet'; valid kinds: hourglass, megabyte"):
        load_model_config("tiny", ["kind=bytenet"])
    with pytest.raises(ConfigError, match="leaves no shortened layer"):
        load_model_config("tiny", ["kind=hourglass", "n_pre_layers=2", "n_post_layers=2"])
    with pytest.raises(ConfigError, match=r"local_mixer \(default: mixer at d_local=24\).n_heads"):
        load_model_config("tiny", ["kind=megabyte", "d_local=24", "mixer.n_heads=16"])
    with pytest.raises(ConfigError, match="mtp_heads"):
        load_model_config("tiny", ["kind=megabyte", "mtp_heads=1"])
    with pytest.raises(ConfigError, match="layer 1 .rwkv7. has value_residual=true, but it is in the shortened middle"):
        load_model_config("tiny", ["kind=hourglass", "mixer={kind: rwkv7, head_dim: 32}"])
    for kind in ("megabyte", "hourglass"):
        with pytest.raises(ConfigError, match=f"pretrained: .* not available for model kind {kind}"):
            load_model_config("tiny", [f"kind={kind}", "pretrained.path=/nonexistent"])
    from archifactory.model.hf import to_hf_config

    with pytest.raises(ValueError, match="no transformers class represents this model: kind='hourglass'"):
        to_hf_config(hourglass)


# ------------------------------------------------------------------------------- trainer and sweep


def _run(tmp_path, name, kind_overrides, tokenizer=None, **train):
    from archifactory.train import load_run_config
    from test_train import run_config

    data = run_config(tmp_path, name, **train)
    data["schedule"] = {"kind": "constant", "warmup_steps": 2}
    if tokenizer:
        data["data"]["tokenizer"] = tokenizer
    return load_run_config(data, kind_overrides)


@pytest.mark.parametrize("kind", [
    ["model.kind=megabyte", "model.patch_size=4", "model.d_local=16"],
    ["model.kind=hourglass", "model.n_layers=3", "model.shorten_factor=2", "model.mixer.n_heads=2"],
])
def test_trains_on_bytes_and_bpe_and_resumes_exactly(tmp_path, kind):
    from archifactory.train import train
    from archifactory.train import checkpoint as ckpt
    from archifactory.train.metrics import read_metrics

    def losses(run_dir):
        return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"}

    full = _run(tmp_path, "full", kind, max_steps=8, checkpoint_every=4)
    summary = train(full, resume=False)
    assert 0 < summary["val_bpb"] < 8.5  # bits per byte of a barely trained byte model (8 = uniform bytes)
    assert summary["flops_per_token_train"] == full.model.build().flops_per_token(32, training=True)
    cut = _run(tmp_path, "cut", kind, max_steps=8, checkpoint_every=4)
    train(cut, resume=False)
    for path in ckpt.checkpoint_dirs(cut.run_dir()):
        if int(path.name.split("_")[-1]) > 4:
            shutil.rmtree(path)
    train(cut, resume=True)
    assert losses(cut.run_dir()) == losses(full.run_dir())  # resume from step 4 == uninterrupted, bitwise
    first = losses(full.run_dir())
    assert first[8] < first[1]
    bpe = _run(tmp_path, "bpe", [*kind, "model.vocab_size=300"], tokenizer={"kind": "bpe", "vocab_size": 300},
               max_steps=3, eval_every=3)
    assert math.isfinite(train(bpe, resume=False)["val_bpb"])
    loaded = CausalLM.from_pretrained(bpe.run_dir() / "model")
    assert type(loaded).__name__ == {"megabyte": "MegaByteLM", "hourglass": "HourglassLM"}[kind[0].split("=")[1]]


def test_shipped_bytes_sweep_gives_every_model_the_same_training_flops(tmp_path):
    from archifactory.sweep.spec import load_sweep, plan

    spec, root = load_sweep(ROOT / "configs" / "sweeps" / "bytes.yaml")
    runs = [r for r in plan(spec, root, tmp_path) if r.seed == spec.seeds[0]]
    kinds, per_token = {}, {}
    for run in runs:
        assert run.config.data.tokenizer.kind == "bytes"
        with torch.device("meta"):
            model = run.config.model.build()
        kinds[run.variant] = type(model).__name__
        per_token[run.variant] = model.flops_per_token(run.config.train.seq_len, training=True)
        spent = run.config.train.max_tokens * per_token[run.variant]
        assert spec.budget.flops - per_token[run.variant] < spent <= spec.budget.flops  # whole tokens
    assert kinds == {"baseline": "CausalLM", "megabyte": "MegaByteLM", "hourglass": "HourglassLM"}
    assert len(set(per_token.values())) == 3  # unequal costs per byte, hence unequal token budgets


def test_cli_info_and_config_for_each_kind():
    from typer.testing import CliRunner

    from archifactory.cli import app

    runner = CliRunner()
    for kind, row in (("megabyte", "patch"), ("hourglass", "resampling")):
        result = runner.invoke(app, ["info", "tiny", "--seq-len", "64", "--set", f"kind={kind}"])
        assert result.exit_code == 0, result.output
        cfg = load_model_config("tiny", [f"kind={kind}"])
        with torch.device("meta"):
            model = cfg.build()
        assert f"{model.num_params():,}" in result.output and row in result.output
        assert f"training FLOPs per token at T=64: {model.flops_per_token(64, training=True):,}" in result.output
        printed = runner.invoke(app, ["config", "tiny", "--set", f"kind={kind}"])
        assert printed.exit_code == 0 and printed.output.startswith(f"kind: {kind}\n")
    bad = runner.invoke(app, ["info", "tiny", "--set", "kind=bytenet"])
    assert bad.exit_code != 0 and "unknown model kind 'bytenet'" in bad.output
    with pytest.raises(TypeError, match="use config.build"):
        CausalLM(load_model_config("tiny", ["kind=megabyte"]))
