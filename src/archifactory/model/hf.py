"""Conversion between Hugging Face ``transformers`` causal LMs and :class:`CausalLM`.

Reading (``config_from_hf``, ``from_hf``, ``load_hf``) covers these ``model_type`` values:

- ``llama`` (Touvron et al. 2023), ``mistral`` (Jiang et al. 2023; ``sliding_window`` on every layer),
  ``qwen2`` (QKV bias, per-layer sliding window from ``layer_types``), ``qwen3`` (QK-norm, explicit
  ``head_dim``);
- ``mixtral`` (Jiang et al. 2024) and ``qwen3_moe``: sparse mixture-of-experts FFNs;
- ``gpt2`` (Radford et al. 2019): learned positions, LayerNorm, GELU MLP with biases, fused ``c_attn``
  stored as ``Conv1D`` (weights transposed relative to ``nn.Linear``);
- ``gemma2`` (Gemma Team 2024): sandwich norms, ``sqrt(d_model)`` embedding scale, GeGLU, soft-capped
  attention and final logits, ``query_pre_attn_scalar`` and alternating sliding-window layers.

Writing (``to_hf``, ``save_hf``) produces a ``LlamaForCausalLM`` for any model whose config Llama can
express; other configs raise a ``ValueError`` listing every field that stands in the way.

Every mapping is exact up to float rounding: the tests compare logits with HF at ``atol=1e-5`` in fp32.
``transformers`` is an optional dependency (``pip install archifactory[hf]``), imported on first use.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from archifactory.errors import MissingDependencyError
from archifactory.ffn.mlp import GeGLUConfig, GLUConfig, MLPConfig, SwiGLUConfig
from archifactory.ffn.moe import MoEConfig
from archifactory.mixers.attention import AttentionConfig
from archifactory.model.config import LayerOverride, ModelConfig
from archifactory.model.lm import CausalLM
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import LayerNormConfig, RMSNormConfig
from archifactory.nn.positions import LearnedPositionConfig, RoPEConfig, RopeScaling

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

__all__ = ["SUPPORTED_MODEL_TYPES", "config_from_hf", "from_hf", "load_hf", "save_hf", "to_hf", "to_hf_config"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gpt2", "gemma2")

# HF activation names (``transformers.activations.ACT2FN``) <-> ours. ``gelu_new`` is GPT-2's tanh
# approximation written out by hand; it equals torch's ``approximate="tanh"`` up to rounding.
_ACT_FROM_HF = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "relu": "relu",
    "relu2": "relu2",
}
_ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "relu2": "relu2"}

# Families that read the sliding window per layer from ``layer_types``; the rest of the RoPE families
# apply ``config.sliding_window`` (when set) to every layer.
_PER_LAYER_WINDOW = {"qwen2", "qwen3", "gemma2"}
_QK_NORM = {"qwen3", "qwen3_moe"}


def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "Hugging Face conversion needs `transformers`: pip install 'archifactory[hf]'"
        ) from err
    return transformers


# ------------------------------------------------------------------------------------------- config


def config_from_hf(hf_config: "PretrainedConfig") -> ModelConfig:
    """The :class:`ModelConfig` of a ``transformers`` config (one of :data:`SUPPORTED_MODEL_TYPES`).

    Raises ``ValueError`` naming the HF field when the config uses something without a counterpart here
    (an unknown activation, dynamic/llama3/longrope RoPE scaling, partial rotary, cross-attention...).

    Training-only settings are not carried over, except the MoE ``router_aux_loss_coef`` which becomes
    ``balance_loss_weight``. Note that HF pools the balance loss over all layers' tokens (and adds it only
    with ``output_router_logits``), while ours is summed layer by layer.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "gpt2":
        return _gpt2_config(hf_config)
    return _rope_family_config(hf_config, model_type)


def _activation(hf_config: Any, field: str) -> str:
    name = getattr(hf_config, field)
    if name not in _ACT_FROM_HF:
        raise ValueError(f"{field}={name!r} has no counterpart; supported: {', '.join(sorted(_ACT_FROM_HF))}")
    return _ACT_FROM_HF[name]


def _glu(hidden: int, activation: str, bias: bool) -> GLUConfig:
    if activation == "silu":
        return SwiGLUConfig(hidden=hidden, bias=bias)
    if activation in ("gelu", "gelu_tanh"):
        return GeGLUConfig(hidden=hidden, activation=activation, bias=bias)
    return GLUConfig(hidden=hidden, activation=activation, bias=bias)


