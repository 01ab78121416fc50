"""Hugging Face conversion: tiny random ``transformers`` models converted with ``from_hf`` give the same
logits (full forward and cached token-by-token decoding), and a Llama-style model written by ``save_hf``
loads in ``transformers`` with the same logits."""

import os

# Everything is built from local config objects; the hub must never be contacted.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import archifactory as af  # noqa: E402
from numerics import reduction_atol  # noqa: E402

from archifactory.model.hf import config_from_hf, from_hf, load_hf, save_hf, to_hf  # noqa: E402

VOCAB, SEQ, BATCH = 160, 24, 2
ATOL = RTOL = 1e-5
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    # Larger than the usual 0.02 so logits are O(1): soft-caps bend them and routing is decisive.
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def _cases():
    T = transformers
    return {
        "llama": lambda: T.LlamaConfig(**COMMON),
        "llama_bias_linear_rope": lambda: T.LlamaConfig(
            **COMMON, attention_bias=True, mlp_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
        ),
        "llama3_rope": lambda: T.LlamaConfig(
            **{**COMMON, "max_position_embeddings": 128},
            rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16, "rope_theta": 500.0},
        ),
        # max_position_embeddings below SEQ: the dynamic base grows with the sequence in these tests
        "dynamic_rope": lambda: T.LlamaConfig(
            **{**COMMON, "max_position_embeddings": 10},
            rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 100.0},
        ),
        "mistral": lambda: T.MistralConfig(**COMMON, sliding_window=5),
        "qwen2": lambda: T.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=5, max_window_layers=1),
        "qwen3_yarn": lambda: T.Qwen3Config(
            **{**COMMON, "max_position_embeddings": 128}, head_dim=24, tie_word_embeddings=True,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                             "rope_theta": 10000.0},
        ),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(
            **COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            mlp_only_layers=[1], norm_topk_prob=False,
        ),
        "qwen3_moe_norm_topk": lambda: T.Qwen3MoeConfig(
            **COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        ),
        "mixtral": lambda: T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=7),
        "gpt2": lambda: T.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64, initializer_range=0.1,
            bos_token_id=None, eos_token_id=None,
        ),
        "gpt2_layer_scaled": lambda: T.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64, initializer_range=0.1,
            scale_attn_by_inverse_layer_idx=True, activation_function="relu", bos_token_id=None, eos_token_id=None,
        ),
        # MLA on every layer, dense SwiGLU FFNs (DeepSeek-V3's MoE layers are refused)
        "deepseek_v3": lambda: T.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4}, q_lora_rank=None, kv_lora_rank=24, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=12, first_k_dense_replace=3, rope_interleave=False,
        ),
        "deepseek_v3_lora_q_interleaved_yarn": lambda: T.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4, "max_position_embeddings": 128}, q_lora_rank=32, kv_lora_rank=24,
            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, first_k_dense_replace=3, rope_interleave=True,
            attention_bias=True,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                             "mscale": 1.0, "mscale_all_dim": 1.0},
        ),
        # Mamba-2 layers and one attention layer (RoPE on half of each head), each followed by a SwiGLU MLP
        "bamba": lambda: T.BambaConfig(
            **COMMON, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
            mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8, attention_bias=True,
        ),
        "bamba_mamba_only": lambda: T.BambaConfig(
            **{**COMMON, "num_hidden_layers": 2}, attn_layer_indices=[], mamba_n_heads=4, mamba_d_head=16,
            mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=3, mamba_expand=1, mamba_chunk_size=64,
            mamba_proj_bias=True, mamba_conv_bias=False, mlp_bias=True, tie_word_embeddings=True,
            use_cache=False,  # transformers' cache needs an attention layer to measure the length
        ),
        "gemma2": lambda: T.Gemma2Config(
            **{**COMMON, "num_hidden_layers": 4}, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
            attn_logit_softcapping=1.5, final_logit_softcapping=2.5,
        ),
    }


CASES = list(_cases())


def hf_model(name: str):
    config = _cases()[name]()
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    gemma = config.model_type == "gemma2"
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                # Random norm gains and biases, so a dropped or misplaced one changes the logits.
                # Gemma stores its RMSNorm gain as w in x * (1 + w), so its neutral value is 0.
                neutral = 0.0 if gemma or pname.endswith("bias") else 1.0
                p.copy_(neutral + 0.3 * torch.randn_like(p))
    return model.eval()


def ids():
    return torch.randint(0, VOCAB, (BATCH, SEQ))


