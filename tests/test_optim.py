"""Optimizer roles declared by components, optimizers and schedules as typed components, and
schedule-free runs that save the weights they evaluate.

- every parameter of every registered component (mixers, FFNs, norms, positions, the LM's embedding and
  head) has a declared role; an undeclared one is an error naming it;
- the declared roles reproduce the reference trainers' choices: RWKV-LM's ``configure_optimizers``
  (x060, x070) rule applied to the reference's parameter names, and the ``_no_weight_decay`` flags of
  fla's GatedDeltaNet and Mamba2 layers;
- Muon's defaults and the same values set explicitly give identical updates, equal to torch.optim.Muon's
  own; a field an optimizer cannot honour is a validation error naming it;
- Adam-mini partitions each attention layer by its own head count;
- C-AdamW and fully decoupled AdamW (decay independent of the peak rate) equal their papers' updates
  computed by hand on fixed gradients;
- schedule-free: the saved model scores the reported validation loss, and resume stays exact.
"""

import json
import math

import pytest
import torch
from torch import nn

import archifactory as af
from archifactory.config import BuildContext, ConfigError
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import RMSNormConfig
from archifactory.nn.positions import RoPEConfig
from archifactory.nn.roles import ParamRole, UndeclaredRoleError, parameter_roles
from archifactory.registry import FFNS, MIXERS, NORMS, OPTIMIZERS, POSITIONS, SCHEDULES
from archifactory.train import Trainer, load_run_config, train
from archifactory.train.metrics import read_metrics
from archifactory.train.optim import DECAYED_ROLES, MuonConfig, ParamGroups, build_optimizer, optimizer_config

D = 32


def ctx(layer_idx=0):
    return BuildContext(d_model=D, n_layers=2, layer_idx=layer_idx, max_seq_len=64, norm=RMSNormConfig(),
                        position=RoPEConfig(), init=InitConfig())


def decayed(module: nn.Module) -> set[str]:
    return {n for n, r in parameter_roles(module).items() if r in DECAYED_ROLES}


# ------------------------------------------------------------------------------------ every component

COMPONENTS = (
    [pytest.param(cfg, id=f"mixer-{k}-{i}") for k, c in MIXERS.items() for i, cfg in enumerate(c.contract_examples(D))]
    + [pytest.param(c(), id=f"ffn-{k}") for k, c in FFNS.items()]
)


@pytest.mark.parametrize("cfg", COMPONENTS)
@pytest.mark.parametrize("layer_idx", [0, 1])  # some parts exist only after the first layer (RWKV-7's v mix)
def test_every_parameter_of_every_mixer_and_ffn_has_a_declared_role(cfg, layer_idx):
    module = cfg.build(ctx(layer_idx))
    roles = parameter_roles(module)
    assert set(roles) == {n for n, _ in module.named_parameters()}
    for name, p in module.named_parameters():
        if roles[name] is ParamRole.MATRIX:
            assert p.dim() == 2, f"{name} is declared a matrix but has shape {tuple(p.shape)}"


@pytest.mark.parametrize("kind", NORMS.kinds())
def test_every_norm_declares_its_parameters(kind):
    norm = NORMS.get(kind)().build_for(D)
    assert set(parameter_roles(norm).values()) <= {ParamRole.VECTOR}
    assert set(parameter_roles(norm)) == {n for n, _ in norm.named_parameters()}


@pytest.mark.parametrize("kind", POSITIONS.kinds())
@pytest.mark.parametrize("tie", [False, True])
def test_lm_embedding_head_and_every_position_have_roles(kind, tie):
    model = af.CausalLM(af.load_model_config({
        "vocab_size": 64, "d_model": D, "n_layers": 1, "max_seq_len": 32, "position": {"kind": kind},
        "mixer": {"kind": "attention", "n_heads": 2}, "tie_embeddings": tie, "head_bias": True, "mtp_heads": 1,
    }))
    roles = parameter_roles(model)
    assert roles["embed.weight"] is ParamRole.EMBEDDING
    assert roles["lm_head.bias"] is ParamRole.VECTOR
    assert ("lm_head.weight" in roles) is not tie  # tied: one tensor, the embedding
    if not tie:
        assert roles["lm_head.weight"] is ParamRole.HEAD
    if kind == "learned":
        assert roles["pos_embed.weight"] is ParamRole.EMBEDDING
    assert roles["final_norm.weight"] is ParamRole.VECTOR


