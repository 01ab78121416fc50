"""Property tests over random configs (hypothesis): a model, run or sweep config either fails validation
with a :class:`ConfigError` naming the field, or it works: the model builds and one forward/backward gives
a finite loss and finite gradients. Derandomized with a fixed number of examples, so the suite stays fast
and every run checks the same configs."""

from __future__ import annotations

import copy
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
EXTREME_FLOATS = [1e308, 1e30, 1e-300, 5e-324, -1e308, -1e-300]
"""Finite but extreme: 1e308 and 1e30 overflow once multiplied (1e308 is inf in fp32), 1e-300 and the
smallest subnormal are 0 in fp32, and negatives of both."""
HUGE_FLOATS = st.one_of(st.sampled_from(EXTREME_FLOATS), st.floats(1e30, 1e308), st.floats(-1e308, -1e30),
                        st.floats(5e-324, 1e-300))
BAD_FLOATS = st.one_of(EDGE_FLOATS, st.floats(-4, 4, allow_nan=False), HUGE_FLOATS)
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


PROBLEM = re.compile(r"^(?P<path>[A-Za-z_][\w]*(?:\.[\w]+)*)(?:: |=)\S")


def assert_names_a_field(err: ConfigError, model_cls, root: str = "") -> None:
    """The error is one line starting ``invalid <Config>``, and each of its problems starts with the
    dotted path of a field of the config (under ``root``)."""
    text = str(err)
    assert text.startswith("invalid ") and "\n" not in text, text
    assert err.problems, text
    for line in err.problems:
        match = PROBLEM.match(line)
        assert match, f"problem without a field path: {line!r} in\n{text}"
        path = match["path"].removeprefix(root + ".") if root else match["path"]
        assert path.split(".")[0] in model_cls.model_fields, f"{path!r} is not a field in\n{text}"
        assert path.split(".")[0] in text  # the one line names at least the first segment of each field


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
        (["z_loss_weight=1e308"], "z_loss_weight"),  # finite but huge: the first loss was inf
        (["init.std=1e300"], "init.std"),
        (["init.embedding_std=1e300"], "init.embedding_std"),
        (["embedding_scale=1e308"], "embedding_scale"),
        (["position.scaling={type: yarn, factor: 2, original_max_seq_len: 0}"], "position.scaling.original_max_seq_len"),
        (["mixer.n_heads=64", "position.scaling={type: ntk, factor: 2}"], "mixer.head_dim"),
        (["mtp_heads=8", "max_seq_len=8"], "mtp_heads"),
        # finite extremes that validated and then gave a non-finite first loss or gradient, or a hang
        (["mixer.scale=1e30"], "mixer.scale"),
        (["mixer.logit_softcap=1e-300"], "mixer.logit_softcap"),
        (["logit_softcap=1e308"], "logit_softcap"),
        (["mtp_heads=1", "mtp_loss_weight=1e308"], "mtp_loss_weight"),
        (["mixer={kind: gla, expand_v: 1000000}"], "mixer.expand_v"),  # allocated for minutes
        (["mixer={kind: gla, gate_logit_normalizer: 1e-300}"], "mixer.gate_logit_normalizer"),
        (["mixer={kind: retnet, rope_theta: 1e-300}"], "mixer.rope_theta"),
        (["mixer={kind: mamba2, dt_max: 1e308}"], "mixer.dt_max"),
        (["mixer={kind: diff_attention, lambda_std: 10000}"], "mixer.lambda_std"),
        (["mixer={kind: diff_attention, lambda_init: 1e30}"], "mixer.lambda_init"),
        (["ffn={kind: moe, balance_loss_weight: 1e308}"], "ffn.balance_loss_weight"),
        (["ffn={kind: moe, router_z_loss_weight: 1e308}"], "ffn.router_z_loss_weight"),
        (["position.scaling={type: linear, factor: 1e308}"], "position.scaling.factor"),  # OverflowError at build
        (["position.scaling={type: yarn, factor: 2, original_max_seq_len: 8, beta_fast: 1e308}"],
         "position.scaling.beta_fast"),  # math domain error at build
        (["position.scaling={type: yarn, factor: 2, original_max_seq_len: 8, attention_factor: 1e308}"],
         "position.scaling.attention_factor"),
    ],
)
def test_values_that_cannot_work_are_config_errors_naming_the_field(overrides, field):
    """Each used to validate and then hang, crash at build or give a NaN loss (or a raw TypeError)."""
    from archifactory.model.config import load_model_config

    with pytest.raises(ConfigError) as info:
        load_model_config("tiny", overrides)
    assert f"{field}: " in str(info.value), str(info.value)
    assert_names_a_field(info.value, ModelConfig)


