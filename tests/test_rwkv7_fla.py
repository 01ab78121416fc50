"""RWKV-7 as published, against flash-linear-attention's ``RWKV7ForCausalLM`` with copied weights.

Our ``CausalLM`` with the ``rwkv7`` mixer (value residual on), the ``rwkv7_channel_mix`` FFN and LayerNorms
computes the same logits as fla's model, whose layers pass ``v_first`` from layer 0 to the later ones;
fla runs in a child process under Triton's interpreter (tests/fla_rwkv7_reference.py). fla normalises the
embeddings once more before layer 0 (``pre_norm``, RWKV's ``ln0``); that is a function of the token alone,
so it is folded into our embedding table. Also here: cached decoding == full forward through the value
residual, the published zero init of the low-rank maps, and the errors for a model without layer 0's values.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from archifactory.config import BuildContext
from archifactory.errors import InputError
from archifactory.ffn.rwkv_channel_mix import RWKV7ChannelMixConfig
from archifactory.mixers.rwkv7 import RWKV7Config
from archifactory.model.config import ModelConfig
from archifactory.model.lm import CausalLM
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import RMSNormConfig
from archifactory.nn.positions import NoPositionConfig

D, LAYERS, HEAD_DIM, VOCAB = 32, 3, 16, 61
RANKS = {"decay_rank": 8, "iclr_rank": 4, "gate_rank": 8, "value_rank": 4}
CHILD = Path(__file__).with_name("fla_rwkv7_reference.py")


def rwkv7_model(**overrides) -> CausalLM:
    cfg = {"vocab_size": VOCAB, "d_model": D, "n_layers": LAYERS, "max_seq_len": 64, "tie_embeddings": False,
           "norm": {"kind": "layernorm"}, "position": {"kind": "none"},
           "mixer": {"kind": "rwkv7", "n_heads": D // HEAD_DIM, **RANKS}, "ffn": {"kind": "rwkv7_channel_mix"},
           **overrides}
    return CausalLM(ModelConfig.model_validate(cfg))


@torch.no_grad()
def randomize(model: CausalLM) -> None:
    """Every parameter away from its init (zero LoRA factors, unit norms), so that each one shows."""
    for p in model.parameters():
        p.add_(0.3 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))


def fla_state_dict(model: CausalLM, ln0: torch.nn.LayerNorm) -> dict[str, torch.Tensor]:
    """Our weights under fla's names (fla.models.rwkv7.modeling_rwkv7, fla.layers.rwkv7)."""
    sd = {"model.embeddings.weight": model.embed.weight, "lm_head.weight": model.lm_head.weight,
          "model.norm.weight": model.final_norm.weight, "model.norm.bias": model.final_norm.bias,
          "model.layers.0.pre_norm.weight": ln0.weight, "model.layers.0.pre_norm.bias": ln0.bias}
    for i, block in enumerate(model.blocks):
        p, m, f = f"model.layers.{i}.", block.mixer, block.ffn
        for ours, theirs in ((block.mixer_norm, "attn_norm"), (block.ffn_norm, "ffn_norm")):
            sd[p + theirs + ".weight"], sd[p + theirs + ".bias"] = ours.weight, ours.bias
        for row, name in enumerate("rwkvag"):
            sd[p + f"attn.x_{name}"] = m.token_mix[row].view(1, 1, D)
        for name in ("k_k", "k_a", "r_k", "r_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"):
            sd[p + "attn." + name] = m.get_parameter(name)
        maps = {"w_lora": m.decay, "a_lora": m.iclr, "g_lora": m.gate}
        if i > 0:
            maps["v_lora"] = m.value_mix
        for theirs, lora in maps.items():
            sd[p + f"attn.{theirs}.lora.0.weight"] = lora.down.weight
            sd[p + f"attn.{theirs}.lora.2.weight"] = lora.up.weight
            if lora.up.bias is not None:
                sd[p + f"attn.{theirs}.lora.2.bias"] = lora.up.bias
        sd[p + "attn.g_norm.weight"], sd[p + "attn.g_norm.bias"] = m.norm_weight, m.norm_bias
        sd[p + "ffn.x_k"], sd[p + "ffn.key.weight"], sd[p + "ffn.value.weight"] = f.mu_k, f.key.weight, f.value.weight
    return {k: v.detach().clone() for k, v in sd.items()}


