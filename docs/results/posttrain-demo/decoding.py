"""Greedy versus sampled exact match of a post-training sweep's SFT and GRPO runs (the diagnosis behind the
posttrain-demo entry of docs/results/README.md).

GRPO maximises the expected reward of completions sampled at ``grpo.temperature``; the sweep reports greedy
exact match. This script measures both, for every ``*-sft`` run and the ``*-sft-grpo`` run that continues it,
on the first ``--problems`` held-out problems (``split test``, the problems the report's exact match uses)
and on as many training-split problems that GRPO's prompts do not start from (indices from 10**6):

    python docs/results/posttrain-demo/decoding.py SWEEP_DIR [--problems 200] [--samples 8] [--out FILE.json]

Sampled accuracy is the mean over problems of (correct samples / ``--samples``), i.e. pass@1 estimated from
n samples (DeepSeek-R1's pass@1), at the GRPO run's temperature and top-k. Prints a Markdown table; ``--out``
also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from archifactory.data.tokenizer import Tokenizer
from archifactory.model.lm import CausalLM
from archifactory.posttrain.chat import IM_END, ChatTemplate
from archifactory.posttrain.grpo import load_grpo_config, prompt_ids

TRAIN_OFFSET = 10**6


def accuracy(run: Path, task, split: str, problems: int, samples: int, temperature: float, top_k: int | None,
             max_new_tokens: int) -> tuple[float, float]:
    """(greedy exact match, sampled exact match) of the model in ``run`` on ``problems`` problems of ``split``."""
    tokenizer, template = Tokenizer.load(run / "tokenizer.json"), ChatTemplate.load(run)
    model = CausalLM.from_pretrained(run / "model").eval()
    end = tokenizer.backend.token_to_id(IM_END)
    offset = TRAIN_OFFSET if split == "train" else 0
    greedy = sampled = 0
    for i in range(problems):
        problem = task.problem(offset + i, split)
        prompt = prompt_ids(template, tokenizer, problem)
        rows = [model.generate(prompt, max_new_tokens, temperature=0, eos_token_id=end).tolist()]
        rows += model.generate(torch.tensor([prompt] * samples), max_new_tokens, temperature=temperature,
                               top_k=top_k, seed=i, eos_token_id=end).tolist()
        right = []
        for row in rows:
            completion = row[len(prompt):]
            completion = completion[: completion.index(end)] if end in completion else completion
            right.append(task.correct(tokenizer.decode(completion), problem))
        greedy += right[0]
        sampled += sum(right[1:]) / samples
    return greedy / problems, sampled / problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    grpo_runs = sorted((args.sweep_dir / "runs").glob("*-sft-grpo"))
    if not grpo_runs:
        sys.exit(f"{args.sweep_dir}/runs holds no *-sft-grpo run: give the directory of a finished post-training sweep")
    records = []
    print("| run | split | greedy SFT -> GRPO | sampled SFT -> GRPO |\n|---|---|---|---|")
    for grpo_run in grpo_runs:
        cfg = load_grpo_config(grpo_run / "config.yaml")
        task, opts = cfg.task.build(), cfg.grpo
        for split in ("test", "train"):
            figures = {stage: accuracy(run, task, split, args.problems, args.samples, opts.temperature, opts.top_k,
                                       opts.max_completion_length)
                       for stage, run in (("sft", Path(cfg.base)), ("grpo", grpo_run))}
            records.append({"run": grpo_run.name, "split": split, "temperature": opts.temperature,
                            "samples": args.samples, "problems": args.problems,
                            **{f"{stage}_{kind}": value for stage, pair in figures.items()
                               for kind, value in zip(("greedy", "sampled"), pair)}})
            r = records[-1]
            print(f"| {grpo_run.name} | {split} | {100 * r['sft_greedy']:.1f} -> {100 * r['grpo_greedy']:.1f} "
                  f"| {100 * r['sft_sampled']:.1f} -> {100 * r['grpo_sampled']:.1f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