def _rope_family_config(cfg: Any, model_type: str) -> ModelConfig:
    d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or d // n_heads
    gemma = model_type == "gemma2"
    if gemma and getattr(cfg, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=True: only causal attention is supported")

    # Which projections carry a bias is fixed in each HF modeling file, not always read from the config.
    if model_type == "qwen2":
        qkv_bias, out_bias = True, False
    elif model_type in ("mistral", "mixtral"):
        qkv_bias = out_bias = False
    else:
        qkv_bias = out_bias = bool(getattr(cfg, "attention_bias", False))

    window = getattr(cfg, "sliding_window", None) if model_type != "llama" else None
    if model_type in _PER_LAYER_WINDOW:
        layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers)
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"layer_types contains {unknown}; only full_attention and sliding_attention map")
        windows = [window if kind == "sliding_attention" else None for kind in layer_types]
    else:
        windows = [window] * n_layers

    scale = None
    softcap = None
    if gemma:
        scale = float(cfg.query_pre_attn_scalar) ** -0.5
        softcap = getattr(cfg, "attn_logit_softcapping", None)
    mixers = [
        AttentionConfig(
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim if head_dim * n_heads != d else None,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            qk_norm=model_type in _QK_NORM,
            window=w,
            logit_softcap=softcap,
            scale=scale,
        )
        for w in windows
    ]

    act = _activation(cfg, "hidden_activation" if gemma else "hidden_act")
    dense = _glu(cfg.intermediate_size, act, bias=bool(getattr(cfg, "mlp_bias", False)))
    if model_type == "mixtral":
        moe = MoEConfig(
            n_experts=cfg.num_local_experts,
            top_k=cfg.num_experts_per_tok,
            expert_hidden=cfg.intermediate_size,
            activation=act,
            routing="topk_softmax",
            balance_loss_weight=float(cfg.router_aux_loss_coef),
        )
        ffns = [moe] * n_layers
    elif model_type == "qwen3_moe":
        moe = MoEConfig(
            n_experts=max(cfg.num_experts, 1),
            top_k=min(cfg.num_experts_per_tok, max(cfg.num_experts, 1)),
            expert_hidden=cfg.moe_intermediate_size,
            activation=act,
            routing="softmax_topk",
            renormalize=bool(cfg.norm_topk_prob),
            balance_loss_weight=float(cfg.router_aux_loss_coef),
        )
        # The layer rule of Qwen3MoeDecoderLayer.
        dense_layers = set(getattr(cfg, "mlp_only_layers", None) or [])
        ffns = [
            moe if i not in dense_layers and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0 else dense
            for i in range(n_layers)
        ]
    else:
        ffns = [dense] * n_layers

    mixer, ffn, overrides = _layer_plan(mixers, ffns)
    max_seq_len = int(getattr(cfg, "max_position_embeddings", 1024))
    return ModelConfig(
        vocab_size=cfg.vocab_size,
        d_model=d,
        n_layers=n_layers,
        max_seq_len=max_seq_len,
        mixer=mixer,
        ffn=ffn,
        layer_overrides=overrides,
        norm=RMSNormConfig(eps=float(cfg.rms_norm_eps), unit_offset=gemma),
        residual="sandwich" if gemma else "pre",
        position=_rope_from_hf(cfg),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        embedding_scale="sqrt_d_model" if gemma else 1.0,
        logit_softcap=getattr(cfg, "final_logit_softcapping", None) if gemma else None,
        init=InitConfig(std=float(getattr(cfg, "initializer_range", 0.02))),
    )