@pytest.mark.parametrize("name", CASES)
def test_from_hf_logits_match(name):
    hf = hf_model(name)
    ours = from_hf(hf)
    x = ids()
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x).logits
    assert expected.abs().max() > 0.5  # real signal, not near-zero logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


# One case per cache path (plain, windowed, per-layer windows, MoE, learned positions, soft-capped);
# the variants left out differ from these only in what the full-forward test already covers.
DECODE_CASES = ["llama", "mistral", "qwen2", "qwen3_yarn", "qwen3_moe", "mixtral", "gpt2", "gemma2",
                "deepseek_v3_lora_q_interleaved_yarn", "bamba"]


@pytest.mark.parametrize("name", DECODE_CASES)
def test_cached_decoding_matches_hf(name):
    hf = hf_model(name)
    ours = from_hf(hf)
    x = ids()
    with torch.no_grad():
        expected = hf(x).logits
        cache = ours.init_cache(BATCH)
        steps = [ours(x[:, t : t + 1], cache=cache).logits for t in range(SEQ)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["llama", "qwen3_yarn", "gemma2"])
def test_from_hf_accepts_a_model_cast_to_bf16(name):
    # .to(torch.bfloat16) rounds transformers' RoPE inv_freq buffer too: not a scaling mismatch
    hf = hf_model(name).to(torch.bfloat16)
    ours = from_hf(hf)
    assert ours.embed.weight.dtype == torch.bfloat16
    x = ids()
    with torch.no_grad():
        expected, got = hf(x).logits.float(), ours(x).logits.float()
    # both in bf16 with other kernels: a few bf16 roundings (2^-8 relative) of the largest logit apart
    torch.testing.assert_close(got, expected, rtol=0, atol=8 * 2**-8 * float(expected.abs().max()))
    if name == "gemma2":  # 1 + w is formed in fp32 from the stored w, as Gemma does
        assert ours.config.norm.unit_offset and torch.equal(ours(x).logits, hf(x).logits)


def test_converted_configs_carry_the_architecture():
    """The structural choices the parity tests rely on are really in the converted configs."""
    gemma = from_hf(hf_model("gemma2"))
    # Gemma2Config.layer_types: sliding on even layers, full on odd ones.
    assert [b.mixer.window for b in gemma.blocks] == [6, None, 6, None]
    assert all(b.mixer.softcap == 1.5 and b.mixer.scale == 24**-0.5 for b in gemma.blocks)
    assert gemma.config.logit_softcap == 2.5 and gemma.config.residual == "sandwich"
    assert gemma.embedding_scale == pytest.approx(8.0)

    assert [b.mixer.window for b in from_hf(hf_model("mistral")).blocks] == [5, 5, 5]
    assert [b.mixer.window for b in from_hf(hf_model("qwen2")).blocks] == [None, 5, 5]

    moe = from_hf(hf_model("qwen3_moe"))
    assert [type(b.ffn).__name__ for b in moe.blocks] == ["MoE", "GLU", "MoE"]
    assert moe.blocks[0].ffn.routing == "softmax_topk" and not moe.blocks[0].ffn.renormalize
    assert moe.blocks[0].ffn.balance_weight == pytest.approx(0.001)
    assert from_hf(hf_model("mixtral")).blocks[0].ffn.routing == "topk_softmax"

    gpt2 = from_hf(hf_model("gpt2_layer_scaled"))
    assert [b.mixer.scale for b in gpt2.blocks] == pytest.approx([16**-0.5 / (i + 1) for i in range(3)])
    assert gpt2.lm_head.weight is gpt2.embed.weight


@pytest.mark.parametrize("name", ["gpt2", "gemma2"])
def test_load_hf_reads_a_saved_hf_directory(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=ATOL, rtol=RTOL)