def float_fields(cls) -> list[str]:
    """The fields of ``cls`` that take a float (alone, optional or in a union)."""
    def takes_float(annotation) -> bool:
        return annotation is float or any(takes_float(a) for a in typing.get_args(annotation))
    return sorted(n for n, f in cls.model_fields.items() if takes_float(f.annotation))


SMALL_MODEL = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "max_seq_len": 16}


def every_float_field() -> list[tuple[dict, tuple[str, ...]]]:
    """(a small model config using the component, the path of one of its float fields) for every float
    field of every registered mixer, FFN, norm and position, of RoPE scaling, init and the model itself."""
    cases = []
    for section, reg in (("mixer", registry.MIXERS), ("ffn", registry.FFNS), ("norm", registry.NORMS),
                         ("position", registry.POSITIONS)):
        for kind in reg.kinds():
            cls = reg.get(kind)
            part = {"kind": kind, **({"n_heads": 2} if "n_heads" in cls.model_fields else {})}
            cases += [({**SMALL_MODEL, section: part}, (section, n)) for n in float_fields(cls)]
    for kind in ("linear", "ntk", "yarn", "llama3", "dynamic"):
        scaling = {"type": kind, "factor": 2.0, "original_max_seq_len": 8}
        cases += [({**SMALL_MODEL, "position": {"kind": "rope", "scaling": scaling}}, ("position", "scaling", n))
                  for n in float_fields(RopeScaling)]
    cases += [({**SMALL_MODEL, "mtp_heads": 1}, (n,)) for n in float_fields(ModelConfig)]
    cases += [(SMALL_MODEL, ("init", n)) for n in float_fields(InitConfig)]
    return cases


def with_value(data: dict, path: tuple[str, ...], value) -> dict:
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return data


@pytest.mark.parametrize(("data", "path"), every_float_field(),
                         ids=lambda v: ".".join(v) if isinstance(v, tuple) else v.get("mixer", v.get("ffn", v.get(
                             "norm", v.get("position", {})))).get("kind", "model") if isinstance(v, dict) else str(v))
def test_every_float_field_at_its_extremes(data, path):
    """Each float field of the model config, at huge, tiny and negative finite values: a config error
    naming the field, or a model whose first loss and gradients are finite."""
    assert len(every_float_field()) > 60  # every registry was imported and walked
    for value in EXTREME_FLOATS + [-1.0, 0.0]:
        check_model(with_value(data, path, value))


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


# ------------------------------------------------------------------------------------- run configs

import archifactory.train  # noqa: E402  (registers optimizers, schedules, corpora, tokenizers)
from archifactory.train.config import DataConfig, RunConfig, TrainConfig  # noqa: E402

RUN_FUZZ = settings(FUZZ, max_examples=60)
TINY_MODEL = {"vocab_size": 257, "d_model": 16, "n_layers": 1, "max_seq_len": 32,
              "mixer": {"kind": "attention", "n_heads": 2}}
BETAS = often(st.tuples(st.sampled_from([0.0, 0.5, 0.9, 0.99]), st.sampled_from([0.9, 0.95, 0.999])),
              st.one_of(st.tuples(BAD_FLOATS, BAD_FLOATS), st.tuples(GOOD_FLOATS), WRONG))


