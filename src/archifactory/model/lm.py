"""``CausalLM``: token embedding -> blocks -> final norm -> LM head, with the loss, auxiliary losses,
costs (parameters by component, FLOPs per token, cache bytes) and cached generation."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from archifactory.config import dump_config, to_yaml
from archifactory.errors import ArchifactoryWarning, InputError
from archifactory.ffn.base import FFN
from archifactory.model.block import Block
from archifactory.model.config import ModelConfig, load_model_config
from archifactory.model.sampling import sample_next
from archifactory.nn.init import normal_
from archifactory.nn.roles import EMBEDDING, HEAD, VECTOR, ParamRole

IGNORE_INDEX = -100


@dataclasses.dataclass
class LMOutput:
    logits: torch.Tensor
    """(B, T, V) next-token logits of the main head."""
    loss: torch.Tensor | None = None
    """Training objective: ``ce_loss`` plus every auxiliary loss."""
    ce_loss: torch.Tensor | None = None
    """Mean next-token cross-entropy over target positions (nats)."""
    aux_losses: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Weighted auxiliary terms included in ``loss`` (z_loss, moe_balance, moe_router_z, mtp)."""
    cache: "ModelCache | None" = None


@dataclasses.dataclass
class ModelCache:
    layers: list[Any]
    """Each block's mixer cache (KV cache or recurrent state)."""
    ffn_layers: list[Any] = dataclasses.field(default_factory=list)
    """Each block's FFN cache (None for position-wise FFNs)."""
    pos: int = 0


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.kind != "transformer":
            raise TypeError(f"CausalLM builds model kind 'transformer', not {config.kind!r}; use config.build()")
        self.config = config
        D, V = config.d_model, config.vocab_size
        self.embed = nn.Embedding(V, D)
        self.embedding_scale = config.resolved_embedding_scale()
        self.pos_embed = config.position.build_absolute(D, config.max_seq_len, config.init.std)
        shared: dict[str, nn.Module] = {}  # modules several layers reuse (Zamba2's shared block), by name
        self.blocks = nn.ModuleList(
            Block(layer, config.build_context(i, shared), config.residual)
            for i, layer in enumerate(config.layer_configs())
        )
        last = config.layer_configs()[-1]
        self.mtp_blocks = nn.ModuleList(
            # initialised as the last trunk layer: depth-dependent inits (RWKV's) only cover 0..n_layers-1
            Block(last, config.build_context(config.n_layers - 1, shared), config.residual)
            for _ in range(config.mtp_heads)
        )
        # registered once here (one set of parameters, one optimizer state), used by every layer naming it
        self.shared_blocks = nn.ModuleDict(shared) if shared else None
        self._embeddings_read = any(b.mixer.reads_embeddings for b in self.blocks)
        if self._embeddings_read and config.mtp_heads:
            raise ValueError(
                "mtp_heads > 0 with a mixer that reads the token embeddings (zamba2 with concat_embeddings) is "
                "not supported; set mtp_heads: 0 or concat_embeddings: false"
            )
        self.final_norm = config.norm.build_for(D) if config.final_norm else nn.Identity()
        self.lm_head = nn.Linear(D, V, bias=config.head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()
        if config.pretrained is not None and config.pretrained.freeze:
            for p in self.pretrained_parameters().values():
                p.requires_grad_(False)

    def pretrained_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters ``config.pretrained`` initialises from a Hugging Face model, by name."""
        if self.config.pretrained is None:
            return {}
        modules = {"embedding": ["embed.weight"], "head": ["lm_head.weight"],
                   "final_norm": [f"final_norm.{n}" for n, _ in self.final_norm.named_parameters()]}
        params = dict(self.named_parameters(remove_duplicate=False))
        return {name: params[name] for m in self.config.pretrained.modules for name in modules[m]}

    # ------------------------------------------------------------------------------------------ set-up

    def reset_parameters(self) -> None:
        init = self.config.init
        normal_(self.embed.weight, init.embedding_std if init.embedding_std is not None else init.std)
        if not self.config.tie_embeddings:
            normal_(self.lm_head.weight, init.std)
        if self.lm_head.bias is not None:
            nn.init.zeros_(self.lm_head.bias)
        if self.pos_embed is not None and hasattr(self.pos_embed, "reset_parameters"):
            self.pos_embed.reset_parameters()
        for block in [*self.blocks, *self.mtp_blocks]:
            block.reset_parameters()
        for module in self.shared_modules():
            module.reset_parameters()
        if hasattr(self.final_norm, "reset_parameters"):
            self.final_norm.reset_parameters()

    def shared_modules(self) -> list[nn.Module]:
        """Modules several layers reuse (``shared_blocks``; none in most models and in the hierarchical
        kinds, which build their stacks themselves)."""
        shared = getattr(self, "shared_blocks", None)
        return list(shared.values()) if shared is not None else []

    def param_roles(self) -> dict[str, ParamRole]:
        """The token table is an embedding and the vocabulary projection a head: both AdamW, never Muon
        (Jordan et al. 2024; modded-nanogpt). A tied head is the embedding table. Blocks, norms and
        position tables declare their own parameters."""
        roles = {"embed.weight": EMBEDDING, "lm_head.bias": VECTOR}
        if not self.config.tie_embeddings:
            roles["lm_head.weight"] = HEAD
        return roles

    @classmethod
    def from_config(cls, source: str | Path | dict | ModelConfig, overrides: Sequence[str] = ()) -> "CausalLM":
        """Build from a :class:`ModelConfig`, a preset name, a YAML path or a mapping."""
        config = source if isinstance(source, ModelConfig) else load_model_config(source, overrides)
        return config.build()

    # ---------------------------------------------------------------------------------------- forward

    def init_cache(self, batch_size: int, device: torch.device | str | None = None, dtype=None) -> ModelCache:
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return ModelCache(
            [block.mixer.init_cache(batch_size, device, dtype) for block in self.blocks],
            [block.ffn.init_cache(batch_size, device, dtype) for block in self.blocks],
        )

    def reorder_cache(self, cache: ModelCache, index: torch.Tensor) -> ModelCache:
        """A new cache holding batch rows ``index`` ((B',) int64; rows may repeat) of ``cache``, each block
        asking its mixer and FFN (their caches may lay out batch differently); ``cache`` is unchanged."""
        return ModelCache(
            [block.mixer.reorder_cache(c, index) for block, c in zip(self.blocks, cache.layers)],
            [block.ffn.reorder_cache(c, index) for block, c in zip(self.blocks, cache.ffn_layers)],
            cache.pos,
        )

    def document_blockers(self) -> list[str]:
        """The parts that cannot keep packed documents apart (a mixer without ``supports_documents``, an
        FFN with state), as ``"layer 2 mixer Mamba2"``; empty when ``forward(..., document_ids=...)`` works."""
        out = []
        for i, block in enumerate([*self.blocks, *self.mtp_blocks]):
            if not block.mixer.supports_documents:
                out.append(f"layer {i} mixer {type(block.mixer).__name__}")
            if type(block.ffn).init_cache is not FFN.init_cache:  # an FFN with state (token shift)
                out.append(f"layer {i} ffn {type(block.ffn).__name__}")
        return out

    def hidden_states(
        self, input_ids: torch.Tensor, cache: ModelCache | None = None, document_ids: torch.Tensor | None = None,
        cross_layer: dict | None = None,
    ):
        """Run embedding and blocks; returns the trunk output (before the final norm) and summed aux losses.
        ``cross_layer``: the dict that mixers connecting layers share during this call (a new one if None)."""
        cross_layer = {} if cross_layer is None else cross_layer
        B, T = input_ids.shape
        x = self.embed(input_ids)
        if self.embedding_scale != 1.0:
            x = x * torch.tensor(self.embedding_scale, dtype=x.dtype)
        start = cache.pos if cache is not None else 0
        if self.pos_embed is not None:
            if document_ids is None:
                if start + T > self.config.max_seq_len:  # Python ints: no device sync, no graph break
                    raise InputError(
                        f"position {start + T - 1} is beyond the absolute position table's "
                        f"max_seq_len={self.config.max_seq_len}; use shorter inputs or a larger model.max_seq_len"
                    )
                positions = torch.arange(start, start + T, device=input_ids.device)
            else:
                positions = document_positions(document_ids)  # restarts at each document: < T
                if T > self.config.max_seq_len:
                    raise InputError(
                        f"a packed row of {T} tokens may hold a document beyond the absolute position table's "
                        f"max_seq_len={self.config.max_seq_len}; use shorter rows or a larger model.max_seq_len"
                    )
            x = x + self.pos_embed(positions).to(x.dtype)
        aux: dict[str, torch.Tensor] = {}
        if getattr(self, "_embeddings_read", False):  # Zamba's shared block reads the token embeddings
            cross_layer["embeddings"] = x
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            ffn_cache = cache.ffn_layers[i] if cache is not None else None
            x, layer_cache, block_aux = block(x, layer_cache, ffn_cache, document_ids, cross_layer)
            if cache is not None:
                cache.layers[i] = layer_cache
            for name, value in block_aux.items():
                aux[name] = aux[name] + value if name in aux else value
        if cache is not None:
            cache.pos += T
        return x, aux

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.final_norm(hidden))
        cap = self.config.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: ModelCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> LMOutput:
        """``input_ids`` (B, T); ``targets`` (B, T) holds the next token at each position, or -100 where no
        loss is taken (padding, document ends). ``document_ids`` (B, T), for rows packing several documents:
        the document each token belongs to (consecutive runs of equal ids); no token then reads another
        document, and absolute positions restart at each document. Needs every part to support it
        (:meth:`document_blockers` is empty). The multi-token heads' targets k tokens ahead may cross into
        the next document (mask them in ``targets`` if that matters)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if document_ids is not None:
            if document_ids.shape != input_ids.shape:
                raise ValueError(
                    f"document_ids shape {tuple(document_ids.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            blockers = self.document_blockers()
            if blockers:
                raise ValueError(
                    f"packed documents cannot be kept apart by {', '.join(blockers)}: "
                    "give one document per row (padding) for this model"
                )
        cross_layer: dict = {}  # filled by the trunk, read by the multi-token heads too
        hidden, aux = self.hidden_states(input_ids, cache, document_ids, cross_layer)
        logits = self.logits(hidden)
        if targets is None:
            return LMOutput(logits=logits, aux_losses=aux, cache=cache)
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != input_ids shape {tuple(input_ids.shape)}")
        ce = cross_entropy(logits, targets)
        if self.config.z_loss_weight:
            aux["z_loss"] = self.config.z_loss_weight * z_loss(logits, targets)
        if self.mtp_blocks:
            if input_ids.shape[1] <= len(self.mtp_blocks):
                raise InputError(
                    f"a sequence of {input_ids.shape[1]} tokens leaves no target for the last of mtp_heads="
                    f"{len(self.mtp_blocks)}; use sequences longer than mtp_heads"
                )
            mtp = [
                cross_entropy(self.logits(block(hidden, documents=document_ids, cross_layer=cross_layer)[0]),
                              shift_targets(targets, i + 1))
                for i, block in enumerate(self.mtp_blocks)
            ]
            aux["mtp"] = self.config.mtp_loss_weight * torch.stack(mtp).mean()
        loss = ce + sum(aux.values()) if aux else ce
        return LMOutput(logits=logits, loss=loss, ce_loss=ce, aux_losses=aux, cache=cache)

    # -------------------------------------------------------------------------------------- generation

    def check_generation_length(self, n_prompt: int, max_new_tokens: int) -> None:
        """Refuse a generation whose prompt + new tokens exceed ``max_seq_len`` when the model's positions
        cannot go past it: a table of ``max_seq_len`` rows (learned, sinusoidal) or RoPE (without dynamic
        scaling) in any mixer that uses positions. Where they extrapolate by design (NoPE, ALiBi, RoPE with
        dynamic NTK, or no mixer using positions: recurrent models), warn once per model instead.

        Raises:
            InputError: the length cannot work; the message says how many new tokens fit.
        """
        limit = self.config.max_seq_len
        if n_prompt + max_new_tokens <= limit:
            return
        position = self.config.position
        room = limit - n_prompt
        fix = (f"give max_new_tokens <= {room}" if room > 0 else f"shorten the prompt to fewer than {limit} tokens")
        head = f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={limit}"
        if self.pos_embed is not None or position.limits_length:
            raise InputError(f"{head}, the length of the model's {position.kind} position table; {fix}")
        uses = self.config.mixers_use_positions()
        if uses and not position.extrapolates():
            raise InputError(
                f"{head}: the model's {position.kind} positions past it were never trained and do not extrapolate; "
                f"{fix}, or train a model with a larger max_seq_len"
            )
        if not getattr(self, "_warned_length", False):
            self._warned_length = True
            why = (f"its {position.kind} positions extrapolate by design" if uses
                   else "no mixer uses positions")
            warnings.warn(f"{head}: generating past the model's context anyway ({why}; quality usually drops "
                          f"past the length it was built for)", ArchifactoryWarning, stacklevel=3)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor | Sequence[int],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | None = None,
    ) -> torch.Tensor:
        """Decode with caches. ``prompt_ids``: (T,), (B, T) or a list of ids; returns prompt + new tokens
        with the same leading shape. Rows that produced ``eos_token_id`` are padded with it."""
        device = self.embed.weight.device
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
        squeeze = ids.dim() == 1
        if squeeze:
            ids = ids[None]
        if ids.shape[1] == 0:
            raise InputError("prompt_ids is empty: give at least one token (e.g. a BOS/EOS id)")
        self.check_generation_length(ids.shape[1], max_new_tokens)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        was_training = self.training
        self.eval()
        cache = self.init_cache(ids.shape[0])
        logits = self(ids, cache=cache).logits[:, -1]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        out = [ids]
        for _ in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done |= token == eos_token_id
            out.append(token[:, None])
            if eos_token_id is not None and bool(done.all()):
                break
            logits = self(token[:, None], cache=cache).logits[:, -1]
        self.train(was_training)
        result = torch.cat(out, dim=1)
        return result[0] if squeeze else result

    # ------------------------------------------------------------------------------------------- costs

    def param_breakdown(self) -> dict[str, int]:
        """Parameters by component; each tensor counted once (a tied head counts under ``embedding``)."""
        groups: dict[str, list[nn.Module]] = {
            "embedding": [self.embed],
            "position": [self.pos_embed] if self.pos_embed is not None else [],
            "mixer": [b.mixer for b in self.blocks] + self.shared_modules(),
            "ffn": [b.ffn for b in self.blocks],
            "norm": [n for b in self.blocks for n in b.norms()] + [self.final_norm],
            "mtp": list(self.mtp_blocks),
            "head": [self.lm_head],
        }
        seen: set[int] = set()
        counts: dict[str, int] = {}
        for name, modules in groups.items():
            total = 0
            for module in modules:
                for p in module.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        total += p.numel()
            counts[name] = total
        return counts

    def num_params(self, non_embedding: bool = False) -> int:
        counts = self.param_breakdown()
        if non_embedding:
            return sum(v for k, v in counts.items() if k not in ("embedding", "position"))
        return sum(counts.values())

    def active_params(self) -> int:
        """Parameters used per token (differs from :meth:`num_params` with mixture-of-experts FFNs)."""
        total = self.num_params()
        for block in self.blocks:
            total -= sum(p.numel() for p in block.ffn.parameters()) - block.ffn.active_params()
        return total

    def flops_per_token(self, seq_len: int | None = None, training: bool = False) -> int:
        """Matmul FLOPs per token from each component (norms, activations and softmax are ignored); with
        ``training``, 3x forward (backward = 2x forward) including the multi-token heads."""
        T = seq_len or self.config.max_seq_len
        head = 2 * self.lm_head.in_features * self.lm_head.out_features
        trunk = sum(b.mixer.flops_per_token(T) + b.ffn.flops_per_token() for b in self.blocks) + head
        if not training:
            return trunk
        mtp = sum(b.mixer.flops_per_token(T) + b.ffn.flops_per_token() + head for b in self.mtp_blocks)
        return 3 * (trunk + mtp)

    def flops_breakdown(self, seq_len: int | None = None) -> dict[str, int]:
        """Forward FLOPs per token by component."""
        T = seq_len or self.config.max_seq_len
        return {
            "mixer": sum(b.mixer.flops_per_token(T) for b in self.blocks),
            "ffn": sum(b.ffn.flops_per_token() for b in self.blocks),
            "head": 2 * self.lm_head.in_features * self.lm_head.out_features,
        }

    def state_bytes(self, seq_len: int | None = None, dtype: torch.dtype = torch.bfloat16) -> int:
        """Cache bytes (KV or recurrent state) one sequence holds after ``seq_len`` tokens."""
        T = seq_len or self.config.max_seq_len
        return sum(b.mixer.state_bytes(T, dtype) for b in self.blocks)

    def kernel_paths(self) -> dict[int, str]:
        """Which implementation each layer's mixer runs."""
        return {i: b.mixer.kernel_path() for i, b in enumerate(self.blocks)}

    def after_optimizer_step(self, applied: bool = True) -> None:
        """Updates that are not gradient steps and happen once per optimizer step (MoE routing-bias
        balancing): calls ``after_optimizer_step(applied)`` on every submodule that defines it. Training
        loops call it right after ``optimizer.step()``, with ``applied=False`` for a step whose update was
        skipped (non-finite loss or gradients): its statistics are then discarded, not applied. Under
        ``torch.distributed`` it is collective only when ``applied`` (every process takes the same decision)."""
        for module in self.modules():
            if module is not self and callable(getattr(module, "after_optimizer_step", None)):
                module.after_optimizer_step(applied)

    def moe_loads(self) -> dict[int, torch.Tensor]:
        """Per MoE layer, the share of routed assignments each expert got since the last reset."""
        return {i: b.ffn.load_fractions() for i, b in enumerate(self.blocks) if hasattr(b.ffn, "load_fractions")}

    # ------------------------------------------------------------------------------------------ saving

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.yaml`` and ``model.safetensors`` to ``directory``, with both files' sizes and
        digests in ``checksums.json`` (verified by :meth:`from_pretrained`)."""
        from safetensors.torch import save_model

        from archifactory.integrity import write_checksums

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dump_config(self.config, directory / "config.yaml")
        save_model(self, str(directory / "model.safetensors"))
        write_checksums(directory, ["config.yaml", "model.safetensors"])
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "CausalLM":
        """Load what :meth:`save_pretrained` wrote; raises :class:`~archifactory.integrity.CorruptFileError`
        when a file does not match its checksum or cannot be read."""
        from safetensors.torch import load_model

        from archifactory.integrity import CorruptFileError, verify_checksums

        directory = Path(directory)
        for name in ("config.yaml", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing: not a saved archifactory model")
        problems = verify_checksums(directory)
        if problems:
            raise CorruptFileError(f"saved model {directory} is damaged: {'; '.join(problems)}")
        model = load_model_config(directory / "config.yaml").build()
        try:
            load_model(model, str(directory / "model.safetensors"), device=str(device))
        except Exception as err:  # safetensors' own error types: a damaged header or a wrong shape
            raise CorruptFileError(f"{directory / 'model.safetensors'} cannot be read ({type(err).__name__}: {err})") from None
        return model.to(device)

    def extra_repr(self) -> str:
        return f"params={self.num_params():,}"

    def config_yaml(self) -> str:
        return to_yaml(self.config)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document: (B, T) ids of consecutive documents -> (B, T) offsets
    that restart at 0 wherever the id changes."""
    T = document_ids.shape[1]
    index = torch.arange(T, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def z_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of ``logsumexp(logits)^2`` over target positions (PaLM, Chowdhery et al. 2022)."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    keep = targets != IGNORE_INDEX
    return (lse.square() * keep).sum() / keep.sum().clamp(min=1)


def shift_targets(targets: torch.Tensor, k: int) -> torch.Tensor:
    """Targets k tokens further ahead: position t gets ``targets[t + k]``, the last k get -100."""
    shifted = torch.full_like(targets, IGNORE_INDEX)
    if k < targets.shape[1]:
        shifted[:, :-k] = targets[:, k:]
    return shifted