def test_dynamic_rope_follows_the_sequence_length_like_transformers():
    """Dynamic NTK: below max_position_embeddings the frequencies are plain RoPE's; beyond it they depend
    on the length of the forward, so a prefix of a long sequence gets other logits than the same prefix
    alone. Both sides agree on each length (fresh HF models, whose cached length starts from scratch)."""
    ours = from_hf(hf_model("dynamic_rope"))
    x = ids()
    for length in (6, 10, 11, SEQ):
        hf = to_hf(ours)  # a fresh transformers model each time (its dynamic table is stateful)
        with torch.no_grad():
            torch.testing.assert_close(ours(x[:, :length]).logits, hf(x[:, :length]).logits, atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        short, long = ours(x[:, :10]).logits, ours(x).logits[:, :10]
    assert not torch.allclose(short, long, atol=1e-3)  # the base really changed with the length
    assert ours.config.position.scaling.original_max_seq_len == 10


def test_dynamic_rope_cached_decoding_matches_transformers_cached_decoding():
    """Token by token, each step's keys are rotated with the base of its own length and stay so in the
    cache, on both sides (which is why this differs from a full forward beyond the trained length)."""
    hf = hf_model("dynamic_rope")
    ours = from_hf(hf)
    x = ids()
    cache, hf_cache = ours.init_cache(BATCH), transformers.DynamicCache(config=hf.config)
    with torch.no_grad():
        got = [ours(x[:, :4], cache=cache).logits]
        expected = [hf(x[:, :4], cache=hf_cache, use_cache=True).logits]
        for t in range(4, SEQ):
            got.append(ours(x[:, t : t + 1], cache=cache).logits)
            expected.append(hf(x[:, t : t + 1], cache=hf_cache, use_cache=True).logits)
        full = hf_model("dynamic_rope")(x).logits
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(expected, 1), atol=ATOL, rtol=RTOL)
    assert not torch.allclose(torch.cat(got, 1), full, atol=1e-3)


def test_unsupported_hf_configs_raise_naming_the_field():
    T = transformers
    with pytest.raises(ValueError, match="rope_type='longrope'"):
        longrope = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                    "original_max_position_embeddings": 32}
        config_from_hf(T.LlamaConfig(**COMMON, rope_parameters=longrope))
    with pytest.raises(ValueError, match="first_k_dense_replace=1 < num_hidden_layers=3: DeepSeek-V3's MoE"):
        config_from_hf(T.DeepseekV3Config(**COMMON, first_k_dense_replace=1, n_routed_experts=4))
    with pytest.raises(ValueError, match="Mamba2ForCausalLM's layers have no FFN"):
        config_from_hf(T.Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB, num_heads=8, head_dim=16))
    with pytest.raises(ValueError, match="time_step_limit=.*does not clamp"):
        config_from_hf(T.BambaConfig(**COMMON, mamba_n_heads=8, time_step_limit=(0.001, 0.1)))
    with pytest.raises(ValueError, match="hidden_act='tanh'"):
        config_from_hf(T.LlamaConfig(**{**COMMON, "hidden_act": "tanh"}))
    with pytest.raises(ValueError, match="model_type='gpt_neox' is not supported"):
        config_from_hf(T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4))


# ------------------------------------------------------------------------------------ ours -> HF


LLAMA_STYLE = {
    "tied_gqa": {
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 3, "max_seq_len": 64,
        "mixer": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
        "ffn": {"kind": "swiglu", "hidden": 96},
        "norm": {"kind": "rmsnorm", "eps": 1e-5},
        "position": {"kind": "rope", "theta": 10000.0},
        "tie_embeddings": True,
    },
    "untied_bias_yarn": {
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "max_seq_len": 128,
        "mixer": {"kind": "attention", "n_heads": 4, "n_kv_heads": 1, "head_dim": 24,
                  "qkv_bias": True, "out_bias": True},
        "ffn": {"kind": "swiglu", "hidden": 96, "bias": True},
        "position": {"kind": "rope", "theta": 5e5,
                     "scaling": {"type": "yarn", "factor": 4.0, "original_max_seq_len": 32}},
        "tie_embeddings": False,
    },
    "ntk_rope": {
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "max_seq_len": 64,
        "mixer": {"kind": "attention", "n_heads": 2, "n_kv_heads": 1},
        "ffn": {"kind": "geglu", "hidden": 64, "activation": "gelu_tanh"},
        "position": {"kind": "rope", "theta": 10000.0, "scaling": {"type": "ntk", "factor": 8.0}},
    },
}


