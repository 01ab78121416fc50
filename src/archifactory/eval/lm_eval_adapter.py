"""archifactory models inside lm-evaluation-harness: :class:`ArchifactoryLM` is an lm-eval ``TemplateLM``,
so any lm-eval task whose data is reachable (a local file named in a task YAML under ``--include-path``,
or the hub where there is one) runs on any run or saved model:

```bash
archifactory eval RUN_DIR --tasks lm_eval:arc_easy_local --include-path my_tasks/
lm_eval --model archifactory --model_args pretrained=RUN_DIR --tasks ...   # after importing this module
```

Requests go through the same engine as the native tasks (:func:`~archifactory.eval.scoring.score_requests`):
lm-eval splits (context, continuation) into tokens with ``_encode_pair``; we prepend the end-of-document
id to every non-empty context, as the native scorer does (lm-eval itself puts it only before an empty
context), so the two give identical log-likelihoods on identical strings: the test that runs a task
both ways holds lm-eval's prompt rendering and metric code as the outside reference for ours.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from archifactory.eval.scoring import ModelScorer, Request, TokenScorer, score_requests

PREFIX = "lm_eval:"


@register_model("archifactory")
class ArchifactoryLM(TemplateLM):
    """An archifactory model (or any :class:`TokenScorer`, e.g. a null model) as an lm-eval LM.

    ``pretrained``: a run or saved model directory (what ``archifactory eval`` accepts); or pass ``model``
    (a CausalLM or a TokenScorer) and ``tokenizer`` directly.
    """

    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, batch_size: int | str = 16,
                 device: str = "cpu", **_: Any) -> None:
        super().__init__()
        if pretrained is not None:
            from archifactory.eval.runner import load_target

            target = load_target(pretrained, tokenizer, device)
            model, tokenizer = target.model, target.tokenizer
        if model is None or tokenizer is None:
            raise ValueError("ArchifactoryLM needs pretrained=RUN_DIR, or both model= and tokenizer=")
        self.model = model if hasattr(model, "config") else None  # a CausalLM can also generate
        self.scorer: TokenScorer = ModelScorer(model, device) if self.model is not None else model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self._device = torch.device(device)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        batch = []
        for (context, _), context_ids, continuation_ids in requests:
            # lm-eval already put the prefix id before an empty context; every other context gets it here
            prefix = () if context == "" else (self.eot_token_id,)
            batch.append(Request((*prefix, *context_ids), tuple(continuation_ids)))
        return [(s.logprob, s.greedy) for s in score_requests(self.scorer, batch, self.batch_size)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in lm-eval's disjoint rolling windows of ``max_length``."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (string,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.eot_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = score_requests(self.scorer, [Request(tuple(c), tuple(k)) for c, k in windows], self.batch_size)
            out.append(sum(s.logprob for s in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``temperature`` > 0) generation up to the first stop string."""
        if self.model is None:
            raise NotImplementedError("a null model does not generate")
        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            until = gen_kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            # keep the context's last tokens that leave room for the new ones (lm-eval's HFLM does the same)
            ids = [self.eot_token_id, *self.tok_encode(context)][-max(1, self.max_length - max_new):]
            generated = self.model.generate(ids, max_new, temperature=float(gen_kwargs.get("temperature", 0.0)),
                                            eos_token_id=self.eot_token_id)
            text = self.tok_decode(generated[len(ids):].tolist()).replace("<|endoftext|>", "")
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


@dataclasses.dataclass
class LMEvalResult:
    """What one lm-eval task gave: metric -> value, the item count, the task's version, and per-item
    responses (lm-eval's ``samples``)."""

    task: str
    version: str
    n_items: int
    metrics: dict[str, float]
    samples: list[dict]


def task_manager(include_path: str | Path | None, include_defaults: bool = True):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)


def run_lm_eval(lm: ArchifactoryLM, names: Sequence[str], limit: int | None, manager) -> dict[str, LMEvalResult]:
    """Run lm-eval tasks ``names`` (without the ``lm_eval:`` prefix) on ``lm``."""
    import lm_eval
    from lm_eval.evaluator import simple_evaluate

    results = simple_evaluate(model=lm, tasks=list(names), limit=limit, task_manager=manager, log_samples=True,
                              bootstrap_iters=0, verbosity="ERROR")
    out = {}
    for name in names:
        values = {key.split(",")[0]: float(v) for key, v in results["results"][name].items()
                  if "," in key and "_stderr" not in key and isinstance(v, (int, float))}
        n = results["n-samples"][name]["effective"]
        version = f"{results['versions'].get(name)}+lm_eval-{lm_eval.__version__}"
        out[name] = LMEvalResult(name, version, int(n), values, results["samples"][name])
    return out
