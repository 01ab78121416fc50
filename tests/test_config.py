"""Configs: YAML round trips, dotted overrides, per-layer overrides, and errors that name the field."""

import os

import pytest
import yaml

import archifactory as af
from archifactory.config import ConfigError, apply_overrides, parse_override
from archifactory.mixers.attention import AttentionConfig
from archifactory.model.config import ModelConfig
from archifactory.model.presets import preset_names

BASE = {"vocab_size": 64, "d_model": 32, "n_layers": 4}


def build_error(data: dict, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        af.load_model_config(data, overrides)
    return str(info.value)


def test_defaults_are_llama_style():
    cfg = af.load_model_config(BASE)
    assert cfg.mixer.kind == "attention" and cfg.ffn.kind == "swiglu"
    assert cfg.norm.kind == "rmsnorm" and cfg.position.kind == "rope" and cfg.residual == "pre"


@pytest.mark.parametrize("name", preset_names())
def test_yaml_round_trip_presets(name, tmp_path):
    cfg = af.load_model_config(name)
    af.dump_config(cfg, tmp_path / "c.yaml")
    again = af.load_model_config(tmp_path / "c.yaml")
    assert again == cfg
    assert af.to_yaml(again) == af.to_yaml(cfg)


def test_yaml_round_trip_hybrid(tmp_path):
    data = {
        **BASE,
        "mixer": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True},
        "ffn": {"kind": "moe", "n_experts": 4, "top_k": 2, "n_shared_experts": 1},
        "layer_overrides": [
            {"every": 2, "mixer": {"kind": "attention", "n_heads": 2, "window": 8}},
            {"layers": [0], "ffn": {"kind": "mlp", "activation": "relu2"}},
        ],
        "position": {"kind": "rope", "theta": 5e5, "scaling": {"type": "yarn", "factor": 4, "original_max_seq_len": 64}},
        "norm": "layernorm",
    }
    cfg = af.load_model_config(data)
    af.dump_config(cfg, tmp_path / "c.yaml")
    assert af.load_model_config(tmp_path / "c.yaml") == cfg
    assert yaml.safe_load(af.to_yaml(cfg))["norm"] == {"kind": "layernorm", "eps": 1e-5, "bias": True}


def test_parse_override_values_are_yaml():
    assert parse_override("mixer.n_kv_heads=2") == (["mixer", "n_kv_heads"], 2)
    assert parse_override("a=0.5")[1] == 0.5
    assert parse_override("a=true")[1] is True
    assert parse_override("a=null")[1] is None
    assert parse_override("a=[1, 2]")[1] == [1, 2]
    assert parse_override("a={kind: mlp}")[1] == {"kind": "mlp"}
    assert parse_override("a=b=c")[1] == "b=c"
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("mixer.n_heads")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("mixer..n_heads=2")


def test_overrides_apply_and_do_not_mutate():
    data = {**BASE, "mixer": {"kind": "attention", "n_heads": 4}, "norm": "rmsnorm"}
    out = apply_overrides(data, ["mixer.n_kv_heads=2", "norm.eps=1e-5", "position.kind=alibi"])
    assert out["mixer"] == {"kind": "attention", "n_heads": 4, "n_kv_heads": 2}
    assert out["norm"] == {"kind": "rmsnorm", "eps": 1e-5}
    assert out["position"] == {"kind": "alibi"}
    assert data["mixer"] == {"kind": "attention", "n_heads": 4} and data["norm"] == "rmsnorm"
    cfg = af.load_model_config(data, ["mixer.n_kv_heads=1", "mixer.window=16"])
    assert cfg.mixer.kv_heads == 1 and cfg.mixer.window == 16


def test_override_list_index():
    data = {**BASE, "layer_overrides": [{"layers": [1], "ffn": {"kind": "mlp"}}]}
    cfg = af.load_model_config(data, ["layer_overrides.0.ffn.activation=relu"])
    assert cfg.layer_configs()[1].ffn.activation == "relu"
    with pytest.raises(ConfigError, match="index 3 out of range"):
        apply_overrides(data, ["layer_overrides.3.ffn.kind=mlp"])


