"""Optimizers as registered, typed components: one config class per optimizer, with its own fields and
``build(groups)``, chosen by ``name`` in the run config (``optimizer: {name: adamw, lr: 3e-3}``).

Every optimizer comes from ``torch.optim`` (AdamW, Adam, SGD, Muon) or the ``pytorch-optimizer`` package
(Lion, SOAP, AdEMAMix, ADOPT, MARS, Adam-mini, schedule-free AdamW); no update rule is written here.
Two AdamW variants are torch's AdamW with one change each: ``decoupled_adamw`` only sets its weight decay so
that it does not scale with the peak rate, and ``cadamw`` masks torch's update with pytorch-optimizer's
cautious mask (``BaseOptimizer.apply_cautious``), which has no cautious AdamW of its own.

Which parameters take weight decay, and which take Muon's orthogonalised update, follows the role each
component declares for its parameters (:mod:`archifactory.nn.roles`), never a tensor's rank or name:

- ``matrix``: decayed; Muon under ``name: muon``;
- ``experts``, ``filter``, ``head``: decayed; AdamW under ``name: muon``;
- ``embedding``: decayed only with ``decay_embeddings: true``; AdamW under ``name: muon``;
- ``vector``: never decayed; AdamW under ``name: muon``.

A field belongs to the optimizers that honour it: setting one an optimizer does not have (``momentum``
for AdamW, ``muon_lr`` for Lion) is a validation error that names it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar, Iterator, Literal

import torch
from pydantic import Field
from torch import nn

from typing_extensions import Annotated

from archifactory.config import MAX_LR, MAX_STEPS, ConfigError, Strict, validate
from archifactory.nn.roles import ParamRole, parameter_roles
from archifactory.registry import OPTIMIZERS, register_optimizer

DECAYED_ROLES = (ParamRole.MATRIX, ParamRole.EXPERTS, ParamRole.FILTER, ParamRole.HEAD)
"""Roles that take weight decay (embeddings too, with ``decay_embeddings``)."""


# --------------------------------------------------------------------------------- parameter groups


@dataclasses.dataclass
class ParamGroups:
    """The trainable parameters of a model, each once, with the role its component declared."""

    model: nn.Module
    named: list[tuple[str, nn.Parameter, ParamRole]]

    @classmethod
    def from_model(cls, model: nn.Module) -> "ParamGroups":
        roles = parameter_roles(model)
        return cls(model, [(n, p, roles[n]) for n, p in model.named_parameters() if p.requires_grad])

    def role_of(self, p: torch.Tensor) -> ParamRole:
        return next(role for _, q, role in self.named if q is p)

    def decays(self, role: ParamRole, decay_embeddings: bool) -> bool:
        return role in DECAYED_ROLES or (role is ParamRole.EMBEDDING and decay_embeddings)

    def by_role(self, roles: tuple[ParamRole, ...] | None = None) -> dict[ParamRole, list[nn.Parameter]]:
        """Parameters grouped by role, in :class:`ParamRole` order, empty roles left out."""
        out: dict[ParamRole, list[nn.Parameter]] = {}
        for role in ParamRole:
            if roles is not None and role not in roles:
                continue
            params = [p for _, p, r in self.named if r is role]
            if params:
                out[role] = params
        return out

    def torch_groups(self, weight_decay: float, decay_embeddings: bool,
                     roles: tuple[ParamRole, ...] | None = None) -> list[dict[str, Any]]:
        """One torch param group per role: ``{"params", "weight_decay", "role"}``."""
        return [
            {"params": params, "weight_decay": weight_decay if self.decays(role, decay_embeddings) else 0.0,
             "role": role.value}
            for role, params in self.by_role(roles).items()
        ]


# ------------------------------------------------------------------------------------------- configs


Beta = Annotated[float, Field(ge=0, lt=1)]
"""A moment's decay rate: in [0, 1) (1 would never forget, above 1 or below 0 diverges)."""
Betas = tuple[Beta, Beta]