def test_a_parameter_nobody_declared_is_an_error_naming_it():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.mix = nn.Parameter(torch.zeros(2, 4))

    with pytest.raises(UndeclaredRoleError, match=r"no optimizer role declared for mix \(2, 4\)"):
        parameter_roles(Odd())

    class Typo(Odd):
        def param_roles(self):
            return {"mixx": ParamRole.VECTOR}

    with pytest.raises(UndeclaredRoleError, match="declares mixx, which is not a parameter"):
        parameter_roles(Typo())


# ------------------------------------------------------------------------------------ the references


def rwkv_lm_x060_decays(name: str, shape: tuple[int, ...]) -> bool:
    """RWKV-LM, RWKV-v5/src/model.py ``configure_optimizers`` with its default ``layerwise_lr=1``."""
    if any(s in name for s in ("_w1", "_w2", "time_mix", "time_maa", "time_decay", "time_daaaa", "time_faaaa",
                               "time_first")):
        return False
    return len([s for s in shape if s != 1]) >= 2


def rwkv_lm_x070_decays(name: str, shape: tuple[int, ...]) -> bool:
    """RWKV-LM, RWKV-v7/train_temp/src/model.py ``configure_optimizers``."""
    return "att.w0" not in name and len([s for s in shape if s != 1]) >= 2 and ".weight" in name


# our name -> (RWKV-LM name, RWKV-LM shape) at d_model C=32, H heads of N, LoRA rank R
C, R = 32, 8
RWKV6_NAMES = {
    "mu_x": ("att.time_maa_x", (1, 1, C)), "lerp_lambda": ("att.time_maa_w", (1, 1, C)),
    "lerp_down.weight": ("att.time_maa_w1", (C, 5 * R)), "lerp_up": ("att.time_maa_w2", (5, R, C)),
    "decay_lambda": ("att.time_decay", (1, 1, C)), "decay_down.weight": ("att.time_decay_w1", (C, 64)),
    "decay_up.weight": ("att.time_decay_w2", (64, C)), "bonus": ("att.time_faaaa", (4, 8)),
    "q_proj.weight": ("att.receptance.weight", (C, C)), "k_proj.weight": ("att.key.weight", (C, C)),
    "v_proj.weight": ("att.value.weight", (C, C)), "o_proj.weight": ("att.output.weight", (C, C)),
    "g_proj.weight": ("att.gate.weight", (C, C)), "norm.weight": ("att.ln_x.weight", (C,)),
    "norm.bias": ("att.ln_x.bias", (C,)),
}
RWKV6_FFN_NAMES = {
    "mu_k": ("ffn.time_maa_k", (1, 1, C)), "mu_r": ("ffn.time_maa_r", (1, 1, C)),
    "key.weight": ("ffn.key.weight", (4 * C, C)), "value.weight": ("ffn.value.weight", (C, 4 * C)),
    "receptance.weight": ("ffn.receptance.weight", (C, C)),
}
RWKV7_NAMES = {
    "token_mix": ("att.x_r", (1, 1, C)), "k_k": ("att.k_k", (1, 1, C)), "k_a": ("att.k_a", (1, 1, C)),
    "r_k": ("att.r_k", (4, 8)), "norm_weight": ("att.ln_x.weight", (C,)), "norm_bias": ("att.ln_x.bias", (C,)),
    "r_proj.weight": ("att.receptance.weight", (C, C)), "k_proj.weight": ("att.key.weight", (C, C)),
    "v_proj.weight": ("att.value.weight", (C, C)), "o_proj.weight": ("att.output.weight", (C, C)),
    "decay.down.weight": ("att.w1", (C, R)), "decay.up.weight": ("att.w2", (R, C)), "decay.up.bias": ("att.w0", (1, 1, C)),
    "iclr.down.weight": ("att.a1", (C, R)), "iclr.up.weight": ("att.a2", (R, C)), "iclr.up.bias": ("att.a0", (1, 1, C)),
    "gate.down.weight": ("att.g1", (C, R)), "gate.up.weight": ("att.g2", (R, C)),
    "value_mix.down.weight": ("att.v1", (C, R)), "value_mix.up.weight": ("att.v2", (R, C)),
    "value_mix.up.bias": ("att.v0", (1, 1, C)),
}


