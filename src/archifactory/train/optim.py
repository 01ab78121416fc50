"""Optimizers: ``torch.optim`` (AdamW, Adam, SGD, Muon) and the ``pytorch-optimizer`` package (Lion,
SOAP, AdEMAMix, ADOPT, MARS, Adam-mini, schedule-free AdamW); no hand-written update rules.

Weight decay goes to matrices only. What is a matrix is decided by module type and tensor rank, never by
parameter names: parameters of embedding tables (token and learned-position) and every 1-D tensor (norm
scales, biases, per-channel decays) are not decayed, unless ``decay_embeddings`` includes the tables.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from archifactory.nn.positions import LearnedPositions
from archifactory.train.config import OptimizerConfig

PYTORCH_OPTIMIZER_NAMES = {
    "lion": "lion",
    "soap": "soap",
    "ademamix": "ademamix",
    "adopt": "adopt",
    "mars": "mars",
    "schedulefree_adamw": "schedulefreeadamw",
}


def embedding_params(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, LearnedPositions)):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def split_decay(model: nn.Module, decay_embeddings: bool) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed) trainable parameters, each tensor once."""
    embeds = embedding_params(model)
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2 or (id(p) in embeds and not decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    return decay, no_decay


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


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    decay, no_decay = split_decay(model, cfg.decay_embeddings)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    name = cfg.name
    if name == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **cfg.extra)
    elif name == "adam":
        opt = torch.optim.Adam([{"params": decay + no_decay}], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **cfg.extra)
    elif name == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **cfg.extra)
    elif name == "muon":
        opt = _muon(model, cfg, decay, no_decay)
    elif name == "adam_mini":
        from pytorch_optimizer import AdamMini

        config = getattr(model, "config", None)
        heads = getattr(getattr(config, "mixer", None), "n_heads", 1)
        opt = AdamMini(model, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       num_embeds=getattr(config, "d_model", 1), num_heads=heads, **cfg.extra)
    else:
        from pytorch_optimizer import load_optimizer

        cls = load_optimizer(PYTORCH_OPTIMIZER_NAMES[name])
        opt = cls(groups, lr=cfg.lr, **_accepted(cls, {"betas": cfg.betas, "eps": cfg.eps}), **cfg.extra)
    for group in opt.param_groups:
        group.setdefault("base_lr", group["lr"])
    return opt


def _muon(model: nn.Module, cfg: OptimizerConfig, decay: list, no_decay: list) -> CombinedOptimizer:
    """Muon (Jordan et al. 2024) on 2-D hidden matrices; AdamW on embeddings, the head, biases, norms and
    any tensor that is not 2-D."""
    head = getattr(model, "lm_head", None)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    hidden = [p for p in decay if p.dim() == 2 and id(p) not in head_ids and id(p) not in embedding_params(model)]
    hidden_ids = {id(p) for p in hidden}
    rest_decay = [p for p in decay if id(p) not in hidden_ids]
    muon = torch.optim.Muon(hidden, lr=cfg.muon_lr or 0.02, weight_decay=cfg.weight_decay, momentum=0.95,
                            adjust_lr_fn="match_rms_adamw" if cfg.muon_lr is None else None)
    adam_groups = [g for g in ({"params": rest_decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    adamw = torch.optim.AdamW(adam_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return CombinedOptimizer([muon, adamw])


def _accepted(cls, kwargs: dict) -> dict:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    out = {k: v for k, v in kwargs.items() if k in params}
    default_betas = params["betas"].default if "betas" in params else None
    if isinstance(default_betas, tuple) and len(default_betas) != len(kwargs.get("betas", ())):
        out.pop("betas", None)  # e.g. AdEMAMix's three betas: keep its defaults unless given in `extra`
    return out


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    """Scale every group's base rate; returns the first group's rate (for logging)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
    return optimizer.param_groups[0]["lr"]