def _gpt2_config(cfg: Any) -> ModelConfig:
    if getattr(cfg, "add_cross_attention", False):
        raise ValueError("add_cross_attention=True: encoder-decoder cross-attention has no counterpart")
    d, n_heads, n_layers = cfg.n_embd, cfg.n_head, cfg.n_layer
    head_dim = d // n_heads
    # GPT2Attention.scaling: 1/sqrt(head_dim) when scale_attn_weights, further / (layer + 1) when
    # scale_attn_by_inverse_layer_idx (an fp16-stability option); becomes a per-layer mixer.scale.
    scales: list[float | None] = []
    for i in range(n_layers):
        scale = head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(i + 1)
        scales.append(None if scale == head_dim**-0.5 else scale)
    mixers = [AttentionConfig(n_heads=n_heads, qkv_bias=True, out_bias=True, scale=s) for s in scales]
    ffn = MLPConfig(hidden=cfg.n_inner or 4 * d, activation=_activation(cfg, "activation_function"), bias=True)
    mixer, ffn, overrides = _layer_plan(mixers, [ffn] * n_layers)
    return ModelConfig(
        vocab_size=cfg.vocab_size,
        d_model=d,
        n_layers=n_layers,
        max_seq_len=cfg.n_positions,
        mixer=mixer,
        ffn=ffn,
        layer_overrides=overrides,
        norm=LayerNormConfig(eps=float(cfg.layer_norm_epsilon)),
        residual="pre",
        position=LearnedPositionConfig(),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
        init=InitConfig(std=float(cfg.initializer_range)),
    )


def _rope_parameters(cfg: Any) -> dict[str, Any]:
    """The flat RoPE dict of a transformers 5 (``rope_parameters``) or 4.x (``rope_theta`` +
    ``rope_scaling``) config."""
    params = getattr(cfg, "rope_parameters", None)
    if params is None:
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    params = dict(params)
    layer_types = set(getattr(cfg, "layer_types", None) or [])
    nested = [k for k in params if k in layer_types]
    if nested:
        # Per-layer-type RoPE (Gemma 3 style); one table serves every layer here, so they must agree.
        distinct = {repr(sorted(params[k].items())) for k in nested if params[k] is not None}
        if len(distinct) > 1:
            raise ValueError(f"rope_parameters differ between layer types {nested}; one RoPE must serve all layers")
        params = dict(params[nested[0]])
    return params


def _rope_from_hf(cfg: Any) -> RoPEConfig:
    params = _rope_parameters(cfg)
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor={partial}: these HF models rotate whole heads; not supported")
    if rope_type == "default":
        return RoPEConfig(theta=theta)
    if rope_type == "linear":
        return RoPEConfig(theta=theta, scaling=RopeScaling(type="linear", factor=float(params["factor"])))
    if rope_type == "yarn":
        if params.get("truncate", True) is False:
            raise ValueError("rope_parameters.truncate=False: our YaRN always rounds the correction range")
        original = params.get("original_max_position_embeddings") or cfg.max_position_embeddings
        factor = params.get("factor") or cfg.max_position_embeddings / original
        attention = params.get("attention_factor")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if attention is None and mscale and mscale_all_dim:
            # DeepSeek-style ratio of the two mscales (transformers' _compute_yarn_parameters).
            def get_mscale(scale: float, m: float) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            attention = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        scaling = RopeScaling(
            type="yarn",
            factor=float(factor),
            original_max_seq_len=int(original),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=None if attention is None else float(attention),
        )
        return RoPEConfig(theta=theta, scaling=scaling)
    why = {
        "dynamic": " (dynamic NTK rescales the frequencies with the running sequence length; our RoPE table is fixed)",
    }.get(rope_type, "")
    raise ValueError(
        f"rope_parameters.rope_type={rope_type!r} is not supported{why}; supported: default, linear, yarn"
    )


def _layer_plan(mixers: list, ffns: list) -> tuple[Any, Any, list[LayerOverride]]:
    """Default mixer and FFN (the most common per-layer config, earliest on a tie) and the overrides
    that give every other layer its own."""
    n = len(mixers)
    mixer, mixer_groups = _most_common(mixers)
    ffn, ffn_groups = _most_common(ffns)
    overrides = [LayerOverride(**_select(layers, n), mixer=m) for layers, m in mixer_groups]
    overrides += [LayerOverride(**_select(layers, n), ffn=f) for layers, f in ffn_groups]
    return mixer, ffn, overrides


def _most_common(items: list) -> tuple[Any, list[tuple[list[int], Any]]]:
    uniques: list = []
    for item in items:
        if item not in uniques:
            uniques.append(item)
    default = max(uniques, key=lambda u: sum(x == u for x in items))
    groups = [([i for i, x in enumerate(items) if x == u], u) for u in uniques if u != default]
    return default, groups


def _select(layers: list[int], n_layers: int) -> dict[str, Any]:
    """``every``/``start`` when the layers are a period running to the end of the stack (reads better in
    YAML), else the explicit list."""
    if len(layers) >= 2:
        step = layers[1] - layers[0]
        if step > 0 and layers == list(range(layers[0], n_layers, step)):
            return {"every": step, "start": layers[0]}
    return {"layers": list(layers)}