def choose(values) -> st.SearchStrategy:
    """``sampled_from`` that says which table was empty instead of hypothesis' bare "length-zero"."""
    values = list(values)
    assert values, "a strategy was built from an empty table (a registry not imported yet?)"
    return st.sampled_from(values)


def field_value(annotation, name: str = "") -> st.SearchStrategy:
    """Like :func:`value_for`, also for tuples, lists and strings (optimizer betas, loggers, device)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return field_value(args[0], name)
    if origin is tuple:
        return BETAS if all(typing.get_origin(a) is typing.Annotated or a is float for a in args) and len(args) == 2 \
            else often(st.tuples(*[field_value(a) for a in args]), WRONG)
    if origin is list:
        inner = [field_value(a) for a in args] or [WRONG]
        return often(st.lists(inner[0], max_size=2), WRONG)
    if origin in (typing.Union, types.UnionType):
        members = [field_value(a, name) for a in args if a is not type(None)]
        return often(st.one_of(*members) if members else st.none(), st.none(), odds=2)
    if origin is typing.Literal and not args:
        return WRONG
    if annotation is str:
        return often(choose(["auto", "cpu"] if name == "device" else ["x"]), st.sampled_from(["gpu", "", "cuda:x"]))
    if origin is None and annotation not in (bool, int, float) and not isinstance(annotation, type):
        return WRONG
    return value_for(annotation)


def registered(reg: registry.Registry, only=None, skip=()) -> st.SearchStrategy:
    """``{reg.key: name, field: value, ...}`` for a registered kind (0-3 of its fields), or a bad kind."""
    key = reg.key

    def fields_of(kind: str) -> st.SearchStrategy:
        cls = reg.get(kind)
        names = sorted(n for n in cls.model_fields if n != key and n not in skip)
        if not names:
            return st.just({key: kind})
        values = {n: field_value(cls.model_fields[n].annotation, n) for n in names}
        return st.lists(choose(names), max_size=3, unique=True).flatmap(
            lambda chosen: st.fixed_dictionaries({key: st.just(kind), **{n: values[n] for n in chosen}}))

    kinds = [k for k in reg.kinds() if only is None or k in only]
    good = choose(kinds).flatmap(fields_of)
    bad = st.sampled_from([["adamw"], 3, None, "no-such-kind"]).map(lambda k: {key: k})
    return often(good, bad, odds=10)


def train_data() -> st.SearchStrategy:
    small = {  # sizes that keep one step in milliseconds; everything else any value
        "seq_len": often(st.sampled_from([4, 8, 16]), st.one_of(BAD_INTS, st.just(10**9))),
        "batch_size": often(st.sampled_from([1, 2, 4]), BAD_INTS),
        "micro_batch_size": often(st.sampled_from([None, 1, 2]), BAD_INTS),
        "max_steps": often(st.sampled_from([1, 10, 1000]), st.one_of(BAD_INTS, st.just(10**12))),
        "eval_tokens": often(st.sampled_from([8, 64]), BAD_INTS),
    }
    rest = {n: field_value(f.annotation, n) for n, f in TrainConfig.model_fields.items() if n not in small}
    return st.fixed_dictionaries({"max_steps": small.pop("max_steps")}, optional={**small, **rest})


def run_data(corpus_path: str) -> st.SearchStrategy:
    corpus = st.fixed_dictionaries(
        {"kind": st.just("files"), "paths": often(st.just([corpus_path]), st.sampled_from([[], [1], "x.csv"]))},
        optional={n: field_value(f.annotation, n) for n, f in registry.CORPORA.get("files").model_fields.items()
                  if n not in ("kind", "paths", "separator", "text_field")})
    data = st.fixed_dictionaries({"corpus": corpus, "tokenizer": st.just({"kind": "bytes"})},
                                 optional={"seed": often(st.sampled_from([0, 1]), BAD_INTS)})
    return st.fixed_dictionaries(
        {"model": st.just(TINY_MODEL), "train": train_data()},
        optional={"data": data,
                  "optimizer": registered(registry.OPTIMIZERS, skip=("decay_embeddings",)),
                  "schedule": registered(registry.SCHEDULES),
                  "name": often(st.just("fuzz"), st.sampled_from(["../x", "/abs", "", "a/b"]))},
    )


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "corpus.txt"
    path.write_text("\n<|doc|>\n".join(f"document {i}: some words to read" for i in range(40)))
    return str(path)


def check_run(data: dict, cls=RunConfig):
    """Validation fails naming a field, or the optimizer and schedule build and one step on a tiny model
    gives a finite loss (and finite weights when every rate is at most 1). Returns the config, if valid."""
    from archifactory.train.optim import build_optimizer, set_lr
    from archifactory.train.schedule import lr_multiplier

    try:
        cfg = validate(cls, data)
    except ConfigError as err:
        assert_names_a_field(err, cls)
        return None
    tc = cfg.train
    assert 1 <= tc.max_steps <= 10**9 and 1 <= tc.seq_len <= 2**24
    assert tc.seq_len <= cfg.model.max_seq_len or not cfg.model.position.limits_length
    assert math.isfinite(cfg.optimizer.lr) and cfg.optimizer.lr > 0
    for step in (0, tc.max_steps // 2, tc.max_steps - 1):
        m = lr_multiplier(cfg.schedule, step, tc.max_steps)
        assert 0 <= m <= 1 and math.isfinite(m), (m, cfg.schedule)
    torch.manual_seed(cfg.train.seed % 2**32)
    model = CausalLM(cfg.model)
    try:
        optimizer = build_optimizer(model, cfg.optimizer)
    except ModuleNotFoundError as err:  # an optional optimizer package that is not installed here
        assert "pytorch_optimizer" in str(err) or "torch" in str(err)
        return cfg
    set_lr(optimizer, lr_multiplier(cfg.schedule, 0, tc.max_steps))
    T = min(tc.seq_len, 16)  # a window of the run's length (capped: the step's cost, not its meaning)
    ids = torch.randint(0, 257, (min(tc.batch_size, 4), T + 1), generator=torch.Generator().manual_seed(0))
    loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
    assert torch.isfinite(loss), (loss, cfg.model_dump())
    loss.backward()
    if tc.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    optimizer.step()
    rates = [v for k, v in cfg.optimizer.model_dump().items() if k.endswith("lr")]
    if max(rates) <= 1:
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        assert not bad, (bad, cfg.optimizer)
        with torch.no_grad():
            assert torch.isfinite(model(ids[:, :-1], targets=ids[:, 1:]).loss), cfg.optimizer
    return cfg


@RUN_FUZZ
@given(data=st.data())
def test_random_run_configs_fail_clearly_or_train(corpus_file, data):
    check_run(data.draw(run_data(corpus_file)))


@pytest.mark.parametrize(("override", "field"), [
    ("train.max_steps=10000000000", "train.max_steps"),
    ("train.seq_len=0", "train.seq_len"),
    ("train.grad_clip=.nan", "train.grad_clip"),
    ("train.max_time_s=.inf", "train.max_time_s"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("optimizer.lr=.inf", "optimizer.lr"),
    ("optimizer.betas=[0.9, 1.5]", "optimizer.betas.1"),
    ("optimizer.betas=[-0.1, 0.9]", "optimizer.betas.0"),
    ("optimizer.eps=0", "optimizer.eps"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
    ("schedule.warmup_fraction=2", "schedule.warmup_fraction"),
    ("schedule.min_lr_ratio=.nan", "schedule.min_lr_ratio"),
    ("schedule.warmup_steps=100000000000", "schedule.warmup_steps"),
    ("data.seed=-1", "data.seed"),
    ("data.corpus.val_fraction=1", "data.corpus.val_fraction"),
    ("train.device=gpu0", "train.device"),
])
def test_run_values_that_cannot_work_are_config_errors_naming_the_field(corpus_file, override, field):
    from archifactory.train import load_run_config

    base = {"name": "r", "model": TINY_MODEL, "train": {"max_steps": 2, "seq_len": 8},
            "data": {"corpus": {"kind": "files", "paths": [corpus_file]}, "tokenizer": {"kind": "bytes"}}}
    with pytest.raises(ConfigError) as info:
        load_run_config(base, [override])
    assert f"{field}: " in str(info.value), str(info.value)
    assert_names_a_field(info.value, RunConfig)


@pytest.mark.parametrize("name", ["muon", "soap", "ademamix", "schedulefree_adamw"])
def test_optimizer_extras_are_bounded(name):
    """Fields the fuzzing found unbounded: Newton-Schulz steps (a huge count hangs a step), averaging powers."""
    from archifactory.train.optim import optimizer_config

    bad = {"muon": {"ns_steps": 10**9}, "soap": {"betas": [0.9, 1.0]}, "ademamix": {"betas": [0.9, 0.999, 1.2]},
           "schedulefree_adamw": {"r": -1.0}}[name]
    with pytest.raises(ConfigError, match=f"optimizer.{next(iter(bad))}"):
        optimizer_config({"name": name, **bad})


# ------------------------------------------------------------------------------------- sweep specs

from archifactory.sweep.spec import SweepSpec  # noqa: E402

LR_VALUES = often(st.sampled_from([1e-3, 3e-3, 1e-2]), st.sampled_from([0, -1e-3, math.nan, math.inf, -math.inf, "x"]))
OVERRIDES = often(st.sampled_from(["model.mixer.n_kv_heads=1", "model.ffn.kind=mlp", "train.batch_size=4"]),
                  st.sampled_from(["model.mixer.n_heads=3", "nonsense", "model.nope=1", "train.seq_len=0"]))
VARIANT_NAMES = often(st.sampled_from(["a", "b", "wide", "baseline"]), st.sampled_from(["../x", "", "a/b", "x" * 300]))


def variant() -> st.SearchStrategy:
    full = st.fixed_dictionaries({}, optional={"overrides": st.lists(OVERRIDES, max_size=2),
                                               "lr": often(st.lists(LR_VALUES, min_size=1, max_size=3),
                                                           st.sampled_from([[], None, "x"])),
                                               "description": st.just("d")})
    return often(full, st.one_of(st.lists(OVERRIDES, max_size=2), WRONG), odds=4)


def sweep_data(base: dict) -> st.SearchStrategy:
    seeds = often(st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=2),
                  st.one_of(st.just([]), st.lists(BAD_INTS, min_size=1, max_size=2), WRONG))
    budget = st.one_of(
        st.fixed_dictionaries({"tokens": often(st.sampled_from([64, 256.0]), BAD_FLOATS)}),
        st.fixed_dictionaries({"flops": often(st.sampled_from([1e7, 1e8]), st.sampled_from([0, -1, 1e31, math.inf]))}),
        st.fixed_dictionaries({"seconds": often(st.sampled_from([1.0, 60.0]), st.sampled_from([0, 1e9, math.nan]))}),
        st.just({"tokens": 64, "seconds": 1.0}), WRONG,
    )
    return st.fixed_dictionaries(
        {"name": often(st.just("s"), st.sampled_from(["../s", "/abs", ""])), "base": st.just(base), "budget": budget},
        optional={"seeds": seeds,
                  "lr_selection_seeds": often(st.lists(st.sampled_from([10, 11, 0]), max_size=2), WRONG),
                  "variants": st.dictionaries(VARIANT_NAMES, variant(), max_size=3),
                  "match_tolerance": FLOATS,
                  "parallel": often(st.sampled_from([None, 1, 2]), BAD_INTS),
                  "threads_per_run": often(st.sampled_from([1, 2]), BAD_INTS),
                  "base_overrides": st.lists(OVERRIDES, max_size=1)},
    )


def check_sweep(data: dict, sweep_dir) -> None:
    """Validation fails naming a field, or planning either names the variant whose config fails or gives
    runs whose configs all validate again with the sweep's budget and lr."""
    from archifactory.sweep.spec import plan

    try:
        spec = validate(SweepSpec, data)
    except ConfigError as err:
        assert_names_a_field(err, SweepSpec)
        return
    try:
        runs = plan(spec, sweep_dir, sweep_dir)
    except ConfigError as err:
        text = str(err)
        assert "\n" not in text
        assert re.match(r"variant '[^']*': |budget\.flops: ", text), text
        return
    for run in runs:
        again = validate(RunConfig, run.config.model_dump(mode="json"))
        tc = again.train
        assert sum(x is not None for x in (tc.max_steps, tc.max_tokens, tc.max_time_s)) == 1
        if run.lr is not None:
            assert again.optimizer.lr == run.lr and math.isfinite(run.lr) and run.lr > 0