@pytest.mark.parametrize(("kind", "names", "rule"), [
    ("rwkv6", RWKV6_NAMES, rwkv_lm_x060_decays),
    ("rwkv7", RWKV7_NAMES, rwkv_lm_x070_decays),
])
def test_rwkv_decay_matches_rwkv_lm_configure_optimizers(kind, names, rule):
    mixer = MIXERS.get(kind)(n_heads=4).build(ctx(layer_idx=1))
    roles = parameter_roles(mixer)
    assert set(roles) <= set(names), f"map {set(roles) - set(names)} to RWKV-LM names"
    expected = {n for n in roles if rule(*names[n])}
    assert decayed(mixer) == expected
    assert {"lerp_lambda", "bonus", "token_mix", "r_k"} & set(roles) <= {n for n, r in roles.items() if r is ParamRole.VECTOR}


def test_rwkv6_channel_mix_decay_matches_rwkv_lm():
    ffn = FFNS.get("rwkv6_channel_mix")().build(ctx())
    roles = parameter_roles(ffn)
    assert decayed(ffn) == {n for n in roles if rwkv_lm_x060_decays(*RWKV6_FFN_NAMES[n])}


def test_rwkv7_channel_mix_decay_matches_rwkv_lm():
    ffn = FFNS.get("rwkv7_channel_mix")().build(ctx())
    roles = parameter_roles(ffn)
    names = {"mu_k": ("ffn.x_k", (1, 1, C)), "key.weight": ("ffn.key.weight", (4 * C, C)),
             "value.weight": ("ffn.value.weight", (C, 4 * C))}
    assert set(roles) == set(names)
    assert decayed(ffn) == {n for n in roles if rwkv_lm_x070_decays(*names[n])}


def test_no_weight_decay_flags_of_the_fla_layers_are_vectors_here():
    """fla's GatedDeltaNet and Mamba2 layers (the latter as mamba_ssm's) mark their decay and skip
    parameters ``_no_weight_decay``."""
    from fla.layers import GatedDeltaNet
    from fla.layers.mamba2 import Mamba2

    cases = [
        (GatedDeltaNet(hidden_size=D, num_heads=2, head_dim=16, mode="chunk"), MIXERS.get("gated_deltanet")(n_heads=2)),
        (Mamba2(hidden_size=D, num_heads=4, head_dim=16, state_size=16, n_groups=1), MIXERS.get("mamba2")()),
    ]
    for reference, cfg in cases:
        flagged = {n for n, p in reference.named_parameters() if getattr(p, "_no_weight_decay", False)}
        assert flagged, type(reference).__name__
        ours = {n.rsplit(".", 1)[-1]: r for n, r in parameter_roles(cfg.build(ctx())).items()}
        assert all(ours[n] is ParamRole.VECTOR for n in flagged), (type(reference).__name__, flagged)


def test_coefficients_and_filters_get_neither_muon_nor_weight_decay_by_default():
    """The parameters the issue names: RWKV-6 lerp_lambda/bonus, RWKV-7 token_mix/r_k, KV-shift mixing
    weights (4x2) take no decay and no Muon; DeltaNet's depthwise kernels take no Muon."""
    for mixer, vectors, filters in [
        ({"kind": "rwkv6", "n_heads": 2}, ["lerp_lambda", "bonus"], []),
        ({"kind": "rwkv7", "n_heads": 2}, ["token_mix", "r_k"], []),
        ({"kind": "kv_shift", "n_heads": 4}, ["k_shift", "v_shift"], []),
        ({"kind": "gated_deltanet", "n_heads": 2}, ["A_log", "dt_bias"], ["conv.weight"]),
    ]:
        model = af.CausalLM(af.load_model_config({"vocab_size": 64, "d_model": D, "n_layers": 1, "max_seq_len": 32,
                                                  "mixer": mixer}))
        opt = build_optimizer(model, MuonConfig())
        names = {id(p): n for n, p in model.named_parameters()}
        muon = {names[id(p)] for g in opt.optimizers[0].param_groups for p in g["params"]}
        decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        for leaf in vectors + filters:
            full = f"blocks.0.mixer.{leaf}"
            assert full not in muon, full
            assert (full in decay) is (leaf in filters), full
        assert "blocks.0.mixer.o_proj.weight" in muon and "lm_head.weight" not in muon