def test_per_layer_overrides_make_hybrids():
    data = {
        **BASE,
        "n_layers": 8,
        "layer_overrides": [
            {"every": 4, "mixer": {"kind": "attention", "n_heads": 2, "window": 16}},
            {"layers": [0, 5], "ffn": {"kind": "mlp"}},
        ],
    }
    cfg = af.load_model_config(data)
    layers = cfg.layer_configs()
    assert [i for i, layer in enumerate(layers) if layer.mixer.window == 16] == [3, 7]
    assert [i for i, layer in enumerate(layers) if layer.ffn.kind == "mlp"] == [0, 5]
    model = af.CausalLM(cfg)
    assert model.blocks[3].mixer.window == 16 and model.blocks[2].mixer.window is None
    assert type(model.blocks[5].ffn).__name__ == "MLP" and type(model.blocks[4].ffn).__name__ == "GLU"
    assert af.load_model_config(data, ["layer_overrides.0.start=0"]).layer_configs()[0].mixer.window == 16


def test_unknown_key_names_path_and_valid_keys():
    msg = build_error({**BASE, "mixer": {"kind": "attention", "nheads": 4}})
    assert "mixer.nheads: unknown key" in msg and "n_heads" in msg and "n_kv_heads" in msg
    msg = build_error({**BASE, "layer_overrides": [{"layers": [1], "ffn": {"kind": "mlp", "hiden": 8}}]})
    assert "layer_overrides.0.ffn.hiden: unknown key" in msg and "hidden" in msg
    msg = build_error({**BASE, "dmodel": 3})
    assert "dmodel: unknown key" in msg and "d_model" in msg


def test_unknown_kind_lists_valid_kinds():
    msg = build_error(BASE, ["mixer.kind=atention"])
    assert "mixer: unknown mixer kind 'atention'" in msg and "attention" in msg
    msg = build_error(BASE, ["ffn.kind=swishglu"])
    assert "ffn: unknown ffn kind 'swishglu'" in msg and "swiglu" in msg and "moe" in msg
    assert "position: unknown position kind" in build_error(BASE, ["position.kind=rotary"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["mixer.n_heads=3"], "mixer.n_heads: n_heads=3 does not divide d_model=32"),
        (["mixer.n_heads=4", "mixer.n_kv_heads=3"], "mixer.n_kv_heads: n_kv_heads=3 does not divide n_heads=4"),
        (["mixer.n_heads=4", "position.fraction=0.2"], "rotary dim = int(head_dim=8 * fraction=0.2) = 1 must be even"),
        (["mixer.n_heads=4", "mixer.head_dim=7"], "mixer.head_dim: with position kind 'rope'"),
        (["ffn.kind=moe", "ffn.n_experts=2", "ffn.top_k=3"], "top_k=3 exceeds n_experts=2"),
        (["mixer.qk_norm=true", "norm.kind=none"], "mixer.qk_norm: qk_norm=true needs a model norm"),
        (["position.scaling={type: yarn, factor: 2}"], "type=yarn needs original_max_seq_len"),
        (["layer_overrides=[{layers: [4], ffn: mlp}]"], "layer_overrides.0.layers: layer 4 does not exist"),
        (["layer_overrides=[{layers: [1], every: 2, ffn: mlp}]"], "give exactly one of `layers`"),
        (["d_model=0"], "d_model: Input should be greater than or equal to 1"),
        (["residual=preln"], "residual: Input should be 'pre', 'post', 'sandwich' or 'parallel'"),
    ],
)
def test_impossible_combinations_name_the_field(overrides, expected):
    msg = build_error(BASE, overrides)
    assert expected in msg, msg


def test_fraction_that_rounds_odd_is_rejected_but_even_accepted():
    base = {**BASE, "mixer": {"kind": "attention", "n_heads": 4}}
    assert "must be even" in build_error(base, ["position.fraction=0.375"])  # 8 * 0.375 = 3
    assert af.load_model_config(base, ["position.fraction=0.5"]).position.fraction == 0.5


