"""Zamba2-style hybrid layers: parity with transformers' Zamba2 on copied weights, one shared block per
model (parameters counted once, one optimizer state, shared through save/load), and cached decoding of a
whole model equal to its full forward. (The mixer contract covers causality and cached == full per layer.)"""

import pytest
import torch

import archifactory as af
from archifactory.config import BuildContext, ConfigError
from archifactory.mixers.mamba2 import Mamba2Config
from archifactory.mixers.zamba2 import Zamba2Config
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import RMSNormConfig
from archifactory.nn.positions import NoPositionConfig, RoPEConfig
from archifactory.train.optim import build_optimizer

transformers = pytest.importorskip("transformers")

D, HEADS, RANK, FFN = 32, 4, 4, 48


def hf_model(rope: bool):
    cfg = transformers.Zamba2Config(
        vocab_size=64, hidden_size=D, num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
        num_attention_heads=HEADS, intermediate_size=FFN, hidden_act="gelu", mamba_d_state=8, mamba_d_conv=4,
        mamba_expand=2, n_mamba_heads=4, mamba_ngroups=1, chunk_size=4, use_shared_attention_adapter=True,
        adapter_rank=RANK, num_mem_blocks=1, use_mem_rope=rope, rope_parameters={"rope_type": "default", "rope_theta": 100.0},
        rms_norm_eps=1e-5, time_step_min=1e-12, time_step_floor=1e-4, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.Zamba2ForCausalLM(cfg).eval()  # fp32: fp64 depthwise conv is slow on CPU
    with torch.no_grad():  # random gains, so that copying them is checked
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.add_(0.3 * torch.randn_like(p))
            if "adapter_list" in name:  # at init (std 0.02 both factors) the adapters barely matter
                p.normal_(0.0, 0.3)
    return model


def our_layers(rope: bool):
    shared: dict = {}
    cfg = Zamba2Config(
        n_heads=HEADS, ffn_hidden=FFN, adapter_rank=RANK, concat_embeddings=True,
        mamba=Mamba2Config(expand=2, head_dim=16, d_state=8, n_groups=1, d_conv=4, chunk_size=4),
    )
    layers = []
    for i in (1, 3):
        ctx = BuildContext(
            d_model=D, n_layers=4, layer_idx=i, max_seq_len=64, norm=RMSNormConfig(eps=1e-5),
            position=RoPEConfig(theta=100.0) if rope else NoPositionConfig(), init=InitConfig(), shared=shared,
        )
        layers.append(cfg.build(ctx))
    assert layers[0].shared is layers[1].shared is shared["shared"]
    return layers


def copy_weights(hf_layer, mine, use: int):
    st, lin, mamba_layer = hf_layer.shared_transformer, hf_layer.linear, hf_layer.mamba_decoder
    s = mine.shared
    pairs = [
        (st.input_layernorm.weight, s.input_norm.weight), (st.self_attn.q_proj.weight, s.q_proj.weight),
        (st.self_attn.k_proj.weight, s.k_proj.weight), (st.self_attn.v_proj.weight, s.v_proj.weight),
        (st.self_attn.o_proj.weight, s.o_proj.weight), (st.pre_ff_layernorm.weight, s.ffn_norm.weight),
        (st.feed_forward.gate_up_proj.weight, s.gate_up_proj.weight), (st.feed_forward.down_proj.weight, s.down_proj.weight),
        (lin.weight, mine.out_linear.weight), (mamba_layer.input_layernorm.weight, mine.mamba_norm.weight),
    ]
    for name, adapters in (("q", st.self_attn.linear_q_adapter_list), ("k", st.self_attn.linear_k_adapter_list),
                           ("v", st.self_attn.linear_v_adapter_list),
                           ("gate_up", st.feed_forward.gate_up_proj_adapter_list)):
        pairs += [(adapters[use][0].weight, mine.adapters[name].down.weight),
                  (adapters[use][1].weight, mine.adapters[name].up.weight)]
    m, heads = mamba_layer.mamba, mine.mamba.heads
    pairs += [(m.in_proj.weight, heads.in_proj.weight), (m.conv1d.weight, heads.conv1d.weight),
              (m.conv1d.bias, heads.conv1d.bias), (m.dt_bias, heads.dt_bias), (m.A_log, heads.A_log), (m.D, heads.D),
              (m.norm.weight, heads.norm.weight), (m.out_proj.weight, mine.mamba.out_proj.weight)]
    with torch.no_grad():
        for src, dst in pairs:
            assert src.shape == dst.shape, (src.shape, dst.shape)
            dst.copy_(src)


@pytest.mark.parametrize("rope", [False, True])
def test_hybrid_layers_match_transformers_zamba2(rope):
    """Each of two hybrid layers (adapters 0 and 1 around one shared block) computes transformers'
    ``Zamba2HybridLayer`` output minus its input (the residual the block adds), on the inputs the HF
    model feeds it."""
    hf = hf_model(rope)
    captured = {}

    def hook(i):
        def fn(module, args, output):
            captured[i] = (args[0].detach(), args[1].detach(), output.detach())
        return fn

    for i in (1, 3):
        hf.model.layers[i].register_forward_hook(hook(i))
    ids = torch.randint(0, 64, (2, 11))
    hf(ids)
    layers = our_layers(rope)
    for use, (i, mine) in enumerate(zip((1, 3), layers)):
        copy_weights(hf.model.layers[i], mine, use)
    for use, (i, mine) in enumerate(zip((1, 3), layers)):
        h, e, out = captured[i]
        y, _ = mine(h, embeddings=e)
        torch.testing.assert_close(y, out - h, rtol=1e-4, atol=1e-5)
        # the shared block and the other layer's adapters are not this layer's: a different adapter breaks it
        if use == 1:
            with torch.no_grad():
                saved = mine.adapters["q"].up.weight.clone()
                mine.adapters["q"].up.weight.copy_(layers[0].adapters["q"].up.weight)
            assert (mine(h, embeddings=e)[0] - (out - h)).abs().max() > 1e-2
            with torch.no_grad():
                mine.adapters["q"].up.weight.copy_(saved)


def tiny_zamba2(**changes):
    cfg = {
        "vocab_size": 64, "d_model": D, "n_layers": 4, "max_seq_len": 64,
        "mixer": {"kind": "mamba2", "head_dim": 16, "d_state": 8, "chunk_size": 4},
        "layer_overrides": [{"every": 2, "mixer": {"kind": "zamba2", "n_heads": 4, "ffn_hidden": FFN, "adapter_rank": RANK,
                                                   "mamba": {"head_dim": 16, "d_state": 8, "chunk_size": 4}}}],
        "ffn": {"kind": "swiglu", "hidden": 48}, "position": {"kind": "rope", "theta": 100.0},
    }
    cfg.update(changes)
    return af.CausalLM(af.load_model_config(cfg))


def test_shared_block_counted_once_with_one_optimizer_state():
    torch.manual_seed(0)
    model = tiny_zamba2()
    shared = model.shared_blocks["shared"]
    assert model.blocks[1].mixer.shared is shared and model.blocks[3].mixer.shared is shared
    shared_numel = sum(p.numel() for p in shared.parameters())
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())
    # without sharing, each of the two uses would hold its own copy
    per_layer = sum(p.numel() for b in model.blocks for p in b.parameters()) + shared_numel
    embed = model.embed.weight.numel() + sum(p.numel() for p in model.final_norm.parameters())
    assert model.num_params() == per_layer + embed
    names = [n for n, _ in model.named_parameters() if "q_proj" in n]
    assert names == ["shared_blocks.shared.q_proj.weight"]
    opt = build_optimizer(model, {"name": "adamw", "lr": 1e-3})
    ids = torch.randint(0, 64, (2, 9))
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    before = shared.q_proj.weight.detach().clone()
    opt.step()
    states = [s for g in opt.param_groups for p in g["params"] for s in [opt.state[p]] if s]
    assert len(states) == len(unique)
    assert sum(p is shared.q_proj.weight for g in opt.param_groups for p in g["params"]) == 1
    assert not torch.equal(before, shared.q_proj.weight)