def random_model(config: dict) -> af.CausalLM:
    model = af.CausalLM(af.load_model_config(config)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_((1.0 if pname.endswith("norm.weight") else 0.0) + 0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", list(LLAMA_STYLE))
def test_save_hf_loads_in_transformers_with_the_same_logits(name, tmp_path):
    model = random_model(LLAMA_STYLE[name])
    save_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        assert expected.abs().max() > 0.5
        torch.testing.assert_close(hf(x).logits, expected, atol=ATOL, rtol=RTOL)
        back = load_hf(tmp_path)
        if name != "ntk_rope":  # a static NTK base change comes back as plain RoPE with the larger theta
            assert back.config == model.config
        torch.testing.assert_close(back(x).logits, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", CASES)
def test_every_importable_family_exports_to_its_own_class(name, tmp_path):
    """HF -> ours -> save_hf -> from_pretrained: the class transformers reloads is the one we started
    from, with the same logits (so export covers every family import reads)."""
    hf = hf_model(name)
    ours = from_hf(hf)
    save_hf(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(back) is type(hf)
    x = ids()
    with torch.no_grad():  # ours equals hf: test_from_hf_logits_match
        torch.testing.assert_close(back(x).logits, ours(x).logits, atol=ATOL, rtol=RTOL)


NATIVE = {
    # (our config, the class export must pick)
    "mistral_window": ({
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "max_seq_len": 64,
        "mixer": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "window": 6},
        "ffn": {"kind": "swiglu", "hidden": 96}, "tie_embeddings": False,
    }, "MistralForCausalLM"),
    "qwen2_qkv_bias": ({
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "max_seq_len": 64,
        "mixer": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "qkv_bias": True},
        "ffn": {"kind": "swiglu", "hidden": 96},
    }, "Qwen2ForCausalLM"),
    "qwen3_qk_norm_llama3_rope": ({
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "max_seq_len": 64,
        "mixer": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "head_dim": 24, "qk_norm": True},
        "ffn": {"kind": "swiglu", "hidden": 96},
        "position": {"kind": "rope", "theta": 500.0, "scaling": {
            "type": "llama3", "factor": 4.0, "original_max_seq_len": 12, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0}},
    }, "Qwen3ForCausalLM"),
    "qwen3_moe_hybrid": ({
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 3, "max_seq_len": 64,
        "mixer": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True},
        "ffn": {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 32, "renormalize": False},
        "layer_overrides": [{"layers": [1], "ffn": {"kind": "swiglu", "hidden": 96}}],
    }, "Qwen3MoeForCausalLM"),
    "mixtral": ({
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "max_seq_len": 64,
        "mixer": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
        "ffn": {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 32, "routing": "topk_softmax"},
    }, "MixtralForCausalLM"),
    "gpt2": ({
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "max_seq_len": 32,
        "mixer": {"kind": "attention", "n_heads": 4, "qkv_bias": True, "out_bias": True},
        "ffn": {"kind": "mlp", "hidden": 96, "activation": "gelu_tanh", "bias": True},
        "norm": {"kind": "layernorm"}, "position": {"kind": "learned"},
    }, "GPT2LMHeadModel"),
    "gemma2": ({
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "max_seq_len": 64,
        "mixer": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "logit_softcap": 2.0,
                  "scale": 0.25},
        "layer_overrides": [{"layers": [0], "mixer": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2,
                                                      "head_dim": 16, "logit_softcap": 2.0, "scale": 0.25,
                                                      "window": 5}}],
        "ffn": {"kind": "geglu", "hidden": 96, "activation": "gelu_tanh"},
        "norm": {"kind": "rmsnorm", "unit_offset": True}, "residual": "sandwich",
        "embedding_scale": "sqrt_d_model", "logit_softcap": 3.0,
    }, "Gemma2ForCausalLM"),
    "deepseek_v3_mla": ({
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "max_seq_len": 64,
        "mixer": {"kind": "mla", "n_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 20, "qk_rope_head_dim": 8,
                  "qk_nope_head_dim": 12, "v_head_dim": 10},
        "ffn": {"kind": "swiglu", "hidden": 96}, "tie_embeddings": False,
    }, "DeepseekV3ForCausalLM"),
    "bamba_mamba2": ({
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "max_seq_len": 64,
        "mixer": {"kind": "mamba2", "head_dim": 16, "d_state": 8, "n_groups": 2, "chunk_size": 8},
        "ffn": {"kind": "swiglu", "hidden": 96}, "tie_embeddings": False,
    }, "BambaForCausalLM"),
    "bamba_hybrid": ({
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 3, "max_seq_len": 64,
        "mixer": {"kind": "mamba2", "head_dim": 16, "d_state": 8},
        "layer_overrides": [{"layers": [2], "mixer": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2}}],
        "position": {"kind": "rope", "fraction": 0.5},
        "ffn": {"kind": "swiglu", "hidden": 96},
    }, "BambaForCausalLM"),
    "llama_dynamic_rope": ({
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "max_seq_len": 12,
        "mixer": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
        "ffn": {"kind": "swiglu", "hidden": 96},
        "position": {"kind": "rope", "theta": 100.0,
                     "scaling": {"type": "dynamic", "factor": 2.0, "original_max_seq_len": 12}},
    }, "LlamaForCausalLM"),
}