# ------------------------------------------------------------------------------------------ weights


class _Weights:
    """An HF model's parameters by name; conversion must use each exactly once."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self.params = params
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def take(self, name: str) -> torch.Tensor:
        if name not in self.params:
            raise ValueError(f"the HF model has no parameter {name!r} that the converted config needs")
        self.used.add(name)
        return self.params[name]

    def unused(self) -> list[str]:
        return sorted(set(self.params) - self.used)


def from_hf(hf_model: "PreTrainedModel") -> CausalLM:
    """Build a :class:`CausalLM` with the architecture and weights of a ``transformers`` causal LM.

    The result has the HF model's dtype and device, and its train/eval mode. Gemma's RMSNorm scales by
    ``1 + w``: the converted model's norms are ``rmsnorm`` with ``unit_offset: true``, which keep ``w`` and
    form ``1 + w`` in fp32 as Gemma does, so a bf16 model keeps every bit of ``w``. A model cast to a lower
    precision (``.to(torch.bfloat16)``) converts too: its RoPE frequency buffer, rounded to that precision,
    is compared with ours within that precision's rounding.
    """
    config = config_from_hf(hf_model.config)
    inp, out = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    if out is None:
        raise ValueError(f"{type(hf_model).__name__} has no LM head; pass a *ForCausalLM model")
    tied = out.weight is inp.weight
    if tied != config.tie_embeddings:
        # Trust the modules over the config flag (tying happens at load time from more than one setting).
        config = config.model_copy(update={"tie_embeddings": tied})
    model = CausalLM(config)

    # named_parameters() lists a tied head once, under the embedding.
    weights = _Weights({name: p.detach() for name, p in hf_model.named_parameters()})
    if config.position.kind == "learned":
        state = _gpt2_state(model, weights, prefix=_prefix(hf_model))
    else:
        state = _rope_family_state(model, weights, prefix=_prefix(hf_model))
    left = weights.unused()
    if left:
        raise ValueError(f"HF parameters with no counterpart in the converted model: {left}")
    if tied:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    _check_rope(hf_model, model)
    param = next(hf_model.parameters())
    return model.to(device=param.device, dtype=param.dtype).train(hf_model.training)


def _prefix(hf_model: Any) -> str:
    return f"{hf_model.base_model_prefix}."


# Our per-layer names -> HF names in the Llama family (Llama, Mistral, Qwen, Gemma 2).
_LLAMA_BLOCK_NAMES: dict[str, str] = {
    "mixer_norm": "input_layernorm",
    "mixer_post_norm": "post_attention_layernorm",
    "ffn_post_norm": "post_feedforward_layernorm",
}


def _llama_name(key: str, prefix: str, residual: str, moe_prefix: str = "mlp.") -> str:
    """HF name of one of our (non-expert) parameters in the Llama family layout."""
    if key == "embed.weight":
        return f"{prefix}embed_tokens.weight"
    if key.startswith("final_norm."):
        return f"{prefix}norm.{key.split('.', 1)[1]}"
    if key.startswith("lm_head."):
        return key
    m = re.fullmatch(r"blocks\.(\d+)\.([^.]+)\.(.+)", key)
    if m is None:
        raise ValueError(f"no HF counterpart for parameter {key!r}")
    i, part, rest = m.groups()
    layer = f"{prefix}layers.{i}."
    if part == "mixer":
        return f"{layer}self_attn.{rest}"
    if part == "ffn":
        if rest.startswith("router."):
            return f"{layer}{moe_prefix}gate.{rest.split('.', 1)[1]}"
        return f"{layer}mlp.{rest}"
    if part == "ffn_norm":
        # Llama's post_attention_layernorm is the pre-FFN norm; Gemma 2 has a separate one.
        name = "pre_feedforward_layernorm" if residual == "sandwich" else "post_attention_layernorm"
        return f"{layer}{name}.{rest}"
    if part in _LLAMA_BLOCK_NAMES:
        return f"{layer}{_LLAMA_BLOCK_NAMES[part]}.{rest}"
    raise ValueError(f"no HF counterpart for parameter {key!r}")


def _rope_family_state(model: CausalLM, weights: _Weights, prefix: str) -> dict[str, torch.Tensor]:
    config = model.config
    state: dict[str, torch.Tensor] = {}
    for key in model.state_dict():
        if key == "lm_head.weight" and config.tie_embeddings:
            continue
        if re.fullmatch(r"blocks\.\d+\.ffn\.(w_gate|w_up|w_down)", key):
            continue  # experts are read per layer below
        i = key.split(".")[1] if key.startswith("blocks.") else None
        moe_prefix = _moe_prefix(weights, f"{prefix}layers.{i}.") if i is not None else "mlp."
        state[key] = weights.take(_llama_name(key, prefix, config.residual, moe_prefix))
    for i, block in enumerate(model.blocks):
        if hasattr(block.ffn, "w_up"):
            layer = f"{prefix}layers.{i}."
            w_gate, w_up, w_down = _expert_weights(weights, layer + _moe_prefix(weights, layer), block.ffn)
            for name, value in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
                state[f"blocks.{i}.ffn.{name}"] = value
    return state


def _moe_prefix(weights: _Weights, layer: str) -> str:
    # transformers 4.x Mixtral keeps the MoE under ``block_sparse_moe``; 5.x and Qwen3-MoE under ``mlp``.
    return "block_sparse_moe." if f"{layer}block_sparse_moe.gate.weight" in weights else "mlp."


def _expert_weights(weights: _Weights, moe: str, ffn: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert matrices stacked (E, hidden, d) / (E, d, hidden) from either HF layout: fused 3-D
    ``experts.gate_up_proj`` (E, 2*hidden, d, gate rows first) and ``experts.down_proj`` (E, d, hidden) in
    transformers 5, or one module per expert (``gate_proj/up_proj/down_proj``, Mixtral's ``w1/w3/w2``)."""
    E, h, d = ffn.n_experts, ffn.hidden, ffn.w_up.shape[-1]
    fused = f"{moe}experts.gate_up_proj"
    if fused in weights:
        gate_up, down = weights.take(fused), weights.take(f"{moe}experts.down_proj")
        if tuple(gate_up.shape) != (E, 2 * h, d) and tuple(gate_up.shape) == (E, d, 2 * h):
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)  # (in, out) storage
        if tuple(gate_up.shape) != (E, 2 * h, d) or tuple(down.shape) != (E, d, h):
            raise ValueError(f"unexpected expert shapes {tuple(gate_up.shape)}, {tuple(down.shape)} under {moe}experts")
        w_gate, w_up = gate_up.chunk(2, dim=1)
        return w_gate, w_up, down
    names = ("w1", "w3", "w2") if f"{moe}experts.0.w1.weight" in weights else ("gate_proj", "up_proj", "down_proj")
    stacked = [torch.stack([weights.take(f"{moe}experts.{e}.{n}.weight") for e in range(E)]) for n in names]
    return stacked[0], stacked[1], stacked[2]