@FUZZ
@given(data=st.data())
def test_random_sweep_specs_fail_clearly_or_plan(corpus_file, tmp_path_factory, data):
    base = {"name": "b", "model": TINY_MODEL, "train": {"max_steps": 2, "seq_len": 8, "batch_size": 2},
            "data": {"corpus": {"kind": "files", "paths": [corpus_file]}, "tokenizer": {"kind": "bytes"}}}
    check_sweep(data.draw(sweep_data(base)), tmp_path_factory.getbasetemp() / "sweep")


# ------------------------------------------------------------------ SFT, GRPO and evaluation configs

from archifactory.posttrain.grpo import GRPOOptions, GRPORunConfig, GRPOTaskConfig  # noqa: E402
from archifactory.posttrain.grpo_loss import group_advantages, grpo_loss  # noqa: E402
from archifactory.posttrain.sft import SFTDataConfig, SFTOptions, SFTRunConfig  # noqa: E402
from archifactory.sweep.spec import EvalSection  # noqa: E402

STAGE_FUZZ = settings(FUZZ, max_examples=40)


def section(cls, skip=()) -> st.SearchStrategy:
    """A mapping setting any of ``cls``'s fields (each drawn by :func:`field_value`)."""
    return st.fixed_dictionaries({}, optional={n: field_value(f.annotation, n) for n, f in cls.model_fields.items()
                                               if n not in skip})