# ------------------------------------------------------------------------------------------ optimizers

WIDE = {"vocab_size": 64, "d_model": 128, "n_layers": 1, "max_seq_len": 32,
        "mixer": {"kind": "attention", "n_heads": 4}, "ffn": {"kind": "swiglu", "hidden": 256}}


def one_step(cfg, model_cfg=WIDE):
    torch.manual_seed(0)
    model = af.CausalLM(af.load_model_config(model_cfg))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg)
    ids = torch.randint(0, 64, (2, 17))
    for _ in range(2):  # two steps, so that momentum matters
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, model, before


def test_muon_defaults_and_the_same_values_set_explicitly_give_identical_updates():
    default, _, _ = one_step(MuonConfig())
    explicit, _, _ = one_step(optimizer_config({"name": "muon", "muon_lr": 0.02, "momentum": 0.95, "nesterov": True,
                                                "adjust_lr": "original", "weight_decay": 0.1}))
    assert all(torch.equal(default[n], explicit[n]) for n in default)


SMALL = {"vocab_size": 64, "d_model": D, "n_layers": 1, "max_seq_len": 32, "mixer": {"kind": "attention", "n_heads": 4}}


@pytest.mark.parametrize("name", OPTIMIZERS.kinds())
def test_every_optimizers_defaults_equal_the_same_values_set_explicitly(name):
    """A default means one value: spelling every field out (as config.yaml records it) changes nothing."""
    default = optimizer_config(name)
    explicit = optimizer_config(json.loads(default.model_dump_json()))
    a, _, _ = one_step(default, SMALL)
    b, _, _ = one_step(explicit, SMALL)
    assert all(torch.equal(a[n], b[n]) for n in a) and any(a[n].abs().max() > 0 for n in a)


@pytest.mark.parametrize(("fields", "torch_kwargs"), [
    ({}, {"lr": 0.02, "adjust_lr_fn": None}),  # Jordan et al.'s rate and scaling
    ({"muon_lr": 3e-3, "adjust_lr": "match_rms_adamw"}, {"lr": 3e-3, "adjust_lr_fn": "match_rms_adamw"}),
])
def test_muon_first_update_equals_torch_muon(fields, torch_kwargs):
    """The q_proj update equals torch.optim.Muon's on that matrix alone, with the same settings."""
    ours, _, _ = _first_update(optimizer_config({"name": "muon", **fields}))
    torch.manual_seed(0)
    ref_model = af.CausalLM(af.load_model_config(WIDE))
    q = ref_model.blocks[0].mixer.q_proj.weight
    start = q.detach().clone()
    reference = torch.optim.Muon([q], weight_decay=0.1, momentum=0.95, **torch_kwargs)
    ids = torch.randint(0, 64, (2, 17))
    ref_model(ids[:, :-1], ids[:, 1:]).loss.backward()
    reference.step()
    assert torch.equal(ours["blocks.0.mixer.q_proj.weight"], q.detach() - start)


def test_muon_momentum_and_nesterov_are_honoured():
    model = af.CausalLM(af.load_model_config(WIDE))
    muon = build_optimizer(model, optimizer_config({"name": "muon", "momentum": 0.5, "nesterov": False,
                                                    "ns_steps": 3})).optimizers[0]
    assert {(g["momentum"], g["nesterov"], g["ns_steps"]) for g in muon.param_groups} == {(0.5, False, 3)}
    slow, _, _ = one_step(optimizer_config({"name": "muon", "momentum": 0.5}))
    fast, _, _ = one_step(MuonConfig())
    assert not torch.equal(slow["blocks.0.mixer.q_proj.weight"], fast["blocks.0.mixer.q_proj.weight"])