class OptimizerConfig(Strict):
    """Base of every optimizer config: a registered ``name`` and the peak learning rate ``lr`` (the
    schedule scales it at each step; a sweep's lr grid sets it)."""

    registry_key: ClassVar[str] = "name"
    name: str
    lr: float = Field(3e-3, gt=0, le=MAX_LR)
    """Peak learning rate (at most ``MAX_LR``, 1e6)."""

    def build(self, groups: ParamGroups) -> torch.optim.Optimizer:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.build")


class _DecayedConfig(OptimizerConfig):
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay (AdamW's ``p -= lr * weight_decay * p``) on the roles that take decay."""
    decay_embeddings: bool = False
    """Also decay ``embedding`` parameters (token and learned-position tables)."""

    def groups(self, groups: ParamGroups) -> list[dict[str, Any]]:
        return groups.torch_groups(self.weight_decay, self.decay_embeddings)


@register_optimizer
class AdamWConfig(_DecayedConfig):
    """``torch.optim.AdamW`` (Loshchilov & Hutter 2019)."""

    name: Literal["adamw"] = "adamw"
    betas: Betas = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)

    def build(self, groups):
        return torch.optim.AdamW(self.groups(groups), lr=self.lr, betas=self.betas, eps=self.eps)


@register_optimizer
class DecoupledAdamWConfig(OptimizerConfig):
    """AdamW with weight decay independent of the learning rate: Loshchilov & Hutter 2019, Algorithm 2,
    ``theta <- theta - eta_t * (alpha * m_hat / (sqrt(v_hat) + eps) + lambda * theta)``, where ``alpha`` is
    the peak rate ``lr`` and ``eta_t`` the schedule's multiplier. ``weight_decay`` is ``lambda``, the
    fraction of each weight removed per step at the schedule's peak, whatever ``lr`` is, so an lr sweep
    does not also sweep the decay (MosaicML Composer's ``DecoupledAdamW`` does the same). Built as
    ``torch.optim.AdamW`` with ``weight_decay = lambda / lr``, since torch multiplies its decay by the
    group's current rate ``lr * eta_t``."""

    name: Literal["decoupled_adamw"] = "decoupled_adamw"
    weight_decay: float = Field(3e-4, ge=0, lt=1)
    """Fraction of each decayed weight removed per step at the peak of the schedule (adamw's 0.1 at
    lr=3e-3 is 3e-4)."""
    decay_embeddings: bool = False
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)

    def build(self, groups):
        torch_groups = groups.torch_groups(self.weight_decay / self.lr, self.decay_embeddings)
        return torch.optim.AdamW(torch_groups, lr=self.lr, betas=self.betas, eps=self.eps)


class CautiousAdamW(torch.optim.AdamW):
    """C-AdamW (Liang et al. 2024, "Cautious Optimizers", Algorithm 2): AdamW whose update
    ``u = m_hat / (sqrt(v_hat) + eps)`` is zeroed where it disagrees in sign with the gradient
    (``u * g <= 0``) and the rest rescaled by ``d / (kept + 1)`` (``d`` entries in the tensor), then the
    decoupled decay ``theta -= lr * weight_decay * theta`` on the updated weights.

    The moments and ``u`` are torch's AdamW (stepped without decay); the mask is pytorch-optimizer's
    ``BaseOptimizer.apply_cautious``. State and ``state_dict`` are AdamW's."""

    @torch.no_grad()
    def step(self, closure=None):
        from pytorch_optimizer.base.optimizer import BaseOptimizer

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        decays = [group["weight_decay"] for group in self.param_groups]
        before = [
            (group, p, p.detach().clone()) for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        for group in self.param_groups:
            group["weight_decay"] = 0.0
        try:
            super().step()
        finally:
            for group, decay in zip(self.param_groups, decays):
                group["weight_decay"] = decay
        for group, p, old in before:
            update = p.detach() - old  # -lr * u
            BaseOptimizer.apply_cautious(update, -p.grad)  # keeps (-lr u) * (-g) > 0, i.e. u * g > 0
            p.copy_(old + update).mul_(1.0 - group["lr"] * group["weight_decay"])
        return loss


@register_optimizer
class CautiousAdamWConfig(_DecayedConfig):
    """C-AdamW (Liang et al. 2024): AdamW with the cautious mask; see :class:`CautiousAdamW`."""

    name: Literal["cadamw"] = "cadamw"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)

    def build(self, groups):
        return CautiousAdamW(self.groups(groups), lr=self.lr, betas=self.betas, eps=self.eps)


