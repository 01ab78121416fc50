"""Positional encodings.

Absolute encodings (learned, sinusoidal) are added to the token embeddings by the model; relative ones
(RoPE, ALiBi) are handed to attention, which applies them to queries/keys or to the attention logits.
A config builds each once; ``forward`` never branches on strings.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from archifactory.config import Component, Strict
from archifactory.registry import register_position
from archifactory.nn.roles import EMBEDDING


class PositionConfig(Component):
    limits_length: ClassVar[bool] = False
    """True when the encoding is a table of ``max_seq_len`` rows: no sequence may be longer."""

    def build_absolute(self, d_model: int, max_seq_len: int, std: float) -> nn.Module | None:
        """Module mapping positions ``(T,)`` to ``(T, d_model)`` added to the embeddings, or ``None``."""
        return None

    def build_relative(self, head_dim: int, n_heads: int) -> nn.Module | None:
        """A :class:`Rotary` or :class:`ALiBi` for attention, or ``None``."""
        return None

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ``ValueError`` when this encoding cannot work with attention heads of ``head_dim``."""

    def extrapolates(self) -> bool:
        """Whether positions past ``max_seq_len`` are meaningful by design (generation past it then only
        warns, see ``CausalLM.check_generation_length``); a table of ``max_seq_len`` rows or an encoding
        whose rotations past it were never trained does not."""
        return False

    @classmethod
    def contract_examples(cls) -> list["PositionConfig"]:
        """Configs the shared position contract test (tests/test_component_contract.py) builds; the first
        is also the one the mixer contract runs position-using mixers under."""
        return [cls()]


@register_position
class NoPositionConfig(PositionConfig):
    """No positional information (NoPE, Kazemnejad et al. 2023): causal masking alone orders tokens."""

    kind: Literal["none"] = "none"

    def extrapolates(self) -> bool:
        return True  # nothing is tied to a length (Kazemnejad et al. 2023 study NoPE's length generalisation)


# ------------------------------------------------------------------------------------------ absolute


class LearnedPositions(nn.Module):
    def __init__(self, max_seq_len: int, d_model: int, std: float) -> None:
        super().__init__()
        self.std = std
        self.weight = nn.Parameter(torch.empty(max_seq_len, d_model))
        self.reset_parameters()

    def param_roles(self):
        return {"weight": EMBEDDING}  # a lookup table, like the token embedding (GPT-2's wpe)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """(T,) positions -> (T, d_model). The range is checked by the caller, from Python ints
        (``CausalLM.hidden_states``): reading ``positions.max()`` here would synchronise the device on
        every step and break ``torch.compile``'s graph."""
        return self.weight[positions]


@register_position
class LearnedPositionConfig(PositionConfig):
    """Learned absolute position embeddings (GPT-2), ``max_seq_len`` rows."""

    kind: Literal["learned"] = "learned"
    limits_length: ClassVar[bool] = True

    def build_absolute(self, d_model, max_seq_len, std):
        return LearnedPositions(max_seq_len, d_model, std)


def sinusoidal_table(n_positions: int, d_model: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al. 2017, Sec. 3.5: PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d))."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : d_model // 2]
    return table.float()


class SinusoidalPositions(nn.Module):
    def __init__(self, max_seq_len: int, d_model: int, base: float) -> None:
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_seq_len, d_model, base), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """(T,) positions -> (T, d_model); the range is checked by the caller (see LearnedPositions)."""
        return self.table[positions]


@register_position
class SinusoidalPositionConfig(PositionConfig):
    kind: Literal["sinusoidal"] = "sinusoidal"
    limits_length: ClassVar[bool] = True
    base: float = Field(10000.0, gt=1)
    """Wavelengths grow geometrically from 2 pi to 2 pi * base over the channels, so base > 1."""

    def build_absolute(self, d_model, max_seq_len, std):
        return SinusoidalPositions(max_seq_len, d_model, self.base)


# ------------------------------------------------------------------------------------------------ RoPE


