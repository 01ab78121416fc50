"""Greedy versus sampled exact match of a post-training sweep's SFT and GRPO runs (the diagnosis behind the
posttrain-demo entry of docs/results/README.md).

GRPO maximises the expected reward of completions sampled at ``grpo.temperature``; the sweep reports greedy
exact match. This script measures both, for every ``*-sft`` run and the ``*-sft-grpo`` run that continues it,
on the first ``--problems`` held-out problems (``split test``, the problems the report's exact match uses)
and on as many training-split problems (operand pairs that SFT and GRPO train on, drawn from index 10**6 on):

    python docs/results/posttrain-demo/decoding.py SWEEP_DIR [--problems 200] [--samples 8] [--margins] [--out FILE.json]
    python docs/results/posttrain-demo/decoding.py GRPO_RUN_DIR [GRPO_RUN_DIR ...] [...]   # runs of `archifactory grpo`

Sampled accuracy is :func:`archifactory.posttrain.grpo.exact_match` with ``samples``: pass@1 estimated from
n samples at the GRPO run's temperature and top-k (what ``grpo.eval_samples`` reports on the held-out
problems). Prints a Markdown table; ``--out`` also writes the figures as JSON.

``--margins`` adds, for the held-out problems, where greedy answers were lost and gained. A problem's margin
is the smallest, over the reference answer's tokens and the end-of-turn token (teacher-forced), of the
probability of the reference token minus that of the likeliest other token: greedy decoding gives the
reference answer exactly when it is positive. Problems the SFT model answered are binned by that margin,
so it shows whether GRPO lost near-ties (noise) or answers the SFT model was sure of (interference).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from archifactory.config import ConfigError, load_yaml
from archifactory.data.tokenizer import Tokenizer
from archifactory.model.lm import CausalLM
from archifactory.posttrain.chat import IM_END, ChatTemplate
from archifactory.posttrain.grpo import exact_match, load_grpo_config, prompt_ids

TRAIN_START = 10**6
"""Training-split problems from this index on (GRPO's prompts start at 0)."""


def load(run: Path) -> tuple[CausalLM, Tokenizer, ChatTemplate]:
    """The model, tokenizer and chat template of ``run``, read once for every measurement of it."""
    return (CausalLM.from_pretrained(run / "model").eval(), Tokenizer.load(run / "tokenizer.json"),
            ChatTemplate.load(run))


def accuracy(loaded, task, problems: int, samples: int, opts) -> dict[str, tuple[float, float]]:
    """split -> (greedy exact match, sampled pass@1) of a :func:`load`-ed run on ``problems`` problems."""
    args = (*loaded, task, problems, opts.max_completion_length)
    figures = {}
    for split, start in (("test", 0), ("train", TRAIN_START)):
        figures[split] = (exact_match(*args, split, start=start),
                          exact_match(*args, split, samples=samples, temperature=opts.temperature, top_k=opts.top_k,
                                      start=start))
    return figures


MARGIN_BINS = (0.0, 0.1, 0.2, 0.4, 1.0)


@torch.no_grad()
def margins(loaded, task, problems: int) -> list[float]:
    """The teacher-forced margin (see the module docstring) of a :func:`load`-ed run on each of the first
    ``problems`` held-out problems."""
    model, tokenizer, template = loaded
    end = tokenizer.backend.token_to_id(IM_END)
    out = []
    for i in range(problems):
        problem = task.problem(i, "test")
        prompt, answer = prompt_ids(template, tokenizer, problem), tokenizer.encode(problem.answer) + [end]
        probs = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1].float().softmax(-1)
        right = probs.gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)
        other = probs.scatter(-1, torch.tensor(answer)[:, None], -1.0).amax(-1)
        out.append(float((right - other).min()))
    return out


def margin_rows(name: str, sft: list[float], grpo: list[float]) -> list[dict]:
    """Per SFT-margin bin: problems, and how many greedy answers GRPO lost (bins above 0) or gained (below)."""
    rows = [{"run": name, "sft_margin": "<= 0", "problems": sum(a <= 0 for a in sft),
             "gained": sum(a <= 0 < b for a, b in zip(sft, grpo)), "lost": 0}]
    for low, high in zip(MARGIN_BINS, MARGIN_BINS[1:]):
        inside = [(a, b) for a, b in zip(sft, grpo) if low < a <= high]
        rows.append({"run": name, "sft_margin": f"({low}, {high}]", "problems": len(inside), "gained": 0,
                     "lost": sum(b <= 0 for _, b in inside)})
    return rows


