"""Sparse mixture of experts (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral, Jiang et al.
2024; DeepSeekMoE, Dai et al. 2024).

Routing: ``softmax_topk`` takes the softmax over all experts and keeps the top k (optionally renormalised,
Qwen3-MoE's ``norm_topk_prob``); ``topk_softmax`` keeps the k largest logits and takes the softmax over
them (Mixtral; equal to ``softmax_topk`` with renormalisation). Dispatch is dropless: every token reaches
its k experts, sorted by expert and run as one matmul per expert, no capacity factor.

Balancing: the Switch/Mixtral auxiliary loss ``E * sum_i f_i * P_i`` (f_i: routed assignments to expert i
per token, P_i: mean router probability), the router z-loss of ST-MoE (Zoph et al. 2022), and the
auxiliary-loss-free bias of DeepSeek-V3 (Wang et al. 2024): a per-expert bias added to the scores used
for *selection* only, nudged by ``bias_update_rate`` against each expert's load once per optimizer step.
The load is summed over every training forward of the step (all micro-batches of gradient accumulation)
and, under ``torch.distributed``, over all processes, so that one step with accumulation or several
processes moves the bias exactly as one process with the whole batch does (DeepSeek-V3, Sec. 2.1.2:
"at the end of each step"). The trainer calls :meth:`MoE.after_optimizer_step` through
``CausalLM.after_optimizer_step``; a hand-written training loop must do the same.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from archifactory.config import MAX_AUX_LOSS_WEIGHT, MAX_COUNT, BuildContext
from archifactory.ffn.base import ACTIVATIONS, FFN, AuxLosses, FFNConfig, glu_hidden
from archifactory.ffn.mlp import GLU, MLP, Activation
from archifactory.nn.init import init_linear, normal_
from archifactory.nn.roles import EXPERTS
from archifactory.registry import register_ffn


@register_ffn
class MoEConfig(FFNConfig):
    kind: Literal["moe"] = "moe"
    n_experts: int = Field(8, ge=1, le=MAX_COUNT)
    top_k: int = Field(2, ge=1)
    expert_hidden: int | None = Field(None, ge=1)
    """Hidden size of each expert; ``None`` means the dense GLU default (8/3 d rounded to 64)."""
    glu: bool = True
    """Experts are GLUs (SwiGLU with ``activation: silu``); ``false`` gives two-layer MLP experts."""
    activation: Activation = "silu"
    routing: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    renormalize: bool = True
    """With ``softmax_topk``: divide the kept probabilities by their sum."""
    n_shared_experts: int = Field(0, ge=0, le=MAX_COUNT)
    """Always-on experts (DeepSeekMoE), merged into one FFN of ``n_shared_experts * expert_hidden``."""
    balance_loss_weight: float = Field(0.01, ge=0, le=MAX_AUX_LOSS_WEIGHT)
    """Weight of the load-balancing loss (Switch Transformer: 0.01); at most 1."""
    router_z_loss_weight: float = Field(0.0, ge=0, le=MAX_AUX_LOSS_WEIGHT)
    """Weight of the router z-loss (ST-MoE: 0.001); at most 1."""
    bias_balancing: bool = False
    bias_update_rate: float = Field(1e-3, ge=0, le=1)
    """DeepSeek-V3's auxiliary-loss-free bias step ``gamma`` (0.001 there); at most 1 per optimizer step."""

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}; choose top_k in 1..{self.n_experts}")
        return self

    def resolved_hidden(self, d_model: int) -> int:
        return self.expert_hidden or glu_hidden(d_model, 64)

    def build(self, ctx: BuildContext) -> "MoE":
        return MoE(self, ctx)

    @classmethod
    def contract_examples(cls, d_model: int) -> list["MoEConfig"]:
        return [
            cls(n_experts=4, top_k=2, expert_hidden=16),
            cls(n_experts=4, top_k=1, expert_hidden=8, glu=False, activation="gelu", routing="topk_softmax",
                n_shared_experts=1, bias_balancing=True, router_z_loss_weight=1e-3),
        ]


