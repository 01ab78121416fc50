"""Synthetic recall probes: Zoology's multi-query associative recall (MQAR) and MAD-lab's six tasks.

Each task is a typed config (``kind`` picks the class) whose :meth:`ProbeTask.generate` draws ``n``
examples from a ``numpy.random.Generator``. An example is a fixed-length row of token ids with two target
rows: ``targets`` holds the answer at each position where one is due and ``-100`` elsewhere (accuracy is
taken on these positions only), and ``train_targets`` is what the training loss is taken on (the answers,
or every next token where the reference trains so). Semantics follow the reference generators, read
from their sources (not copied):

- ``mqar``: Zoology ``zoology/data/associative_recall.py::_mqar`` (Arora et al. 2023, "Zoology:
  Measuring and improving recall in efficient language models").
- ``in_context_recall``, ``noisy_recall``, ``fuzzy_recall``, ``selective_copying``, ``compression``,
  ``memorization``: MAD-lab ``mad/data/instances.py`` with the baselines of ``configs/tasks/*.yml``
  (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid Architectures").

Where we differ from a reference it is to close a hole in it, said at the class: MAD's recall tasks can
draw a final query whose key never appeared (we draw the guaranteed pair among the positions the
loop visits), and selective copying draws its blank positions from the seeded generator instead of
NumPy's global one.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, ClassVar, Literal, Union

import numpy as np
from pydantic import Field, model_validator

from archifactory.config import Strict

IGNORE_INDEX = -100


@dataclasses.dataclass
class ProbeData:
    inputs: np.ndarray
    """(N, T) int64 token ids."""
    targets: np.ndarray
    """(N, T) int64: the answer due at each position, ``-100`` where none is (accuracy is taken here)."""
    train_targets: np.ndarray
    """(N, T) int64: what the training loss is taken on (``targets``, or every next token)."""

    def __len__(self) -> int:
        return len(self.inputs)


VocabSize = Annotated[int, Field(ge=4, le=2**20)]
SeqLen = Annotated[int, Field(ge=4, le=2**16)]
Examples = Annotated[int, Field(ge=1)]


class ProbeTask(Strict):
    """Base of every probe task: vocabulary, length and how many examples each split draws."""

    kind: str
    vocab_size: VocabSize
    seq_len: SeqLen
    train_examples: Examples
    test_examples: Examples
    """Examples the reported accuracy is measured on; the held-out validation split (early stopping and
    the grid's choice) draws as many again, from its own stream."""
    autoencoder: ClassVar[bool] = False
    """True for compression: the model reads the sequence and rebuilds it from its last position."""

    def generate(self, n: int, rng: np.random.Generator, split: str = "test") -> ProbeData:  # pragma: no cover
        raise NotImplementedError

    def model_seq_len(self) -> int:
        """Length of the rows :meth:`generate` returns (the model's ``max_seq_len``)."""
        return self.seq_len

    def label(self) -> str:
        return self.kind


# ------------------------------------------------------------------------------------------------ MQAR


class MQARTask(ProbeTask):
    """Multi-query associative recall (Zoology). A row of ``seq_len`` tokens: ``num_kv_pairs`` key-value
    pairs first (``k0 v0 k1 v1 ...``), keys drawn without replacement from ``[1, V/2)`` and values without
    replacement from ``[V/2, V)``; then each key is queried once, at offset ``2 * gap`` into the rest of
    the row, the gaps drawn without replacement from ``p(g) ∝ a (g + 1)^(a - 1)``, ``g = 0 .. (T - 2P)/2 - 1``
    (a power law; ``a = 0.01`` favours short gaps, ``a = 1`` is uniform). The answer (the key's value) is
    due at the query's position. Every other position holds a uniform random token from the whole
    vocabulary (``random_non_queries``, Zoology's default; else 0), so a filler token may equal a key."""

    kind: Literal["mqar"] = "mqar"
    vocab_size: VocabSize = 8192
    seq_len: SeqLen = 64
    num_kv_pairs: int = Field(4, ge=1)
    power_a: float = Field(0.01, gt=0, le=1)
    random_non_queries: bool = True
    train_examples: Examples = 100_000
    test_examples: Examples = 3_000

    @model_validator(mode="after")
    def _check(self):
        T, V, P = self.seq_len, self.vocab_size, self.num_kv_pairs
        if T % 2:
            raise ValueError(f"seq_len={T} must be even (queries sit at even offsets after the pairs)")
        if V <= T:
            raise ValueError(f"vocab_size={V} must exceed seq_len={T} (Zoology's condition)")
        if 4 * P > T:
            raise ValueError(f"num_kv_pairs={P} needs seq_len >= 4 * num_kv_pairs = {4 * P} (pairs, then a "
                             f"query slot per pair in the rest); raise seq_len or lower num_kv_pairs")
        if P > V // 2 - 1:
            raise ValueError(f"num_kv_pairs={P} distinct keys do not fit in the key half [1, {V // 2}) of "
                             f"vocab_size={V}")
        return self

    def label(self) -> str:
        return f"mqar-T{self.seq_len}-kv{self.num_kv_pairs}"

    def gap_probabilities(self) -> np.ndarray:
        """(space,) the probability of each gap ``g`` for one draw: ``a (g + 1)^(a - 1)``, normalised."""
        space = (self.seq_len - 2 * self.num_kv_pairs) // 2
        p = self.power_a * np.arange(1, space + 1, dtype=np.float64) ** (self.power_a - 1)
        return p / p.sum()

    def generate(self, n: int, rng: np.random.Generator, split: str = "test") -> ProbeData:
        T, V, P = self.seq_len, self.vocab_size, self.num_kv_pairs
        half = V // 2
        rows = np.arange(n)[:, None]
        keys = np.stack([rng.choice(half - 1, P, replace=False) for _ in range(n)]) + 1 if n else np.zeros((0, P), int)
        values = np.stack([rng.choice(V - half, P, replace=False) for _ in range(n)]) + half if n else keys
        # P gaps without replacement, each drawn in proportion to the weights left (successive sampling):
        # the order of the P largest Gumbel-perturbed log-weights has exactly that law (Plackett-Luce)
        log_p = np.log(self.gap_probabilities())
        perturbed = log_p[None, :] + rng.gumbel(size=(n, log_p.size))
        gaps = np.argsort(-perturbed, axis=1, kind="stable")[:, :P]
        inputs = np.zeros((n, T), dtype=np.int64)
        inputs[:, 0:2 * P:2] = keys
        inputs[:, 1:2 * P:2] = values
        query_pos = 2 * P + 2 * gaps  # key i is queried at query_pos[:, i]
        inputs[rows, query_pos] = keys
        targets = np.full((n, T), IGNORE_INDEX, dtype=np.int64)
        targets[rows, query_pos] = values
        if self.random_non_queries:
            empty = inputs == 0  # keys start at 1 and values at V/2: 0 marks exactly the filler
            inputs[empty] = rng.integers(0, V, size=int(empty.sum()))
        return ProbeData(inputs, targets, targets.copy())


# ------------------------------------------------------------------------------------------ MAD tasks


def _shifted(inputs: list[int], targets: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MAD's autoregressive shift of one generated row: (``inputs[:-1]``, answers ``targets[1:]``, every
    next token ``inputs[1:]``)."""
    x = np.asarray(inputs, dtype=np.int64)
    y = np.asarray(targets, dtype=np.int64)
    return x[:-1], y[1:], x[1:]


def _stack(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], length: int) -> tuple[np.ndarray, ...]:
    if not rows:
        return tuple(np.zeros((0, length), np.int64) for _ in range(3))
    return tuple(np.stack(part) for part in zip(*rows))


class MADTask(ProbeTask):
    """Base of MAD-lab's tasks: MAD's baseline split sizes (12,800 training and 1,280 test examples)."""

    train_examples: Examples = 12_800
    test_examples: Examples = 1_280


class MADRecallTask(MADTask):
    """Base of MAD's in-context and noisy recall: several queries per row, noise tokens, where training
    takes its loss. (Fuzzy recall has the same fields after its motif sizes: see there.)"""

    multi_query: bool = True
    noise_vocab_size: int = Field(0, ge=0)
    """Noise tokens: the last ``noise_vocab_size`` ids below the special tokens."""
    frac_noise: float = Field(0.0, ge=0, lt=1)
    """Probability that a slot holds noise tokens instead of a key and its value."""
    train_loss: Literal["all_tokens", "answers"] = "all_tokens"
    """``all_tokens``: training takes the loss on every next token (MAD's ``is_training``); ``answers``:
    on the answers only."""

    @model_validator(mode="after")
    def _check_noise(self):
        if self.frac_noise > 0 and self.noise_vocab_size == 0:
            raise ValueError(f"frac_noise={self.frac_noise} needs noise_vocab_size > 0")
        return self


class InContextRecallTask(MADRecallTask):
    """MAD in-context recall: ``seq_len / 2`` slots of key-value pairs (keys uniform with replacement from
    the lower half of the non-special vocabulary, each key's value fixed within the row and drawn from
    the upper half), a slot turning into two noise tokens with probability ``frac_noise``; the row ends
    with a query of a key already shown and its value. ``multi_query``: every repeated key's value is
    an answer too, and no copy token precedes the final query. Training takes the loss on every next
    token (MAD's ``is_training``); accuracy on the answers. Rows are ``seq_len - 1`` long (``seq_len``
    without multi_query: the copy token)."""

    kind: Literal["in_context_recall"] = "in_context_recall"
    vocab_size: VocabSize = 16
    seq_len: SeqLen = 128

    @model_validator(mode="after")
    def _check(self):
        if self.seq_len % 2:
            raise ValueError(f"seq_len={self.seq_len} must be even (key-value slots of two tokens)")
        if self.non_special() < 2:
            raise ValueError(f"vocab_size={self.vocab_size} leaves no room for keys and values beside "
                             f"noise_vocab_size={self.noise_vocab_size} and the special token")
        return self

    def non_special(self) -> int:
        return (self.vocab_size if self.multi_query else self.vocab_size - 1) - self.noise_vocab_size

    def model_seq_len(self) -> int:
        return self.seq_len - 1 if self.multi_query else self.seq_len

    def label(self) -> str:
        return f"{self.kind}-V{self.vocab_size}-T{self.seq_len}"

    def generate(self, n: int, rng: np.random.Generator, split: str = "test") -> ProbeData:
        ns = self.non_special()
        n_keys, copy_token = ns // 2, self.vocab_size - 1
        slots = self.seq_len // 2
        rows = []
        for _ in range(n):
            # one slot the loop visits is never noise, so some key is shown before the final query (MAD
            # draws it among all slots, the last of which the loop never visits)
            keep = int(rng.integers(slots - 1))
            kv: dict[int, int] = {}
            inputs: list[int] = []
            targets: list[int] = []
            for i in range(slots - 1):
                if self.frac_noise > 0 and i != keep and rng.random() < self.frac_noise:
                    inputs += [int(t) for t in rng.integers(ns, ns + self.noise_vocab_size, size=2)]
                    targets += [IGNORE_INDEX, IGNORE_INDEX]
                    continue
                k = int(rng.integers(n_keys))
                shown = k in kv
                if not shown:
                    kv[k] = int(rng.integers(n_keys, ns))
                inputs += [k, kv[k]]
                targets += [IGNORE_INDEX, kv[k] if shown and self.multi_query else IGNORE_INDEX]
            probe = list(kv)[int(rng.integers(len(kv)))]
            if not self.multi_query:
                inputs.append(copy_token)
                targets.append(IGNORE_INDEX)
            inputs += [probe, kv[probe]]
            targets += [IGNORE_INDEX, kv[probe]]
            rows.append(_shifted(inputs, targets))
        x, y, nxt = _stack(rows, self.model_seq_len())
        return ProbeData(x, y, nxt if self.train_loss == "all_tokens" else y.copy())


class NoisyRecallTask(InContextRecallTask):
    """MAD noisy in-context recall: in-context recall with 16 noise tokens at rate 0.2 (MAD's baseline)."""

    kind: Literal["noisy_recall"] = "noisy_recall"
    vocab_size: VocabSize = 32
    noise_vocab_size: int = Field(16, ge=0)
    frac_noise: float = Field(0.2, ge=0, lt=1)


class FuzzyRecallTask(MADTask):
    """MAD fuzzy in-context recall: keys and values are motifs of 1..``k_motif_size`` (1..``v_motif_size``)
    distinct adjacent tokens (keys from the lower half, values from the upper half of the non-special
    vocabulary); a probe pair is placed at a random point and queried at the end of the row; evaluation
    rows use keys of the full motif size only. Rows are left-padded to ``seq_len`` (then shifted: ``seq_len``
    long). MAD draws the probe's position among points its loop may never reach (the query is then
    unanswerable); we draw it among the points the loop visits."""

    kind: Literal["fuzzy_recall"] = "fuzzy_recall"
    vocab_size: VocabSize = 16
    seq_len: SeqLen = 128
    k_motif_size: int = Field(3, ge=1)
    v_motif_size: int = Field(3, ge=1)
    # MADRecallTask's fields, declared here after the motif sizes: a task's field order is part of its
    # data stream's name (ProbeSetting.data_key hashes the task's JSON), so it must not move
    multi_query: bool = True
    noise_vocab_size: int = Field(0, ge=0)
    frac_noise: float = Field(0.0, ge=0, lt=1)
    train_loss: Literal["all_tokens", "answers"] = "all_tokens"

    @model_validator(mode="after")
    def _check(self):
        ns = self.non_special()
        if ns // 2 < self.k_motif_size or ns - ns // 2 < self.v_motif_size:
            raise ValueError(f"vocab_size={self.vocab_size} is too small for motifs of {self.k_motif_size} "
                             f"(keys) and {self.v_motif_size} (values) distinct tokens")
        if self.frac_noise > 0 and self.noise_vocab_size == 0:
            raise ValueError(f"frac_noise={self.frac_noise} needs noise_vocab_size > 0")
        if self.seq_len <= 3 * (self.k_motif_size + self.v_motif_size) + 1:
            raise ValueError(f"seq_len={self.seq_len} leaves no room for pairs of motifs up to "
                             f"{self.k_motif_size}+{self.v_motif_size} tokens")
        return self

    def non_special(self) -> int:
        return (self.vocab_size - 1 if self.multi_query else self.vocab_size - 2) - self.noise_vocab_size

    def label(self) -> str:
        return f"fuzzy_recall-V{self.vocab_size}-T{self.seq_len}"

    def generate(self, n: int, rng: np.random.Generator, split: str = "test") -> ProbeData:
        train = split == "train"
        ns = self.non_special()
        key_vocab, value_vocab = np.arange(ns // 2), np.arange(ns // 2, ns)
        copy_token = self.vocab_size - 1
        pad = self.vocab_size - 1 if self.multi_query else self.vocab_size - 2
        K, Vm = self.k_motif_size, self.v_motif_size

        def motif(vocab, size):  # a uniform ordered draw of `size` distinct tokens (MAD: a permutation)
            return tuple(int(t) for t in rng.choice(vocab, size, replace=False))

        def key_size():
            return int(rng.integers(1, K + 1)) if train else K

        rows = []
        for _ in range(n):
            kp_size, vp_size = key_size(), int(rng.integers(1, Vm + 1))
            k_probe, v_probe = motif(key_vocab, kp_size), motif(value_vocab, vp_size)
            bound = self.seq_len - (kp_size + vp_size) - (K + Vm)  # the loop runs while len(inputs) < bound
            probe_at = int(rng.integers(max(1, bound)))
            probe_added = False
            kv: dict[tuple, tuple] = {}
            inputs: list[int] = []
            targets: list[int] = []
            while len(inputs) < bound:
                k_size, v_size = key_size(), int(rng.integers(1, Vm + 1))
                # at the drawn point, or on the last pass at the latest (MAD may never place it)
                if not probe_added and (len(inputs) >= probe_at or len(inputs) + K + Vm >= bound):
                    inputs += [*k_probe, *v_probe]
                    targets += [IGNORE_INDEX] * (kp_size + vp_size)
                    kv[k_probe] = v_probe
                    probe_added = True
                    continue
                if self.frac_noise > 0 and rng.random() < self.frac_noise:
                    inputs += [int(t) for t in rng.integers(ns, ns + self.noise_vocab_size, size=k_size + v_size)]
                    targets += [IGNORE_INDEX] * (k_size + v_size)
                    continue
                k = motif(key_vocab, k_size)
                shown = k in kv
                if k == k_probe:
                    v = v_probe
                    probe_added = True
                elif shown:
                    v = kv[k]
                else:
                    v = motif(value_vocab, v_size)
                kv[k] = v
                inputs += [*k, *v]
                targets += [IGNORE_INDEX] * len(k)
                targets += list(v) if shown and self.multi_query else [IGNORE_INDEX] * len(v)
            if not self.multi_query:
                inputs.append(copy_token)
                targets.append(IGNORE_INDEX)
            inputs += [*k_probe, *v_probe]
            targets += [IGNORE_INDEX] * kp_size + list(v_probe)
            n_pad = self.seq_len + 1 - len(inputs)
            inputs = [pad] * n_pad + inputs
            targets = [IGNORE_INDEX] * n_pad + targets
            rows.append(_shifted(inputs, targets))
        x, y, nxt = _stack(rows, self.model_seq_len())
        return ProbeData(x, y, nxt if self.train_loss == "all_tokens" else y.copy())


class SelectiveCopyingTask(MADTask):
    """MAD selective copying: ``num_tokens_to_copy`` tokens (uniform, with replacement, from the
    non-special vocabulary) with ``seq_len - 2n - 1`` blank tokens inserted at random points among them
    (never after the last), then the copy token and ``n`` blanks during which the tokens are due in
    order. Loss and accuracy on those ``n`` positions only."""

    kind: Literal["selective_copying"] = "selective_copying"
    vocab_size: VocabSize = 16
    seq_len: SeqLen = 256
    num_tokens_to_copy: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.seq_len <= 2 * self.num_tokens_to_copy + 1:
            raise ValueError(f"seq_len={self.seq_len} must exceed 2 * num_tokens_to_copy + 1 = "
                             f"{2 * self.num_tokens_to_copy + 1}")
        return self

    def label(self) -> str:
        return f"selective_copying-V{self.vocab_size}-T{self.seq_len}-n{self.num_tokens_to_copy}"

    def generate(self, n: int, rng: np.random.Generator, split: str = "test") -> ProbeData:
        V, T, m = self.vocab_size, self.seq_len, self.num_tokens_to_copy
        copy_token, blank = V - 1, V - 2
        n_blank = T - 2 * m - 1
        inputs = np.empty((n, T), dtype=np.int64)
        for i in range(n):
            to_copy = rng.integers(0, V - 2, size=m)
            spread = np.insert(to_copy, rng.integers(0, m, size=n_blank), blank)  # blanks before token j
            inputs[i] = np.concatenate([spread, [copy_token], np.full(m, blank)])
        targets = np.full((n, T), IGNORE_INDEX, dtype=np.int64)
        content = inputs[:, :m + n_blank]
        targets[:, T - m:] = content[content != blank].reshape(n, m) if n else targets[:, T - m:]
        return ProbeData(inputs, targets, targets.copy())


class CompressionTask(MADTask):
    """MAD compression: ``seq_len - 1`` uniform tokens and a compression token; the model reads the row,
    keeps its last position's state (MAD's autoencoder with ``global_pool: last``) and an MLP decoder
    rebuilds every token of the row from it and a sinusoidal position code. Accuracy over all positions."""

    kind: Literal["compression"] = "compression"
    vocab_size: VocabSize = 16
    seq_len: SeqLen = 32
    autoencoder: ClassVar[bool] = True

    def label(self) -> str:
        return f"compression-V{self.vocab_size}-T{self.seq_len}"

    def generate(self, n: int, rng: np.random.Generator, split: str = "test") -> ProbeData:
        body = rng.integers(0, self.vocab_size - 1, size=(n, self.seq_len - 1))
        inputs = np.concatenate([body, np.full((n, 1), self.vocab_size - 1)], axis=1).astype(np.int64)
        return ProbeData(inputs, inputs.copy(), inputs.copy())


class MemorizationTask(MADTask):
    """MAD memorization: a fixed key -> value map (keys of the lower half of the non-special vocabulary
    paired with a permutation of the upper half, drawn once from ``map_seed``), shared by every split;
    a row is ``seq_len / 2`` pairs ``key, insert`` with the key's value due at the insert token. The
    facts cannot be read from the row: they must be stored in the weights."""

    kind: Literal["memorization"] = "memorization"
    vocab_size: VocabSize = 256
    seq_len: int = Field(32, ge=2, le=2**16)
    map_seed: int = Field(12345, ge=0)
    train_examples: Examples = 256

    @model_validator(mode="after")
    def _check(self):
        if self.seq_len % 2:
            raise ValueError(f"seq_len={self.seq_len} must be even (key, insert pairs)")
        return self

    def label(self) -> str:
        return f"memorization-V{self.vocab_size}"

    def kv_map(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values): key ``keys[i]`` maps to ``values[i]``."""
        ns = self.vocab_size - 1
        map_rng = np.random.default_rng(self.map_seed)
        keys = map_rng.permutation(np.arange(ns // 2))
        values = map_rng.permutation(np.arange(ns // 2, ns))
        m = min(len(keys), len(values))
        return keys[:m], values[:m]

    def generate(self, n: int, rng: np.random.Generator, split: str = "test") -> ProbeData:
        keys, values = self.kv_map()
        lookup = np.zeros(self.vocab_size, dtype=np.int64)
        lookup[keys] = values
        pairs = self.seq_len // 2
        drawn = keys[rng.integers(0, len(keys), size=(n, pairs))]
        inputs = np.empty((n, self.seq_len), dtype=np.int64)
        inputs[:, 0::2] = drawn
        inputs[:, 1::2] = self.vocab_size - 1
        targets = np.full((n, self.seq_len), IGNORE_INDEX, dtype=np.int64)
        targets[:, 1::2] = lookup[drawn]
        return ProbeData(inputs, targets, targets.copy())


TaskConfig = Annotated[
    Union[MQARTask, InContextRecallTask, NoisyRecallTask, FuzzyRecallTask, SelectiveCopyingTask, CompressionTask,
          MemorizationTask],
    Field(discriminator="kind"),
]
MAD_TASKS = ("in_context_recall", "fuzzy_recall", "noisy_recall", "selective_copying", "compression", "memorization")