def test_shared_gradient_sums_both_uses():
    """The shared weight's gradient is the sum of what each use contributes: with one use's adapters and
    input cut off (its layer bypassed via a zero output linear), the gradient changes."""
    torch.manual_seed(0)
    model = tiny_zamba2()
    ids = torch.randint(0, 64, (2, 9))
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    both = model.shared_blocks["shared"].q_proj.weight.grad.clone()
    model.zero_grad()
    with torch.no_grad():
        model.blocks[3].mixer.out_linear.weight.zero_()  # the second use no longer reaches the loss
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    first_only = model.shared_blocks["shared"].q_proj.weight.grad
    assert first_only.abs().sum() > 0 and (both - first_only).abs().max() > 1e-8


@pytest.mark.parametrize("chunks", [[1] * 10, [4, 1, 5]])
def test_model_cached_decoding_equals_full_forward(chunks):
    torch.manual_seed(0)
    # fp32: PyTorch's fp64 depthwise conv1d (Mamba-2's) takes a slow per-channel path on CPU
    model = tiny_zamba2().eval()
    ids = torch.randint(0, 64, (2, 10))
    full = model(ids).logits
    cache, outs, start = model.init_cache(2), [], 0
    for n in chunks:
        outs.append(model(ids[:, start : start + n], cache=cache).logits)
        start += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)


