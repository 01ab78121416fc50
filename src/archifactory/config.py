"""Typed configs: the base class every component config derives from, registry-dispatched fields,
YAML load/dump, dotted overrides, and errors that name the full field path.

A component config is a pydantic model with a ``kind`` literal, registered in one of the registries of
:mod:`archifactory.registry`. It turns into a module once, through ``build(ctx)``; strings never reach
``forward``.
"""

from __future__ import annotations

import copy
import os
import re
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError
from typing_extensions import Annotated

from archifactory.errors import UserError
from archifactory.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from archifactory.nn.init import InitConfig

C = TypeVar("C", bound=BaseModel)


class ConfigError(UserError, ValueError):
    """A config that cannot be used. The message is one line: the first problems with their dotted field
    paths (and how many more); ``problems`` holds every one of them."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


MAX_PROBLEMS_SHOWN = 3
"""Problems a validation error spells out on its one line; the rest are counted and their fields named."""


def summarize_problems(problems: list[str], shown: int = MAX_PROBLEMS_SHOWN) -> str:
    """``problems`` (each ``path: message``) as one line: the first ``shown`` joined by ``; ``, then
    ``(and N more: path, path)``."""
    head = "; ".join(problems[:shown])
    rest = problems[shown:]
    if rest:
        head += f" (and {len(rest)} more: {', '.join(p.split(': ', 1)[0] for p in rest)})"
    return head


class FieldError(ValueError):
    """A problem with one field of a component, raised by ``Component.check``; the caller adds the path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


MAX_FOLDER_NAME_BYTES = 200
"""Longest folder name (UTF-8 bytes) a config may give; file systems allow 255."""


def check_folder_name(name: str, max_bytes: int = MAX_FOLDER_NAME_BYTES) -> str:
    """``name`` unchanged if it is one plain folder name, else ``ValueError`` saying why.

    Run, sweep and variant names become default directories (``runs/<name>``, ``sweeps/<name>``,
    ``<sweep>/runs/<variant>-s<seed>``), so they must stay inside that parent: no path separator, not
    ``.`` or ``..``, no control characters, no surrounding spaces. Nothing is rewritten: another place is
    chosen with an explicit directory (``out_dir``, ``--dir``), never through the name.
    """
    problem = None
    if not name.strip():
        problem = "is empty"
    elif name in (".", ".."):
        problem = "is a relative path (. or ..), not a name"
    elif any(sep in name for sep in {"/", os.sep, os.altsep or "/"}):
        problem = "contains a path separator"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        problem = "contains a control character"
    elif name.strip() != name:
        problem = "has surrounding spaces"
    elif len(name.encode("utf-8")) > max_bytes:
        problem = f"is longer than {max_bytes} bytes"
    if problem is not None:
        raise ValueError(
            f"{name!r} {problem}; a name becomes a folder name, so give one plain name "
            f"(and choose another place with an explicit directory: out_dir or --dir)"
        )
    return name


FolderName = Annotated[str, AfterValidator(check_folder_name)]
"""A ``str`` field that becomes a default folder name (see :func:`check_folder_name`)."""


MAX_COUNT = 4096
"""Most layers, heads or experts a config may ask for: each becomes a Python object or list entry, so the
bound keeps validation and building from looping for hours on a typo like ``n_heads=1000000000001``."""

MAX_STEPS = 10**9
"""Most optimizer steps a run may ask for (and the bound of every step count or interval): far beyond any
run this workbench is for, and well inside what metrics and results stores hold as integers."""
MAX_TOKENS = 10**15
"""Most tokens a run, a sweep budget or an evaluation may ask for (today's largest pretraining runs use a
few times 10**13)."""
MAX_FLOPS = 1e30
"""Largest training-FLOPs budget of a sweep run."""
MAX_SECONDS = 366 * 24 * 3600.0
"""Longest wall-time budget (one year)."""
MAX_SEQ_LEN = 2**24
"""Longest sequence (and most sequences per batch) a config may ask for."""

