"""The sweep's ``eval:`` step for one run, as a subprocess of the sweep runner (it keeps the slot's
thread settings and a crash cannot take the sweep down)::

    python -m archifactory.sweep.evaluation RUN_DIR --tasks lambada,piqa --limit 100 \
        --store SWEEP_DIR/results.sqlite --run-id RUN_ID

Results go to the sweep's ``results.sqlite`` (:class:`~archifactory.eval.store.EvalStore` tables) under
the sweep's run id; evaluations already stored for the run's weights are skipped.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m archifactory.sweep.evaluation", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--store", required=True, help="the sweep's results.sqlite")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    from archifactory.eval import evaluate

    records = evaluate(args.run_dir, args.tasks, args.limit, store=args.store, run_id=args.run_id,
                       batch_size=args.batch_size, progress=False)
    for record in records:
        print(f"{args.run_id} {record.task}: " + ", ".join(f"{m.metric}={m.value:.4g}" for m in record.metrics
                                                         if m.value is not None), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