def test_model_matches_fla_rwkv7_with_copied_weights(tmp_path):
    torch.manual_seed(0)
    model = rwkv7_model().eval()
    randomize(model)
    ln0 = torch.nn.LayerNorm(D)
    with torch.no_grad():
        ln0.weight.add_(0.3 * torch.randn(D)), ln0.bias.add_(0.3 * torch.randn(D))
    fla_weights = fla_state_dict(model, ln0)
    with torch.no_grad():  # fla's pre_norm (ln0) acts on each token's embedding alone: fold it into ours
        model.embed.weight.copy_(ln0(model.embed.weight))
    ids = torch.randint(0, VOCAB, (1, 9))  # small: Triton's interpreter runs fla's kernels slowly
    config = {"hidden_size": D, "num_hidden_layers": LAYERS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
              "decay_low_rank_dim": RANKS["decay_rank"], "a_low_rank_dim": RANKS["iclr_rank"],
              "gate_low_rank_dim": RANKS["gate_rank"], "v_low_rank_dim": RANKS["value_rank"],
              "intermediate_size": RWKV7ChannelMixConfig().resolved_hidden(D), "norm_eps": 1e-5,
              "fuse_norm": False, "tie_word_embeddings": False}
    torch.save({"config": config, "state_dict": fla_weights, "input_ids": ids}, tmp_path / "in.pt")
    run = subprocess.run([sys.executable, str(CHILD), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ref = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        ours = model(ids).logits
        cache = model.init_cache(1)
        steps = torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])], dim=1)
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(ours, ref["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps, ref["logits"], rtol=1e-4, atol=1e-4)  # our decoding, through v_first


def test_value_residual_changes_later_layers_and_decodes_with_the_cache():
    torch.manual_seed(1)
    model = rwkv7_model(norm={"kind": "rmsnorm"}).eval()
    randomize(model)
    assert model.blocks[0].mixer.value_mix is None and model.blocks[0].mixer.provides_v_first
    assert all(b.mixer.value_mix is not None for b in model.blocks[1:])
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.init_cache(2)
        steps = torch.cat([model(ids[:, :5], cache=cache).logits]
                          + [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 12)], 1)
        torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
        # the blend matters: forcing the gate shut (v kept, v_first ignored) changes the logits
        for block in model.blocks[1:]:
            block.mixer.value_mix.up.bias.fill_(-1e4)
            block.mixer.value_mix.up.weight.zero_()
        alone = model(ids).logits
    assert (alone - full).abs().max() > 1e-3


def test_multi_token_heads_read_the_trunk_values():
    model = rwkv7_model(mtp_heads=1)
    ids = torch.randint(0, VOCAB, (2, 9))
    out = model(ids, ids)
    out.loss.backward()
    assert model.mtp_blocks[0].mixer.value_mix.up.bias.grad.abs().sum() > 0


def test_a_layer_without_layer_zero_values_is_an_error():
    hybrid = rwkv7_model(mixer={"kind": "attention", "n_heads": 4},
                         layer_overrides=[{"layers": [1, 2], "mixer": {"kind": "rwkv7", "n_heads": 4, **RANKS}}])
    with pytest.raises(InputError, match="RWKV-7 at layer 1 has value_residual=true.*set value_residual=false"):
        hybrid(torch.randint(0, VOCAB, (1, 5)))
    fine = rwkv7_model(mixer={"kind": "attention", "n_heads": 4},
                       layer_overrides=[{"layers": [1, 2], "mixer": {"kind": "rwkv7", "n_heads": 4,
                                                                     "value_residual": False}}])
    assert torch.isfinite(fine(torch.randint(0, VOCAB, (1, 5))).logits).all()


def test_low_rank_maps_start_as_published():
    ctx = BuildContext(d_model=64, n_layers=4, layer_idx=2, max_seq_len=64, norm=RMSNormConfig(),
                       position=NoPositionConfig(), init=InitConfig())
    mixer = RWKV7Config(n_heads=2, decay_rank=16, iclr_rank=8, gate_rank=96, value_rank=8).build(ctx)
    for lora in mixer.low_rank_maps():
        assert torch.equal(lora.down.weight, torch.zeros_like(lora.down.weight))
        up = lora.up.weight.double()  # (d_out, rank): orthogonal columns of norm 0.1 * max(1, sqrt(rank / d_out))
        rank, d_out = up.shape[1], up.shape[0]
        if rank <= d_out:
            torch.testing.assert_close(up.T @ up, 0.01 * torch.eye(rank, dtype=torch.float64), atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(up @ up.T, 0.01 * rank / d_out * torch.eye(d_out, dtype=torch.float64),
                                       atol=1e-6, rtol=0)
    linear = torch.arange(64) / 63 - 0.5  # RWKV-LM x070: v0 = 0.73 - linear * 0.4
    torch.testing.assert_close(mixer.value_mix.up.bias, 0.73 - linear * 0.4)
    assert mixer.zero_gradient_at_init() == {"decay.up.weight", "iclr.up.weight", "value_mix.up.weight"}


def test_channel_mix_is_rwkv_lm_cmix_x070():
    ctx = BuildContext(d_model=D, n_layers=4, layer_idx=1, max_seq_len=64, norm=RMSNormConfig(),
                       position=NoPositionConfig(), init=InitConfig(std=0.2))
    ffn = RWKV7ChannelMixConfig().build(ctx)
    assert ffn.key.out_features == 128
    ramp = torch.arange(D, dtype=torch.float64) / D
    torch.testing.assert_close(ffn.mu_k.double(), 1 - ramp ** ((1 - 1 / 4) ** 4))
    x = torch.randn(2, 7, D)
    xx = F.pad(x, (0, 0, 1, -1)) - x  # RWKV-LM: self.time_shift(x) - x
    k = torch.relu((x + xx * ffn.mu_k) @ ffn.key.weight.T) ** 2
    torch.testing.assert_close(ffn(x)[0], k @ ffn.value.weight.T)