def grpo_config(run: Path):
    """The GRPO run's config, its SFT run (``base``) read beside it when there (a copied or moved sweep keeps
    its runs together), else where the config says."""
    data = load_yaml(run / "config.yaml")
    sibling = run.parent / Path(str(data.get("base", ""))).name
    if (sibling / "model").is_dir():
        data["base"] = str(sibling)
    try:
        return load_grpo_config(data)
    except ConfigError as err:
        sys.exit(f"{run}: {err}")


def positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", type=Path, nargs="+", help="a sweep directory, or GRPO run directories")
    parser.add_argument("--problems", type=positive, default=200)
    parser.add_argument("--samples", type=positive, default=8)
    parser.add_argument("--threads", type=positive, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--margins", action="store_true", help="also bin lost/gained held-out answers by SFT margin")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    grpo_runs = [run for d in args.dirs
                 for run in ([d] if (d / "config.yaml").is_file() else sorted((d / "runs").glob("*-sft-grpo")))]
    missing = [d for d in args.dirs if not (d / "model").is_dir() and not any((d / "runs").glob("*-sft-grpo"))]
    if missing or not grpo_runs:
        sys.exit(f"{missing[0] if missing else args.dirs[0]}: neither a finished GRPO run (model/, config.yaml) nor a "
                 "sweep directory with *-sft-grpo runs; give one of those")
    unfinished = [run for run in grpo_runs if not (run / "model").is_dir()]
    if unfinished:
        sys.exit(f"{unfinished[0]}: the GRPO run has not finished (no model/); finish the sweep (archifactory sweep "
                 "SWEEP.yaml) or give finished GRPO run directories")
    records, margin_records = [], []
    print("| run | split | greedy SFT -> GRPO | sampled pass@1 SFT -> GRPO |\n|---|---|---|---|")
    for grpo_run in grpo_runs:
        cfg = grpo_config(grpo_run)
        task = cfg.task.build()
        figures, both = [], []  # SFT, then GRPO
        for run in (Path(cfg.base), grpo_run):
            loaded = load(run)
            figures.append(accuracy(loaded, task, args.problems, args.samples, cfg.grpo))
            if args.margins:
                both.append(margins(loaded, task, args.problems))
        sft, grpo = figures
        for split in ("test", "train"):
            (sft_greedy, sft_sampled), (grpo_greedy, grpo_sampled) = sft[split], grpo[split]
            records.append({"run": grpo_run.name, "split": split, "problems": args.problems, "samples": args.samples,
                            "temperature": cfg.grpo.temperature, "sft_greedy": sft_greedy, "grpo_greedy": grpo_greedy,
                            "sft_sampled": sft_sampled, "grpo_sampled": grpo_sampled})
            print(f"| {grpo_run.name} | {split} | {100 * sft_greedy:.1f} -> {100 * grpo_greedy:.1f} "
                  f"| {100 * sft_sampled:.1f} -> {100 * grpo_sampled:.1f} |", flush=True)
        if args.margins:
            for stage, values, share in zip(("SFT", "GRPO"), both, (sft["test"][0], grpo["test"][0])):
                if sum(m > 0 for m in values) != round(share * args.problems):  # greedy is right iff margin > 0
                    print(f"warning: {grpo_run.name}: {stage} margins > 0 on {sum(m > 0 for m in values)} of "
                          f"{args.problems} problems, greedy exact match {round(share * args.problems)}: the "
                          "margin table does not describe greedy decoding here", file=sys.stderr)
            margin_records += [{"kind": "margins", **row} for row in margin_rows(grpo_run.name, *both)]
    if args.margins:
        print("\n| run | SFT margin | held-out problems | greedy answers GRPO lost | gained |\n|---|---|---|---|---|")
        for row in margin_records:
            print(f"| {row['run']} | {row['sft_margin']} | {row['problems']} | {row['lost']} | {row['gained']} |")
    records += margin_records
    if args.out:
        args.out.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