def _first_update(cfg):
    torch.manual_seed(0)
    model = af.CausalLM(af.load_model_config(WIDE))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg)
    ids = torch.randint(0, 64, (2, 17))
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, model, before


def test_adam_honours_weight_decay_on_decayed_roles_only():
    plain, _, _ = _first_update(optimizer_config({"name": "adam", "lr": 1e-3}))
    l2, model, before = _first_update(optimizer_config({"name": "adam", "lr": 1e-3, "weight_decay": 0.5}))
    roles = parameter_roles(model)
    for name in plain:
        changed = not torch.equal(plain[name], l2[name])
        assert changed is (roles[name] in DECAYED_ROLES), name
    # against torch.optim.Adam on one decayed matrix: the same L2 term
    torch.manual_seed(0)
    ref = af.CausalLM(af.load_model_config(WIDE))
    w = ref.blocks[0].ffn.up_proj.weight
    start = w.detach().clone()
    opt = torch.optim.Adam([w], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.5)
    ids = torch.randint(0, 64, (2, 17))
    ref(ids[:, :-1], ids[:, 1:]).loss.backward()
    opt.step()
    assert torch.equal(l2["blocks.0.ffn.up_proj.weight"], w.detach() - start)


@pytest.mark.parametrize(("data", "field"), [
    ({"name": "adamw", "momentum": 0.9}, "momentum"),
    ({"name": "adamw", "muon_lr": 0.02}, "muon_lr"),
    ({"name": "lion", "eps": 1e-6}, "eps"),
    ({"name": "sgd", "betas": [0.9, 0.99]}, "betas"),
    ({"name": "muon", "extra": {}}, "extra"),
])
def test_a_field_an_optimizer_cannot_honour_is_an_error_naming_it(data, field):
    with pytest.raises(ConfigError, match=rf"optimizer\.{field}: unknown key"):
        optimizer_config(data)
    with pytest.raises(ConfigError, match=rf"optimizer\.{field}: unknown key"):
        load_run_config({"model": "tiny", "train": {"max_steps": 1}, "optimizer": data})


def test_existing_yaml_and_lr_override_keep_working():
    cfg = load_run_config("configs/runs/shakespeare-tiny.yaml", ["optimizer.lr=1e-3"])
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == 1e-3 and cfg.optimizer.weight_decay == 0.1
    cfg = load_run_config({"model": "tiny", "train": {"max_steps": 1}}, ["optimizer.lr=2e-3", "schedule.warmup_steps=3"])
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.schedule.kind, cfg.schedule.warmup_steps) == ("adamw", 2e-3, "cosine", 3)
    cfg = load_run_config({"model": "tiny", "train": {"max_steps": 1}, "optimizer": {"name": "muon", "momentum": 0.9}})
    assert load_run_config(json.loads(cfg.model_dump_json())) == cfg
    with pytest.raises(ConfigError, match="schedule.decay_fraction: unknown key"):
        load_run_config({"model": "tiny", "train": {"max_steps": 1}, "schedule": {"kind": "cosine", "decay_fraction": 0.2}})
    assert set(OPTIMIZERS.kinds()) >= {"adamw", "adam", "sgd", "muon", "lion", "soap", "ademamix", "adopt", "mars",
                                       "adam_mini", "schedulefree_adamw"}
    assert SCHEDULES.kinds() == ["constant", "cosine", "linear", "wsd"]