# Ranges of float fields that the config fuzzing (tests/test_config_fuzz.py) found to validate and then give
# a non-finite first loss or gradient at their extremes (1e308 is inf once a model runs in fp32; 1e-300 is 0).
SOFTCAP_MIN, SOFTCAP_MAX = 1e-2, 1e4
"""Range of a logit soft-cap ``cap * tanh(x / cap)``: Gemma 2 uses 50 (attention) and 30 (final logits);
below 1e-2 every logit is ~0, above 1e4 the cap is beyond what fp16 products hold (65,504)."""
LOGIT_SCALE_MIN, LOGIT_SCALE_MAX = 1e-6, 100.0
"""Range of an attention logit scale: the usual ``head_dim ** -0.5`` (or muP's ``1 / head_dim``) lies in
[2e-4, 1] for the head sizes a config allows; 1e30 already made the first gradients non-finite."""
MAX_LR = 1e6
"""Largest learning rate: the references' peak rates lie in 1e-5 .. 10 (SGD, Muon 0.02, AdamW 1e-4 .. 1e-2), and
the robustness tests diverge on purpose at 10 .. 3e4; above ~3e38 (float32's largest) the optimizers' fused
updates cannot even convert the step size (1e308 raised an overflow error inside torch.optim.Adam)."""
MAX_AUX_LOSS_WEIGHT = 1.0
"""Largest weight of an auxiliary loss (z-loss, MoE balance and router z-loss, multi-token heads): the
references use 1e-4 .. 1 (PaLM's z-loss 1e-4, Switch's balance loss 1e-2, Gloeckle et al.'s MTP heads 1);
a larger weight lets the auxiliary term outweigh the language-model loss (and 1e308 made it infinite)."""
MAX_WIDTH_EXPAND = 16.0
"""Largest ``expand_k`` / ``expand_v`` (widths relative to d_model or head_dim): the references use 0.5 to
2 (GLA, RetNet, Gated DeltaNet); 1e6 allocated for minutes and 1e30 overflowed the tensor size."""

MAX_TEMPERATURE = 1e6
"""Highest sampling temperature a config or option takes (already uniform sampling for any model)."""

MAX_SEED = 2**63 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
"""A random seed: what both ``torch.manual_seed`` and numpy's ``SeedSequence`` accept (0 .. 2**63 - 1)."""


def _numbers_only(annotation: Any) -> bool:
    """Does a field of type ``annotation`` take numbers (int / float, alone, optional, in a union with
    literals or in a list / tuple) and never a bool?"""
    import typing

    leaves: list = []

    def walk(a: Any) -> None:
        if typing.get_origin(a) is typing.Literal:
            leaves.extend(type(v) for v in typing.get_args(a))
        elif typing.get_args(a) and typing.get_origin(a) is not None:
            for arg in typing.get_args(a):
                walk(arg)
        else:
            leaves.append(a)

    walk(annotation)
    return bool({int, float} & set(leaves)) and bool not in leaves and Any not in leaves


_NUMBERS_ONLY: dict[tuple[type, str], bool] = {}


class Strict(BaseModel):
    """Base of every config: unknown keys are errors, assignments are validated, and no float field
    accepts NaN or infinity (none of them means anything there, and each would reach the loss). A boolean
    given for a number field is refused by :func:`validate` (pydantic alone would read ``true`` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class Component(Strict):
    """A registered, buildable part of the model. Subclasses define ``kind: Literal[...]`` and ``build``."""

    registry_key: ClassVar[str] = "kind"
    kind: str

    def build(self, ctx: "BuildContext"):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.build")

    def check(self, ctx: "BuildContext") -> None:
        """Raise :class:`FieldError` when this component cannot work in the model ``ctx`` describes."""


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What a component needs to know about the model it is built into."""

    d_model: int
    n_layers: int
    layer_idx: int
    max_seq_len: int
    norm: Any  # NormConfig: used for norms inside components (QK-norm, gated norms)
    position: Any  # PositionConfig: attention asks it for RoPE / ALiBi
    init: "InitConfig"
    shared: dict | None = dataclasses.field(default=None, compare=False)
    """Modules that several layers of one model share, by name (one dict per model build; ``None`` when a
    component is built alone). The model registers them once (``CausalLM.shared_blocks``)."""


