"""Training throughput and peak memory of every registered sequence mixer on CPU.

    python benchmarks/mixers_cpu.py [--steps 5] [--threads 2] [--kinds attention mamba2 ...]
                                    [--out benchmarks/results/mixers_cpu.json] [--label before]

With ``--out x.jsonl`` the record is appended as one line (a history: before/after, CPU kinds).

Each mixer's own defaults at d_model 256, 4 layers, T=256, B=8, fp32, SwiGLU FFN, vocab 4096; one
training step = forward + backward + AdamW. The baseline is grouped-query attention (8 heads, 2 kv
heads). Peak memory is the peak RSS growth of a child process running that mixer alone. Target (issue 12):
every mixer at >= 0.5x the GQA baseline's tokens/s, with and without AVX-512. Each record names the CPU,
the instruction set ATen ran with (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2`` emulates an AVX2-only CPU) and the load average around the run: on a shared
machine other processes slow every figure, so ``cpu_s_per_step`` (the process's CPU seconds per step) is
recorded beside the wall-clock tokens/s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

from _common import cpu_model, isa, load_average_1m, record_header, write_record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

D, LAYERS, T, B, VOCAB = 256, 4, 256, 8, 4096
BASELINE = {"kind": "attention", "n_heads": 8, "n_kv_heads": 2}


def model_config(mixer: dict) -> dict:
    return {"vocab_size": VOCAB, "d_model": D, "n_layers": LAYERS, "max_seq_len": T, "mixer": mixer,
            "ffn": {"kind": "swiglu"}, "position": {"kind": "rope"}}


def measure(mixer: dict, steps: int, warmup: int, threads: int, queue) -> None:
    import torch

    import archifactory as af

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = af.CausalLM(af.load_model_config(model_config(mixer)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (B, T + 1))

    def step():
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    queue.put({
        "tokens_per_s": steps * B * T / elapsed,
        "cpu_s_per_step": round(cpu / steps, 3),
        "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
        "params": model.num_params(),
        "kernel_paths": sorted(set(model.kernel_paths().values())),
    })


def run_isolated(mixer: dict, args) -> dict:
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=measure, args=(mixer, args.steps, args.warmup, args.threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", nargs="*", default=None)
    parser.add_argument("--rounds", type=int, default=2, help="measure every mixer this many times; keep the best")
    parser.add_argument("--out", type=Path, default=None, help="a .json file (overwritten) or .jsonl (appended)")
    parser.add_argument("--label", default=None, help="a note stored with the record (e.g. before/after)")
    args = parser.parse_args()
    import torch

    from archifactory.registry import MIXERS

    kinds = args.kinds or [k for k in MIXERS.kinds() if k != "attention"]
    load_before = load_average_1m()
    best: dict[str, dict] = {}
    for _ in range(args.rounds):  # whole rounds, so that a noisy minute hits every mixer alike
        for name, mixer in [("attention (GQA 8/2)", BASELINE)] + [(k, {"kind": k}) for k in kinds]:
            try:
                result = run_isolated(mixer, args)
            except Exception as err:  # a mixer that fails to build at these shapes is reported, not fatal
                best.setdefault(name, {"mixer": name, "error": str(err)})
                continue
            if name not in best or result["tokens_per_s"] > best[name].get("tokens_per_s", 0):
                best[name] = {"mixer": name, **result}
    rows = list(best.values())
    base = rows[0]["tokens_per_s"]
    print(f"{'mixer':<24}{'params':>12}{'tok/s':>10}{'vs GQA':>8}{'peak MB':>10}  kernels")
    for r in rows:
        if "error" in r:
            print(f"{r['mixer']:<24}  error: {r['error']}")
            continue
        r["ratio_vs_gqa"] = round(r["tokens_per_s"] / base, 3)
        print(f"{r['mixer']:<24}{r['params']:>12,}{r['tokens_per_s']:>10,.0f}{r['ratio_vs_gqa']:>8.2f}"
              f"{r['peak_rss_growth_mb']:>10.0f}  {','.join(r['kernel_paths'])}")
    if args.out:
        record = {
            **record_header("mixers_cpu"),
            "label": args.label,
            "device": f"{cpu_model()}, {args.threads} threads",
            "isa": isa(),
            "load_average_1m": {"before": load_before, "after": load_average_1m()},
            "torch": torch.__version__,
            "shape": {"d_model": D, "n_layers": LAYERS, "seq_len": T, "batch": B, "vocab": VOCAB, "dtype": "fp32"},
            "results": rows,
        }
        write_record(args.out, record)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