def test_adam_mini_takes_each_layers_head_count():
    from pytorch_optimizer import AdamMini

    uniform = {"vocab_size": 64, "d_model": D, "n_layers": 2, "max_seq_len": 32, "mixer": {"kind": "attention", "n_heads": 4}}
    model = af.CausalLM(af.load_model_config(uniform))
    ours = build_optimizer(model, optimizer_config("adam_mini"))
    library = AdamMini(model, num_embeds=D, num_heads=4)  # the library's own block size, right for this model
    assert [g.get("parameter_per_head") for g in ours.param_groups] == [g.get("parameter_per_head") for g in library.param_groups]
    hybrid = {**uniform, "layer_overrides": [{"layers": [0], "mixer": {"kind": "attention", "n_heads": 2}}]}
    model = af.CausalLM(af.load_model_config(hybrid))
    groups = {g["name"]: g for g in build_optimizer(model, optimizer_config("adam_mini")).param_groups}
    assert groups["blocks.0.mixer.q_proj.weight"]["parameter_per_head"] == D * D // 2
    assert groups["blocks.1.mixer.q_proj.weight"]["parameter_per_head"] == D * D // 4
    assert groups["final_norm.weight"]["weight_decay"] == 0.0 and groups["blocks.0.mixer.q_proj.weight"]["weight_decay"] == 0.1


def test_schedule_configs_are_registered_components():
    cosine = load_run_config({"model": "tiny", "train": {"max_steps": 1},
                              "schedule": {"kind": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1}}).schedule
    assert cosine.multiplier(60, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine.multiplier(35, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))


# --------------------------------------------------------------------------------------- schedule-free


def sf_config(tmp_path, name, **train_fields):
    from test_train import run_config

    cfg = run_config(tmp_path, name, **{"max_steps": 8, "eval_every": 4, "checkpoint_every": 4, **train_fields})
    cfg["optimizer"] = {"name": "schedulefree_adamw", "lr": 1e-2}
    cfg["schedule"] = {"kind": "constant", "warmup_steps": 0}
    return cfg


def test_schedule_free_saved_model_scores_the_reported_val_loss_and_resume_is_exact(tmp_path):
    summary = train(load_run_config(sf_config(tmp_path, "whole")))
    # the saved model, evaluated afresh, scores what the run reported
    check = Trainer(load_run_config(sf_config(tmp_path, "check")), resume=False)
    check.setup()
    check.model.load_state_dict(af.CausalLM.from_pretrained(tmp_path / "whole" / "model").state_dict())
    assert check.evaluate()["val_loss"] == summary["val_loss"]
    # so does the step-4 checkpoint, against the step-4 evaluation
    from archifactory.train import checkpoint as ckpt

    ckpt.load_checkpoint(tmp_path / "whole" / "checkpoints" / "step_00000004", check.model, "cpu")
    at4 = [r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if r["kind"] == "eval" and r["step"] == 4]
    assert check.evaluate()["val_loss"] == at4[0]["val_loss"]
    # stopped at step 4 and resumed: every loss and the final evaluation are the same floats
    train(load_run_config(sf_config(tmp_path, "resumed", max_steps=4)))
    resumed = train(load_run_config(sf_config(tmp_path, "resumed")))
    losses = [{r["step"]: r["loss"] for r in read_metrics(tmp_path / n / "metrics.jsonl") if r["kind"] == "train"}
              for n in ("whole", "resumed")]
    assert losses[0] == losses[1] and sorted(losses[0]) == list(range(1, 9))
    assert resumed["val_loss"] == summary["val_loss"]


def test_param_groups_record_roles():
    model = af.CausalLM(af.load_model_config({"vocab_size": 64, "d_model": D, "n_layers": 1, "max_seq_len": 32,
                                              "mixer": {"kind": "rwkv7", "n_heads": 2}, "tie_embeddings": False}))
    opt = build_optimizer(model, optimizer_config({"name": "adamw", "weight_decay": 0.1}))
    by_role = {g["role"]: g["weight_decay"] for g in opt.param_groups}
    assert by_role == {"matrix": 0.1, "head": 0.1, "embedding": 0.0, "vector": 0.0}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    groups = ParamGroups.from_model(model)
    assert groups.role_of(model.blocks[0].mixer.token_mix) is ParamRole.VECTOR


# ------------------------------------------------------------------ C-AdamW and fully decoupled AdamW