def component_field(registry: Registry) -> Any:
    """A field type that validates a mapping into the config class registered under its ``kind``."""

    key = registry.key

    def dispatch(value: Any, handler: Any, info: Any) -> Any:
        if isinstance(value, BaseModel):
            kind = getattr(value, key, None)
            if kind not in registry or not isinstance(value, registry.get(kind)):
                raise PydanticCustomError(
                    "unknown_kind",
                    "{name} {key} '{kind}' is not registered; valid {key}s: {valid}",
                    {"name": registry.name, "key": key, "kind": kind, "valid": ", ".join(registry.kinds())},
                )
            return value
        if isinstance(value, str):  # shorthand: `norm: rmsnorm`, `optimizer: adamw`
            value = {key: value}
        if not isinstance(value, dict):
            raise PydanticCustomError(
                "component_type", "expected a mapping with a `{key}` key for a {name}", {"name": registry.name, "key": key}
            )
        kind = value.get(key)
        if kind is not None and not isinstance(kind, str):
            raise PydanticCustomError(
                "kind_type",
                "{key} must be a {name} name, not the {type} {kind}; valid {key}s: {valid}",
                {"name": registry.name, "key": key, "type": type(kind).__name__, "kind": repr(kind),
                 "valid": ", ".join(registry.kinds())},
            )
        if kind is None:
            raise PydanticCustomError(
                "missing_kind",
                "a {name} needs a `{key}`; valid {key}s: {valid}",
                {"name": registry.name, "key": key, "valid": ", ".join(registry.kinds())},
            )
        if kind not in registry:
            raise PydanticCustomError(
                "unknown_kind",
                "unknown {name} {key} '{kind}'; valid {key}s: {valid}",
                {"name": registry.name, "key": key, "kind": kind, "valid": ", ".join(registry.kinds())},
            )
        return registry.get(kind).model_validate(value)

    return Annotated[SerializeAsAny[BaseModel], WrapValidator(dispatch)]


_UNION_MEMBER = re.compile(r"(constrained-)?(float|int|str|bool|bytes)|[a-z][a-z-]*\[.*\]")
"""The tags pydantic puts in an error's location for each member of a union (``constrained-float``,
``literal['sqrt_d_model']``, ``function-wrap[dispatch()]``): not fields, so left out of the path."""


def format_validation_error(err: ValidationError, root: str = "") -> list[str]:
    """One ``path: message`` per field that failed (a model-level check's message as it is)."""
    lines: list[str] = []
    by_path: dict[str, int] = {}
    for e in err.errors():
        loc = [p for i, p in enumerate(e["loc"]) if not (i and isinstance(p, str) and _UNION_MEMBER.fullmatch(p))]
        path = ".".join(str(p) for p in loc)
        path = f"{root}.{path}" if root and path else (root or path)
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] == "value_error" and not path:
            lines.append(msg)  # a model-level check that already names its field paths
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this config)"
            parent = _parent_fields(err, e["loc"])
            if parent:
                msg += f"; valid keys: {', '.join(parent)}"
        elif e["type"] == "literal_error" and e["loc"] and e["loc"][-1] == "kind":
            msg = f"kind does not match this component: {msg}"
        if path in by_path:  # another member of a union: one line per field
            lines[by_path[path]] += f", or {msg[0].lower()}{msg[1:]}"
            continue
        by_path[path] = len(lines)
        lines.append(f"{path or '<root>'}: {msg}")
    return [" ".join(line.split()) for line in lines]  # one physical line each


def _parent_fields(err: ValidationError, loc: tuple) -> list[str]:
    # The error does not carry the class, so we re-walk the title's model with the input's kinds.
    return getattr(err, "_archifactory_valid_keys", {}).get(tuple(loc[:-1]), [])


def validate(cls: type[C], data: Any, root: str = "", source: str | Path | None = None,
             overrides: Iterable[str] = ()) -> C:
    """``cls.model_validate(data)`` with a one-line :class:`ConfigError` naming the bad field paths, and
    where each value came from: a problem with a field that one of ``overrides`` (``--set key=value``) set
    says so; the others are in the file ``source``, when given."""
    booleans = _booleans_for_numbers(cls, data, root)
    try:
        validated = cls.model_validate(data)
        problems = []
    except ValidationError as err:
        keys = _valid_keys_by_path(cls, data)
        err._archifactory_valid_keys = keys  # type: ignore[attr-defined]
        problems = format_validation_error(err, root)
    if booleans or problems:
        # booleans alone: pydantic's other problems may only follow from reading them as 0 / 1
        problems, from_set = _mark_overrides(booleans or problems, overrides)
        if problems and from_set == len(problems):
            where = " from the command line"
        else:
            where = f" in {source}" if source is not None else ""
        raise ConfigError(f"invalid {cls.__name__}{where}: {summarize_problems(problems)}", problems) from None
    return validated


