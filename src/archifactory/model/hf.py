"""Conversion between Hugging Face ``transformers`` causal LMs and :class:`CausalLM`.

Reading (``config_from_hf``, ``from_hf``, ``load_hf``) covers these ``model_type`` values:

- ``llama`` (Touvron et al. 2023), ``mistral`` (Jiang et al. 2023; ``sliding_window`` on every layer),
  ``qwen2`` (QKV bias, per-layer sliding window from ``layer_types``), ``qwen3`` (QK-norm, explicit
  ``head_dim``);
- ``mixtral`` (Jiang et al. 2024) and ``qwen3_moe``: sparse mixture-of-experts FFNs;
- ``gpt2`` (Radford et al. 2019): learned positions, LayerNorm, GELU MLP with biases, fused ``c_attn``
  stored as ``Conv1D`` (weights transposed relative to ``nn.Linear``);
- ``gemma2`` (Gemma Team 2024): sandwich norms, ``sqrt(d_model)`` embedding scale, GeGLU, soft-capped
  attention and final logits, ``query_pre_attn_scalar`` and alternating sliding-window layers;
- ``deepseek_v3`` (DeepSeek-AI 2024) with dense FFNs: multi-head latent attention (our ``mla``), interleaved
  or half-split RoPE, YaRN with DeepSeek's softmax mscale. Its MoE layers (sigmoid, group-limited routing)
  have no counterpart and are refused;
- ``bamba`` (IBM 2024): Mamba-2 layers (our ``mamba2``), optionally attention layers with RoPE on half of each
  head, each followed by a SwiGLU MLP. ``Mamba2ForCausalLM`` itself has no FFN, which every block here has:
  it is refused, naming Bamba as the Mamba-2 class that matches our blocks.

RoPE scalings read: ``default``, ``linear``, ``yarn`` (with DeepSeek's mscale ratio), ``llama3`` and ``dynamic``
(dynamic NTK, recomputed from each forward's largest position as transformers does; see ``RopeScaling``).

Writing (``to_hf``, ``save_hf``) picks the first class of :data:`EXPORT_MODEL_TYPES` (Llama, Mistral, Qwen2,
Qwen3, Mixtral, Qwen3-MoE, Gemma 2, GPT-2, DeepSeek-V3, Bamba) whose config, read back by ``config_from_hf``, is our architecture
again, and moves the weights with the import mapping run backwards (so the two directions cannot drift
apart). A model no class represents raises a one-line ``ValueError`` naming the component in the way.

Every mapping is exact up to float rounding: the tests compare fp32 logits with HF at ``atol=1e-5`` (or the
bound of tests/numerics.py for two summation orders, where Mamba-2's chunked scans block differently).
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
from archifactory.mixers.mamba2 import Mamba2Config
from archifactory.mixers.mla import MLAConfig
from archifactory.model.config import LayerOverride, ModelConfig
from archifactory.model.lm import CausalLM
from archifactory.nn.init import InitConfig
from archifactory.nn.norms import LayerNormConfig, RMSNormConfig
from archifactory.nn.positions import LearnedPositionConfig, RoPEConfig, RopeScaling

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

__all__ = ["EXPORT_MODEL_TYPES", "load_pretrained_modules", "SUPPORTED_MODEL_TYPES", "config_from_hf", "from_hf", "load_hf", "save_hf", "to_hf", "to_hf_config"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gpt2", "gemma2", "deepseek_v3", "bamba")

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
    if model_type == "mamba2":
        raise ValueError(
            "model_type='mamba2': Mamba2ForCausalLM's layers have no FFN, and every archifactory block has one; "
            "the Mamba-2 class with an FFN per layer is Bamba (model_type='bamba')"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "gpt2":
        return _gpt2_config(hf_config)
    if model_type == "deepseek_v3":
        return _deepseek_config(hf_config)
    if model_type == "bamba":
        return _bamba_config(hf_config)
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


def _deepseek_config(cfg: Any) -> ModelConfig:
    """DeepSeek-V3 (DeepSeek-AI 2024) with multi-head latent attention on every layer and dense SwiGLU
    FFNs. Its MoE layers (sigmoid scores, group-limited top-k, ``routed_scaling_factor``) have no
    counterpart in our MoE, which routes by softmax: a config with any is refused."""
    n_layers = cfg.num_hidden_layers
    first_dense = cfg.first_k_dense_replace if cfg.first_k_dense_replace is not None else n_layers
    if first_dense < n_layers and cfg.n_routed_experts:
        raise ValueError(
            f"first_k_dense_replace={first_dense} < num_hidden_layers={n_layers}: DeepSeek-V3's MoE layers "
            "(sigmoid routing, group-limited top-k, routed_scaling_factor) have no counterpart (our moe routes "
            "by softmax); only all-dense DeepSeek-V3 models convert"
        )
    if cfg.num_key_value_heads != cfg.num_attention_heads:
        raise ValueError(
            f"num_key_value_heads={cfg.num_key_value_heads} differs from num_attention_heads="
            f"{cfg.num_attention_heads}: MLA expands keys and values per head"
        )
    params = _rope_parameters(cfg)
    rope_type = params.get("rope_type", params.get("type", "default"))
    mscale_all_dim = float(params.get("mscale_all_dim") or 0.0)
    if mscale_all_dim and rope_type != "yarn":
        raise ValueError(
            f"rope_parameters.mscale_all_dim={mscale_all_dim} with rope_type={rope_type!r}: our MLA applies "
            "DeepSeek's softmax mscale with yarn only"
        )
    mixer = MLAConfig(
        n_heads=cfg.num_attention_heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        bias=bool(cfg.attention_bias),
        latent_norm_eps=1e-6,  # DeepseekV3RMSNorm's default: q_a_layernorm / kv_a_layernorm get no eps
        mscale_all_dim=mscale_all_dim,
    )
    return ModelConfig(
        vocab_size=cfg.vocab_size,
        d_model=cfg.hidden_size,
        n_layers=n_layers,
        max_seq_len=int(cfg.max_position_embeddings),
        mixer=mixer,
        ffn=_glu(cfg.intermediate_size, _activation(cfg, "hidden_act"), bias=False),
        norm=RMSNormConfig(eps=float(cfg.rms_norm_eps)),
        residual="pre",
        position=_rope_from_hf(cfg),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        init=InitConfig(std=float(getattr(cfg, "initializer_range", 0.02))),
    )


def _bamba_config(cfg: Any) -> ModelConfig:
    """Bamba (IBM 2024): pre-norm layers of Mamba-2 (or, at ``attn_layer_indices``, attention with RoPE on
    half of each head) followed by a SwiGLU MLP; our ``mamba2`` mixer in a block with an FFN. Its Mamba
    layers use ``hidden_act`` in the convolution where ours use SiLU, so other activations are refused."""
    if cfg.hidden_act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={cfg.hidden_act!r}: Bamba's Mamba layers use it too, ours use silu")
    limit = tuple(cfg.time_step_limit) if cfg.time_step_limit is not None else (0.0, float("inf"))
    if limit != (0.0, float("inf")):
        raise ValueError(f"time_step_limit={limit}: our Mamba-2 does not clamp its time steps")
    d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    mamba = Mamba2Config(
        expand=cfg.mamba_expand, head_dim=cfg.mamba_d_head, d_state=cfg.mamba_d_state, n_groups=cfg.mamba_n_groups,
        d_conv=cfg.mamba_d_conv, conv_bias=bool(cfg.mamba_conv_bias), proj_bias=bool(cfg.mamba_proj_bias),
        chunk_size=cfg.mamba_chunk_size,
    )
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or d // n_heads
    attention = AttentionConfig(
        n_heads=n_heads, n_kv_heads=cfg.num_key_value_heads, head_dim=head_dim if head_dim * n_heads != d else None,
        qkv_bias=bool(cfg.attention_bias), out_bias=bool(cfg.attention_bias),
    )
    attention_layers = set(cfg.attn_layer_indices or [])
    mixers = [attention if i in attention_layers else mamba for i in range(n_layers)]
    ffn = _glu(cfg.intermediate_size, "silu", bias=bool(cfg.mlp_bias))
    mixer, ffn, overrides = _layer_plan(mixers, [ffn] * n_layers)
    return ModelConfig(
        vocab_size=cfg.vocab_size,
        d_model=d,
        n_layers=n_layers,
        max_seq_len=int(cfg.max_position_embeddings),
        mixer=mixer,
        ffn=ffn,
        layer_overrides=overrides,
        norm=RMSNormConfig(eps=float(cfg.rms_norm_eps)),
        residual="pre",
        position=_rope_from_hf(cfg, partial_ok=True),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        init=InitConfig(std=float(getattr(cfg, "initializer_range", 0.02))),
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


def _rope_from_hf(cfg: Any, partial_ok: bool = False) -> RoPEConfig:
    params = _rope_parameters(cfg)
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    fraction = 1.0 if partial is None else float(partial)
    if fraction != 1.0 and not partial_ok:
        raise ValueError(f"partial_rotary_factor={partial}: these HF models rotate whole heads; not supported")
    if rope_type != "default" and fraction != 1.0:
        raise ValueError(f"rope_type={rope_type!r} with partial_rotary_factor={partial}: not supported")
    if rope_type == "default":
        return RoPEConfig(theta=theta, fraction=fraction)
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
    if rope_type == "llama3":
        scaling = RopeScaling(
            type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_seq_len=int(params["original_max_position_embeddings"]),
        )
        return RoPEConfig(theta=theta, scaling=scaling)
    if rope_type == "dynamic":
        # transformers' dynamic NTK measures the length against max_position_embeddings (not
        # rope_parameters.original_max_position_embeddings): _compute_dynamic_ntk_parameters.
        scaling = RopeScaling(
            type="dynamic", factor=float(params["factor"]), original_max_seq_len=int(cfg.max_position_embeddings)
        )
        return RoPEConfig(theta=theta, scaling=scaling)
    raise ValueError(
        f"rope_parameters.rope_type={rope_type!r} is not supported; supported: default, linear, yarn, llama3, dynamic"
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
    state = _import_state(model, weights, _prefix(hf_model), hf_model.config)
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


# Our MLA names -> DeepSeek-V3's (the rest of the layer is Llama's layout).
_MLA_NAMES = {"q_a_norm": "q_a_layernorm", "kv_a_proj": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm"}


def _deepseek_state(model: CausalLM, weights: _Weights, prefix: str, interleaved: bool) -> dict[str, torch.Tensor]:
    """Our state from DeepSeek-V3's parameters. With ``rope_interleave`` DeepSeek rotates channel pairs
    (0, 1), (2, 3), ...; our rotary pairs channel i with i + rope/2. Feeding ours the de-interleaved channels
    (evens, then odds) is the same rotation, and q.k is unchanged when q's and k's rotary channels are
    permuted alike: so the rows producing them are permuted."""
    state: dict[str, torch.Tensor] = {}
    for key in model.state_dict():
        if key == "lm_head.weight" and model.config.tie_embeddings:
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.mixer\.([^.]+)\.(weight|bias)", key)
        if m is None:
            state[key] = weights.take(_llama_name(key, prefix, "pre"))
            continue
        i, part, kind = m.groups()
        mla = model.blocks[int(i)].mixer
        value = weights.take(f"{prefix}layers.{i}.self_attn.{_MLA_NAMES.get(part, part)}.{kind}")
        if interleaved:
            rope, nope = mla.rope_dim, mla.nope_dim
            perm = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
            if part in ("q_proj", "q_b_proj"):  # rows: per head, nope then rope channels
                heads = value.view(mla.n_heads, nope + rope, *value.shape[1:])
                value = torch.cat([heads[:, :nope], heads[:, nope:][:, perm]], dim=1).reshape(value.shape)
            elif part == "kv_a_proj":  # rows: the latent, then the shared rotary key
                value = torch.cat([value[: mla.kv_rank], value[mla.kv_rank :][perm]])
        state[key] = value
    return state


def _bamba_state(model: CausalLM, weights: _Weights, prefix: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    parts = {"mixer_norm": "input_layernorm", "ffn_norm": "pre_ff_layernorm", "ffn": "feed_forward"}
    for key in model.state_dict():
        if key == "lm_head.weight" and model.config.tie_embeddings:
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.([^.]+)\.(.+)", key)
        if key.startswith("final_norm."):
            name = f"{prefix}final_layernorm.{key.split('.', 1)[1]}"
        elif m is None:
            name = _llama_name(key, prefix, "pre")
        else:
            i, part, rest = m.groups()
            if part == "mixer":
                mamba = rest.startswith("heads.") or rest.startswith("out_proj.")
                rest = rest.removeprefix("heads.")
                name = f"{prefix}layers.{i}.{'mamba' if mamba else 'self_attn'}.{rest}"
            elif part in parts:
                name = f"{prefix}layers.{i}.{parts[part]}.{rest}"
            else:
                raise ValueError(f"no HF counterpart for parameter {key!r}")
        state[key] = weights.take(name)
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
    rtol = max(
        [1e-6] + [torch.finfo(t.dtype).eps for t in (ours.inv_freq, theirs.inv_freq) if t.is_floating_point()]
    )
    same = inv_ours.shape == inv_theirs.shape and torch.allclose(inv_ours, inv_theirs, rtol=rtol, atol=0.0)
    if not same or not math.isclose(ours.attention_scaling, float(theirs.attention_scaling), rel_tol=1e-6):
        raise ValueError(
            f"RoPE tables disagree after conversion (position={model.config.position!r}, HF "
            f"rope_parameters={_rope_parameters(hf_model.config)!r}): a scaling variant does not map exactly"
        )


# ------------------------------------------------------------------------------------------- export
#
# Export never writes a weight mapping of its own. For each transformers class that could represent the
# model, the HF config is built from ours and read back with ``config_from_hf``: the class is used only when
# that round trip gives our architecture again (``_architecture`` below: the config minus training-only
# settings). The weights then go through the *import* mapping run backwards: the HF parameters are filled
# with their own element indices, the import mapping turns them into our state dict of indices, and each of
# our values is written to the HF element whose index it holds. A bijection is checked (every HF element
# written exactly once), so a mapping that drops, duplicates or mis-shapes a weight fails loudly.

# Tried in this order; the first class whose round trip reproduces the model is written.
EXPORT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gemma2", "gpt2", "deepseek_v3", "bamba")
_EXPORTABLE_MIXERS = ("attention", "mla", "mamba2")
_EXPORTABLE_FFNS = ("swiglu", "geglu", "glu", "mlp", "moe")

# Fields that change how a model is trained or initialised, not the function it computes.
_NOT_ARCHITECTURE = {
    "init", "z_loss_weight", "mtp_loss_weight", "balance_loss_weight", "router_z_loss_weight",
    "bias_update_rate", "backend", "chunk_size", "dt_min", "dt_max", "multiple_of", "layer_overrides",
}


def _architecture(config: ModelConfig) -> dict[str, Any]:
    """What the model computes, per layer and with every default resolved, as a flat ``{path: value}``."""
    d = config.d_model
    flat: dict[str, Any] = {}

    def put(prefix: str, data: dict[str, Any]) -> None:
        for key, value in data.items():
            if key in _NOT_ARCHITECTURE:
                continue
            if isinstance(value, dict):
                put(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    top = config.model_dump(exclude={"mixer", "ffn", "position"})
    top["embedding_scale"] = config.resolved_embedding_scale()
    put("", top)
    position = config.position.model_dump()
    if config.position.kind in ("rope", "alibi", "none") and not config.mixers_use_positions():
        position = {}  # a relative encoding no layer applies changes nothing
    scaling = position.get("scaling")
    for i, layer in enumerate(config.layer_configs()):
        mixer, ffn = layer.mixer.model_dump(), layer.ffn.model_dump()
        if layer.mixer.kind == "attention":
            head_dim = layer.mixer.resolved_head_dim(d)
            mixer.update(head_dim=head_dim, n_kv_heads=layer.mixer.kv_heads, scale=layer.mixer.scale or head_dim**-0.5)
            if scaling is not None and scaling["type"] == "ntk" and position.get("scaling") is not None:
                # a static NTK base change is plain RoPE with a larger base (rope_inv_freq computes the same)
                rot = config.position.rot_dim(head_dim)
                position = {**position, "scaling": None, "theta": position["theta"] * scaling["factor"] ** (rot / (rot - 2))}
        if layer.mixer.kind == "mla":
            nope, rope, v, kv_rank = layer.mixer.sizes(d)
            mixer.update(qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v, kv_lora_rank=kv_rank)
        if "hidden" in ffn:
            ffn["hidden"] = ffn["hidden"] or (4 * d if layer.ffn.kind == "mlp" else layer.ffn.resolved_hidden(d))
        if layer.ffn.kind == "moe":
            ffn["expert_hidden"] = layer.ffn.resolved_hidden(d)
        put(f"layers[{i}].mixer.", mixer)
        put(f"layers[{i}].ffn.", ffn)
    put("position.", position)
    return flat


def _differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """``path=ours (the HF config gives theirs)`` per differing field, first layer only, kinds first."""

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-9)
        return a == b

    def order(key: str) -> tuple[bool, str, str]:
        field = re.sub(r"\[\d+\]", "", key)
        return (not field.endswith("kind"), field, key)

    found, seen, other_kind = [], set(), []
    for key in sorted(set(ours) | set(theirs), key=order):
        a, b = ours.get(key, "<absent>"), theirs.get(key, "<absent>")
        field = re.sub(r"\[\d+\]", "[*]", key)
        if any(key.startswith(prefix) for prefix in other_kind):
            continue  # the fields of a component of another kind say nothing more
        if key.endswith("kind") and not same(a, b):
            other_kind.append(key[: -len("kind")])
        if not same(a, b) and field not in seen:
            seen.add(field)
            found.append(f"{key}={a!r} (the HF config gives {b!r})")
    return found


def _rope_kwargs(position: Any, head_dim: int, max_seq_len: int) -> dict[str, Any]:
    if position.kind != "rope":
        return {}
    scaling = position.scaling
    theta = position.theta
    if scaling is None:
        params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    elif scaling.type == "linear":
        params = {"rope_type": "linear", "rope_theta": theta, "factor": scaling.factor}
    elif scaling.type == "ntk":
        rot = position.rot_dim(head_dim)
        params = {"rope_type": "default", "rope_theta": theta * scaling.factor ** (rot / (rot - 2))}
    elif scaling.type == "dynamic":
        # transformers measures the length against max_position_embeddings (= our max_seq_len): the round
        # trip refuses a model whose original_max_seq_len differs.
        params = {"rope_type": "dynamic", "rope_theta": theta, "factor": scaling.factor}
    elif scaling.type == "llama3":
        params = {
            "rope_type": "llama3", "rope_theta": theta, "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_seq_len,
        }
    else:
        params = {
            "rope_type": "yarn", "rope_theta": theta, "factor": scaling.factor,
            "original_max_position_embeddings": scaling.original_max_seq_len,
            "beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow,
        }
        if scaling.attention_factor is not None:
            params["attention_factor"] = float(scaling.attention_factor)
    if position.fraction != 1.0:
        params["partial_rotary_factor"] = position.fraction  # refused on import: shows in the round trip
    return {"rope_parameters": params}


def _hf_config_kwargs(config: ModelConfig, model_type: str) -> dict[str, Any]:
    """The keyword arguments of ``model_type``'s transformers config for ``config``, best effort: what the
    class cannot express is left out and shows up as a difference in the round trip."""
    layers = config.layer_configs()
    mixers, ffns = [layer.mixer for layer in layers], [layer.ffn for layer in layers]
    mixer, d = mixers[0], config.d_model
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if model_type == "gpt2":
        mlp = ffns[0]
        head_dim = d // mixer.n_heads
        scales = [m.scale or head_dim**-0.5 for m in mixers]
        by_layer = all(math.isclose(s, head_dim**-0.5 / (i + 1)) for i, s in enumerate(scales)) and len(scales) > 1
        return dict(
            vocab_size=config.vocab_size, n_embd=d, n_layer=config.n_layers, n_head=mixer.n_heads,
            n_positions=config.max_seq_len, n_inner=getattr(mlp, "hidden", None) or 4 * d,
            activation_function=_ACT_TO_HF.get(getattr(mlp, "activation", ""), "gelu_new"),
            layer_norm_epsilon=config.norm.eps, scale_attn_by_inverse_layer_idx=by_layer,
            tie_word_embeddings=config.tie_embeddings, initializer_range=config.init.std, **ids,
        )
    if model_type == "deepseek_v3":
        return _deepseek_kwargs(config, mixer, ffns[0], ids)
    if model_type == "bamba":
        return _bamba_kwargs(config, mixers, ffns[0], ids)
    head_dim = mixer.resolved_head_dim(d)  # AttributeError for another mixer: the class is not a candidate
    dense = next((f for f in ffns if f.kind != "moe"), ffns[0])
    moe = next((f for f in ffns if f.kind == "moe"), None)
    gemma = model_type == "gemma2"
    kwargs: dict[str, Any] = dict(
        vocab_size=config.vocab_size, hidden_size=d, num_hidden_layers=config.n_layers,
        num_attention_heads=mixer.n_heads, num_key_value_heads=mixer.kv_heads, head_dim=head_dim,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm.eps,
        tie_word_embeddings=config.tie_embeddings, initializer_range=config.init.std, **ids,
        **_rope_kwargs(config.position, head_dim, config.max_seq_len),
    )
    activation = _ACT_TO_HF.get(getattr(moe or dense, "activation", "silu"), "silu")
    kwargs["hidden_activation" if gemma else "hidden_act"] = activation
    if hasattr(dense, "resolved_hidden"):
        kwargs["intermediate_size"] = dense.resolved_hidden(d)
    elif getattr(dense, "kind", None) == "mlp":
        kwargs["intermediate_size"] = dense.hidden or 4 * d
    if model_type in ("llama", "qwen3", "qwen3_moe", "gemma2"):
        kwargs["attention_bias"] = mixer.qkv_bias
    if model_type == "llama":
        kwargs["mlp_bias"] = bool(getattr(dense, "bias", False))
    windows = [m.window for m in mixers]
    window = next((w for w in windows if w), None)
    if model_type in ("mistral", "mixtral"):
        kwargs["sliding_window"] = window
    if model_type in _PER_LAYER_WINDOW:
        kwargs["sliding_window"] = window
        kwargs["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windows]
        if model_type != "gemma2":
            kwargs["use_sliding_window"] = window is not None
            kwargs["max_window_layers"] = 0
    if gemma:
        scale = mixer.scale or head_dim**-0.5
        scalar = scale**-2  # Gemma2Config types it int: a non-integral one cannot be written
        kwargs["query_pre_attn_scalar"] = round(scalar) if math.isclose(scalar, round(scalar), rel_tol=1e-9) else scalar
        kwargs["attn_logit_softcapping"] = mixer.logit_softcap
        kwargs["final_logit_softcapping"] = config.logit_softcap
    if moe is not None and model_type == "mixtral":
        kwargs.update(
            num_local_experts=moe.n_experts, num_experts_per_tok=moe.top_k,
            intermediate_size=moe.resolved_hidden(d), router_aux_loss_coef=moe.balance_loss_weight,
        )
    if moe is not None and model_type == "qwen3_moe":
        kwargs.update(
            num_experts=moe.n_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.resolved_hidden(d),
            norm_topk_prob=moe.renormalize, router_aux_loss_coef=moe.balance_loss_weight, decoder_sparse_step=1,
            mlp_only_layers=[i for i, f in enumerate(ffns) if f.kind != "moe"],
        )
    return kwargs


def _deepseek_kwargs(config: ModelConfig, mla: Any, ffn: Any, ids: dict[str, Any]) -> dict[str, Any]:
    if mla.kind != "mla":
        raise ValueError(f"mixer.kind={mla.kind!r}: DeepSeek-V3 attends with MLA")
    d = config.d_model
    nope, rope_dim, v, kv_rank = mla.sizes(d)
    rope = _rope_kwargs(config.position, rope_dim, config.max_seq_len)
    if mla.mscale_all_dim and rope:
        rope["rope_parameters"] = {**rope["rope_parameters"], "mscale_all_dim": mla.mscale_all_dim}
    return dict(
        vocab_size=config.vocab_size, hidden_size=d, num_hidden_layers=config.n_layers,
        num_attention_heads=mla.n_heads, num_key_value_heads=mla.n_heads, q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=kv_rank, qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=v,
        intermediate_size=ffn.resolved_hidden(d) if hasattr(ffn, "resolved_hidden") else 4 * d,
        hidden_act=_ACT_TO_HF.get(getattr(ffn, "activation", "silu"), "silu"),
        first_k_dense_replace=config.n_layers, n_routed_experts=0, attention_bias=mla.bias,
        rope_interleave=False, max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm.eps,
        tie_word_embeddings=config.tie_embeddings, initializer_range=config.init.std, **ids, **rope,
    )


def _bamba_kwargs(config: ModelConfig, mixers: list, ffn: Any, ids: dict[str, Any]) -> dict[str, Any]:
    mamba = next((m for m in mixers if m.kind == "mamba2"), None)
    if mamba is None:
        raise ValueError("Bamba is a Mamba-2 model: no layer has mixer.kind='mamba2'")
    attention = next((m for m in mixers if m.kind == "attention"), None)
    d = config.d_model
    d_inner = mamba.expand * d
    kwargs = dict(
        vocab_size=config.vocab_size, hidden_size=d, num_hidden_layers=config.n_layers,
        intermediate_size=ffn.resolved_hidden(d) if hasattr(ffn, "resolved_hidden") else 4 * d,
        hidden_act="silu", mlp_bias=bool(getattr(ffn, "bias", False)),
        attn_layer_indices=[i for i, m in enumerate(mixers) if m.kind == "attention"],
        mamba_n_heads=d_inner // mamba.head_dim, mamba_d_head=mamba.head_dim, mamba_n_groups=mamba.n_groups,
        mamba_d_state=mamba.d_state, mamba_d_conv=mamba.d_conv, mamba_expand=mamba.expand,
        mamba_chunk_size=mamba.chunk_size, mamba_conv_bias=mamba.conv_bias, mamba_proj_bias=mamba.proj_bias,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm.eps,
        tie_word_embeddings=config.tie_embeddings, initializer_range=config.init.std, **ids,
    )
    if attention is None:
        # transformers 5's hybrid cache asks an attention layer for the sequence length, so a Bamba without
        # one fails any forward with use_cache=True (their limitation): write it with caching off
        kwargs["use_cache"] = False
    else:
        kwargs.update(
            num_attention_heads=attention.n_heads, num_key_value_heads=attention.kv_heads,
            attention_bias=attention.qkv_bias,
            **_rope_kwargs(config.position, attention.resolved_head_dim(d), config.max_seq_len),
        )
        kwargs.get("rope_parameters", {}).pop("partial_rotary_factor", None)  # Bamba fixes it at 0.5
    return kwargs


def _candidate(config: ModelConfig, model_type: str) -> tuple[Any, list[str]]:
    """``model_type``'s HF config for ``config`` and the differences of its round trip (empty: exact)."""
    transformers = _transformers()
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **_hf_config_kwargs(config, model_type))
        back = config_from_hf(hf_config)
    except Exception as err:  # noqa: BLE001 - transformers' strict config validation raises its own types
        return None, [f"{model_type}: " + " ".join(str(err).split())]
    ours, theirs = _architecture(config), _architecture(back)
    if config.tie_embeddings != back.tie_embeddings:
        theirs["tie_embeddings"] = back.tie_embeddings
    return hf_config, _differences(ours, theirs)


