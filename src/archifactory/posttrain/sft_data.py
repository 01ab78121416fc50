"""SFT batches: tokenized conversations with the loss mask, packed several to a row or one per row.

Each conversation of ``n`` tokens gives ``n - 1`` (input, target) positions; a target is -100 where no loss
is taken (every non-assistant token by default, and padding). Conversations longer than ``seq_len + 1``
tokens are cut at the end (as TRL's ``max_length``), and those left without a trained target are dropped.

``packing``: conversations are placed, in a seeded order, one after another into rows of ``seq_len``
positions, a conversation never split across rows (the rest of a row is padding); ``document_ids`` tell
the model where each conversation starts, so attention does not cross them (see ``CausalLM.forward``).
Without packing each row holds one conversation, padded to the longest row of its micro-batch.

Like the pretraining loader, micro-batch ``i`` is a pure function of ``(seed, i)``: resume needs no replay.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np
import torch

from archifactory.data.tokenizer import Tokenizer
from archifactory.model.lm import IGNORE_INDEX
from archifactory.posttrain.chat import ChatTemplate


@dataclasses.dataclass
class SFTExample:
    inputs: np.ndarray
    """(n,) int64 token ids fed to the model."""
    targets: np.ndarray
    """(n,) int64 next token at each position, -100 where no loss is taken."""

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


@dataclasses.dataclass
class TokenizeStats:
    conversations: int = 0
    truncated: int = 0
    dropped: int = 0
    """Conversations with no trained token left after truncation."""


def tokenize_conversations(
    conversations: Sequence[Sequence[dict]],
    template: ChatTemplate,
    tokenizer: Tokenizer,
    seq_len: int,
    assistant_only_loss: bool = True,
) -> tuple[list[SFTExample], TokenizeStats]:
    """Render, tokenize and mask each conversation; cut to ``seq_len`` positions."""
    examples, stats = [], TokenizeStats(conversations=len(conversations))
    for messages in conversations:
        encoded = template.encode(messages, tokenizer)
        ids = np.asarray(encoded.ids, dtype=np.int64)
        trained = np.asarray(encoded.assistant, dtype=bool) if assistant_only_loss else np.ones(len(ids), dtype=bool)
        if len(ids) > seq_len + 1:
            stats.truncated += 1
            ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
        targets = np.where(trained[1:], ids[1:], IGNORE_INDEX)
        if len(ids) < 2 or not (targets != IGNORE_INDEX).any():
            stats.dropped += 1
            continue
        examples.append(SFTExample(ids[:-1].copy(), targets))
    return examples, stats


@dataclasses.dataclass
class SFTBatch:
    input_ids: torch.Tensor
    """(B, T) int64."""
    targets: torch.Tensor
    """(B, T) int64, -100 where no loss is taken."""
    document_ids: torch.Tensor | None
    """(B, T) int64 conversation index within each row (packing), else ``None``."""

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def collate(examples: Sequence[Sequence[SFTExample]], pad_id: int, length: int | None = None, pack: bool = False) -> SFTBatch:
    """Rows of concatenated examples, right-padded to ``length`` (default: the longest row). The padding
    after a row's last conversation counts as one more document."""
    lengths = [sum(len(e.inputs) for e in row) for row in examples]
    T = length or max(lengths)
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    documents = torch.zeros((len(examples), T), dtype=torch.long)
    for r, row in enumerate(examples):
        at = 0
        for d, example in enumerate(row):
            n = len(example.inputs)
            inputs[r, at : at + n] = torch.from_numpy(example.inputs)
            targets[r, at : at + n] = torch.from_numpy(example.targets)
            documents[r, at : at + n] = d
            at += n
        documents[r, at:] = len(row)
    return SFTBatch(inputs, targets, documents if pack else None)


class SFTLoader:
    """Seeded, resumable micro-batches of SFT rows; global micro-batch ``i`` holds ``batch_size`` rows,
    split evenly across ``world_size`` ranks."""

    def __init__(self, examples: Sequence[SFTExample], seq_len: int, batch_size: int, seed: int, pad_id: int,
                 pack: bool, rank: int = 0, world_size: int = 1) -> None:
        if not examples:
            raise ValueError("no SFT conversation left to train on (all empty or without assistant tokens)")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world_size})")
        self.examples, self.seq_len, self.batch_size, self.seed = list(examples), seq_len, batch_size, seed
        self.pad_id, self.pack, self.rank, self.world_size = pad_id, pack, rank, world_size
        self._epochs: list[list[list[int]]] = []

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """Rows of example indices for ``epoch``: a seeded permutation, packed greedily when packing."""
        while len(self._epochs) <= epoch:
            order = np.random.default_rng([self.seed, len(self._epochs)]).permutation(len(self.examples))
            if not self.pack:
                rows = [[int(i)] for i in order]
            else:
                rows, row, used = [], [], 0
                for i in order:
                    n = len(self.examples[i].inputs)
                    if row and used + n > self.seq_len:
                        rows.append(row)
                        row, used = [], 0
                    row.append(int(i))
                    used += n
                rows.append(row)
            self._epochs.append(rows)
        return self._epochs[epoch]

    def global_rows(self, index: int) -> list[list[int]]:
        """Every row (example indices) of global micro-batch ``index``; epochs follow one another."""
        first, out = index * self.batch_size, []
        epoch, position = 0, first
        while position >= len(self.epoch_rows(epoch)):
            position -= len(self.epoch_rows(epoch))
            epoch += 1
        while len(out) < self.batch_size:
            rows = self.epoch_rows(epoch)
            take = rows[position : position + self.batch_size - len(out)]
            out.extend(take)
            position += len(take)
            if position >= len(rows):
                epoch, position = epoch + 1, 0
        return out

    def batch(self, index: int) -> SFTBatch:
        per_rank = self.batch_size // self.world_size
        rows = self.global_rows(index)[self.rank * per_rank : (self.rank + 1) * per_rank]
        return collate([[self.examples[i] for i in row] for row in rows], self.pad_id,
                       self.seq_len if self.pack else None, self.pack)

    def n_targets(self, indices: Sequence[int]) -> int:
        """Trained tokens in the global micro-batches ``indices`` (all ranks): the divisor of a step's loss."""
        return sum(self.examples[i].n_targets for index in indices for row in self.global_rows(index) for i in row)

    def epoch_of(self, index: int) -> float:
        rows_before = index * self.batch_size
        epoch = 0
        while rows_before >= len(self.epoch_rows(epoch)):
            rows_before -= len(self.epoch_rows(epoch))
            epoch += 1
        return epoch + rows_before / len(self.epoch_rows(epoch))

    def stream_hash(self, n_batches: int) -> str:
        """Hash of the conversations (their tokens and masks) in the order the first ``n_batches`` global
        micro-batches read them: equal across runs exactly when they train on the same stream."""
        h = hashlib.sha256(f"sft:{self.seq_len}:{self.batch_size}:{self.pack}".encode())
        digests = {}
        for index in range(n_batches):
            for row in self.global_rows(index):
                for i in row:
                    if i not in digests:
                        e = self.examples[i]
                        digests[i] = hashlib.sha256(e.inputs.tobytes() + e.targets.tobytes()).digest()
                    h.update(digests[i])
                h.update(b"|")
        return h.hexdigest()[:16]


def eval_batches(examples: Sequence[SFTExample], batch_size: int, pad_id: int):
    """Held-out conversations in fixed order, one per row, ``batch_size`` rows at a time."""
    for start in range(0, len(examples), batch_size):
        yield collate([[e] for e in examples[start : start + batch_size]], pad_id)
