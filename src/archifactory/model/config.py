"""The model config: a default block (mixer + FFN), per-layer overrides for hybrids, and the parts
around the stack (embedding, positions, norm, residual layout, head and loss)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Iterable, Literal

from pydantic import BeforeValidator, Field, SerializeAsAny, model_validator

import archifactory.ffn  # noqa: F401  (registers the built-in FFNs)
import archifactory.mixers  # noqa: F401  (registers the built-in mixers)
from archifactory.config import (
    MAX_AUX_LOSS_WEIGHT,
    MAX_COUNT,
    SOFTCAP_MAX,
    SOFTCAP_MIN,
    BuildContext,
    ConfigError,
    FieldError,
    Strict,
    apply_overrides,
    component_field,
    load_yaml,
    validate,
    with_default_kinds,
)
from archifactory.ffn.mlp import SwiGLUConfig
from archifactory.mixers.attention import AttentionConfig
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import RMSNormConfig
from archifactory.nn.positions import RoPEConfig
from archifactory.registry import FFNS, MIXERS, MODELS, NORMS, POSITIONS, register_model

MixerField = component_field(MIXERS)
FFNField = component_field(FFNS)
NormField = component_field(NORMS)
PositionField = component_field(POSITIONS)


class BlockConfig(Strict):
    """What one layer is built from, after overrides are resolved."""

    mixer: MixerField
    ffn: FFNField


class LayerOverride(Strict):
    """Replace the mixer and/or FFN on some layers. Select layers by ``layers: [3, 7]`` or by
    ``every: 4`` (with ``start``, default ``every - 1``: layers 3, 7, 11, ...). The given component replaces
    the default one whole (no merging), so the config reads as what the layer is."""

    layers: list[int] | None = None
    every: int | None = Field(None, ge=1)
    start: int | None = Field(None, ge=0)
    mixer: MixerField | None = None
    ffn: FFNField | None = None

    @model_validator(mode="after")
    def _check(self):
        if (self.layers is None) == (self.every is None):
            raise ValueError("give exactly one of `layers` (a list of indices) or `every` (a period)")
        if self.start is not None and self.every is None:
            raise ValueError("`start` only applies with `every`")
        if self.mixer is None and self.ffn is None:
            raise ValueError("an override must set `mixer`, `ffn` or both")
        return self

    def selected(self, n_layers: int) -> list[int]:
        if self.layers is not None:
            return list(self.layers)
        start = self.every - 1 if self.start is None else self.start
        return list(range(start, n_layers, self.every))


PretrainedModule = Literal["embedding", "head", "final_norm"]


class PretrainedModules(Strict):
    """Parts of the model initialised from a local Hugging Face model directory, optionally frozen
    (ArchiFactory's ``freeze_lm_modules``), so that variants share one pretrained vocabulary interface.

    The directory holds ``config.json``, the weights and the ``tokenizer.json`` the run must tokenise with
    (``data.tokenizer: {kind: hf, name_or_path: <path>}``): the embedding's rows are that tokenizer's ids.
    Weights are read with :func:`archifactory.model.hf.load_pretrained_modules` when a run starts (not
    on resume, whose checkpoint holds them); frozen parameters get ``requires_grad=False`` whenever the
    model is built, so the optimizer never sees them and keeps no state for them."""

    path: str
    """Local Hugging Face model directory (any family ``archifactory hf import`` reads)."""
    modules: list[PretrainedModule] = Field(default_factory=lambda: ["embedding"], min_length=1)
    """Which parts to copy: ``embedding`` (token table), ``head`` (LM head; the embedding itself when
    tied), ``final_norm``."""
    freeze: bool = True
    """Keep the copied parameters fixed during training."""


@register_model
class ModelConfig(Strict):
    """A decoder LM: token embedding -> ``n_layers`` blocks -> final norm -> head. Other model kinds
    (:data:`~archifactory.registry.MODELS`: ``megabyte``, ``hourglass``) extend it with their own fields."""

    registry_key: ClassVar[str] = "kind"
    kind: Literal["transformer"] = Field("transformer", exclude=True)
    """The model kind; the plain transformer's is left out of dumps, so its configs read as before."""
    # Upper bounds far beyond any model trained with this workbench keep validation's work (one entry
    # per layer) and every size product bounded; a larger model fails at build for lack of memory anyway.
    vocab_size: int = Field(ge=2, le=2**24)
    d_model: int = Field(ge=1, le=2**17)
    n_layers: int = Field(ge=1, le=MAX_COUNT)
    max_seq_len: int = Field(1024, ge=1, le=2**24)
    """Longest sequence trained on; sizes learned/sinusoidal tables and the FLOPs estimate."""
    mixer: MixerField = Field(default_factory=AttentionConfig)
    ffn: FFNField = Field(default_factory=SwiGLUConfig)
    layer_overrides: list[LayerOverride] = Field(default_factory=list)
    norm: NormField = Field(default_factory=RMSNormConfig)
    residual: Literal["pre", "post", "sandwich", "parallel"] = "pre"
    """``pre``: x + f(norm(x)); ``post``: norm(x + f(x)) (Vaswani et al.); ``sandwich``: x + norm(f(norm(x)))
    (Gemma 2); ``parallel``: x + mixer(norm(x)) + ffn(norm(x)) (GPT-J, PaLM)."""
    final_norm: bool = True
    position: PositionField = Field(default_factory=RoPEConfig)
    tie_embeddings: bool = True
    embedding_scale: Annotated[float, Field(gt=0, le=1e4)] | Literal["sqrt_d_model"] = 1.0
    """Multiply token embeddings by this (Gemma uses ``sqrt_d_model``)."""
    head_bias: bool = False
    """A learned per-token bias on the output logits."""
    logit_softcap: float | None = Field(None, ge=SOFTCAP_MIN, le=SOFTCAP_MAX)
    """Final logits become ``cap * tanh(logits / cap)`` (Gemma 2 uses 30); in [1e-2, 1e4]."""
    z_loss_weight: float = Field(0.0, ge=0, le=MAX_AUX_LOSS_WEIGHT)
    """Weight of ``logsumexp(logits)^2`` (PaLM's z-loss, 1e-4 there), averaged over target tokens; at most 1."""
    mtp_heads: int = Field(0, ge=0, le=64)
    """Extra heads predicting tokens t+2 .. t+1+mtp_heads (Gloeckle et al. 2024), each one block on top
    of the trunk sharing the final norm and unembedding; unused in generation."""
    mtp_loss_weight: float = Field(1.0, ge=0, le=MAX_AUX_LOSS_WEIGHT)
    init: InitConfig = Field(default_factory=InitConfig)
    pretrained: PretrainedModules | None = None
    """Initialise (and optionally freeze) the embedding / head / final norm from a Hugging Face model."""

    @classmethod
    def contract_examples(cls) -> list[dict]:
        """Field values (over a small attention + SwiGLU base model) that the shared contract of every
        registered model kind (tests/test_hierarchical.py) builds: causality, gradients, cached decoding
        and generation, FLOPs against an independent count."""
        return [{}]

    def build(self):
        """The model this config describes (a :class:`~archifactory.model.lm.CausalLM` for this kind)."""
        from archifactory.model.lm import CausalLM

        return CausalLM(self)

    def layer_configs(self) -> list[BlockConfig]:
        layers = [BlockConfig(mixer=self.mixer, ffn=self.ffn) for _ in range(self.n_layers)]
        for override in self.layer_overrides:
            for i in override.selected(self.n_layers):
                layers[i] = BlockConfig(
                    mixer=override.mixer or layers[i].mixer, ffn=override.ffn or layers[i].ffn
                )
        return layers

    def mixers_use_positions(self) -> bool:
        """Whether any layer's mixer applies the relative position encoding (RoPE, ALiBi): recurrent
        mixers do not, so a model of them has no position limit from ``position``."""
        return any(layer.mixer.uses_positions for layer in self.layer_configs())

    def build_context(self, layer_idx: int, shared: dict | None = None) -> BuildContext:
        """``shared``: the dict of cross-layer shared modules of the model being built (see BuildContext)."""
        return BuildContext(
            d_model=self.d_model,
            n_layers=self.n_layers,
            layer_idx=layer_idx,
            max_seq_len=self.max_seq_len,
            norm=self.norm,
            position=self.position,
            init=self.init,
            shared=shared,
        )

    def resolved_embedding_scale(self) -> float:
        return math.sqrt(self.d_model) if self.embedding_scale == "sqrt_d_model" else float(self.embedding_scale)

    @model_validator(mode="after")
    def _check_components(self):
        errors: list[str] = []
        if self.pretrained is not None:
            modules = self.pretrained.modules
            if len(set(modules)) != len(modules):
                errors.append(f"pretrained.modules: {modules} lists a module twice")
            if self.tie_embeddings and "head" in modules and "embedding" not in modules:
                errors.append(
                    "pretrained.modules: with tie_embeddings=true the head is the embedding table; list "
                    "'embedding' (which is also the head) or set tie_embeddings=false"
                )
            if "final_norm" in modules and not self.final_norm:
                errors.append("pretrained.modules: lists 'final_norm' but final_norm=false; drop it or set final_norm=true")
        if self.mtp_heads >= self.max_seq_len:
            errors.append(
                f"mtp_heads: mtp_heads={self.mtp_heads} must be < max_seq_len={self.max_seq_len} (head k predicts "
                f"the token k + 1 places further on, so it needs sequences longer than k + 1)"
            )
        for j, override in enumerate(self.layer_overrides):
            for i in override.selected(self.n_layers):
                if not 0 <= i < self.n_layers:
                    errors.append(
                        f"layer_overrides.{j}.layers: layer {i} does not exist; valid layers are 0..{self.n_layers - 1}"
                    )
        ctx = self.build_context(0)
        sources = [("mixer", self.mixer), ("ffn", self.ffn)]
        for j, override in enumerate(self.layer_overrides):
            sources += [(f"layer_overrides.{j}.mixer", override.mixer), (f"layer_overrides.{j}.ffn", override.ffn)]
        for path, component in sources:
            if component is None:
                continue
            try:
                component.check(ctx)
            except FieldError as err:
                errors.append(f"{path}.{err.field}: {err.message}")
        if not errors:
            errors += self._check_across_layers()
        if errors:
            raise ValueError("\n".join(errors))
        return self

    def _check_across_layers(self) -> list[str]:
        """Rules between a layer's mixer and the model or other layers: a mixer that normalises its own
        input needs pre-norm blocks; one that reads the token embeddings excludes the multi-token heads
        (their blocks get the trunk's output only); layers sharing a block agree on its settings."""
        errors: dict[str, None] = {}  # ordered, without repeats
        shared: dict[str, tuple[int, dict]] = {}
        for i, layer in enumerate(self.layer_configs()):
            mixer = layer.mixer
            if mixer.owns_input_norm and self.residual != "pre":
                errors[f"residual: mixer kind {mixer.kind!r} normalises its own input and needs residual: pre, "
                       f"not {self.residual!r}"] = None
            if mixer.reads_token_embeddings() and self.mtp_heads:
                errors[f"mtp_heads: mtp_heads={self.mtp_heads} with mixer kind {mixer.kind!r} reading the token "
                       "embeddings is not supported; set mtp_heads: 0"] = None
            block = mixer.shared_block(self.d_model)
            if block is not None:
                name, spec = block
                first, first_spec = shared.setdefault(name, (i, spec))
                if first_spec != spec:
                    errors[f"layer_overrides: layers {first} and {i} share block {name!r} (shared_name) but set it "
                           f"up differently ({first_spec} vs {spec}); give them the same settings or another "
                           "shared_name"] = None
        return list(errors)


def _default_model_kind(value: Any) -> Any:
    if isinstance(value, dict) and "kind" not in value:
        return {"kind": "transformer", **value}
    return value


# component_field's dispatch on `kind`, over ModelConfig (not BaseModel), so that error messages list its keys
ModelField = Annotated[
    (SerializeAsAny[ModelConfig], *component_field(MODELS).__metadata__, BeforeValidator(_default_model_kind))
]
"""A field holding a model config of any registered kind (``transformer`` when no ``kind`` is given)."""


def model_config_class(data: dict, path: str = "kind") -> type[ModelConfig]:
    """The config class registered for ``data``'s ``kind`` (``transformer`` when none is given); an
    unknown kind is a :class:`ConfigError` naming ``path``."""
    kind = data.get("kind", "transformer") if isinstance(data, dict) else "transformer"
    if not isinstance(kind, str) or kind not in MODELS:
        raise ConfigError(f"{path}: unknown model kind {kind!r}; valid kinds: {', '.join(MODELS.kinds())}")
    return MODELS.get(kind)


def load_model_config(source: str | Path | dict, overrides: Iterable[str] = ()) -> ModelConfig:
    """A :class:`ModelConfig` from a preset name (``tiny``), a YAML path, or a mapping, with dotted
    overrides such as ``mixer.n_kv_heads=2`` applied before validation."""
    path, overrides = None, list(overrides)
    if isinstance(source, dict):
        data = source
    else:
        from archifactory.model.presets import resolve_model_source

        path = resolve_model_source(source)
        data = load_yaml(path)
    data = apply_overrides(with_default_kinds(ModelConfig, data), overrides)
    cls = model_config_class(data)
    return validate(cls, with_default_kinds(cls, data), source=path, overrides=overrides)


# The other model kinds register themselves on import; they extend ModelConfig, so they come last.
import archifactory.model.hourglass  # noqa: E402,F401
import archifactory.model.megabyte  # noqa: E402,F401