def _unexportable_component(config: ModelConfig) -> str | None:
    if config.kind != "transformer":
        return f"kind={config.kind!r}: no transformers causal LM is a {config.kind} model"
    for i, layer in enumerate(config.layer_configs()):
        if layer.mixer.kind not in _EXPORTABLE_MIXERS:
            return (
                f"layer {i} mixer.kind={layer.mixer.kind!r}: no transformers causal LM has this mixer "
                f"(exportable mixers: {', '.join(_EXPORTABLE_MIXERS)})"
            )
        if layer.ffn.kind not in _EXPORTABLE_FFNS:
            return (
                f"layer {i} ffn.kind={layer.ffn.kind!r}: no transformers causal LM has this FFN "
                f"(exportable FFNs: {', '.join(_EXPORTABLE_FFNS)})"
            )
    if config.mtp_heads:
        return f"mtp_heads={config.mtp_heads}: the exportable transformers classes have no multi-token heads"
    return None


def to_hf_config(config: ModelConfig) -> "PretrainedConfig":
    """The config of the first transformers class (in :data:`EXPORT_MODEL_TYPES` order) that represents
    ``config`` exactly: reading it back with :func:`config_from_hf` gives the same architecture.

    Raises ``ValueError`` in one line naming the component that no class represents (a mixer or FFN kind
    no transformers model has), or else the closest class and the first field it cannot express.
    """
    problem = _unexportable_component(config)
    if problem is not None:
        raise ValueError(f"no transformers class represents this model: {problem}")
    ranked = []
    for model_type in EXPORT_MODEL_TYPES:
        hf_config, differences = _candidate(config, model_type)
        if hf_config is not None and not differences:
            return hf_config
        # closest: a class whose config could be written, with the fewest fields differing
        ranked.append((hf_config is None, len(differences), model_type, differences))
    _, _, model_type, differences = min(ranked, key=lambda r: r[:2])
    raise ValueError(
        f"no transformers class represents this model; the closest, model_type={model_type!r}, "
        f"cannot express: {'; '.join(differences)}"
    )