class MoE(FFN):
    def __init__(self, cfg: MoEConfig, ctx: BuildContext) -> None:
        super().__init__()
        d, h, E = ctx.d_model, cfg.resolved_hidden(ctx.d_model), cfg.n_experts
        self.n_experts, self.top_k, self.hidden = E, cfg.top_k, h
        self.routing, self.renormalize = cfg.routing, cfg.renormalize
        self.balance_weight, self.z_weight = cfg.balance_loss_weight, cfg.router_z_loss_weight
        self.bias_update_rate = cfg.bias_update_rate if cfg.bias_balancing else 0.0
        self.router = nn.Linear(d, E, bias=False)
        # Expert weights stacked in nn.Linear layout (out_features, in_features) per expert.
        self.w_gate = nn.Parameter(torch.empty(E, h, d)) if cfg.glu else None
        self.w_up = nn.Parameter(torch.empty(E, h, d))
        self.w_down = nn.Parameter(torch.empty(E, d, h))
        self.act = ACTIVATIONS[cfg.activation]
        shared_hidden = cfg.n_shared_experts * h
        if cfg.n_shared_experts == 0:
            self.shared = None
        elif cfg.glu:
            self.shared = GLU(d, shared_hidden, cfg.activation, False, ctx)
        else:
            self.shared = MLP(d, shared_hidden, cfg.activation, False, ctx)
        self.register_buffer("routing_bias", torch.zeros(E), persistent=cfg.bias_balancing)
        self.register_buffer("last_load", torch.zeros(E, dtype=torch.long), persistent=False)
        self.register_buffer("total_load", torch.zeros(E, dtype=torch.long), persistent=False)
        # routed assignments of the training forwards since the last optimizer step (bias balancing only)
        self.register_buffer("step_load", torch.zeros(E, dtype=torch.long), persistent=False)
        self.std, self.out_std = ctx.init.std, ctx.init.out_std(ctx.n_layers)
        self.reset_parameters()

    def param_roles(self):
        # Stacked expert matrices (E, out, in): decayed like the dense FFN's matrices (Mixtral, DeepSeek-MoE
        # train them with AdamW); torch's Muon orthogonalises single 2-D matrices only, so AdamW.
        # The router is an nn.Linear matrix.
        return {"w_gate": EXPERTS, "w_up": EXPERTS, "w_down": EXPERTS}

    def reset_parameters(self) -> None:
        init_linear(self.router, self.std)
        for w in (self.w_gate, self.w_up):
            if w is not None:
                normal_(w, self.std)
        normal_(self.w_down, self.out_std)
        if self.shared is not None:
            self.shared.reset_parameters()
        self.routing_bias.zero_()
        self.step_load.zero_()
        self.reset_load_stats()

    def reset_load_stats(self) -> None:
        self.last_load.zero_()
        self.total_load.zero_()

    def load_fractions(self) -> torch.Tensor:
        """Share of routed assignments each expert received since the last reset (sums to 1)."""
        total = self.total_load.sum().clamp(min=1)
        return self.total_load.float() / total

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits ``(N, E)`` (fp32) -> chosen experts ``(N, k)`` and their weights ``(N, k)``."""
        if self.routing == "softmax_topk":
            probs = logits.softmax(dim=-1)
            chosen = (probs + self.routing_bias).topk(self.top_k, dim=-1).indices
            weights = probs.gather(-1, chosen)
            if self.renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        else:
            chosen = (logits + self.routing_bias).topk(self.top_k, dim=-1).indices
            weights = logits.gather(-1, chosen).softmax(dim=-1)
        return chosen, weights

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        up = x @ self.w_up[e].t()
        hidden = self.act(x @ self.w_gate[e].t()) * up if self.w_gate is not None else self.act(up)
        return hidden @ self.w_down[e].t()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, AuxLosses]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        logits = self.router(flat).float()  # (N, E)
        chosen, weights = self.route(logits)
        # Dropless dispatch: sort the N*k (token, expert) assignments by expert, one matmul per expert.
        assignments = chosen.reshape(-1)
        order = assignments.argsort(stable=True)
        token_of = order // self.top_k
        counts = torch.bincount(assignments, minlength=self.n_experts)
        outputs = [
            self.expert(e, chunk)
            for e, chunk in enumerate(flat[token_of].split(counts.tolist()))
            if chunk.shape[0] > 0
        ]
        routed = torch.cat(outputs) * weights.reshape(-1)[order, None].to(flat.dtype)
        y = torch.zeros_like(flat).index_add_(0, token_of, routed.to(flat.dtype))
        if self.shared is not None:
            y = y + self.shared(flat)[0]
        with torch.no_grad():
            self.last_load.copy_(counts)
            self.total_load.add_(counts)
            if self.training and self.bias_update_rate:
                self.step_load.add_(counts)
        return y.reshape(shape), self.aux_losses(logits, chosen)

    @torch.no_grad()
    def after_optimizer_step(self, applied: bool = True) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024): ``b_i += rate * sign(mean_j c_j - c_i)``
        with ``c_i`` the assignments expert i received in this step's training forwards, summed over
        micro-batches and (all-reduced) over processes; then the count restarts. Collective under
        ``torch.distributed``: every process must call it once per optimizer step. A skipped step
        (``applied=False``) discards its counts: the bias moves only with updates that were applied."""
        if not self.bias_update_rate or not applied:
            self.step_load.zero_()
            return
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.step_load, op=dist.ReduceOp.SUM)
        load = self.step_load.float()
        self.routing_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
        self.step_load.zero_()

    def aux_losses(self, logits: torch.Tensor, chosen: torch.Tensor) -> AuxLosses:
        aux: AuxLosses = {}
        if self.balance_weight:
            probs = logits.softmax(dim=-1)
            routed_per_token = F.one_hot(chosen, self.n_experts).float().sum(dim=1).mean(dim=0)  # f_i, sums to k
            aux["moe_balance"] = self.balance_weight * self.n_experts * (routed_per_token * probs.mean(dim=0)).sum()
        if self.z_weight:
            aux["moe_router_z"] = self.z_weight * torch.logsumexp(logits, dim=-1).square().mean()
        return aux

    def expert_params(self) -> int:
        return sum(w[0].numel() for w in (self.w_gate, self.w_up, self.w_down) if w is not None)

    def active_params(self) -> int:
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared is not None else 0
        return self.router.weight.numel() + self.top_k * self.expert_params() + shared

    def flops_per_token(self) -> int:
        shared = self.shared.flops_per_token() if self.shared is not None else 0
        return 2 * self.router.weight.numel() + self.top_k * 2 * self.expert_params() + shared