def test_save_load_keeps_one_shared_block(tmp_path):
    torch.manual_seed(0)
    model = tiny_zamba2()
    ids = torch.randint(0, 64, (1, 7))
    model.save_pretrained(tmp_path / "m")
    loaded = af.CausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.blocks[1].mixer.shared is loaded.blocks[3].mixer.shared is loaded.shared_blocks["shared"]


def test_embeddings_reach_the_shared_block():
    """With concat_embeddings the shared block reads the token embeddings: changing them (not the
    residual stream's first layer input) changes a hybrid layer's output."""
    torch.manual_seed(0)
    layer = our_layers(rope=False)[0]
    h, e = torch.randn(1, 5, D), torch.randn(1, 5, D)
    assert (layer(h, embeddings=e)[0] - layer(h, embeddings=e + 1)[0]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="needs the token embeddings"):
        layer(h)


def test_config_errors():
    base = {"kind": "zamba2", "n_heads": 4, "mamba": {"head_dim": 16, "d_state": 8}}
    with pytest.raises(ConfigError, match="layer_overrides: layers 1 and 3 share block 'shared'"):
        tiny_zamba2(layer_overrides=[{"layers": [1], "mixer": base}, {"layers": [3], "mixer": {**base, "n_heads": 2}}])
    two = tiny_zamba2(layer_overrides=[{"layers": [1], "mixer": base},
                                       {"layers": [3], "mixer": {**base, "n_heads": 2, "shared_name": "second"}}])
    assert set(two.shared_blocks) == {"shared", "second"}
    with pytest.raises(ConfigError, match="residual: mixer kind 'zamba2' normalises its own input"):
        tiny_zamba2(residual="post")
    with pytest.raises(ConfigError, match="mtp_heads: mtp_heads=1 with mixer kind 'zamba2'"):
        tiny_zamba2(mtp_heads=1)
    with pytest.raises(ValueError, match="shared_name"):
        Zamba2Config(shared_name="a.b")


@pytest.mark.parametrize("preset", ["zamba2-tiny", "rene-tiny"])
def test_hybrid_presets_decode_equals_full_forward(preset):
    """The shipped hybrids decode token by token as their full forward computes; rene-tiny's attention
    window is cut to 4 tokens so that a short sequence runs past it (the windowed KV cache beside
    Mamba-2 states)."""
    from archifactory.config import load_yaml
    from archifactory.model.presets import resolve_model_source

    data = load_yaml(resolve_model_source(preset))
    if preset == "rene-tiny":
        data["layer_overrides"][0]["mixer"]["window"] = 4
    torch.manual_seed(0)
    model = af.CausalLM(af.load_model_config(data)).eval()  # fp32: fp64 depthwise conv is slow on CPU
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    full = model(ids).logits
    cache = model.init_cache(1)
    steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_whole_model_matches_transformers_zamba2():
    """Logits of a whole Zamba2 model: transformers' ``Zamba2ForCausalLM`` and a CausalLM of mamba2 and
    zamba2 layers with copied weights, every block's FFN silenced (its down projection zeroed; Zamba2's
    layers have no FFN). Covers the embeddings reaching the shared block through the model."""
    hf = hf_model(rope=True)
    model = tiny_zamba2(
        vocab_size=64,
        mixer={"kind": "mamba2", "expand": 2, "head_dim": 16, "d_state": 8, "n_groups": 1, "d_conv": 4, "chunk_size": 4},
        layer_overrides=[{"layers": [1, 3], "mixer": {
            "kind": "zamba2", "n_heads": HEADS, "ffn_hidden": FFN, "adapter_rank": RANK,
            "mamba": {"expand": 2, "head_dim": 16, "d_state": 8, "n_groups": 1, "d_conv": 4, "chunk_size": 4}}}],
        norm={"kind": "rmsnorm", "eps": 1e-5},
    ).eval()
    with torch.no_grad():
        model.embed.weight.copy_(hf.model.embed_tokens.weight)
        model.final_norm.weight.copy_(hf.model.final_layernorm.weight)
        for i, block in enumerate(model.blocks):
            block.ffn.down_proj.weight.zero_()
            if i in (1, 3):
                copy_weights(hf.model.layers[i], block.mixer, use=(i - 1) // 2)
            else:
                src, mine = hf.model.layers[i], block
                mine.mixer_norm.weight.copy_(src.input_layernorm.weight)
                m, heads = src.mamba, mine.mixer.heads
                for a, b in ((m.in_proj.weight, heads.in_proj.weight), (m.conv1d.weight, heads.conv1d.weight),
                             (m.conv1d.bias, heads.conv1d.bias), (m.dt_bias, heads.dt_bias), (m.A_log, heads.A_log),
                             (m.D, heads.D), (m.norm.weight, heads.norm.weight),
                             (m.out_proj.weight, mine.mixer.out_proj.weight)):
                    b.copy_(a)
    ids = torch.randint(0, 64, (2, 11))
    torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
