"""CausalLM: residual layouts against torch's own transformer layer, the loss and its auxiliary terms
against closed forms, parameter and FLOP counts, init, cached generation, saving."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import archifactory as af
from archifactory.model.lm import IGNORE_INDEX

BASE = {"vocab_size": 97, "d_model": 32, "n_layers": 2, "max_seq_len": 64}


def model_from(overrides=(), **fields):
    return af.CausalLM(af.load_model_config({**BASE, **fields}, overrides))


def randomize_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))


# ------------------------------------------------------------------------------------ residual layouts


@pytest.mark.parametrize("norm_first", [True, False])
def test_pre_and_post_norm_blocks_match_torch_transformer_layer(norm_first):
    d, heads, ff = 32, 4, 64
    ref = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation="relu", batch_first=True,
                                     norm_first=norm_first)
    ref.eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model = model_from(
        [f"residual={'pre' if norm_first else 'post'}"],
        mixer={"kind": "attention", "n_heads": heads, "qkv_bias": True, "out_bias": True},
        ffn={"kind": "mlp", "hidden": ff, "activation": "relu", "bias": True},
        norm={"kind": "layernorm"},
        position={"kind": "none"},
    )
    block = model.blocks[0]
    att, mlp = block.mixer, block.ffn
    with torch.no_grad():
        for i, proj in enumerate((att.q_proj, att.k_proj, att.v_proj)):
            proj.weight.copy_(ref.self_attn.in_proj_weight[i * d : (i + 1) * d])
            proj.bias.copy_(ref.self_attn.in_proj_bias[i * d : (i + 1) * d])
        att.o_proj.load_state_dict(ref.self_attn.out_proj.state_dict())
        mlp.up_proj.load_state_dict(ref.linear1.state_dict())
        mlp.down_proj.load_state_dict(ref.linear2.state_dict())
        block.mixer_norm.load_state_dict(ref.norm1.state_dict())
        block.ffn_norm.load_state_dict(ref.norm2.state_dict())
    x = torch.randn(2, 9, d)
    mask = nn.Transformer.generate_square_subsequent_mask(9)
    torch.testing.assert_close(block(x)[0], ref(x, src_mask=mask, is_causal=True), atol=1e-5, rtol=1e-5)


def test_parallel_and_sandwich_wiring():
    x = torch.randn(2, 7, 32)
    model = model_from(["residual=parallel"])
    randomize_norms(model)
    b = model.blocks[0]
    assert b.ffn_norm is None
    n = b.mixer_norm(x)
    torch.testing.assert_close(b(x)[0], x + b.mixer(n)[0] + b.ffn(n)[0])
    model = model_from(["residual=sandwich"])
    randomize_norms(model)
    b = model.blocks[0]
    h = x + b.mixer_post_norm(b.mixer(b.mixer_norm(x))[0])
    torch.testing.assert_close(b(x)[0], h + b.ffn_post_norm(b.ffn(b.ffn_norm(h))[0]))


def test_no_norm_is_identity():
    model = model_from(["norm.kind=none"])
    assert all(isinstance(n, nn.Identity) for b in model.blocks for n in b.norms())
    assert model.param_breakdown()["norm"] == 0


# ------------------------------------------------------------------------------------------ the loss


def test_loss_ignores_padding_and_matches_cross_entropy():
    model = model_from()
    ids = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    targets[0, 6:] = IGNORE_INDEX
    out = model(ids, targets)
    keep = targets != IGNORE_INDEX
    logp = out.logits.log_softmax(-1)
    expected = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(out.ce_loss, expected)
    torch.testing.assert_close(out.loss, out.ce_loss)
    # changing the logits' inputs at padded targets' positions only moves nothing at kept positions
    assert out.aux_losses == {}


def test_z_loss_and_logit_softcap_closed_forms():
    ids = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    targets[1, :3] = IGNORE_INDEX
    plain = model_from()
    capped = model_from(["logit_softcap=2.0", "z_loss_weight=1e-2"])
    capped.load_state_dict(plain.state_dict())
    with torch.no_grad():  # scale the logits up so that the cap bites
        for m in (plain, capped):
            m.lm_head.weight.mul_(30)
    raw = plain(ids).logits
    out = capped(ids, targets)
    torch.testing.assert_close(out.logits, 2.0 * torch.tanh(raw / 2.0))
    assert out.logits.abs().max() <= 2.0 < raw.abs().max()
    keep = targets != IGNORE_INDEX
    z = torch.logsumexp(out.logits, -1)[keep].square().mean()
    torch.testing.assert_close(out.aux_losses["z_loss"], 1e-2 * z)
    torch.testing.assert_close(out.loss, out.ce_loss + 1e-2 * z)


def test_multi_token_prediction_heads():
    model = model_from(["mtp_heads=2", "mtp_loss_weight=0.5"])
    ids = torch.randint(0, 97, (2, 12))
    targets = torch.randint(0, 97, (2, 12))
    out = model(ids, targets)
    hidden, _ = model.hidden_states(ids)
    expected = []
    for k, block in enumerate(model.mtp_blocks, start=1):
        logits = model.lm_head(model.final_norm(block(hidden)[0]))
        expected.append(F.cross_entropy(logits[:, :-k].reshape(-1, 97), targets[:, k:].reshape(-1)))
    torch.testing.assert_close(out.aux_losses["mtp"], 0.5 * torch.stack(expected).mean())
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_losses["mtp"])
    out.loss.backward()
    assert all(p.grad is not None for p in model.mtp_blocks.parameters())
    # the main head's logits do not depend on the extra heads
    plain = model_from()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp")})
    torch.testing.assert_close(plain(ids).logits, out.logits)


def test_moe_aux_losses_summed_over_layers_and_in_loss():
    model = model_from(ffn={"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 16,
                            "router_z_loss_weight": 1e-3})
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids, ids)
    per_layer = []
    x = model.embed(ids)
    for block in model.blocks:
        x, _, aux = block(x)
        per_layer.append(aux)
    for name in ("moe_balance", "moe_router_z"):
        torch.testing.assert_close(out.aux_losses[name], sum(a[name] for a in per_layer))
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_losses["moe_balance"] + out.aux_losses["moe_router_z"])
    assert set(model.moe_loads()) == {0, 1}


def test_head_bias_and_untied_head():
    model = model_from(["head_bias=true", "tie_embeddings=false"])
    assert model.lm_head.weight is not model.embed.weight and model.lm_head.bias is not None
    tied = model_from()
    assert tied.lm_head.weight is tied.embed.weight
    assert model.num_params() - tied.num_params() == 97 * 32 + 97
    with torch.no_grad():
        model.lm_head.bias.copy_(torch.arange(97.0))
    ids = torch.randint(0, 97, (1, 5))
    no_bias = model.lm_head.weight @ model.final_norm(model.hidden_states(ids)[0])[0].T
    torch.testing.assert_close(model(ids).logits[0], no_bias.T + torch.arange(97.0))


def test_embedding_scale():
    model = model_from(["embedding_scale=sqrt_d_model", "norm.eps=1e-20"])
    plain = model_from(["norm.eps=1e-20"])
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (1, 4))
    with torch.no_grad():
        for m in (model, plain):
            for b in m.blocks:
                b.mixer.o_proj.weight.zero_()
                b.ffn.down_proj.weight.zero_()
    # with blocks reduced to the identity, RMSNorm removes any scale: outputs equal
    torch.testing.assert_close(model(ids).logits, plain(ids).logits)
    torch.testing.assert_close(model.hidden_states(ids)[0], plain.hidden_states(ids)[0] * math.sqrt(32))


# ----------------------------------------------------------------------------------- counts and costs


def test_param_breakdown_closed_form():
    model = model_from(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2}, ffn={"kind": "swiglu", "hidden": 48})
    d, kv, h, V, L = 32, 16, 48, 97, 2
    attn = d * d + 2 * d * kv + d * d
    ffn = 3 * d * h
    counts = model.param_breakdown()
    assert counts == {"embedding": V * d, "position": 0, "mixer": L * attn, "ffn": L * ffn,
                      "norm": (2 * L + 1) * d, "mtp": 0, "head": 0}
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=True) == model.num_params() - V * d


def test_flops_closed_form():
    model = model_from(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2}, ffn={"kind": "swiglu", "hidden": 48})
    d, kv, h, V, L, T = 32, 16, 48, 97, 2, 64
    matmul = L * (2 * d * d + 2 * d * kv + 3 * d * h) + d * V
    attention = L * 4 * d * (T + 1) / 2  # mean keys per query under the causal mask: (T + 1) / 2
    assert model.flops_per_token(T) == pytest.approx(2 * matmul + attention, rel=1e-6, abs=2)
    assert model.flops_per_token(T, training=True) == pytest.approx(3 * (2 * matmul + attention), rel=1e-6, abs=6)
    windowed = model_from(["mixer.window=8"])
    keys = sum(min(t + 1, 8) for t in range(T)) / T
    dense = model_from()
    assert dense.flops_per_token(T) - windowed.flops_per_token(T) == pytest.approx(
        L * 4 * d * ((T + 1) / 2 - keys), abs=2
    )
    assert sum(model.flops_breakdown(T).values()) == model.flops_per_token(T)


def test_moe_active_params():
    model = model_from(ffn={"kind": "moe", "n_experts": 8, "top_k": 2, "expert_hidden": 16, "n_shared_experts": 1})
    d, h = 32, 16
    per_expert = 3 * d * h
    assert model.param_breakdown()["ffn"] == 2 * (8 * d + 8 * per_expert + per_expert)
    assert model.num_params() - model.active_params() == 2 * 6 * per_expert


def test_state_bytes_kv_cache_closed_form():
    model = model_from(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 1})
    assert model.state_bytes(100, torch.bfloat16) == 2 * 2 * 8 * 100 * 2
    assert model_from(["mixer.window=10", "mixer.n_kv_heads=1"]).state_bytes(100, torch.float32) == 2 * 2 * 8 * 10 * 4


# ---------------------------------------------------------------------------------------------- init


def test_depth_scaled_and_zero_init():
    model = model_from(["n_layers=8", "d_model=256", "mixer.n_heads=4"])
    o = torch.cat([b.mixer.o_proj.weight.flatten() for b in model.blocks])
    q = torch.cat([b.mixer.q_proj.weight.flatten() for b in model.blocks])
    assert o.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.02)
    assert q.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.02)
    zero = model_from(["init.zero_init_out=true"])
    assert all(b.mixer.o_proj.weight.abs().sum() == 0 and b.ffn.down_proj.weight.abs().sum() == 0 for b in zero.blocks)
    ids = torch.randint(0, 97, (1, 6))
    torch.testing.assert_close(zero(ids).logits, zero.lm_head(zero.final_norm(zero.embed(ids))))


# ---------------------------------------------------------------------------------------- generation

HYBRID = dict(
    n_layers=4,
    mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True},
    layer_overrides=[
        {"layers": [1], "mixer": {"kind": "attention", "n_heads": 2, "window": 4}},
        {"layers": [2], "ffn": {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 16}},
        {"layers": [3], "mixer": {"kind": "attention", "n_heads": 4, "logit_softcap": 3.0}},
    ],
)


@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "sinusoidal", "none"])
def test_cached_decoding_equals_full_forward(position):
    model = model_from([f"position.kind={position}"], **HYBRID).eval()
    randomize_norms(model)
    ids = torch.randint(0, 97, (2, 14))
    full = model(ids).logits
    cache = model.init_cache(2)
    parts = [model(ids[:, :5], cache=cache).logits]
    parts += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 14


def test_greedy_generate_equals_uncached_argmax_loop():
    model = model_from(**HYBRID).eval()
    prompt = torch.randint(0, 97, (2, 3))
    out = model.generate(prompt, max_new_tokens=8, temperature=0)
    ids = prompt
    for _ in range(8):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)
    single = model.generate(prompt[0].tolist(), max_new_tokens=8, temperature=0)
    assert torch.equal(single, ids[0])


def test_generate_stops_at_eos_and_checks_length():
    model = model_from().eval()
    prompt = torch.randint(0, 97, (1, 3))
    greedy = model.generate(prompt, 6, temperature=0)
    eos = int(greedy[0, 4])
    out = model.generate(prompt, 6, temperature=0, eos_token_id=eos)
    assert out.shape[1] <= greedy.shape[1] and int(out[0, -1]) == eos
    learned = model_from(["position.kind=learned", "max_seq_len=8"])
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        learned.generate(prompt, 6)
    with pytest.raises(ValueError, match="empty"):
        model.generate([], 3)


def test_bad_inputs_name_the_problem():
    model = model_from()
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


# -------------------------------------------------------------------------------------------- saving


def test_save_and_load_round_trip(tmp_path):
    model = model_from(**HYBRID)
    randomize_norms(model)
    model.save_pretrained(tmp_path / "m")
    again = af.CausalLM.from_pretrained(tmp_path / "m")
    assert again.config == model.config
    ids = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        af.CausalLM.from_pretrained(tmp_path / "m")


def test_kernel_paths_recorded():
    model = model_from(**HYBRID)
    assert model.kernel_paths() == {0: "torch.sdpa", 1: "torch.sdpa", 2: "torch.sdpa", 3: "torch.explicit"}


def test_stateful_ffn_cached_decoding_equals_full_forward():
    # RWKV-6 (Finch): time-mix mixer + channel-mix FFN, both token-shifting, both carry decoding state
    model = model_from(mixer={"kind": "rwkv6"}, ffn={"kind": "rwkv6_channel_mix"}).eval()
    randomize_norms(model)
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids).logits
    cache = model.init_cache(2)
    assert all(c is not None for c in cache.ffn_layers)
    steps = torch.cat([model(ids[:, :4], cache=cache).logits] +
                      [model(ids[:, t : t + 1], cache=cache).logits for t in range(4, 12)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    greedy = model.generate(ids[:, :3], 5, temperature=0)
    loop = ids[:, :3]
    for _ in range(5):
        loop = torch.cat([loop, model(loop).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, loop)
