"""Feed-forward layers against references outside this package: torch.nn.functional activations and
linear maps written out by hand, a dense per-token mixture-of-experts loop, transformers' Mixtral
load-balancing loss, and the closed forms of the papers (ST-MoE z-loss, DeepSeek-V3 bias update)."""

from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from archifactory.config import ConfigError
from archifactory.ffn.base import glu_hidden
from archifactory.ffn.mlp import GeGLUConfig, GLUConfig, MLPConfig, SwiGLUConfig
from archifactory.ffn.moe import MoE, MoEConfig
from archifactory.model.config import ModelConfig, load_model_config
from archifactory.model.lm import CausalLM

D = 16


def ctx(d_model: int = D, n_layers: int = 2):
    mixer = {"kind": "attention", "n_heads": 2}
    return ModelConfig(vocab_size=32, d_model=d_model, n_layers=n_layers, mixer=mixer).build_context(0)


REFERENCE_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: torch.relu(x) ** 2,
    "silu": lambda x: x * torch.sigmoid(x),
}


# ---------------------------------------------------------------------------------------------- dense


@pytest.mark.parametrize("activation", list(REFERENCE_ACTIVATIONS))
@pytest.mark.parametrize("bias", [False, True])
def test_mlp_matches_functional(activation, bias):
    torch.manual_seed(0)
    mlp = MLPConfig(hidden=24, activation=activation, bias=bias).build(ctx())
    if bias:  # non-zero biases so that they are checked too
        with torch.no_grad():
            mlp.up_proj.bias.normal_()
            mlp.down_proj.bias.normal_()
    w_up, w_down = mlp.up_proj.weight.detach().clone(), mlp.down_proj.weight.detach().clone()
    b_up = mlp.up_proj.bias.detach().clone() if bias else None
    b_down = mlp.down_proj.bias.detach().clone() if bias else None
    x = torch.randn(3, 5, D)
    y, aux = mlp(x)
    ref = F.linear(REFERENCE_ACTIVATIONS[activation](F.linear(x, w_up, b_up)), w_down, b_down)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-7)
    assert aux == {}
    assert mlp.flops_per_token() == 2 * 2 * D * 24
    assert mlp.active_params() == 2 * D * 24 + (24 + D if bias else 0)


def test_mlp_default_hidden_is_4d():
    mlp = MLPConfig().build(ctx())
    assert mlp.up_proj.weight.shape == (4 * D, D)


def test_activations_differ():
    """Guard: the parametrised comparison above would pass vacuously if every name mapped to one function."""
    x = torch.linspace(-3, 3, 101)
    outs = {name: MLPConfig(activation=name).build(ctx()).act(x) for name in REFERENCE_ACTIVATIONS}
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)


GLU_CASES = [
    (GLUConfig, "relu"),
    (GLUConfig, "relu2"),
    (GLUConfig, "gelu_tanh"),
    (SwiGLUConfig, "silu"),
    (GeGLUConfig, "gelu"),
    (GeGLUConfig, "gelu_tanh"),
]


@pytest.mark.parametrize("cls,activation", GLU_CASES)
def test_glu_matches_hand_computation(cls, activation):
    torch.manual_seed(1)
    glu = cls(hidden=20, activation=activation).build(ctx())
    x = torch.randn(2, 7, D)
    y, aux = glu(x)
    gate = F.linear(x, glu.gate_proj.weight)
    up = F.linear(x, glu.up_proj.weight)
    ref = F.linear(REFERENCE_ACTIVATIONS[activation](gate) * up, glu.down_proj.weight)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-7)
    assert aux == {}
    assert glu.flops_per_token() == 3 * 2 * D * 20
    assert glu.active_params() == 3 * D * 20


def test_swiglu_matches_llama_mlp():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(2)
    ours = SwiGLUConfig(hidden=24).build(ctx())
    ref = LlamaMLP(LlamaConfig(hidden_size=D, num_attention_heads=2, intermediate_size=24, hidden_act="silu"))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, D)
    torch.testing.assert_close(ours(x)[0], ref(x), rtol=1e-5, atol=1e-7)


