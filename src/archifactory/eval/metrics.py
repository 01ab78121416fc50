"""Metrics of log-likelihood tasks, from the scores of each item's choices.

Per multiple-choice item with choice log-likelihoods ``ll_i`` (nats, summed over the choice's tokens):

- ``acc``: argmax_i ll_i is the gold choice (lm-eval ``acc``);
- ``acc_norm``: argmax_i ll_i / characters(choice_i) (lm-eval ``acc_norm``: the length of the answer
  string, without the leading space);
- ``acc_norm_byte``: the same per UTF-8 byte (lm-eval ``acc_bytes``);
- ``prob_correct``: softmax over the choices' ll of the gold one: the probability the model gives the
  right answer when it must pick one (moves smoothly while accuracy sits at chance);
- ``bpb``: bits per UTF-8 byte of the gold continuation given its context: -ll_gold / ln 2 / bytes.

LAMBADA-style items (one continuation) give ``acc`` (every token of the continuation is the greedy
choice, lm-eval's ``acc``), ``ppl`` (lm-eval's ``perplexity``: exp of minus the mean ll per item) and
``bpb``. Ties in an argmax go to the first choice (numpy's rule, which lm-eval uses).

``chance`` is the expected score of picking uniformly among the choices (1 / n_choices per item for the
accuracies and ``prob_correct``); metrics without a chance level (bpb, ppl, LAMBADA accuracy) have none.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from archifactory.eval.scoring import Score
from archifactory.eval.tasks import Item

HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "acc_norm_byte": True, "prob_correct": True, "bpb": False,
                    "ppl": False}


def item_metrics(item: Item, scores: Sequence[Score], loglikelihood: bool = False) -> dict[str, float]:
    """Per-item values (aggregated by :func:`aggregate`)."""
    ll = np.array([s.logprob for s in scores], dtype=np.float64)
    gold_bytes = len(item.continuations[item.gold].encode("utf-8"))
    bpb = -ll[item.gold] / math.log(2) / max(gold_bytes, 1)
    if loglikelihood:
        return {"acc": float(scores[0].greedy), "ll": float(ll[0]), "bpb": bpb}
    chars = np.array([len(c) for c in item.choices], dtype=np.float64)
    nbytes = np.array([len(c.encode("utf-8")) for c in item.choices], dtype=np.float64)
    p = np.exp(ll - ll.max())
    return {
        "acc": float(np.argmax(ll) == item.gold),
        "acc_norm": float(np.argmax(ll / np.maximum(chars, 1)) == item.gold),
        "acc_norm_byte": float(np.argmax(ll / np.maximum(nbytes, 1)) == item.gold),
        "prob_correct": float(p[item.gold] / p.sum()),
        "bpb": bpb,
    }


def aggregate(per_item: Sequence[dict[str, float]], loglikelihood: bool = False) -> dict[str, float]:
    """Task-level values: means over items; ``ppl`` = exp(-mean ll) for LAMBADA-style tasks."""
    if not per_item:
        return {}
    out = {k: float(np.mean([r[k] for r in per_item])) for k in per_item[0] if k != "ll"}
    if loglikelihood:
        out["ppl"] = math.exp(min(-float(np.mean([r["ll"] for r in per_item])), 700.0))
    return out


def chance(items: Sequence[Item], loglikelihood: bool = False) -> dict[str, float]:
    """Expected score of a uniform random pick among each item's choices."""
    if loglikelihood or not items:
        return {}
    level = float(np.mean([1.0 / len(item.choices) for item in items]))
    return {"acc": level, "acc_norm": level, "acc_norm_byte": level, "prob_correct": level}