@register_optimizer
class AdamConfig(OptimizerConfig):
    """``torch.optim.Adam`` (Kingma & Ba 2015). Its weight decay is an L2 term added to the gradient,
    which Adam then rescales per coordinate; for decoupled weight decay use ``adamw``."""

    name: Literal["adam"] = "adam"
    betas: Betas = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    """L2 coefficient (``grad += weight_decay * p``), on the roles that take decay."""
    decay_embeddings: bool = False

    def build(self, groups):
        return torch.optim.Adam(groups.torch_groups(self.weight_decay, self.decay_embeddings), lr=self.lr,
                                betas=self.betas, eps=self.eps)


@register_optimizer
class SGDConfig(OptimizerConfig):
    """``torch.optim.SGD`` with momentum. Its weight decay is an L2 term added to the gradient (the same
    as decoupled decay of ``lr * weight_decay`` per step when ``momentum`` is 0)."""

    name: Literal["sgd"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.1, ge=0)
    """L2 coefficient (``grad += weight_decay * p``), on the roles that take decay."""
    decay_embeddings: bool = False

    def build(self, groups):
        return torch.optim.SGD(groups.torch_groups(self.weight_decay, self.decay_embeddings), lr=self.lr,
                               momentum=self.momentum, nesterov=self.nesterov)


@register_optimizer
class MuonConfig(_DecayedConfig):
    """``torch.optim.Muon`` (Jordan et al. 2024) on the ``matrix`` parameters, ``torch.optim.AdamW`` at
    ``lr`` on everything else (embeddings, head, experts, filters, vectors), both stepped together."""

    name: Literal["muon"] = "muon"
    muon_lr: float = Field(0.02, gt=0, le=MAX_LR)
    """Muon's peak learning rate for ``matrix`` parameters, scaled per matrix by ``adjust_lr``."""
    momentum: float = Field(0.95, ge=0, lt=1)
    """Muon's momentum (AdamW's are ``betas``)."""
    nesterov: bool = True
    ns_steps: int = Field(5, ge=1, le=100)
    """Newton-Schulz iterations of the orthogonalisation."""
    adjust_lr: Literal["original", "match_rms_adamw"] = "original"
    """How ``muon_lr`` is scaled for an (out x in) matrix: ``original`` multiplies it by
    ``sqrt(max(1, out/in))`` (Jordan et al., whose default rate is 0.02); ``match_rms_adamw`` by
    ``0.2 * sqrt(max(out, in))`` so that the update's RMS matches AdamW's (Liu et al. 2025, Moonlight;
    use it with a ``muon_lr`` near AdamW's)."""
    betas: Betas = (0.9, 0.95)
    """AdamW's betas, for the parameters that are not matrices."""
    eps: float = Field(1e-8, gt=0)

    def build(self, groups):
        matrices = groups.torch_groups(self.weight_decay, self.decay_embeddings, (ParamRole.MATRIX,))
        rest = groups.torch_groups(self.weight_decay, self.decay_embeddings,
                                   tuple(r for r in ParamRole if r is not ParamRole.MATRIX))
        optimizers: list[torch.optim.Optimizer] = []
        if matrices:
            bad = [n for n, p, r in groups.named if r is ParamRole.MATRIX and p.dim() != 2]
            if bad:
                raise ConfigError(f"optimizer.name=muon: 'matrix' parameters must be 2-D, got {', '.join(bad)}; "
                                  "their component should declare another role")
            optimizers.append(torch.optim.Muon(matrices, lr=self.muon_lr, weight_decay=self.weight_decay,
                                               momentum=self.momentum, nesterov=self.nesterov,
                                               ns_steps=self.ns_steps, adjust_lr_fn=self.adjust_lr))
        if rest:
            optimizers.append(torch.optim.AdamW(rest, lr=self.lr, betas=self.betas, eps=self.eps))
        return CombinedOptimizer(optimizers)