def stage_data(stage: str) -> st.SearchStrategy:
    """An SFT or GRPO run config on the tiny model, any of its stage sections' fields set."""
    if stage == "sft":
        required = {"data": st.fixed_dictionaries({"source": st.just("chat.jsonl")}, optional={
            n: field_value(f.annotation, n) for n, f in SFTDataConfig.model_fields.items() if n != "source"})}
        sections = {"sft": section(SFTOptions)}
    else:
        required, sections = {}, {"task": section(GRPOTaskConfig, skip=("data",)), "grpo": section(GRPOOptions)}
    return st.fixed_dictionaries(
        {"stage": st.just(stage), "base": st.just("runs/base"), "model": st.just(TINY_MODEL), "train": train_data(),
         **required},
        optional={**sections, "optimizer": registered(registry.OPTIMIZERS, skip=("decay_embeddings",)),
                  "schedule": registered(registry.SCHEDULES)},
    )


@STAGE_FUZZ
@given(data=st.data())
def test_random_sft_configs_fail_clearly_or_train(data):
    """An SFT config validates and trains a step (see check_run), its epochs give a finite step count and
    its seed seeds numpy and torch; or it is a config error naming the field."""
    import numpy as np

    cfg = check_run(data.draw(stage_data("sft")), SFTRunConfig)
    if cfg is None:
        return
    epochs = cfg.sft.num_train_epochs
    if epochs is not None:  # the step count SFTTrainer.steps_for_epochs gives for 100 rows per epoch
        assert 0 < epochs <= 1000 and 1 <= math.ceil(epochs * 100 / cfg.train.batch_size) < 10**9
    np.random.default_rng(cfg.data.seed)
    torch.Generator().manual_seed(cfg.data.seed)
    assert 0 <= cfg.data.val_fraction < 1