def _gpt2_state(model: CausalLM, weights: _Weights, prefix: str) -> dict[str, torch.Tensor]:
    # Conv1D stores (in, out): transpose to nn.Linear's (out, in).
    d = model.config.d_model
    state = {
        "embed.weight": weights.take(f"{prefix}wte.weight"),
        "pos_embed.weight": weights.take(f"{prefix}wpe.weight"),
    }
    for i in range(model.config.n_layers):
        h, b = f"{prefix}h.{i}.", f"blocks.{i}."
        w, bias = weights.take(h + "attn.c_attn.weight").t(), weights.take(h + "attn.c_attn.bias")
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{b}mixer.{name}.weight"] = w[j * d : (j + 1) * d]
            state[f"{b}mixer.{name}.bias"] = bias[j * d : (j + 1) * d]
        pairs = {
            "mixer.o_proj": "attn.c_proj",
            "ffn.up_proj": "mlp.c_fc",
            "ffn.down_proj": "mlp.c_proj",
        }
        for ours, theirs in pairs.items():
            state[f"{b}{ours}.weight"] = weights.take(f"{h}{theirs}.weight").t()
            state[f"{b}{ours}.bias"] = weights.take(f"{h}{theirs}.bias")
        for ours, theirs in {"mixer_norm": "ln_1", "ffn_norm": "ln_2"}.items():
            for p in ("weight", "bias"):
                state[f"{b}{ours}.{p}"] = weights.take(f"{h}{theirs}.{p}")
    for p in ("weight", "bias"):
        state[f"final_norm.{p}"] = weights.take(f"{prefix}ln_f.{p}")
    if not model.config.tie_embeddings:
        state["lm_head.weight"] = weights.take("lm_head.weight")
    return state


