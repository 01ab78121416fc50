"""Evaluation throughput on CPU: items/s per task type for the ``small`` preset, and the wall time of the
zero-shot suite at ``--limit``.

    python benchmarks/eval.py [--limit 200] [--suite lambada,piqa,...] [--extra mmlu_5shot:5]
                              [--code-limit 10] [--threads 2] [--out benchmarks/results/eval_cpu.json]

The model is ``configs/models/small.yaml`` (9.9M parameters, attention, vocabulary 8192) with seeded random
weights: scoring costs the same for trained weights (one forward pass per request, whatever the values),
except pass@k's generation, which an untrained model runs to ``max_new_tokens`` (128) on every problem
(the worst case). The tokenizer is a byte-level BPE with the preset's 8192 ids trained on the Shakespeare
corpus (cached under ``--cache-dir``).

What is timed is ``archifactory.eval.evaluate`` as a user calls it, without a store: building the
requests, scoring them with the model (batch 16) and with the null model, the metrics. Items/s is items
over that wall time, per task (for MMLU an item is one question: ``--limit`` applies per subject, as in
lm-eval). Task types: ``multiple_choice`` (each choice scored), ``loglikelihood`` (one continuation:
LAMBADA, HumanEval canonical-solution bits per byte), ``code`` (HumanEval pass@k: greedy generation plus
one sandboxed run per completion).

``--extra TASK:LIMIT`` times a suite task outside the suite at a smaller limit (MMLU 5-shot at
``--limit 200`` is 9,183 questions of ~2,650 characters, hours on 2 CPU cores); the suite's time with it
at ``--limit`` is then printed as a projection (its items at ``--limit`` over its measured items/s),
labelled as such.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import cpu_model, record_header, write_record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

ZERO_SHOT_SUITE = ("lambada", "piqa", "arc_easy", "arc_challenge", "sciq", "hellaswag", "winogrande", "mmlu",
                   "mmlu_5shot")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200, help="items per task (per subject for MMLU)")
    parser.add_argument("--suite", default=",".join(ZERO_SHOT_SUITE), help="the zero-shot tasks, comma-separated")
    parser.add_argument("--extra", action="append", default=[], metavar="TASK:LIMIT",
                        help="time TASK at LIMIT outside the suite, and project it to --limit")
    parser.add_argument("--code-limit", type=int, default=10, help="HumanEval problems for pass@k (0: skip)")
    parser.add_argument("--bpb-limit", type=int, default=164, help="HumanEval problems for humaneval_bpb (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/archifactory-bench-cache"))
    parser.add_argument("--mixer", default=None, metavar="KIND",
                        help="replace the preset's mixer by this registered kind (its defaults), e.g. mamba2")
    parser.add_argument("--share-prefix", action="store_true",
                        help="score the choices of an item from one cached pass over their shared context")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch
    import yaml

    import archifactory as af
    from archifactory.data.corpora import ShakespeareCorpus
    from archifactory.data.tokenizer import BPETokenizerConfig
    from archifactory.eval import evaluate, get_task

    torch.set_num_threads(args.threads)
    suite = [t.strip() for t in args.suite.split(",") if t.strip()]
    extra = [(name, int(limit)) for name, limit in (e.rsplit(":", 1) for e in args.extra)]
    for name in [*suite, *(name for name, _ in extra)]:
        get_task(name)  # an unknown name fails now, not after an hour
    config = yaml.safe_load((ROOT / "configs" / "models" / "small.yaml").read_text())
    if args.mixer:
        config["mixer"] = {"kind": args.mixer}
    tokenizer = BPETokenizerConfig().load_or_train(ShakespeareCorpus(), args.cache_dir, config["vocab_size"])
    torch.manual_seed(0)
    model = af.CausalLM.from_config(config).eval()

    rows = []

    def run(tasks: list[str], limit: int, **kwargs) -> float:
        start = time.perf_counter()
        records = evaluate(model, tasks, limit, tokenizer=tokenizer, batch_size=args.batch_size, progress=False,
                           share_prefix=args.share_prefix, **kwargs)
        wall = time.perf_counter() - start
        for record in records:
            task = get_task(record.task)
            rows.append({"task": record.task, "type": task.kind, "limit": limit, "items": record.n_items,
                         "wall_s": record.elapsed_s, "items_per_s": record.items_per_s})
            print(f"{record.task:>14} {task.kind:>15} {record.n_items:>7,} items {record.elapsed_s:>9.1f} s "
                  f"{record.items_per_s:>9.2f} items/s", flush=True)
        return wall

    print(f"small preset, mixer {config['mixer']['kind']} ({model.num_params():,} parameters), share_prefix "
          f"{args.share_prefix}, {args.threads} threads, {cpu_model()}", flush=True)
    # one task at a time, so each is printed when it finishes; the suite's wall time is their sum
    suite_wall = sum(run([name], args.limit) for name in suite) if suite else None
    projected = {}
    for name, limit in extra:
        run([name], limit)
        n_items = len(get_task(name).items(args.limit))
        projected[name] = {"items_at_limit": n_items, "measured_limit": limit,
                           "projected_wall_s": n_items / rows[-1]["items_per_s"]}
    if args.bpb_limit:
        run(["humaneval_bpb"], args.bpb_limit)
    if args.code_limit:
        run(["humaneval"], args.code_limit, samples=1)

    by_type: dict[str, dict] = {}
    for row in rows:
        entry = by_type.setdefault(row["type"], {"tasks": [], "items": 0, "wall_s": 0.0})
        entry["tasks"].append(row["task"])
        entry["items"] += row["items"]
        entry["wall_s"] += row["wall_s"]
    for entry in by_type.values():
        entry["items_per_s"] = entry["items"] / entry["wall_s"]

    print(f"\n{'task type':>15} {'items':>8} {'wall s':>9} {'items/s':>9}  tasks")
    for kind, entry in by_type.items():
        print(f"{kind:>15} {entry['items']:>8,} {entry['wall_s']:>9.1f} {entry['items_per_s']:>9.2f}  "
              f"{', '.join(entry['tasks'])}")
    if suite_wall is not None:
        print(f"\nzero-shot suite ({', '.join(suite)}) at --limit {args.limit}: {suite_wall:.1f} s wall (measured)")
    for name, p in projected.items():
        print(f"+ {name} at --limit {args.limit}: {p['items_at_limit']:,} items at the rate measured at --limit "
              f"{p['measured_limit']}: {p['projected_wall_s']:.0f} s (projected, not measured)")
    if projected and suite_wall is not None:
        total = suite_wall + sum(p["projected_wall_s"] for p in projected.values())
        print(f"= whole suite at --limit {args.limit}: {total:.0f} s (projected)")

    record = {
        **record_header(),
        "device": f"cpu ({cpu_model()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "model": {"preset": "small", "mixer": config["mixer"]["kind"], "params": model.num_params(),
                  "weights": "random (seed 0)"},
        "share_prefix": args.share_prefix,
        "tokenizer": f"byte-level BPE, {tokenizer.vocab_size} ids, trained on shakespeare",
        "batch_size": args.batch_size,
        "zero_shot_suite": {"tasks": suite, "limit": args.limit, "wall_s": suite_wall},
        "projected": projected,
        "per_task": rows,
        "per_type": by_type,
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