def _booleans_for_numbers(cls: type[BaseModel], data: Any, root: str = "") -> list[str]:
    """``path: ...`` for each boolean (alone or in a list) that ``data`` gives a field taking numbers only:
    pydantic reads ``true`` as 1 there, so ``--set d_model=true`` would build a model of width 1."""
    out: list[str] = []

    def walk(cls: type[BaseModel], data: Any, path: str) -> None:
        if not isinstance(data, dict):
            return
        cls = _registered_class(cls, data)
        for name, field in cls.model_fields.items():
            if name not in data:
                continue
            value, here = data[name], f"{path}.{name}" if path else name
            items = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, bool) for v in items):
                key = (cls, name)
                if key not in _NUMBERS_ONLY:
                    _NUMBERS_ONLY[key] = _numbers_only(field.annotation)
                if _NUMBERS_ONLY[key]:
                    shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
                    out.append(f"{here}: expected a number, got the boolean {shown} (YAML reads true/false, yes/no "
                               "and on/off as booleans)")
                    continue
            sub = _field_model(field.annotation)
            if sub is None:
                continue
            for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
                walk(sub, item, here if i is None else f"{here}.{i}")

    walk(cls, data, root)
    return out


def _registered_class(cls: type[BaseModel], data: dict) -> type[BaseModel]:
    """The registered subclass of ``cls`` that ``data``'s ``kind`` (or ``name``) names, else ``cls``."""
    from archifactory import registry as reg  # local: registries are filled by component imports

    for r in (reg.MIXERS, reg.FFNS, reg.NORMS, reg.POSITIONS, reg.CORPORA, reg.TOKENIZERS, reg.OPTIMIZERS,
              reg.SCHEDULES, reg.MODELS):
        kind = data.get(r.key)
        if isinstance(kind, str) and kind in r and issubclass(r.get(kind), cls):
            return r.get(kind)
    return cls


def _mark_overrides(problems: list[str], overrides: Iterable[str]) -> tuple[list[str], int]:
    """``problems`` with ``(from --set key=value)`` added to each whose field an override set (the field
    itself, a field inside it, or the component it is in), and how many were marked."""
    keys = [(text.split("=", 1)[0].strip(), " ".join(text.split())) for text in overrides if "=" in text]
    out, marked = [], 0
    for line in problems:
        path = line.split(": ", 1)[0]
        hits = [text for key, text in keys
                if path == key or path.startswith(key + ".") or key.startswith(path + ".")]
        if hits:
            line += f" (from --set {hits[-1]})"  # the last override of a field is the one that counts
            marked += 1
        out.append(line)
    return out, marked


def _valid_keys_by_path(cls: type[BaseModel], data: Any, path: tuple = ()) -> dict[tuple, list[str]]:
    """Map each mapping's location in ``data`` to the field names its config class accepts."""
    out: dict[tuple, list[str]] = {}
    if not isinstance(data, dict):
        return out
    cls = _registered_class(cls, data)
    out[path] = sorted(cls.model_fields)
    for name, field in cls.model_fields.items():
        if name not in data:
            continue
        sub = _field_model(field.annotation)
        value = data[name]
        if sub is None:
            continue
        if isinstance(value, dict):
            out.update(_valid_keys_by_path(sub, value, path + (name,)))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                out.update(_valid_keys_by_path(sub, item, path + (name, i)))
    return out


def _field_model(annotation: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _field_model(arg)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------- YAML


def leaf_changes(old: Any, new: Any, common_only: bool = False, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(field, old, new)`` for every leaf that differs between two config dumps (nested dicts), the
    field as a dotted path. ``common_only``: only keys both dumps have (else a missing key reads as None)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) & set(new) if common_only else set(old) | set(new)
        return [change for key in sorted(keys)
                for change in leaf_changes(old.get(key), new.get(key), common_only, f"{prefix}{key}.")]
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save the config file as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{_yaml_where(path, err)} is not valid YAML: {_yaml_problem(err)}; fix the syntax there") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _yaml_where(path: Path | str, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's message without its multi-line excerpt of the file."""
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    text = ", ".join(p for p in parts if p) or str(err)
    return " ".join(text.split())


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def dump_config(config: BaseModel, path: str | Path) -> None:
    Path(path).write_text(to_yaml(config))


# ------------------------------------------------------------------------------------------ overrides


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.mixer.n_kv_heads=2"`` -> (["model", "mixer", "n_kv_heads"], 2). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({_yaml_problem(err)}); quote it or fix "
                          "the syntax") from None
    if isinstance(value, str) and _FLOAT.fullmatch(value):
        value = float(value)  # YAML 1.1 reads `1e-5` (no dot) as a string
    return key.split("."), value


