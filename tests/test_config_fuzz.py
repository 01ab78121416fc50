"""Property tests over random configs (hypothesis): a model, run or sweep config either fails validation
with a :class:`ConfigError` naming the field, or it works: the model builds and one forward/backward gives
a finite loss and finite gradients. Derandomized with a fixed number of examples, so the suite stays fast
and every run checks the same configs."""

from __future__ import annotations

import math
import re
import types
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archifactory import registry
from archifactory.config import ConfigError, validate
from archifactory.errors import UnavailableError
from archifactory.model.config import LayerOverride, ModelConfig
from archifactory.model.lm import CausalLM
from archifactory.nn.init import InitConfig
from archifactory.nn.positions import RopeScaling

FUZZ = settings(max_examples=80, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Values a user might type, mostly sensible (so that many configs validate and get built), sometimes an
# edge case, a huge number, NaN or an infinity, or a value of the wrong type. Sizes stay small so that a
# model builds and runs in milliseconds.
GOOD_INTS = st.sampled_from([1, 2, 3, 4, 8, 16])
HUGE_INTS = st.sampled_from([10**12 + 1, 2**63, -(10**12)])
BAD_INTS = st.one_of(st.integers(-2, 70), HUGE_INTS)
GOOD_FLOATS = st.sampled_from([1e-5, 0.02, 0.1, 0.5, 1.0, 2.0, 4.0])
EDGE_FLOATS = st.sampled_from([-1.0, 0.0, 1e-7, 16.0, 1e6, math.nan, math.inf, -math.inf])
BAD_FLOATS = st.one_of(EDGE_FLOATS, st.floats(-4, 4, allow_nan=False))
WRONG = st.sampled_from([[1], {"a": 1}, "x", None, True])


def often(good: st.SearchStrategy, bad: st.SearchStrategy, odds: int = 6) -> st.SearchStrategy:
    """``good`` ``odds`` times out of ``odds + 1`` (one_of alone would favour its first branch)."""
    return st.integers(0, odds).flatmap(lambda i: good if i < odds else bad)


INTS = often(GOOD_INTS, BAD_INTS)
FLOATS = often(GOOD_FLOATS, BAD_FLOATS)


def value_for(annotation) -> st.SearchStrategy:
    """Values for a field of type ``annotation``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return often(st.sampled_from(args), st.just("no-such-choice"))
    if origin in (typing.Union, types.UnionType):
        return often(st.one_of(*[value_for(a) for a in args if a is not type(None)]), st.none(), odds=2)
    if origin is typing.Annotated:
        return value_for(args[0])
    if annotation is bool:
        return often(st.booleans(), st.just("maybe"))
    if annotation is int:
        return INTS
    if annotation is float:
        return FLOATS
    return WRONG


def component(reg: registry.Registry, extra=None) -> st.SearchStrategy:
    """A mapping ``{kind: ..., field: value, ...}`` setting 0-2 of the kind's fields, or a bad kind."""

    def fields_of(kind: str) -> st.SearchStrategy:
        cls = reg.get(kind)
        names = sorted(n for n in cls.model_fields if n != "kind")
        if not names:
            return st.just({"kind": kind})
        strategies = {n: extra[n] if extra and n in extra else value_for(cls.model_fields[n].annotation)
                      for n in names}
        return st.lists(st.sampled_from(names), max_size=2, unique=True).flatmap(
            lambda chosen: st.fixed_dictionaries({"kind": st.just(kind), **{n: strategies[n] for n in chosen}})
        )

    good = st.sampled_from(reg.kinds()).flatmap(fields_of)
    bad = st.sampled_from([["attention"], 3, None, "no-such-kind", {"kind": "x"}]).map(lambda k: {"kind": k})
    return often(good, bad, odds=10)


def scaling() -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {"type": st.sampled_from(["linear", "ntk", "yarn"]), "factor": st.sampled_from([1.0, 2.0, 4.0, 0.5])},
        optional={n: value_for(RopeScaling.model_fields[n].annotation)
                  for n in ("original_max_seq_len", "beta_fast", "beta_slow", "attention_factor")},
    )


def model_data() -> st.SearchStrategy:
    sizes = lambda values: often(st.sampled_from(values), st.one_of(BAD_INTS, WRONG), odds=10)  # noqa: E731
    override = st.fixed_dictionaries(
        {},
        optional={"layers": st.lists(st.integers(-1, 3), max_size=2), "every": st.integers(0, 3),
                  "start": st.integers(-1, 2), "mixer": component(registry.MIXERS), "ffn": component(registry.FFNS)},
    )
    init = st.fixed_dictionaries({}, optional={n: value_for(f.annotation) for n, f in InitConfig.model_fields.items()})
    return st.fixed_dictionaries(
        {
            "vocab_size": sizes([2, 17, 64]),
            "d_model": sizes([8, 16, 24, 32]),
            "n_layers": sizes([1, 2, 3]),
        },
        optional={
            "max_seq_len": sizes([1, 4, 8, 64]),
            "mixer": component(registry.MIXERS),
            "ffn": component(registry.FFNS),
            "norm": component(registry.NORMS),
            "position": component(registry.POSITIONS, extra={"scaling": st.one_of(st.none(), scaling())}),
            "layer_overrides": st.lists(override, max_size=1),
            "residual": value_for(ModelConfig.model_fields["residual"].annotation),
            "final_norm": value_for(bool),
            "tie_embeddings": st.booleans(),
            "embedding_scale": st.one_of(FLOATS, st.just("sqrt_d_model")),
            "head_bias": st.booleans(),
            "logit_softcap": st.one_of(st.none(), FLOATS),
            "z_loss_weight": FLOATS,
            "mtp_heads": often(st.integers(0, 3), BAD_INTS),
            "mtp_loss_weight": FLOATS,
            "init": init,
        },
    )