def llama_ffn_hidden(dim: int, multiple_of: int) -> int:
    """Meta's Llama ``FeedForward``: hidden = int(2 * 4d / 3), rounded up to a multiple of ``multiple_of``."""
    hidden = 4 * dim
    hidden = int(2 * hidden / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@pytest.mark.parametrize(
    "d_model,multiple_of,expected",
    [(128, 64, 384), (96, 64, 256), (4096, 256, 11008), (64, 64, 192), (100, 1, 266), (48, 32, 128)],
)
def test_glu_default_hidden(d_model, multiple_of, expected):
    assert llama_ffn_hidden(d_model, multiple_of) == expected  # the reference itself (Llama-7B: 11008)
    assert glu_hidden(d_model, multiple_of) == expected
    assert GLUConfig(multiple_of=multiple_of).resolved_hidden(d_model) == expected
    if d_model <= 128:  # the built layer uses it too (skip building a 4096-wide one)
        glu = SwiGLUConfig(multiple_of=multiple_of).build(ctx(d_model))
        assert glu.up_proj.out_features == glu.gate_proj.out_features == glu.down_proj.in_features == expected
    # 8/3 d rounded up (up to the int() of the reference): within one multiple above 8d/3
    assert 8 * d_model / 3 - 1 < expected < 8 * d_model / 3 + multiple_of


def test_swiglu_rejects_gelu_with_clear_error():
    with pytest.raises(ConfigError) as err:
        load_model_config({"vocab_size": 32, "d_model": 32, "n_layers": 1, "ffn": {"kind": "swiglu", "activation": "gelu"}})
    message = str(err.value)
    assert "ffn.activation" in message and "silu" in message
    with pytest.raises(ConfigError, match="ffn.activation"):
        load_model_config({"vocab_size": 32, "d_model": 32, "n_layers": 1, "ffn": {"kind": "geglu", "activation": "silu"}})


# ------------------------------------------------------------------------------------------------ MoE


def build_moe(**kw) -> MoE:
    kw.setdefault("expert_hidden", 12)
    kw.setdefault("balance_loss_weight", 0.0)
    cfg = MoEConfig(**kw)
    moe = cfg.build(ctx())
    moe.reference_act = REFERENCE_ACTIVATIONS[cfg.activation]  # used by the reference below only
    return moe


def reference_route(moe: MoE, x: torch.Tensor, bias: torch.Tensor | None = None):
    """Independent routing: logits by F.linear, selection on (optionally biased) scores, weights from the
    unbiased scores."""
    logits = F.linear(x, moe.router.weight).double()
    bias = torch.zeros(moe.n_experts, dtype=torch.float64) if bias is None else bias.double()
    if moe.routing == "softmax_topk":
        probs = torch.softmax(logits, dim=-1)
        chosen = torch.topk(probs + bias, moe.top_k, dim=-1).indices
        weights = probs.gather(-1, chosen)
        if moe.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
    else:
        chosen = torch.topk(logits + bias, moe.top_k, dim=-1).indices
        weights = torch.softmax(logits.gather(-1, chosen), dim=-1)
    return logits, chosen, weights


def reference_expert(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    act = moe.reference_act
    up = F.linear(x, moe.w_up[e])
    hidden = act(F.linear(x, moe.w_gate[e])) * up if moe.w_gate is not None else act(up)
    return F.linear(hidden, moe.w_down[e])


def reference_moe(moe: MoE, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense per-token loop: for every token, sum over its top-k experts of weight * expert(x)."""
    flat = x.reshape(-1, x.shape[-1])
    _, chosen, weights = reference_route(moe, flat, bias)
    rows = []
    for t in range(flat.shape[0]):
        out = torch.zeros_like(flat[t])
        for j in range(moe.top_k):
            e = int(chosen[t, j])
            out = out + weights[t, j].to(flat.dtype) * reference_expert(moe, e, flat[t : t + 1])[0]
        if moe.shared is not None:  # always-on experts: one GLU / MLP of n_shared * expert_hidden
            sh, act, xt = moe.shared, moe.reference_act, flat[t]
            if moe.w_gate is not None:
                hidden = act(F.linear(xt, sh.gate_proj.weight)) * F.linear(xt, sh.up_proj.weight)
            else:
                hidden = act(F.linear(xt, sh.up_proj.weight))
            out = out + F.linear(hidden, sh.down_proj.weight)
        rows.append(out)
    return torch.stack(rows).reshape(x.shape)


MOE_CASES = [
    dict(routing="softmax_topk", renormalize=True),
    dict(routing="softmax_topk", renormalize=False),
    dict(routing="topk_softmax"),
    dict(routing="softmax_topk", renormalize=False, n_shared_experts=2),
    dict(routing="topk_softmax", n_shared_experts=1),
    dict(routing="softmax_topk", glu=False, activation="gelu"),
    dict(routing="topk_softmax", glu=False, activation="relu2", n_shared_experts=1),
    dict(routing="softmax_topk", top_k=1, n_experts=4),
    dict(routing="softmax_topk", top_k=4, n_experts=4),
    dict(routing="softmax_topk", top_k=3, n_experts=6, glu=True, activation="gelu_tanh"),
]


@pytest.mark.parametrize("case", MOE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_moe_dropless_dispatch_matches_dense_loop(case):
    torch.manual_seed(3)
    case = {"n_experts": 5, "top_k": 2, **case}
    moe = build_moe(**case)
    with torch.no_grad():  # larger router weights: decisive, varied routing
        moe.router.weight.normal_(std=1.0)
    x = torch.randn(3, 7, D)
    y, _ = moe(x)
    ref = reference_moe(moe, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert y.abs().max() > 1e-4  # not trivially zero
    # dropless: every expert's matmul saw exactly its assigned tokens
    _, chosen, _ = reference_route(moe, x.reshape(-1, D))
    assert torch.equal(moe.last_load, torch.bincount(chosen.reshape(-1), minlength=moe.n_experts))


def test_moe_with_an_unused_expert_matches_dense_loop():
    torch.manual_seed(4)
    moe = build_moe(n_experts=4, top_k=1)
    with torch.no_grad():
        moe.router.weight.normal_()
        moe.router.weight[3] = -100 * moe.router.weight[3].abs()  # never chosen for positive inputs
    x = torch.rand(2, 5, D) + 0.1
    y, _ = moe(x)
    assert moe.last_load[3] == 0
    torch.testing.assert_close(y, reference_moe(moe, x), rtol=1e-5, atol=1e-6)


def test_topk_softmax_equals_softmax_topk_renormalized():
    """Mixtral's softmax over the top-k logits is the full softmax restricted to the top k and renormalised."""
    torch.manual_seed(5)
    a = build_moe(n_experts=6, top_k=2, routing="topk_softmax")
    b = build_moe(n_experts=6, top_k=2, routing="softmax_topk", renormalize=True)
    c = build_moe(n_experts=6, top_k=2, routing="softmax_topk", renormalize=False)
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.router.weight.normal_()
        b.router.weight.copy_(a.router.weight)
        c.router.weight.copy_(a.router.weight)
    x = torch.randn(4, 6, D)
    ya, yb, yc = a(x)[0], b(x)[0], c(x)[0]
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ya, yc, rtol=1e-3, atol=1e-5)  # without renormalisation they differ
    logits = F.linear(x.reshape(-1, D), a.router.weight)
    ca, wa = a.route(logits)
    cb, wb = b.route(logits)
    assert torch.equal(ca, cb)
    torch.testing.assert_close(wa, wb)


@pytest.mark.parametrize("routing", ["softmax_topk", "topk_softmax"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_balance_loss_matches_mixtral(routing, top_k):
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(6)
    E, weight = 6, 0.03
    moe = build_moe(n_experts=E, top_k=top_k, routing=routing, balance_loss_weight=weight)
    with torch.no_grad():
        moe.router.weight.normal_()
    x = torch.randn(3, 8, D)
    _, aux = moe(x)
    logits = F.linear(x.reshape(-1, D), moe.router.weight)
    ref = mixtral.load_balancing_loss_func((logits,), num_experts=E, top_k=top_k)
    torch.testing.assert_close(aux["moe_balance"], weight * ref, rtol=1e-5, atol=1e-7)
    assert "moe_router_z" not in aux


def test_balance_loss_is_minimal_when_uniform():
    """Switch Transformer: with uniform probabilities and loads, E * sum f_i P_i = k (its minimum)."""
    moe = build_moe(n_experts=4, top_k=2, balance_loss_weight=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities; ties broken by topk
    _, aux = moe(torch.randn(16, D))
    assert aux["moe_balance"].item() == pytest.approx(2.0, rel=1e-6)


def test_router_z_loss_closed_form():
    torch.manual_seed(7)
    moe = build_moe(n_experts=5, top_k=2, router_z_loss_weight=0.001)
    with torch.no_grad():
        moe.router.weight.normal_(std=2.0)
    x = torch.randn(2, 9, D)
    _, aux = moe(x)
    logits = F.linear(x.reshape(-1, D), moe.router.weight).double()
    # ST-MoE, Eq. (5): (1/B) sum_i (log sum_j exp(x_ij))^2
    expected = 0.001 * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / logits.shape[0]
    assert aux["moe_router_z"].item() == pytest.approx(expected, rel=1e-5)
    assert "moe_balance" not in aux


def test_moe_aux_losses_reach_model_loss():
    torch.manual_seed(8)
    config = ModelConfig(
        vocab_size=32, d_model=D, n_layers=2, mixer={"kind": "attention", "n_heads": 2},
        ffn=MoEConfig(n_experts=4, top_k=2, expert_hidden=8, balance_loss_weight=0.01, router_z_loss_weight=0.001),
    )
    model = CausalLM(config)
    ids = torch.randint(0, 32, (2, 6))
    out = model(ids, targets=ids)
    assert set(out.aux_losses) == {"moe_balance", "moe_router_z"}
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_losses["moe_balance"] + out.aux_losses["moe_router_z"])
    # both layers contributed: with weight 0.01 and 2 layers the balance term is at least 2 * 0.01 * k
    assert out.aux_losses["moe_balance"].item() >= 2 * 0.01 * 2 - 1e-6


# ------------------------------------------------------------------------------------------ load stats


def test_load_statistics_count_assignments():
    torch.manual_seed(9)
    moe = build_moe(n_experts=5, top_k=2)
    with torch.no_grad():
        moe.router.weight.normal_()
    xs = [torch.randn(2, 6, D), torch.randn(1, 9, D)]
    expected_total = torch.zeros(5, dtype=torch.long)
    for x in xs:
        moe(x)
        _, chosen, _ = reference_route(moe, x.reshape(-1, D))
        counts = torch.bincount(chosen.reshape(-1), minlength=5)
        assert torch.equal(moe.last_load, counts)
        assert int(moe.last_load.sum()) == x.shape[0] * x.shape[1] * 2
        expected_total += counts
    assert torch.equal(moe.total_load, expected_total)
    torch.testing.assert_close(moe.load_fractions(), expected_total.float() / expected_total.sum())
    assert float(moe.load_fractions().sum()) == pytest.approx(1.0)
    moe.reset_load_stats()
    assert int(moe.total_load.sum()) == 0 and int(moe.last_load.sum()) == 0
    assert float(moe.load_fractions().sum()) == 0.0


def test_causal_lm_moe_loads():
    torch.manual_seed(10)
    config = ModelConfig(
        vocab_size=32, d_model=D, n_layers=3, mixer={"kind": "attention", "n_heads": 2},
        ffn={"kind": "swiglu", "hidden": 16},
        layer_overrides=[{"layers": [1, 2], "ffn": {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 8}}],
    )
    model = CausalLM(config)
    inputs: dict[int, list[torch.Tensor]] = {1: [], 2: []}
    for i in (1, 2):
        model.blocks[i].ffn.register_forward_hook(lambda m, args, out, i=i: inputs[i].append(args[0].detach()))
    for _ in range(2):
        model(torch.randint(0, 32, (2, 5)))
    loads = model.moe_loads()
    assert set(loads) == {1, 2}
    for i in (1, 2):
        moe = model.blocks[i].ffn
        counts = torch.zeros(4, dtype=torch.long)
        for x in inputs[i]:
            _, chosen, _ = reference_route(moe, x.reshape(-1, D))
            counts += torch.bincount(chosen.reshape(-1), minlength=4)
        assert int(counts.sum()) == 2 * 2 * 5 * 2
        torch.testing.assert_close(loads[i], counts.float() / counts.sum())


# ------------------------------------------------------------------------------------- bias balancing


def overloaded_moe(rate: float = 0.01, **kw) -> MoE:
    """Expert 0 gets every token when inputs are positive."""
    moe = build_moe(n_experts=4, bias_balancing=True, bias_update_rate=rate, **kw)
    with torch.no_grad():
        moe.router.weight.normal_(std=0.1)
        moe.router.weight[0] = 1.0
    return moe


@pytest.mark.parametrize("top_k", [1, 2])
def test_bias_update_once_per_optimizer_step(top_k):
    torch.manual_seed(11)
    rate = 0.01
    moe = overloaded_moe(rate, top_k=top_k).train()
    x = torch.rand(4, 8, D) + 0.5
    moe(x)
    load = moe.last_load.float()
    assert load[0] == 32  # expert 0 took every token
    bias = moe.routing_bias
    assert torch.count_nonzero(bias) == 0  # a forward only counts; the step updates
    moe.after_optimizer_step()
    assert float(bias[0]) == pytest.approx(-rate, abs=1e-9)  # overloaded: down by exactly rate
    # DeepSeek-V3 (Wang et al. 2024): b_i += rate * sign(mean load - load_i)
    expected = rate * torch.sign(load.mean() - load)
    torch.testing.assert_close(bias, expected)
    for e in range(1, 4):
        if load[e] < load.mean():
            assert float(bias[e]) == pytest.approx(rate, abs=1e-9)
    # a second step accumulates; a step without a training forward leaves the bias alone
    moe(x)
    load2 = moe.last_load.float()
    moe.after_optimizer_step()
    torch.testing.assert_close(bias, expected + rate * torch.sign(load2.mean() - load2))
    before = bias.clone()
    moe.after_optimizer_step()
    assert torch.equal(bias, before)


def test_skipped_step_discards_its_loads():
    """A step whose update was skipped (non-finite gradients) does not move the bias, and its counts do
    not leak into the next step's update."""
    torch.manual_seed(12)
    rate = 0.01
    moe = overloaded_moe(rate).train()
    x = torch.rand(4, 8, D) + 0.5
    moe(x)
    moe.after_optimizer_step(applied=False)
    assert torch.count_nonzero(moe.routing_bias) == 0 and torch.count_nonzero(moe.step_load) == 0
    reference = overloaded_moe(rate).train()
    for module in (moe, reference):
        module(x)
        module.after_optimizer_step()
    torch.testing.assert_close(moe.routing_bias, reference.routing_bias, rtol=0, atol=0)


def test_bias_update_sums_micro_batches_like_the_full_batch():
    """Gradient accumulation: the loads of every micro-batch of a step add up before the one update."""
    torch.manual_seed(14)
    whole, micro = build_moe(n_experts=6, top_k=2, bias_balancing=True, bias_update_rate=0.1), None
    with torch.no_grad():
        whole.router.weight.normal_()
    micro = copy.deepcopy(whole)
    x = torch.randn(8, 5, D)
    whole.train()(x)
    whole.after_optimizer_step()
    for part in x.split(2):
        micro.train()(part)
    counts = torch.bincount(reference_route(micro, x.reshape(-1, D))[1].reshape(-1), minlength=6).float()
    micro.after_optimizer_step()
    expected = 0.1 * torch.sign(counts.mean() - counts)
    assert torch.count_nonzero(expected) >= 2  # the test data is unbalanced
    torch.testing.assert_close(micro.routing_bias, expected, rtol=0, atol=0)
    torch.testing.assert_close(whole.routing_bias, expected, rtol=0, atol=0)


def test_model_after_optimizer_step_reaches_every_moe_layer():
    torch.manual_seed(15)
    config = ModelConfig(
        vocab_size=32, d_model=D, n_layers=3, mixer={"kind": "attention", "n_heads": 2}, ffn={"kind": "swiglu", "hidden": 16},
        layer_overrides=[{"layers": [0, 2], "ffn": {"kind": "moe", "n_experts": 4, "top_k": 1, "expert_hidden": 8,
                                                    "bias_balancing": True, "bias_update_rate": 0.5}}],
    )
    model = CausalLM(config).train()
    model(torch.randint(0, 32, (2, 7)))
    loads = {i: model.blocks[i].ffn.step_load.float().clone() for i in (0, 2)}
    model.after_optimizer_step()
    for i in (0, 2):
        torch.testing.assert_close(model.blocks[i].ffn.routing_bias, 0.5 * torch.sign(loads[i].mean() - loads[i]))
        assert int(model.blocks[i].ffn.step_load.sum()) == 0


def test_bias_at_mean_load_is_unchanged():
    moe = build_moe(n_experts=2, top_k=1, bias_balancing=True, bias_update_rate=0.5).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0], moe.router.weight[1, 0] = 1.0, -1.0
    x = torch.zeros(6, D)
    x[:3, 0], x[3:, 0] = 1.0, -1.0  # three tokens each
    moe(x)
    moe.after_optimizer_step()
    assert moe.last_load.tolist() == [3, 3]
    assert moe.routing_bias.tolist() == [0.0, 0.0]


def test_bias_not_updated_in_eval_or_when_disabled():
    torch.manual_seed(12)
    x = torch.rand(3, 5, D) + 0.5
    moe = overloaded_moe(top_k=1).eval()
    moe(x)
    moe.after_optimizer_step()
    assert moe.last_load[0] == 15
    assert torch.count_nonzero(moe.routing_bias) == 0
    plain = build_moe(n_experts=4, top_k=1, bias_balancing=False, bias_update_rate=0.5).train()
    plain(x)
    plain.after_optimizer_step()
    assert torch.count_nonzero(plain.routing_bias) == 0
    assert "routing_bias" not in plain.state_dict()  # only persisted when used
    assert "routing_bias" in moe.state_dict()


@pytest.mark.parametrize(
    "case", [dict(routing="softmax_topk"), dict(routing="softmax_topk", renormalize=False), dict(routing="topk_softmax")]
)
def test_bias_changes_selection_not_combine_weights(case):
    torch.manual_seed(13)
    moe = build_moe(n_experts=4, top_k=2, bias_balancing=True, **case).eval()
    with torch.no_grad():
        moe.router.weight.normal_()
    x = torch.randn(3, 6, D)
    flat = x.reshape(-1, D)
    _, unbiased_chosen, _ = reference_route(moe, flat)
    bias = torch.tensor([0.0, 0.0, 0.0, 100.0])  # forces expert 3 into every token's selection
    moe.routing_bias.copy_(bias)
    y, _ = moe(x)
    _, chosen, weights = reference_route(moe, flat, bias)
    assert (chosen == 3).any(dim=-1).all()
    assert not torch.equal(chosen.sort(-1).values, unbiased_chosen.sort(-1).values)  # selection changed
    # combine weights come from the unbiased scores of the chosen experts
    logits = F.linear(flat, moe.router.weight).double()
    if case["routing"] == "softmax_topk":
        manual = torch.softmax(logits, -1).gather(-1, chosen)
        if case.get("renormalize", True):
            manual = manual / manual.sum(-1, keepdim=True)
    else:
        manual = torch.softmax(logits.gather(-1, chosen), -1)
    torch.testing.assert_close(weights, manual)
    ours_chosen, ours_weights = moe.route(logits.float())
    assert torch.equal(ours_chosen, chosen)
    torch.testing.assert_close(ours_weights.double(), manual, rtol=1e-5, atol=1e-7)
    # had the bias entered the weights, expert 3 would take (nearly) all of each token's weight
    biased = logits + bias.double()
    if case["routing"] == "softmax_topk":
        leaked = torch.softmax(biased, -1).gather(-1, chosen)
    else:
        leaked = torch.softmax(biased.gather(-1, chosen), -1)
    assert not torch.allclose(ours_weights.double(), leaked, atol=1e-3)
    torch.testing.assert_close(y, reference_moe(moe, x, bias), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("glu", [True, False])
def test_gradients_match_dense_reference_and_reach_router_and_used_experts(glu):
    torch.manual_seed(14)
    moe = build_moe(n_experts=5, top_k=2, glu=glu, n_shared_experts=1)
    with torch.no_grad():
        moe.router.weight.normal_()
        moe.router.weight[4] = -100 * moe.router.weight[4].abs()  # expert 4 unused on positive inputs
    x = torch.rand(2, 6, D) + 0.1
    probe = torch.randn(2, 6, D)
    (moe(x)[0] * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad()
    (reference_moe(moe, x) * probe).sum().backward()
    for name, p in moe.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    used = moe.last_load > 0
    assert not used[4] and used[:4].any()
    assert grads["router.weight"].abs().sum() > 0
    for e in range(5):
        per_expert = [grads[n][e].abs().sum() for n in ("w_gate", "w_up", "w_down") if n in grads]
        if used[e]:
            assert all(g > 0 for g in per_expert), e
        else:
            assert all(g == 0 for g in per_expert), e


# ---------------------------------------------------------------------------------------- cost model


@pytest.mark.parametrize(
    "kw", [dict(glu=True), dict(glu=False), dict(glu=True, n_shared_experts=2), dict(glu=False, n_shared_experts=1)]
)
def test_active_params_and_flops_closed_form(kw):
    E, k, h = 6, 2, 12
    moe = build_moe(n_experts=E, top_k=k, expert_hidden=h, **kw)
    mats = 3 if kw["glu"] else 2
    s = kw.get("n_shared_experts", 0)
    router = D * E
    expert = mats * D * h
    shared = mats * D * (s * h)
    assert moe.active_params() == router + k * expert + shared
    assert sum(p.numel() for p in moe.parameters()) == router + E * expert + shared
    assert moe.flops_per_token() == 2 * router + 2 * k * expert + 2 * shared


def test_model_active_params_and_flops_with_moe():
    E, k, h, L = 8, 2, 8, 2
    dense_ffn = {"kind": "glu", "hidden": h}
    common = dict(vocab_size=32, d_model=D, n_layers=L, mixer={"kind": "attention", "n_heads": 2})
    model = CausalLM(ModelConfig(**common, ffn=MoEConfig(n_experts=E, top_k=k, expert_hidden=h)))
    dense = CausalLM(ModelConfig(**common, ffn=dense_ffn))
    expert = 3 * D * h
    assert model.num_params() - model.active_params() == L * (E - k) * expert
    # an MoE layer with k experts costs k dense GLUs of the same hidden size plus the router
    assert model.flops_per_token(64) - dense.flops_per_token(64) == L * ((k - 1) * 2 * expert + 2 * D * E)


def test_moe_config_validation():
    with pytest.raises(ValueError, match="top_k=5 exceeds n_experts=4"):
        MoEConfig(n_experts=4, top_k=5)
    assert MoEConfig().resolved_hidden(128) == 384  # dense GLU default, 8/3 d rounded to 64
