"""MLA, KV-shifting attention and the classic RNNs against outside references:

- ``mla``: a tiny ``transformers`` DeepSeek-V3 (dense layers) with its weights copied into our CausalLM gives
  the same logits, for the full forward and for cached chunked/token-by-token decoding (which attends over the
  cached latents with the absorbed up-projections);
- ``kv_shift``: closed forms: with the shift weights at (1, 0) it is plain attention, at (0, 1) (and at any
  per-head mix) it is a hand-written attention whose keys/values come from the previous token;
- ``lstm``/``gru``/``rnn``: a step-by-step loop over the textbook equations, and a demonstration that a
  row-independence check catches an LSTM run without ``batch_first=True``.
"""

import math

import pytest
import torch
from torch import nn

import archifactory as af
from archifactory.config import BuildContext, ConfigError
from archifactory.mixers.attention import AttentionConfig
from archifactory.mixers.base import Mixer, MixerConfig
from archifactory.mixers.kv_shift import KVShiftConfig
from archifactory.mixers.mla import MLAConfig
from archifactory.mixers.rnn import GRUConfig, LSTMConfig, RNNConfig
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import RMSNormConfig
from archifactory.nn.positions import NoPositionConfig, RoPEConfig
from archifactory.registry import MIXERS, register_mixer


def context(position=None, d_model=32) -> BuildContext:
    return BuildContext(
        d_model=d_model, n_layers=2, layer_idx=0, max_seq_len=64, norm=RMSNormConfig(),
        position=position if position is not None else RoPEConfig(theta=100.0), init=InitConfig(std=0.2),
    )


# ------------------------------------------------------------------------------------ MLA vs DeepSeek-V3

VOCAB, D, LAYERS, HEADS, NOPE, ROPE, V_DIM, KV_RANK = 160, 64, 2, 4, 16, 8, 12, 24
MLA_CASES = {
    "full_q_half_split_rope": dict(q_lora_rank=None, rope_interleave=False, yarn=False),
    "lora_q_interleaved_rope": dict(q_lora_rank=32, rope_interleave=True, yarn=False),
    "lora_q_yarn_mscale": dict(q_lora_rank=32, rope_interleave=True, yarn=True),
}


def deepseek_pair(q_lora_rank, rope_interleave, yarn):
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    scaling = None
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
        # mscale == mscale_all_dim makes DeepSeek's cos/sin factor 1; the softmax scale takes mscale^2.
        scaling = {"type": "yarn", "factor": 4.0, "original_max_seq_len": 32, "attention_factor": 1.0}
    hf_config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, q_lora_rank=q_lora_rank, kv_lora_rank=KV_RANK, qk_rope_head_dim=ROPE,
        qk_nope_head_dim=NOPE, v_head_dim=V_DIM,
        first_k_dense_replace=LAYERS,  # every layer a dense SwiGLU MLP (no MoE)
        rope_interleave=rope_interleave, rope_parameters=rope, tie_word_embeddings=False, initializer_range=0.1,
        rms_norm_eps=1e-6, max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    ref = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
    ref.eval()
    with torch.no_grad():  # norm weights away from 1 so that a mis-copied norm shows
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    ours = af.CausalLM(af.load_model_config({
        "vocab_size": VOCAB, "d_model": D, "n_layers": LAYERS, "max_seq_len": 128, "tie_embeddings": False,
        "mixer": {"kind": "mla", "n_heads": HEADS, "q_lora_rank": q_lora_rank, "kv_lora_rank": KV_RANK,
                  "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE, "v_head_dim": V_DIM,
                  "mscale_all_dim": 1.0 if yarn else 0.0},
        "ffn": {"kind": "swiglu", "hidden": 96},
        "norm": {"kind": "rmsnorm", "eps": 1e-6},
        "position": {"kind": "rope", "theta": 10000.0, "scaling": scaling},
    }))
    copy_deepseek_weights(ref, ours, rope_interleave)
    return ref, ours