#: Fields whose component is chosen by ``name`` rather than ``kind`` (a registry keyed on ``name``).
NAME_KEYED_FIELDS = frozenset({"optimizer"})
#: What a switch of optimizer keeps: the learning rate means the same for every optimizer (a sweep's lr
#: grid sets it); every other field starts from the new optimizer's defaults.
SHARED_ON_SWITCH = ("lr",)


#: Overrides that switch the model kind (``model.kind=megabyte`` in a run, ``kind=megabyte`` on a model):
#: every model kind extends the same ModelConfig, so the shared fields (sizes, mixer, FFN) are kept.
MODEL_KIND_KEYS = (["kind"], ["model", "kind"])


def _selects_component(keys: list[str]) -> bool:
    """Does the override ``keys`` choose a component (``a.kind=...``, ``optimizer.name=...``)?"""
    if keys in MODEL_KIND_KEYS:
        return False
    return keys[-1] == "kind" or (keys[-1] == "name" and len(keys) >= 2 and keys[-2] in NAME_KEYED_FIELDS)


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of the raw config mapping ``data`` with dotted overrides applied.

    Integer segments index lists (``layer_overrides.0.mixer.window=64``). Intermediate mappings that do
    not exist yet are created, so ``position.kind=alibi`` works on a config that did not name a position.
    Setting ``kind`` to a different kind starts that component afresh from the new kind's defaults
    (``position.kind=alibi`` drops RoPE's ``theta``); later overrides then refine it. Switching
    ``optimizer.name`` likewise starts from the new optimizer's defaults, keeping only ``lr``.
    """
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = data
        for depth, key in enumerate(keys[:-1]):
            here = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                node = node[_list_index(node, key, here)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {here} is a {type(node).__name__}, not a mapping")
            if isinstance(node.get(key), str) and not keys[depth + 1].isdigit():
                node[key] = {"kind": node[key]}  # `norm: rmsnorm` shorthand, now being refined
            node = node.setdefault(key, {})
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(node, last, text)] = value
        elif isinstance(node, dict):
            if _selects_component(keys) and node.get(last) != value:
                kept = {k: node[k] for k in SHARED_ON_SWITCH if k in node} if last == "name" else {}
                node.clear()
                node.update(kept)
            node[last] = value
        else:
            raise ConfigError(f"override {text!r}: parent of {last!r} is a {type(node).__name__}, not a mapping")
    return data


def with_default_kinds(cls: type[BaseModel], data: dict) -> dict:
    """Name the ``kind`` (``name`` for an optimizer) of every default component ``data`` leaves out or
    gives without one, so that ``norm.eps=1e-5`` or ``optimizer: {lr: 1e-3}`` refines the default
    component instead of creating a kind-less mapping."""
    data = dict(data)
    for name, field in cls.model_fields.items():
        if field.default_factory is None or not (name not in data or isinstance(data[name], dict)):
            continue
        default = field.default_factory()
        key = getattr(default, "registry_key", None)  # "kind" for components, "name" for optimizers
        if key is None:
            continue
        if name not in data:
            data[name] = {key: getattr(default, key)}
        elif key not in data[name]:  # `optimizer: {lr: 1e-3}` refines the default optimizer
            data[name] = {key: getattr(default, key), **data[name]}
    return data


def _list_index(node: list, key: str, where: str) -> int:
    if not key.lstrip("-").isdigit():
        raise ConfigError(f"override at {where}: {key!r} must be a list index (0..{len(node) - 1})")
    i = int(key)
    if not -len(node) <= i < len(node):
        raise ConfigError(f"override at {where}: index {i} out of range for a list of {len(node)}")
    return i
