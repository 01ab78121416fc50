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


class PackedLoader:
    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        """``batch_size``: sequences per global micro-batch (split evenly across ``world_size`` ranks)."""
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world_size})")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"{len(tokens)} tokens are too few for one sequence of seq_len={seq_len}")
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


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int):
    """Consecutive windows from the start of ``tokens`` (the validation split), at most ``max_tokens``
    target tokens, in fixed order."""
    n_windows = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    for start in range(0, n_windows, batch_size):
        rows = [tokens[w * seq_len : w * seq_len + seq_len + 1] for w in range(start, min(start + batch_size, n_windows))]
        data = torch.from_numpy(np.stack(rows).astype(np.int64))
        yield data[:, :-1], data[:, 1:]