class RopeScaling(Strict):
    """Context extension for RoPE.

    - ``linear``: position interpolation (Chen et al. 2023): positions divided by ``factor``.
    - ``ntk``: NTK-aware base change (bloc97 2023): ``theta * factor ** (d / (d - 2))``.
    - ``yarn``: YaRN (Peng et al. 2023): per-frequency blend of interpolation and extrapolation between
      ``beta_fast`` and ``beta_slow`` rotations over ``original_max_seq_len``, with the attention
      temperature ``0.1 * ln(factor) + 1`` folded into cos/sin.
    - ``llama3``: Llama 3.1's frequency-dependent interpolation (Meta 2024, ``apply_scaling`` in
      meta-llama/llama-models): wavelengths longer than ``original_max_seq_len / low_freq_factor`` are
      divided by ``factor``, shorter than ``original_max_seq_len / high_freq_factor`` kept, and the band
      between blended linearly in ``original_max_seq_len / wavelength``.
    - ``dynamic``: dynamic NTK (emozilla 2023, transformers' ``rope_type: dynamic``): for a forward whose
      largest position is ``p``, the base becomes ``theta * (factor * L / original_max_seq_len - (factor -
      1)) ** (d / (d - 2))`` with ``L = max(p + 1, original_max_seq_len)``: plain RoPE up to the trained
      length, a base growing with the sequence beyond it. Keys already in a cache keep the rotation they
      were written with (as in transformers' cached decoding).
    """

    type: Literal["linear", "ntk", "yarn", "llama3", "dynamic"]
    factor: float = Field(le=1024.0)
    """How many times the trained context is stretched: >= 1 and at most 1024 (Llama 3.1 uses 8, YaRN's
    experiments 128; 1e308 overflowed the frequencies at build)."""
    original_max_seq_len: int | None = Field(None, ge=1)
    beta_fast: float = Field(32.0, ge=1e-3, le=1e4)
    beta_slow: float = Field(1.0, ge=1e-3, le=1e4)
    """YaRN's ramp ends, in rotations over ``original_max_seq_len`` (32 and 1 in the paper); in [1e-3, 1e4]
    (1e308 and 5e-324 put the ramp's dimension out of the log's domain at build)."""
    attention_factor: float | None = Field(None, gt=0, le=10.0)
    """YaRN's cos/sin multiplier; ``None``: ``0.1 * ln(factor) + 1`` (at most 1.7 for the largest factor); at most 10
    (1e308 made the first gradients non-finite)."""
    low_freq_factor: float = Field(1.0, gt=0)
    """``llama3`` only: wavelengths above ``original_max_seq_len / low_freq_factor`` are fully interpolated."""
    high_freq_factor: float = Field(4.0, gt=0)
    """``llama3`` only: wavelengths below ``original_max_seq_len / high_freq_factor`` are kept."""

    @model_validator(mode="after")
    def _check(self):
        if self.factor < 1.0:
            raise ValueError(f"factor={self.factor} must be >= 1 (it stretches the trained context)")
        if self.type in ("yarn", "llama3", "dynamic") and self.original_max_seq_len is None:
            raise ValueError(
                f"type={self.type} needs original_max_seq_len (the context length trained without scaling)"
            )
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"type=llama3 needs high_freq_factor={self.high_freq_factor} > low_freq_factor={self.low_freq_factor} "
                "(the blended band lies between the two wavelengths)"
            )
        return self