def _import_state(model: CausalLM, weights: _Weights, prefix: str, hf_config: Any) -> dict[str, torch.Tensor]:
    """Our state dict from an HF model's parameters (the import mapping, used both ways)."""
    if hf_config.model_type == "deepseek_v3":
        return _deepseek_state(model, weights, prefix, bool(getattr(hf_config, "rope_interleave", False)))
    if hf_config.model_type == "gpt2":
        return _gpt2_state(model, weights, prefix)
    if hf_config.model_type == "bamba":
        return _bamba_state(model, weights, prefix)
    return _rope_family_state(model, weights, prefix)


def to_hf(model: CausalLM) -> "PreTrainedModel":
    """The transformers ``*ForCausalLM`` (class chosen by :func:`to_hf_config`) computing the same function
    as ``model``, in the model's dtype, on CPU, in eval mode. Raises ``ValueError`` (one line) when no
    transformers class represents the model."""
    hf_config = to_hf_config(model.config)
    transformers = _transformers()
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    params = dict(hf_model.named_parameters())  # a tied head is listed once, under the embedding
    offsets, indices, total = {}, {}, 0
    for name, p in params.items():
        offsets[name] = total
        indices[name] = torch.arange(total, total + p.numel(), dtype=torch.float64).view(p.shape)
        total += p.numel()
    assert total < 2**53, "element indices must be exact in float64"
    weights = _Weights(indices)
    index_state = _import_state(model, weights, _prefix(hf_model), hf_config)
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    flat = torch.zeros(total, dtype=torch.float64)
    writes = torch.zeros(total, dtype=torch.int64)
    for key, idx in index_state.items():
        if key == "lm_head.weight" and key not in ours:
            continue
        position = idx.reshape(-1).long()
        flat[position] = ours[key].double().reshape(-1)
        writes[position] += 1
    left = weights.unused()
    if left or not torch.all(writes == 1):
        raise ValueError(  # a defect in the import mapping, not in the user's model
            f"export mapping is not one-to-one for {type(hf_model).__name__}: unused HF parameters {left}, "
            f"{int((writes == 0).sum())} elements never written, {int((writes > 1).sum())} written twice"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(flat[offsets[name] : offsets[name] + p.numel()].view(p.shape))
    _check_rope(hf_model, model)
    return hf_model.to(model.embed.weight.dtype).eval()


def save_hf(model: CausalLM, directory: str | Path) -> Path:
    """Write ``model`` as a transformers checkpoint (``config.json`` + safetensors, class chosen by
    :func:`to_hf_config`) that ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads."""
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


def load_pretrained_modules(model: CausalLM) -> CausalLM:
    """Copy the parts ``model.config.pretrained`` names (embedding, head, final norm) from its local
    Hugging Face directory into ``model``, in place, and return it.

    The HF model is converted whole with :func:`load_hf` (so the final norm arrives in our layout, Gemma's
    ``1 + w`` included) and the named tensors copied. Raises ``ValueError`` naming the field when the
    shapes or the final norm's kind disagree."""
    spec = model.config.pretrained
    if spec is None:
        return model
    source = load_hf(spec.path, dtype=torch.float32)
    config, theirs = model.config, source.config
    for field in ("vocab_size", "d_model"):
        if getattr(config, field) != getattr(theirs, field):
            raise ValueError(
                f"model.{field}={getattr(config, field)} but the pretrained model in {spec.path} has "
                f"{getattr(theirs, field)}; set model.{field}={getattr(theirs, field)} to load its "
                f"{', '.join(spec.modules)}"
            )
    if "final_norm" in spec.modules and config.norm != theirs.norm:
        raise ValueError(
            f"model.norm={config.norm.model_dump()} differs from the final norm of {spec.path} "
            f"({theirs.norm.model_dump()}); set model.norm to it or drop 'final_norm' from pretrained.modules"
        )
    ours, source_params = model.pretrained_parameters(), dict(source.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, param in ours.items():
            param.copy_(source_params[name].to(param.dtype))
    return model