@STAGE_FUZZ
@given(data=st.data())
def test_random_grpo_configs_fail_clearly_or_train(data):
    """A GRPO config validates and trains a step (see check_run), and its options give finite advantages
    and a finite clipped loss (with the KL term and temperature it sets) on a group of rewards; or it is a
    config error naming the field."""
    cfg = check_run(data.draw(stage_data("grpo")), GRPORunConfig)
    if cfg is None:
        return
    opts, G = cfg.grpo, cfg.grpo.num_generations
    gen = torch.Generator().manual_seed(0)
    correct = (torch.rand(2 * G, generator=gen) < 0.5).float()
    rewards = correct + opts.format_reward * (torch.rand(2 * G, generator=gen) < 0.5).float()
    advantages = group_advantages(rewards, G, opts.scale_rewards)
    assert torch.isfinite(advantages).all(), (rewards, opts)
    logits = torch.randn(2 * G, 4, 17, generator=gen, requires_grad=True)
    logprobs = (logits / opts.temperature).log_softmax(-1)[..., 0]
    old = logprobs.detach() + 0.1 * torch.randn(logprobs.shape, generator=gen)
    ref = logprobs.detach() - 0.1
    out = grpo_loss(logprobs, old, advantages, torch.ones_like(logprobs), ref_logprobs=ref, beta=opts.beta,
                    epsilon_low=opts.epsilon, epsilon_high=opts.epsilon_high, loss_type=opts.loss_type,
                    max_completion_length=opts.max_completion_length)
    assert torch.isfinite(out.loss), (out.loss, opts)
    out.loss.backward()
    assert torch.isfinite(logits.grad).all(), opts
    GRPOTaskConfig.model_validate(cfg.task.model_dump()).build().problem(0)  # the task draws a problem