PROBLEM = re.compile(r"^(?P<path>[A-Za-z_][\w]*(?:\.[\w]+)*): \S")


def assert_names_a_field(err: ConfigError, model_cls, root: str = "") -> None:
    """Each problem line starts with the dotted path of a field of the config (under ``root``)."""
    text = str(err)
    header, _, body = text.partition(":")
    assert header.startswith("invalid "), text
    lines = [line.strip() for line in body.strip().splitlines() if line.strip()]
    assert lines, text
    for line in lines:
        match = PROBLEM.match(line)
        assert match, f"problem without a field path: {line!r} in\n{text}"
        path = match["path"].removeprefix(root + ".") if root else match["path"]
        assert path.split(".")[0] in model_cls.model_fields, f"{path!r} is not a field in\n{text}"


def check_model(data: dict) -> None:
    try:
        cfg = validate(ModelConfig, data)
    except ConfigError as err:
        assert_names_a_field(err, ModelConfig)
        return
    torch.manual_seed(0)
    model = CausalLM(cfg)
    T = min(cfg.max_seq_len, max(8, cfg.mtp_heads + 1))
    ids = torch.randint(0, cfg.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(0))
    try:
        out = model(ids[:, :-1], targets=ids[:, 1:])
    except UnavailableError as err:  # backend: fla on a machine without CUDA: the setup, not the value
        assert "backend='fla'" in str(err)
        return
    assert torch.isfinite(out.loss), f"loss {out.loss} for\n{cfg.model_dump()}"
    out.loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients in {bad[:5]} for\n{cfg.model_dump()}"


@FUZZ
@given(model_data())
def test_random_model_configs_fail_clearly_or_train(data):
    check_model(data)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["mixer.n_heads=1000000000001"], "mixer.n_heads"),
        (["mixer.head_dim=2", "mixer.n_heads=1000000000000", "position.kind=alibi"], "mixer.n_heads"),
        (["n_layers=10000000000"], "n_layers"),
        (["d_model=1000000000000"], "d_model"),
        (["vocab_size=1000000000000"], "vocab_size"),
        (["max_seq_len=1000000000000"], "max_seq_len"),
        (["mtp_heads=1000000000"], "mtp_heads"),
        (["ffn.kind=moe", "ffn.n_experts=1000000000"], "ffn.n_experts"),
        (["mixer.kind=lstm", "mixer.n_layers=1000000000"], "mixer.n_layers"),
        (["mixer.kind=[attention]"], "mixer"),
        (["norm.kind=3"], "norm"),
        (["position.theta=0"], "position.theta"),
        (["norm.eps=-1e-5"], "norm.eps"),
        (["init.std=-0.02"], "init.std"),
        (["init.std=.nan"], "init.std"),
        (["init.embedding_std=.inf"], "init.embedding_std"),
        (["logit_softcap=.inf"], "logit_softcap"),
        (["embedding_scale=.inf"], "embedding_scale"),
        (["z_loss_weight=.inf"], "z_loss_weight"),
        (["position.scaling={type: yarn, factor: 2, original_max_seq_len: 0}"], "position.scaling.original_max_seq_len"),
        (["mixer.n_heads=64", "position.scaling={type: ntk, factor: 2}"], "mixer.head_dim"),
        (["mtp_heads=8", "max_seq_len=8"], "mtp_heads"),
    ],
)
def test_values_that_cannot_work_are_config_errors_naming_the_field(overrides, field):
    """Each used to validate and then hang, crash at build or give a NaN loss (or a raw TypeError)."""
    from archifactory.model.config import load_model_config

    with pytest.raises(ConfigError) as info:
        load_model_config("tiny", overrides)
    assert f"{field}: " in str(info.value), str(info.value)
    assert_names_a_field(info.value, ModelConfig)


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
def test_multi_token_heads_train_on_rwkv(mixer):
    """MTP blocks sit past the last layer; RWKV's depth-dependent init once went negative there (NaN)."""
    check_model({"vocab_size": 64, "d_model": 32, "n_layers": 2, "max_seq_len": 16, "mtp_heads": 3,
                 "mixer": {"kind": mixer, "n_heads": 2}, "ffn": {"kind": "rwkv6_channel_mix"}})


# -------------------------------------------------------------------------------- sweep specs, lr grids


def test_lr_grid_values_must_be_positive_and_finite():
    from archifactory.sweep.spec import SweepSpec

    spec = {"name": "s", "base": {}, "budget": {"tokens": 1}, "lr_selection_seeds": [10]}
    for lr in ("0", "-1e-3", ".nan", ".inf", "-.inf", "x"):
        data = {**spec, "variants": {"fast": {"lr": [1e-3, __import__("yaml").safe_load(lr)]}}}
        with pytest.raises(ConfigError, match=r"variants\.fast\.lr\.1: "):
            validate(SweepSpec, data)
    with pytest.raises(ConfigError, match=r"variants\.fast\.lr: "):
        validate(SweepSpec, {**spec, "variants": {"fast": {"lr": []}}})
    assert validate(SweepSpec, {**spec, "variants": {"fast": {"lr": [1e-3, 3e-3]}}}).variants["fast"].lr == [1e-3, 3e-3]