def rope_inv_freq(rot_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``(rot_dim // 2,)`` in fp32 and the factor applied to cos/sin."""
    exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
    if scaling is None:
        return 1.0 / theta**exponents, 1.0
    if scaling.type == "linear":
        return 1.0 / (scaling.factor * theta**exponents), 1.0
    if scaling.type == "ntk":
        base = theta * scaling.factor ** (rot_dim / (rot_dim - 2))
        return 1.0 / base**exponents, 1.0
    if scaling.type == "dynamic":
        # the table up to the trained length; Rotary.cos_sin rescales beyond it
        return 1.0 / theta**exponents, 1.0
    if scaling.type == "llama3":
        inv_freq = 1.0 / theta**exponents
        wavelength = 2 * math.pi / inv_freq
        context = scaling.original_max_seq_len
        # 0 at wavelength = context / low_freq_factor (interpolate), 1 at context / high_freq_factor (keep)
        smooth = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        long = wavelength > context / scaling.low_freq_factor
        short = wavelength < context / scaling.high_freq_factor
        return torch.where(long, inv_freq / scaling.factor, torch.where(short, inv_freq, blended)), 1.0
    # YaRN, Peng et al. 2023, Sec. 3.2-3.4.
    def correction_dim(n_rotations: float) -> float:
        # the dimension whose wavelength fits n_rotations times into the original context
        return rot_dim * math.log(scaling.original_max_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), rot_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency ones (interpolated)
    freq = theta**exponents
    inv_freq = (1.0 / (scaling.factor * freq)) * (1 - extrapolate) + (1.0 / freq) * extrapolate
    attention = scaling.attention_factor
    if attention is None:
        attention = 0.1 * math.log(scaling.factor) + 1.0
    return inv_freq, attention


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021) on the first ``rot_dim`` channels of each head, in the
    half-split layout (channel i pairs with i + rot_dim/2) used by GPT-NeoX and Llama."""

    def __init__(self, head_dim: int, rot_dim: int, theta: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        self.head_dim, self.rot_dim = head_dim, rot_dim
        inv_freq, self.attention_scaling = rope_inv_freq(rot_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.theta = theta
        self.dynamic = scaling if scaling is not None and scaling.type == "dynamic" else None

    def dynamic_inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        """Dynamic NTK frequencies ``(rot_dim // 2,)`` for a forward over ``positions`` (see
        :class:`RopeScaling`), computed on the device (no host sync) in fp32 as transformers does."""
        scaling = self.dynamic
        original = scaling.original_max_seq_len
        length = (positions.max() + 1).clamp(min=original).float()
        base = self.theta * (scaling.factor * length / original - (scaling.factor - 1)) ** (self.rot_dim / (self.rot_dim - 2))
        exponents = torch.arange(0, self.rot_dim, 2, dtype=torch.int64, device=positions.device).float() / self.rot_dim
        return 1.0 / base**exponents

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=positions.device.type, enabled=False):
            inv_freq = self.inv_freq.float() if self.dynamic is None else self.dynamic_inv_freq(positions)
            freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, rot/2)
            emb = torch.cat((freqs, freqs), dim=-1)
            return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """q: (B, Hq, T, hd), k: (B, Hk, T, hd), positions: (T,)."""
        cos, sin = self.cos_sin(positions, q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rot_dim == self.head_dim:
            return x * cos + rotate_half(x) * sin
        rot, keep = x[..., : self.rot_dim], x[..., self.rot_dim :]
        return torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)


@register_position
class RoPEConfig(PositionConfig):
    kind: Literal["rope"] = "rope"
    theta: float = Field(10000.0, gt=1)
    """Base of the rotation wavelengths (2 pi theta^(2i/d)); > 1 so they grow over the channels."""
    fraction: float = 1.0
    """Fraction of each head's channels that rotate (partial rotary, GPT-NeoX / Phi)."""
    scaling: RopeScaling | None = None

    @model_validator(mode="after")
    def _check(self):
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction} must be in (0, 1]")
        return self

    def rot_dim(self, head_dim: int) -> int:
        return int(head_dim * self.fraction)

    def check_head_dim(self, head_dim: int) -> None:
        rot = self.rot_dim(head_dim)
        if rot % 2 or rot == 0:
            raise ValueError(
                f"rotary dim = int(head_dim={head_dim} * fraction={self.fraction}) = {rot} must be even and > 0; "
                f"choose a fraction giving an even number of channels"
            )
        if self.scaling is not None and self.scaling.type in ("ntk", "dynamic") and rot <= 2:
            raise ValueError(
                f"scaling.type={self.scaling.type} changes the base by factor ** (d / (d - 2)), undefined for a rotary dim of {rot}; "
                "use more rotary channels (head_dim * fraction >= 4) or scaling.type=linear"
            )

    def build_relative(self, head_dim, n_heads):
        return Rotary(head_dim, self.rot_dim(head_dim), self.theta, self.scaling)

    def extrapolates(self) -> bool:
        # Rotations past the trained length are unseen (RoPE does not extrapolate, Press et al. 2022, Fig. 1);
        # dynamic NTK scaling is the one variant that changes its base with the length to go past it.
        return self.scaling is not None and self.scaling.type == "dynamic"

    @classmethod
    def contract_examples(cls) -> list["RoPEConfig"]:
        yarn = RopeScaling(type="yarn", factor=4.0, original_max_seq_len=16)
        return [cls(theta=100.0), cls(theta=100.0, fraction=0.5, scaling=yarn)]


# ----------------------------------------------------------------------------------------------- ALiBi


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Head slopes of ALiBi (Press et al. 2022): the geometric sequence 2^(-8/n), 2^(-16/n), ... for a
    power-of-two n; otherwise the closest power of two's slopes plus every other slope of twice that."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = alibi_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.cat([torch.tensor(power_of_two(closest)), extra])


class ALiBi(nn.Module):
    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Additive logits ``(H, Tq, Tk)``: ``-slope * (i - j)`` for query i and key j."""
        dist = (q_pos[:, None] - k_pos[None, :]).float()
        return -self.slopes[:, None, None] * dist


@register_position
class ALiBiConfig(PositionConfig):
    kind: Literal["alibi"] = "alibi"

    def extrapolates(self) -> bool:
        return True  # built to: "Train Short, Test Long" (Press et al. 2022)

    def build_relative(self, head_dim, n_heads):
        return ALiBi(n_heads)


def relative_position_parts(position: PositionConfig, head_dim: int, n_heads: int) -> tuple[Rotary | None, ALiBi | None]:
    """The relative encoding ``position`` builds for attention heads, as (rotary, alibi); (None, None) for
    absolute encodings and NoPE. A module of any other type is an error rather than silently unused."""
    relative = position.build_relative(head_dim, n_heads)
    if relative is not None and not isinstance(relative, (Rotary, ALiBi)):
        raise TypeError(
            f"position kind {position.kind!r} builds a {type(relative).__name__}, which attention cannot apply "
            "(it applies Rotary and ALiBi); teach the attention mixers to use it"
        )
    return (relative if isinstance(relative, Rotary) else None), (relative if isinstance(relative, ALiBi) else None)