@pytest.mark.parametrize(
    "name,dtype",
    [(name, torch.float32) for name in NATIVE] + [(name, torch.bfloat16) for name in ("mistral_window", "gpt2")],
)
def test_save_hf_picks_the_class_and_reloads_with_the_same_logits(name, dtype, tmp_path):
    config, class_name = NATIVE[name]
    model = random_model(config).to(dtype)
    save_hf(model, tmp_path)
    # read back in fp32: a bf16 checkpoint's weights widen exactly, so the logits must match our model's
    # (widened the same way) at fp32 tolerance; bf16 kernels on the two sides would differ by more
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, dtype=torch.float32)
    assert type(hf).__name__ == class_name
    x = ids()
    with torch.no_grad():
        # a fresh fp32 model: model.float() would keep the RoPE table rounded to bf16
        widened = af.CausalLM(model.config).eval()
        widened.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        expected, got = widened(x).logits, hf.eval()(x).logits
    assert expected.abs().max() > 0.5
    # two summation orders of the same fp32 function (Mamba-2's chunked scan has its own blocking on each
    # side): the reductions per layer are about d_model + FFN hidden + mixer width + sequence long
    cfg = widened.config
    n = cfg.n_layers * (2 * cfg.d_model + 2 * 96 + SEQ)
    atol = reduction_atol(torch.float32, n, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, atol=atol, rtol=RTOL)
    if dtype == torch.bfloat16:  # and the checkpoint holds bf16, bit for bit
        back = load_hf(tmp_path).state_dict()
        assert all(v.dtype == torch.bfloat16 for v in back.values())
        assert all(torch.equal(value.bfloat16(), back[key]) for key, value in model.state_dict().items())


def test_export_refuses_in_one_line_naming_the_component():
    def config(**extra):
        return af.CausalLM(af.load_model_config({"vocab_size": VOCAB, "d_model": 64, "n_layers": 2, **extra}))

    cases = {
        "mixer.kind='rwkv7'": config(mixer={"kind": "rwkv7"}),
        "ffn.kind='rwkv6_channel_mix'": config(ffn={"kind": "rwkv6_channel_mix"}),
        "norm.kind='layernorm'": config(norm={"kind": "layernorm"}),
        "residual='parallel'": config(residual="parallel"),
        "position.kind='alibi'": config(position={"kind": "alibi"}),
        "mtp_heads=2": config(mtp_heads=2),
        # Bamba rotates half of each head; Mamba2ForCausalLM has no FFN (import says so)
        "position.fraction=1.0": config(
            mixer={"kind": "mamba2", "head_dim": 16},
            layer_overrides=[{"layers": [1], "mixer": {"kind": "attention", "n_heads": 4}}],
        ),
        # transformers measures dynamic NTK against max_position_embeddings, which is our max_seq_len
        "position.scaling.original_max_seq_len=512": config(
            position={"kind": "rope", "scaling": {"type": "dynamic", "factor": 2.0, "original_max_seq_len": 512}}
        ),
        "norm.unit_offset=True": config(mixer={"kind": "attention", "n_heads": 4, "qkv_bias": True},
                                               norm={"kind": "rmsnorm", "unit_offset": True}),
    }
    for field, model in cases.items():
        with pytest.raises(ValueError, match="no transformers class represents this model") as err:
            to_hf(model)
        message = str(err.value)
        assert field in message and "\n" not in message, message


def test_cli_export_picks_the_class_and_refuses_in_one_line(tmp_path):
    import json

    from typer.testing import CliRunner

    from archifactory.cli import app

    runner = CliRunner()
    random_model(NATIVE["bamba_hybrid"][0]).save_pretrained(tmp_path / "mamba")
    result = runner.invoke(app, ["hf", "export", str(tmp_path / "mamba"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["BambaForCausalLM"]

    rwkv = af.CausalLM(af.load_model_config({"vocab_size": VOCAB, "d_model": 64, "n_layers": 2,
                                             "mixer": {"kind": "rwkv7"}}))
    rwkv.save_pretrained(tmp_path / "rwkv")
    result = runner.invoke(app, ["hf", "export", str(tmp_path / "rwkv"), str(tmp_path / "hf_rwkv")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "mixer.kind='rwkv7'" in lines[0], result.output