def _check_rope(hf_model: Any, model: CausalLM) -> None:
    """Compare the RoPE frequencies and cos/sin scale of both sides. The two compute their tables
    independently from their configs, so a scaling variant mapped wrongly shows up here at conversion
    time rather than as quietly worse long-context behaviour."""
    ours = next((b.mixer.rotary for b in model.blocks if getattr(b.mixer, "rotary", None) is not None), None)
    theirs = next((m for m in hf_model.modules() if hasattr(m, "inv_freq") and hasattr(m, "attention_scaling")), None)
    if ours is None or theirs is None:
        return
    inv_ours, inv_theirs = ours.inv_freq.float().cpu(), theirs.inv_freq.float().cpu()
    # A model cast with .to(torch.bfloat16) holds its table rounded to bf16 (relative error <= eps / 2):
    # agree within that rounding. A wrongly mapped scaling variant changes frequencies by far more.
    rtol = max(1e-6, torch.finfo(theirs.inv_freq.dtype).eps) if theirs.inv_freq.is_floating_point() else 1e-6
    same = inv_ours.shape == inv_theirs.shape and torch.allclose(inv_ours, inv_theirs, rtol=rtol, atol=0.0)
    if not same or not math.isclose(ours.attention_scaling, float(theirs.attention_scaling), rel_tol=1e-6):
        raise ValueError(
            f"RoPE tables disagree after conversion (position={model.config.position!r}, HF "
            f"rope_parameters={_rope_parameters(hf_model.config)!r}): a scaling variant does not map exactly"
        )


# ------------------------------------------------------------------------------------------- export


def _llama_incompatibilities(config: ModelConfig) -> list[str]:
    problems: list[str] = []
    layers = config.layer_configs()
    if any(layer != layers[0] for layer in layers):
        problems.append("layer_overrides: layers differ from each other; Llama repeats one layer")
    mixer, ffn = layers[0].mixer, layers[0].ffn
    if mixer.kind != "attention":
        problems.append(f"mixer.kind={mixer.kind!r}: Llama uses attention")
    else:
        head_dim = mixer.resolved_head_dim(config.d_model)
        for field in ("qk_norm", "window", "logit_softcap"):
            bad = getattr(mixer, field)
            if bad:
                problems.append(f"mixer.{field}={bad!r}: Llama has none")
        if mixer.scale is not None and mixer.scale != head_dim**-0.5:
            problems.append(f"mixer.scale={mixer.scale}: Llama scales by head_dim ** -0.5")
        if mixer.qkv_bias != mixer.out_bias:
            problems.append(
                f"mixer.qkv_bias={mixer.qkv_bias}, out_bias={mixer.out_bias}: Llama's attention_bias sets all four"
            )
        if config.d_model % mixer.n_heads:
            problems.append(f"mixer.n_heads={mixer.n_heads} must divide d_model={config.d_model} for LlamaConfig")
    if not isinstance(ffn, GLUConfig):
        problems.append(f"ffn.kind={ffn.kind!r}: Llama uses a gated MLP (swiglu/geglu/glu)")
    elif ffn.activation not in _ACT_TO_HF:
        problems.append(f"ffn.activation={ffn.activation!r} has no HF name")
    if config.norm.kind != "rmsnorm":
        problems.append(f"norm.kind={config.norm.kind!r}: Llama uses rmsnorm")
    elif config.norm.unit_offset:
        problems.append("norm.unit_offset=true: Llama's RMSNorm scales by w, not 1 + w")
    if config.residual != "pre":
        problems.append(f"residual={config.residual!r}: Llama is pre-norm")
    if not config.final_norm:
        problems.append("final_norm=false: Llama has a final norm")
    if config.position.kind != "rope":
        problems.append(f"position.kind={config.position.kind!r}: Llama uses rope")
    elif config.position.fraction != 1.0:
        problems.append(f"position.fraction={config.position.fraction}: Llama rotates whole heads")
    if config.resolved_embedding_scale() != 1.0:
        problems.append(f"embedding_scale={config.embedding_scale!r}: Llama does not scale embeddings")
    if config.head_bias:
        problems.append("head_bias=true: Llama's LM head has no bias")
    if config.logit_softcap is not None:
        problems.append(f"logit_softcap={config.logit_softcap}: Llama has none")
    if config.mtp_heads:
        problems.append(f"mtp_heads={config.mtp_heads}: Llama has no multi-token heads")
    return problems


