"""Packed, deterministic, resumable batches.

The token stream of a split (documents joined by end-of-document ids) is cut into non-overlapping
windows of ``seq_len + 1`` tokens; input is the first ``seq_len``, target the last ``seq_len``. Each epoch
visits every window once in an order drawn from ``seed`` and the epoch number alone, so every
architecture in a sweep sees the identical stream, and micro-batch ``i`` can be produced directly
(resume needs no replay). With several processes, global micro-batch ``i`` is split across ranks.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from archifactory.errors import InputError


class PackedLoader:
    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        """``batch_size``: sequences per global micro-batch (split evenly across ``world_size`` ranks)."""
        if batch_size % world_size:
            raise InputError(f"batch_size={batch_size} must be divisible by the number of processes ({world_size})")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise InputError(
                f"the training split has {len(tokens)} tokens, too few for one sequence of train.seq_len={seq_len} "
                f"(it needs {seq_len + 1}); use a larger corpus or lower train.seq_len"
            )
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)}
        return self._orders[epoch]

    def window_indices(self, index: int) -> np.ndarray:
        """Windows of this rank's share of global micro-batch ``index``."""
        per_rank = self.batch_size // self.world_size
        first = index * self.batch_size + self.rank * per_rank
        flat = np.arange(first, first + per_rank)
        out = np.empty(per_rank, dtype=np.int64)
        for i, f in enumerate(flat):
            epoch, pos = divmod(int(f), self.n_windows)
            out[i] = self._order(epoch)[pos]
        return out

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size // world_size, seq_len) int64."""
        rows = [self.tokens[w * self.seq_len : w * self.seq_len + self.seq_len + 1] for w in self.window_indices(index)]
        data = torch.from_numpy(np.stack(rows).astype(np.int64))
        return data[:, :-1], data[:, 1:]

    def epoch_of(self, index: int) -> float:
        return index * self.batch_size / self.n_windows

    def stream_hash(self, n_batches: int) -> str:
        """Hash of the global window order of the first ``n_batches`` micro-batches plus the tokens'
        identity: equal across runs exactly when they read the same stream."""
        h = hashlib.sha256(f"{self.seq_len}:{self.batch_size}:{len(self.tokens)}".encode())
        for i in range(n_batches):
            for epoch_pos in range(i * self.batch_size, (i + 1) * self.batch_size):
                epoch, pos = divmod(epoch_pos, self.n_windows)
                h.update(int(self._order(epoch)[pos]).to_bytes(8, "little"))
        return h.hexdigest()[:16]


def eval_targets(n_tokens: int, seq_len: int, max_tokens: int) -> int:
    """How many target tokens :func:`eval_batches` scores in a split of ``n_tokens`` tokens: all
    ``n_tokens - 1`` when they fit in ``max_tokens`` (the last window then may be shorter than
    ``seq_len``), else ``max_tokens`` rounded down to whole windows (at least one)."""
    if n_tokens < 2:
        raise ValueError(f"the validation split has {n_tokens} token(s): evaluation needs at least 2 (one input and "
                         f"one target; seq_len={seq_len})")
    cap = max(seq_len, max_tokens // seq_len * seq_len)
    return min(n_tokens - 1, cap)


def eval_batches(tokens: np.ndarray, token_bytes: np.ndarray, seq_len: int, batch_size: int, max_tokens: int):
    """Consecutive windows from the start of ``tokens`` (the validation split), in fixed order, over the
    first :func:`eval_targets` targets: whole windows of ``seq_len`` in batches of ``batch_size``, then
    the split's final partial window (fewer targets, same start-of-window context rule) as a batch of
    its own, so every token of a short split counts. Yields ``(inputs, targets, target_bytes)``, each
    (B, T) int64; ``target_bytes`` are the UTF-8 bytes each target covers (``token_bytes`` aligned with
    ``tokens``, see :meth:`ShardSet.token_bytes`)."""
    if len(token_bytes) != len(tokens):
        raise ValueError(f"token_bytes has {len(token_bytes)} entries for {len(tokens)} tokens")
    n_targets = eval_targets(len(tokens), seq_len, max_tokens)
    n_full, rest = divmod(n_targets, seq_len)

    def rows(windows, length):
        x = np.stack([tokens[w * seq_len : w * seq_len + length + 1] for w in windows]).astype(np.int64)
        b = np.stack([token_bytes[w * seq_len + 1 : w * seq_len + length + 1] for w in windows]).astype(np.int64)
        x, b = torch.from_numpy(x), torch.from_numpy(b)
        return x[:, :-1], x[:, 1:], b

    for start in range(0, n_full, batch_size):
        yield rows(range(start, min(start + batch_size, n_full)), seq_len)
    if rest:
        yield rows([n_full], rest)