# ----------------------------------------------------------------------------- pytorch-optimizer ones


class _LibraryConfig(_DecayedConfig):
    """An optimizer from the ``pytorch-optimizer`` package, built by its registry name with every field
    of the config (but ``name``, ``lr``, ``decay_embeddings``) passed to its constructor."""

    library_name: ClassVar[str]

    def constructor_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"name", "lr", "decay_embeddings", "weight_decay"})

    def build(self, groups):
        from pytorch_optimizer import load_optimizer

        cls = load_optimizer(self.library_name)
        return cls(self.groups(groups), lr=self.lr, **self.constructor_kwargs())


@register_optimizer
class LionConfig(_LibraryConfig):
    """Lion (Chen et al. 2023): sign of an interpolated momentum; decoupled weight decay."""

    name: Literal["lion"] = "lion"
    library_name: ClassVar[str] = "lion"
    betas: Betas = (0.9, 0.95)


@register_optimizer
class SOAPConfig(_LibraryConfig):
    """SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's preconditioner."""

    name: Literal["soap"] = "soap"
    library_name: ClassVar[str] = "soap"
    betas: Betas = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    precondition_frequency: int = Field(10, ge=1, le=MAX_STEPS)
    """Optimizer steps between eigenbasis updates."""


@register_optimizer
class AdEMAMixConfig(_LibraryConfig):
    """AdEMAMix (Pagliardini et al. 2024): Adam with a second, slow momentum (``betas[2]``) mixed in at
    ``alpha``."""

    name: Literal["ademamix"] = "ademamix"
    library_name: ClassVar[str] = "ademamix"
    betas: tuple[Beta, Beta, Beta] = (0.9, 0.999, 0.9999)
    alpha: float = Field(5.0, ge=0)
    eps: float = Field(1e-8, gt=0)
    weight_decouple: bool = False
    """``True``: decoupled (AdamW-style) weight decay; ``False``: L2 in the gradient (the library's default)."""


@register_optimizer
class ADOPTConfig(_LibraryConfig):
    """ADOPT (Taniguchi et al. 2024): Adam with the second moment taken before the current gradient."""

    name: Literal["adopt"] = "adopt"
    library_name: ClassVar[str] = "adopt"
    betas: Betas = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decouple: bool = False
    """``True``: decoupled (AdamW-style) weight decay; ``False``: L2 in the gradient (the library's default)."""


@register_optimizer
class MARSConfig(_LibraryConfig):
    """MARS (Yuan et al. 2024): variance-reduced gradients under an AdamW-style update. The library
    steps 1-D tensors with plain AdamW; here they share ``lr`` and their role's weight decay."""

    name: Literal["mars"] = "mars"
    library_name: ClassVar[str] = "mars"
    betas: Betas = (0.9, 0.95)
    gamma: float = Field(0.025, ge=0)
    """Strength of the variance-reduction correction."""
    eps: float = Field(1e-8, gt=0)

    def build(self, groups):
        from pytorch_optimizer import load_optimizer

        torch_groups = self.groups(groups)
        for group in torch_groups:
            group["weight_decay_1d"] = group["weight_decay"]  # not the library's fixed 0.1 for 1-D tensors
        cls = load_optimizer(self.library_name)
        return cls(torch_groups, lr=self.lr, lr_1d=self.lr, **self.constructor_kwargs())


@register_optimizer
class ScheduleFreeAdamWConfig(_LibraryConfig):
    """Schedule-free AdamW (Defazio et al. 2024). It trains at interpolated weights ``y`` and evaluates
    at their running average ``x``; the trainer evaluates, checkpoints and saves ``x``."""

    name: Literal["schedulefree_adamw"] = "schedulefree_adamw"
    library_name: ClassVar[str] = "schedulefreeadamw"
    betas: Betas = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    """The optimizer's own warmup (on top of the run's schedule, which is usually ``constant``)."""
    r: float = Field(0.0, ge=0)
    """Power of the step count in the averaging weights (0: uniform)."""
    weight_lr_power: float = Field(2.0, ge=0)
    """Power of the learning rate in the averaging weights."""