def test_per_layer_override_checked_with_its_own_path():
    msg = build_error({**BASE, "layer_overrides": [{"layers": [2], "mixer": {"kind": "attention", "n_heads": 5}}]})
    assert "layer_overrides.0.mixer.n_heads: n_heads=5 does not divide d_model=32" in msg


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        af.load_model_config(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="presets: .*tiny"):
        af.load_model_config("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("vocab_size: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        af.load_model_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        af.load_model_config(bad)


def test_python_api_builds_same_as_yaml():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, mixer=AttentionConfig(n_heads=4, n_kv_heads=2))
    assert cfg == af.load_model_config({**BASE, "n_layers": 2, "mixer": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2}})


def test_changing_kind_starts_from_the_new_kinds_defaults():
    data = {**BASE, "position": {"kind": "rope", "theta": 1e6}, "ffn": {"kind": "swiglu", "hidden": 40}}
    cfg = af.load_model_config(data, ["position.kind=alibi", "ffn.kind=mlp", "ffn.activation=relu"])
    assert cfg.position.kind == "alibi" and cfg.ffn.kind == "mlp" and cfg.ffn.hidden is None
    same = af.load_model_config(data, ["position.kind=rope"])
    assert same.position.theta == 1e6  # same kind: nothing dropped


@pytest.mark.parametrize("name", ["../../x", "..", ".", "/abs/path", "a/b", "", " x", "x\n", "a\x00b",
                                  "é" * 101])
def test_names_that_would_leave_their_folder_are_errors(name, tmp_path):
    """A run or sweep name becomes a folder under runs/ or sweeps/: it may not escape it or be unusable."""
    from archifactory.config import validate
    from archifactory.sweep.spec import SweepSpec
    from archifactory.train.config import RunConfig

    run = {"name": name, "model": BASE, "train": {"max_steps": 1}}
    with pytest.raises(ConfigError, match=r"invalid RunConfig: name: .*plain name"):
        validate(RunConfig, run)
    sweep = {"name": name, "base": {}, "budget": {"tokens": 1}}
    with pytest.raises(ConfigError, match=r"invalid SweepSpec: name: "):
        validate(SweepSpec, sweep)
    with pytest.raises(ConfigError, match=r"variants: variant name"):
        validate(SweepSpec, {**sweep, "name": "ok", "variants": {name: []}})
    assert list(tmp_path.iterdir()) == []


def test_plain_names_stay_inside_and_out_dir_goes_anywhere(tmp_path):
    from archifactory.config import validate
    from archifactory.train.config import RunConfig

    for name in ("cost$\\frac{$ ..x", "..x", "x..", "-x", "~"):
        cfg = validate(RunConfig, {"name": name, "model": BASE, "train": {"max_steps": 1}})
        assert os.path.dirname(os.path.normpath(cfg.run_dir())) == "runs", name
    outside = tmp_path.parent / "elsewhere"
    cfg = validate(RunConfig, {"name": "x", "out_dir": str(outside), "model": BASE, "train": {"max_steps": 1}})
    assert cfg.run_dir() == outside


def test_switching_optimizer_starts_from_its_defaults_and_keeps_lr():
    """Like a component's kind: `optimizer.name=adam` must not inherit AdamW's weight_decay 0.1 (an L2 term
    for Adam), nor Muon's fields; the learning rate (what a sweep's lr grid sets) is kept."""
    from archifactory.train import load_run_config

    base = {"model": "tiny", "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.99]},
            "train": {"max_steps": 1}}
    cfg = load_run_config(base, ["optimizer.name=adam"])
    assert cfg.optimizer.name == "adam" and cfg.optimizer.lr == 1e-3 and cfg.optimizer.weight_decay == 0.0
    cfg = load_run_config(base, ["optimizer.name=sgd"])  # betas is not an SGD field: dropped, not an error
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.lr == 1e-3
    assert load_run_config(base, ["optimizer.name=adamw"]).optimizer.weight_decay == 0.1  # same name: refined
    assert apply_overrides({"name": "run", "x": 1}, ["name=other"]) == {"name": "other", "x": 1}  # a run's name