def _adam_direction(grads, betas, eps):
    """Adam's u_t = m_hat / (sqrt(v_hat) + eps) after the gradients ``grads``, by hand in float64
    (Kingma & Ba 2015, Algorithm 1; torch adds eps after dividing sqrt(v) by sqrt(1 - beta2^t))."""
    b1, b2 = betas
    m = v = torch.zeros_like(grads[0], dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
    return (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)


def _steps(cfg, start, grads, multipliers=None):
    """Run ``cfg`` on one decayed matrix (a Linear's weight) with fixed gradients; the weights after each step."""
    layer = nn.Linear(start.shape[1], start.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(start)
    opt = build_optimizer(layer, cfg)
    out = []
    for i, g in enumerate(grads):
        if multipliers is not None:
            af.train.optim.set_lr(opt, multipliers[i])
        layer.weight.grad = g.clone()
        opt.step()
        out.append(layer.weight.detach().clone().double())
    return out, opt


def test_cautious_adamw_matches_the_papers_update_by_hand():
    """Liang et al. 2024, Alg. 2: u masked to the entries where u * g > 0, scaled by d / (kept + 1),
    then theta -= lr * lambda * theta. The second gradient flips some signs against the momentum."""
    torch.manual_seed(0)
    start = torch.randn(4, 6)
    g1 = torch.randn(4, 6)
    g2 = torch.where(torch.rand(4, 6) < 0.4, -0.3 * g1, torch.randn(4, 6))
    lr, wd, betas, eps = 0.01, 0.1, (0.9, 0.95), 1e-8
    cfg = optimizer_config({"name": "cadamw", "lr": lr, "weight_decay": wd})
    (w1, w2), opt = _steps(cfg, start, [g1, g2])
    theta = start.double()
    for t, g in enumerate([g1, g2], start=1):
        u = _adam_direction([g1, g2][:t], betas, eps)
        keep = (u * g.double() > 0).double()
        theta = (theta - lr * u * keep * keep.numel() / (keep.sum() + 1)) * (1 - lr * wd)
        got = (w1, w2)[t - 1]
        torch.testing.assert_close(got, theta, rtol=0, atol=1e-6)
        if t == 2:
            assert 0 < keep.sum() < keep.numel()  # the mask really removed entries
    # and it is not plain AdamW on this data
    (_, a2), _ = _steps(optimizer_config({"name": "adamw", "lr": lr, "weight_decay": wd}), start, [g1, g2])
    assert (a2 - w2).abs().max() > 1e-3
    assert set(opt.state[next(iter(opt.state))]) >= {"exp_avg", "exp_avg_sq"}  # AdamW's state


def test_decoupled_adamw_decays_by_lambda_times_the_schedule_not_the_learning_rate():
    """Loshchilov & Hutter 2019, Alg. 2: theta - eta_t * (alpha * u + lambda * theta), by hand, for two peak
    rates alpha and a schedule multiplier eta_t: the decay term is the same for both rates."""
    torch.manual_seed(1)
    start, g = torch.randn(3, 5), torch.randn(3, 5)
    lam, betas, eps, eta = 2e-3, (0.9, 0.95), 1e-8, [1.0, 0.5]
    decay_terms = []
    for alpha in (1e-3, 1e-2):
        cfg = optimizer_config({"name": "decoupled_adamw", "lr": alpha, "weight_decay": lam})
        got, _ = _steps(cfg, start, [g, g], multipliers=eta)
        theta = start.double()
        for t in (1, 2):
            u = _adam_direction([g] * t, betas, eps)
            theta = theta - eta[t - 1] * (alpha * u + lam * theta)
            torch.testing.assert_close(got[t - 1], theta, rtol=0, atol=1e-6)
        # decay alone: weights with a zero gradient shrink by (1 - eta lambda) whatever alpha is
        still, _ = _steps(cfg, start, [torch.zeros_like(g)], multipliers=[0.5])
        decay_terms.append(still[0])
    torch.testing.assert_close(decay_terms[0], decay_terms[1], rtol=0, atol=0)
    torch.testing.assert_close(decay_terms[0], start.double() * (1 - 0.5 * lam), rtol=1e-7, atol=0)
    with pytest.raises(ConfigError, match="weight_decay"):
        optimizer_config({"name": "decoupled_adamw", "weight_decay": 1.5})