@STAGE_FUZZ
@given(section(EvalSection))
def test_random_eval_sections_fail_clearly_or_name_known_tasks(data):
    """A sweep's eval: section is a config error naming the field, or names only tasks the evaluator
    knows, with a batch size the command line would take too."""
    from archifactory.eval.tasks import get_task

    data = {"tasks": ["piqa"], **data}
    try:
        section_cfg = validate(EvalSection, data)
    except ConfigError as err:
        assert_names_a_field(err, EvalSection)
        return
    assert 1 <= section_cfg.batch_size <= 2**20 and (section_cfg.limit is None or section_cfg.limit >= 1)
    for name in section_cfg.tasks:
        assert name.startswith("lm_eval:") or get_task(name) is not None


@pytest.mark.parametrize(("cls", "data", "field"), [
    (SFTOptions, {"num_train_epochs": 1e9}, "num_train_epochs"),  # counting the steps drew 1e9 epoch orders
    (SFTDataConfig, {"source": "x", "seed": 2**64}, "seed"),
    (GRPOOptions, {"temperature": 1e-300}, "temperature"),  # the loss divided the logits by 0
    (GRPOOptions, {"beta": 1e308}, "beta"),
    (GRPOOptions, {"format_reward": 1e308}, "format_reward"),  # advantages (r - mean) / std were NaN
    (GRPOOptions, {"num_generations": 10**12}, "num_generations"),
    (GRPOTaskConfig, {"seed": -1}, "seed"),
    (EvalSection, {"tasks": ["piqa"], "batch_size": 2**40}, "batch_size"),
])
def test_stage_values_that_cannot_work_are_config_errors_naming_the_field(cls, data, field):
    with pytest.raises(ConfigError, match=f"{field}: "):
        validate(cls, data)