def copy_deepseek_weights(ref, ours, rope_interleave: bool) -> None:
    # DeepSeek's interleaved RoPE rotates channel pairs (0, 1), (2, 3), ...; ours pairs channel i with
    # i + rope/2. Feeding our rotary the de-interleaved channels (evens, then odds) is the same rotation, and
    # q.k is unchanged by permuting q's and k's rotary channels alike: permute the rows that produce them.
    perm = torch.cat([torch.arange(0, ROPE, 2), torch.arange(1, ROPE, 2)]) if rope_interleave else torch.arange(ROPE)

    def q_rows(weight):  # (H * (nope + rope), in): permute each head's rotary rows
        w = weight.view(HEADS, NOPE + ROPE, -1)
        return torch.cat([w[:, :NOPE], w[:, NOPE:][:, perm]], dim=1).reshape(weight.shape)

    with torch.no_grad():
        ours.embed.weight.copy_(ref.model.embed_tokens.weight)
        ours.lm_head.weight.copy_(ref.lm_head.weight)
        ours.final_norm.weight.copy_(ref.model.norm.weight)
        for block, layer in zip(ours.blocks, ref.model.layers):
            block.mixer_norm.weight.copy_(layer.input_layernorm.weight)
            block.ffn_norm.weight.copy_(layer.post_attention_layernorm.weight)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(block.ffn, name).weight.copy_(getattr(layer.mlp, name).weight)
            att, mla = layer.self_attn, block.mixer
            if att.q_lora_rank is None:
                mla.q_proj.weight.copy_(q_rows(att.q_proj.weight))
            else:
                mla.q_a_proj.weight.copy_(att.q_a_proj.weight)
                mla.q_a_norm.weight.copy_(att.q_a_layernorm.weight)
                mla.q_b_proj.weight.copy_(q_rows(att.q_b_proj.weight))
            kv_a = att.kv_a_proj_with_mqa.weight  # rows: latent (KV_RANK), then the shared rotary key (ROPE)
            mla.kv_a_proj.weight.copy_(torch.cat([kv_a[:KV_RANK], kv_a[KV_RANK:][perm]]))
            mla.kv_a_norm.weight.copy_(att.kv_a_layernorm.weight)
            mla.kv_b_proj.weight.copy_(att.kv_b_proj.weight)
            mla.o_proj.weight.copy_(att.o_proj.weight)


@pytest.mark.parametrize("case", list(MLA_CASES))
def test_mla_matches_deepseek_v3_logits_full_and_cached(case):
    ref, ours = deepseek_pair(**MLA_CASES[case])
    ids = torch.randint(0, VOCAB, (2, 40))  # beyond original_max_seq_len=32: YaRN's interpolated band matters
    with torch.no_grad():
        expected = ref(ids).logits
        full = ours(ids).logits
        torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5)
        # cached: a prefill chunk, then token by token (the absorbed, latent-only path)
        cache = ours.init_cache(2)
        chunks = [ours(ids[:, :7], cache=cache).logits]
        chunks += [ours(ids[:, t : t + 1], cache=cache).logits for t in range(7, 40)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), expected, atol=1e-5, rtol=1e-5)
    assert full.abs().max() > 1.0  # logits are not trivially small


def test_mla_cache_holds_latent_and_rope_key_only():
    mla = MLAConfig(n_heads=4, kv_lora_rank=10, qk_rope_head_dim=4).build(context())
    x = torch.randn(3, 9, 32)
    _, cache = mla(x, mla.init_cache(3, "cpu", torch.float32))
    assert cache.latent.shape == (3, 9, 10) and cache.k_rope.shape == (3, 9, 4)
    attention = AttentionConfig(n_heads=4).build(context())
    assert mla.state_bytes(9, torch.float32) == 9 * (10 + 4) * 4 < attention.state_bytes(9, torch.float32)


def test_mla_config_errors_name_the_field():
    base = {"vocab_size": 50, "d_model": 32, "n_layers": 1}
    with pytest.raises(ConfigError, match="mixer.mscale_all_dim"):
        af.load_model_config({**base, "mixer": {"kind": "mla", "mscale_all_dim": 1.0}})
    with pytest.raises(ConfigError, match="mixer.qk_rope_head_dim"):
        af.load_model_config({**base, "mixer": {"kind": "mla", "qk_rope_head_dim": 5}})
    # without RoPE the shared key part is simply not rotated, and any size works
    af.load_model_config({**base, "position": "none", "mixer": {"kind": "mla", "qk_rope_head_dim": 5}})


# ------------------------------------------------------------------------------- KV shifting attention