@register_optimizer
class AdamMiniConfig(OptimizerConfig):
    """Adam-mini (Zhang et al. 2024): one second-moment value per block (per attention head for query
    and key projections). The head count of each ``q_proj`` / ``k_proj`` comes from the mixer that owns
    it, so hybrids with different attention layers are partitioned right."""

    name: Literal["adam_mini"] = "adam_mini"
    betas: Betas = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay on the roles that take decay."""
    decay_embeddings: bool = False

    def build(self, groups):
        from pytorch_optimizer import AdamMini

        model = groups.model
        d_model = int(getattr(getattr(model, "config", None), "d_model", 1))
        # num_heads only sets the library's default block size for q/k; it is replaced per layer below.
        opt = AdamMini(model, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                       num_embeds=d_model, num_heads=1)
        roles = {n: r for n, _, r in groups.named}
        for group in opt.param_groups:
            name = group["name"]
            group["weight_decay"] = self.weight_decay if groups.decays(roles[name], self.decay_embeddings) else 0.0
            if "parameter_per_head" in group:
                group["parameter_per_head"] = _params_per_head(model, name)
        return opt


def _params_per_head(model: nn.Module, name: str) -> int:
    """Entries per head of the query or key projection ``name``, from the owning mixer's head counts."""
    layer_path, _ = name.rsplit(".", 1)
    owner_path, proj = layer_path.rsplit(".", 1) if "." in layer_path else ("", layer_path)
    owner = model.get_submodule(owner_path)
    heads = getattr(owner, "n_kv_heads", None) if proj.startswith("k") else None
    heads = heads or getattr(owner, "n_heads", None)
    weight = model.get_parameter(name)
    if not heads or weight.numel() % heads:
        raise ConfigError(
            f"optimizer.name=adam_mini: cannot split {name} {tuple(weight.shape)} into heads "
            f"({type(owner).__name__} has n_heads={getattr(owner, 'n_heads', None)}); use another optimizer"
        )
    return weight.numel() // heads


# ------------------------------------------------------------------------------------------ helpers


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped together (Muon for hidden matrices + AdamW for the rest)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        self.param_groups = [g for opt in optimizers for g in opt.param_groups]
        self.defaults: dict[str, Any] = {}
        self.state = {}  # each inner optimizer keeps its own

    def step(self, closure=None):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)


def optimizer_config(data: dict | str) -> OptimizerConfig:
    """Validate ``{"name": ..., **fields}`` into its registered config class (errors name the field)."""
    data = {"name": data} if isinstance(data, str) else dict(data)
    name = data.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS.kinds())}")
    return validate(OPTIMIZERS.get(name), {**data, "name": name}, root="optimizer")


def build_optimizer(model: nn.Module, cfg: OptimizerConfig | dict) -> torch.optim.Optimizer:
    """``cfg.build`` over ``model``'s parameters grouped by their declared roles; every group records its
    peak rate as ``base_lr`` for :func:`set_lr`."""
    if isinstance(cfg, dict):
        cfg = optimizer_config(cfg)
    opt = cfg.build(ParamGroups.from_model(model))
    for group in opt.param_groups:
        group.setdefault("base_lr", group["lr"])
    return opt


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    """Scale every group's base rate; returns the first group's rate (for logging)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
    return optimizer.param_groups[0]["lr"]


def averages_weights(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` trains at other weights than those it evaluates (schedule-free)."""
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))


@contextlib.contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside: the model holds the weights to evaluate and to save (a schedule-free optimizer's average
    ``x``); on exit, the training weights again. A no-op for other optimizers."""
    if not averages_weights(optimizer):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


__all__ = [
    "AdamConfig", "AdamMiniConfig", "AdamWConfig", "ADOPTConfig", "AdEMAMixConfig", "CautiousAdamW",
    "CautiousAdamWConfig", "CombinedOptimizer", "DecoupledAdamWConfig",
    "LionConfig", "MARSConfig", "MuonConfig", "OptimizerConfig", "ParamGroups", "SGDConfig", "SOAPConfig",
    "ScheduleFreeAdamWConfig", "averages_weights", "build_optimizer", "evaluation_weights",
    "optimizer_config", "set_lr",
]