def _rope_to_hf(position: RoPEConfig, head_dim: int) -> dict[str, Any]:
    scaling = position.scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": position.theta}
    if scaling.type == "linear":
        return {"rope_type": "linear", "rope_theta": position.theta, "factor": scaling.factor}
    if scaling.type == "ntk":
        # A static NTK base change is plain RoPE with a larger base (rope_inv_freq computes the same).
        return {"rope_type": "default", "rope_theta": position.theta * scaling.factor ** (head_dim / (head_dim - 2))}
    params = {
        "rope_type": "yarn",
        "rope_theta": position.theta,
        "factor": scaling.factor,
        "original_max_position_embeddings": scaling.original_max_seq_len,
        "beta_fast": scaling.beta_fast,
        "beta_slow": scaling.beta_slow,
    }
    if scaling.attention_factor is not None:
        params["attention_factor"] = float(scaling.attention_factor)
    return params


def to_hf_config(config: ModelConfig) -> "LlamaConfig":
    """The ``transformers.LlamaConfig`` of a Llama-compatible :class:`ModelConfig`: attention with RoPE,
    RMSNorm, pre-norm, a gated MLP, the same layer everywhere, no biases (or bias on all four attention
    projections). Raises ``ValueError`` listing every field that Llama cannot express."""
    problems = _llama_incompatibilities(config)
    if problems:
        raise ValueError("model is not Llama-compatible:\n" + "\n".join(f"  - {p}" for p in problems))
    transformers = _transformers()
    mixer, ffn = config.mixer, config.ffn
    head_dim = mixer.resolved_head_dim(config.d_model)
    rope = _rope_to_hf(config.position, head_dim)
    if int(transformers.__version__.split(".")[0]) >= 5:
        rope_kwargs: dict[str, Any] = {"rope_parameters": rope}
    else:  # pragma: no cover - transformers 4.x
        extra = {k: v for k, v in rope.items() if k != "rope_theta"}
        scaling = extra if extra["rope_type"] != "default" else None
        rope_kwargs = {"rope_theta": rope["rope_theta"], "rope_scaling": scaling}
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=ffn.resolved_hidden(config.d_model),
        num_hidden_layers=config.n_layers,
        num_attention_heads=mixer.n_heads,
        num_key_value_heads=mixer.kv_heads,
        head_dim=head_dim,
        hidden_act=_ACT_TO_HF[ffn.activation],
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm.eps,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=mixer.qkv_bias,
        mlp_bias=ffn.bias,
        initializer_range=config.init.std,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **rope_kwargs,
    )


def to_hf(model: CausalLM) -> "LlamaForCausalLM":
    """A ``transformers.LlamaForCausalLM`` (its config is ``.config``) computing the same function as a
    Llama-compatible ``model`` (see :func:`to_hf_config`), in the model's dtype, on CPU, in eval mode."""
    hf_config = to_hf_config(model.config)
    transformers = _transformers()
    dtype = model.embed.weight.dtype
    hf_model = transformers.LlamaForCausalLM(hf_config)
    prefix = _prefix(hf_model)
    state = {
        _llama_name(key, prefix, "pre"): value.detach().cpu()
        for key, value in model.state_dict().items()
        if not (key == "lm_head.weight" and model.config.tie_embeddings)
    }
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state[f"{prefix}embed_tokens.weight"]
    hf_model.load_state_dict(state, strict=True)
    _check_rope(hf_model, model)
    return hf_model.to(dtype).eval()


def save_hf(model: CausalLM, directory: str | Path) -> Path:
    """Write ``model`` as a Llama checkpoint (``config.json`` + safetensors) that
    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads."""
    directory = Path(directory)
    to_hf(model).save_pretrained(directory)
    return directory


def load_hf(directory: str | Path, dtype: torch.dtype | None = None) -> CausalLM:
    """A :class:`CausalLM` from a local HF model directory (``config.json`` + weights), read with
    ``from_pretrained(..., local_files_only=True)`` so the hub is never contacted."""
    transformers = _transformers()
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'} is missing: not a Hugging Face model directory")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    return from_hf(hf_model)