def rope_by_hand(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Half-split RoPE written out: channel i and i + d/2 rotate by positions * theta^(-2i/d)."""
    half = x.shape[-1] // 2
    angle = positions[:, None].double() * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def shifted_attention_by_hand(module, x, k_mix, v_mix, theta):
    """Causal softmax attention with k'_t = k_mix[h, 0] k(x_t) + k_mix[h, 1] k(x_{t-1}), k(x_{-1}) = 0, v alike,
    where k(x) = W_k x + b_k is the key projection of the input sequence shifted by one token."""
    B, T, _ = x.shape
    H, Hkv, hd = module.n_heads, module.n_kv_heads, module.head_dim
    x_prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)

    def heads(proj, inp, n):
        return (inp @ proj.weight.T + proj.bias).view(B, T, n, hd).transpose(1, 2)  # (B, n, T, hd)

    def mixed(proj, mix):
        previous = heads(proj, x_prev, Hkv)
        previous[:, :, 0] = 0  # the paper pads the shifted *projections* with zero (not W 0 + bias)
        return mix[:, 0, None, None] * heads(proj, x, Hkv) + mix[:, 1, None, None] * previous

    pos = torch.arange(T)
    q = rope_by_hand(heads(module.q_proj, x, H), pos, theta)
    k = rope_by_hand(mixed(module.k_proj, k_mix), pos, theta).repeat_interleave(H // Hkv, dim=1)
    v = mixed(module.v_proj, v_mix).repeat_interleave(H // Hkv, dim=1)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd)
    return y @ module.o_proj.weight.T


def test_kv_shift_with_current_token_weights_is_plain_attention():
    ctx = context()
    shifted = KVShiftConfig(n_heads=4, n_kv_heads=2, qk_norm=True, qkv_bias=True).build(ctx).double()
    plain = AttentionConfig(n_heads=4, n_kv_heads=2, qk_norm=True, qkv_bias=True).build(ctx).double()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
        shifted.k_shift.copy_(torch.tensor([[1.0, 0.0]] * 2))
        shifted.v_shift.copy_(torch.tensor([[1.0, 0.0]] * 2))
    missing = shifted.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["k_shift", "v_shift"]
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(shifted(x)[0], plain(x)[0], rtol=0, atol=1e-12)
    # and the shift really changes things once it is on
    with torch.no_grad():
        shifted.k_shift.copy_(torch.tensor([[0.5, 0.5]] * 2))
    assert (shifted(x)[0] - plain(x)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("mix", ["previous_token", "random_per_head"])
def test_kv_shift_matches_attention_over_shifted_inputs_by_hand(mix):
    theta = 100.0
    module = KVShiftConfig(n_heads=4, n_kv_heads=2, qkv_bias=True).build(context(RoPEConfig(theta=theta))).double()
    with torch.no_grad():
        for p in (module.q_proj.bias, module.k_proj.bias, module.v_proj.bias):
            p.normal_(0, 0.3)
        if mix == "previous_token":
            module.k_shift.copy_(torch.tensor([[0.0, 1.0]] * 2))
            module.v_shift.copy_(torch.tensor([[0.0, 1.0]] * 2))
        else:
            module.k_shift.normal_()
            module.v_shift.normal_()
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    expected = shifted_attention_by_hand(module, x, module.k_shift.detach(), module.v_shift.detach(), theta)
    # 1e-6: our rotary tables are computed in fp32 (as Llama's are), the hand-written ones in fp64
    torch.testing.assert_close(module(x)[0], expected, rtol=1e-6, atol=1e-6)


def test_kv_shift_init_follows_the_paper():
    module = KVShiftConfig(n_heads=4, n_kv_heads=2).build(context())
    for mix in (module.k_shift, module.v_shift):
        assert mix.shape == (2, 2)
        assert ((mix[:, 0] >= 0) & (mix[:, 0] <= 1)).all()
        torch.testing.assert_close(mix.sum(dim=1), torch.ones(2))


# ---------------------------------------------------------------------------------- LSTM / GRU / RNN


def recurrence_by_hand(kind: str, rnn: nn.RNNBase, x: torch.Tensor, nonlinearity: str = "tanh"):
    """Step-by-step over time, straight from the equations (PyTorch's gate order and GRU reset placement):
    LSTM (Hochreiter & Schmidhuber 1997; forget gate, Gers et al. 2000), GRU (Cho et al. 2014), Elman RNN.
    Returns the last layer's hidden states (B, T, H) and the final (h, c) per layer."""
    B, T, _ = x.shape
    sigma, act = torch.sigmoid, torch.tanh if nonlinearity == "tanh" else torch.relu
    inputs, finals = x, []
    for layer in range(rnn.num_layers):
        W, U = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
        b_i, b_h = getattr(rnn, f"bias_ih_l{layer}"), getattr(rnn, f"bias_hh_l{layer}")
        H = U.shape[1]
        h = x.new_zeros(B, H)
        c = x.new_zeros(B, H)
        outs = []
        for t in range(T):
            xt = inputs[:, t]
            if kind == "lstm":
                gates = xt @ W.T + b_i + h @ U.T + b_h
                i, f, g, o = gates.split(H, dim=-1)
                c = sigma(f) * c + sigma(i) * torch.tanh(g)
                h = sigma(o) * torch.tanh(c)
            elif kind == "gru":
                gx, gh = xt @ W.T + b_i, h @ U.T + b_h
                r = sigma(gx[:, :H] + gh[:, :H])
                z = sigma(gx[:, H : 2 * H] + gh[:, H : 2 * H])
                n = torch.tanh(gx[:, 2 * H :] + r * gh[:, 2 * H :])
                h = (1 - z) * n + z * h
            else:
                h = act(xt @ W.T + b_i + h @ U.T + b_h)
            outs.append(h)
        inputs = torch.stack(outs, dim=1)
        finals.append((h, c))
    return inputs, finals


RNN_CASES = {
    "lstm": LSTMConfig(hidden=12, n_layers=2),
    "gru": GRUConfig(hidden=12, n_layers=2),
    "rnn_tanh": RNNConfig(hidden=12, n_layers=2),
    "rnn_relu": RNNConfig(hidden=12, n_layers=1, nonlinearity="relu"),
}


@pytest.mark.parametrize("name", list(RNN_CASES))
def test_recurrence_matches_textbook_equations(name):
    cfg = RNN_CASES[name]
    mixer = cfg.build(context(NoPositionConfig())).double()
    with torch.no_grad():  # random biases too, so that every term of the equations matters
        for p in mixer.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5)
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    nonlinearity = getattr(cfg, "nonlinearity", "tanh")
    hidden, finals = recurrence_by_hand(cfg.kind, mixer.rnn, x, nonlinearity)
    torch.testing.assert_close(mixer(x)[0], hidden @ mixer.out_proj.weight.T, rtol=1e-10, atol=1e-10)
    _, cache = mixer(x, mixer.init_cache(3, "cpu", torch.float64))
    torch.testing.assert_close(cache.h, torch.stack([h for h, _ in finals]), rtol=1e-10, atol=1e-10)
    if cfg.kind == "lstm":
        torch.testing.assert_close(cache.c, torch.stack([c for _, c in finals]), rtol=1e-10, atol=1e-10)


def test_lstm_init_sets_forget_bias_and_orthogonal_recurrence():
    mixer = LSTMConfig(hidden=16).build(context())
    b = mixer.rnn.bias_ih_l0
    assert (b[16:32] == 1).all() and (b[:16] == 0).all() and (b[32:] == 0).all()
    for gate in range(4):
        U = mixer.rnn.weight_hh_l0[gate * 16 : (gate + 1) * 16]
        torch.testing.assert_close(U @ U.T, torch.eye(16), atol=1e-5, rtol=0)


def rows_independent(mixer: Mixer) -> bool:
    """The contract's batch-independence check, applied to every row: each sequence's output equals its output
    when run alone, and does not move when the other rows change. (tests/test_mixer_contract.py checks only
    row 0, which an RNN recurring over the batch axis leaves intact: row 0 is its first 'time step'.)"""
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    y = mixer(x)[0]
    for b in range(3):
        alone = mixer(x[b : b + 1])[0][0]
        others = x.clone()
        rest = torch.arange(3) != b
        others[rest] = torch.randn_like(others[rest])
        moved = mixer(others)[0][b]
        if not (torch.allclose(alone, y[b], rtol=0, atol=1e-10) and torch.allclose(moved, y[b], rtol=0, atol=1e-12)):
            return False
    return True


def test_row_independence_check_catches_lstm_without_batch_first():
    class BrokenLSTMConfig(MixerConfig):
        kind: str = "broken_lstm_for_test"

        def build(self, ctx):
            return BrokenLSTM(ctx)

    class BrokenLSTM(Mixer):
        def __init__(self, ctx):
            super().__init__(ctx)
            self.rnn = nn.LSTM(ctx.d_model, ctx.d_model)  # the bug: batch_first=False, fed (B, T, D)

        def forward(self, x, cache=None):
            return self.rnn(x)[0], cache

        def reset_parameters(self):
            self.rnn.reset_parameters()

    register_mixer(BrokenLSTMConfig)
    try:
        model = af.CausalLM(af.load_model_config(
            {"vocab_size": 50, "d_model": 32, "n_layers": 1, "position": "none",
             "mixer": {"kind": "broken_lstm_for_test"}}
        )).double()
        assert not rows_independent(model.blocks[0].mixer)
    finally:
        MIXERS._classes.pop("broken_lstm_for_test")
    assert "broken_lstm_for_test" not in MIXERS
    for cfg in RNN_CASES.values():  # the real ones pass the same check
        assert rows_independent(cfg.build(context(NoPositionConfig())).double())
