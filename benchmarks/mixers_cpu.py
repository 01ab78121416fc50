"""Training throughput and peak memory of every registered sequence mixer on CPU.

    python benchmarks/mixers_cpu.py [--steps 5] [--threads 2] [--kinds attention mamba2 ...] [--compile]
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

Mixers differ in how much work they do per token by design (Hymba runs attention and SSM heads side by
side; Zamba2 runs a shared attention + MLP block over ``[h, e]`` before its Mamba-2), so every row also
gives the model's training FLOPs per token (``CausalLM.flops_per_token``, matmuls only, 3x forward) and the
ratio of achieved matmul FLOP/s to the baseline's: a mixer below 0.5x in tokens/s but near 1x in FLOP/s
does more work, not slower work.

Every row puts its mixer on every layer (``layout: every layer``). A hybrid-layer kind, one that its
architecture places only on some layers of another mixer's stack (``LAYOUTS``), gets a second row laid
out that way: ``zamba2`` on every 3rd layer of a Mamba-2 stack (layer 2 of 0..3), the period of the
``zamba2-tiny`` preset. Zamba2 itself places its hybrid layer on about every 6th layer (Zamba2-2.7B: 9 of
54 layers, the default ``layers_block_type`` of transformers' ``Zamba2Config``), which at 4 layers would
leave none; one hybrid layer in 4 is therefore a heavier hybrid than the paper's.

``--compile`` runs every model, the baseline included, through ``torch.compile`` (the same as
``train.compile: true``); its first steps compile (tens of seconds per mixer on 2 cores), so ``--warmup``
is raised to at least 2 (forward and backward both compiled) and the compile time is recorded apart from
the timed steps. Without it (the default) nothing is compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

from _common import cpu_model, isa, load_average_1m, record_header, write_record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

D, LAYERS, T, B, VOCAB = 256, 4, 256, 8, 4096
BASELINE = {"kind": "attention", "n_heads": 8, "n_kv_heads": 2}
EVERY_LAYER = "every layer"


@dataclasses.dataclass(frozen=True)
class Layout:
    """A hybrid-layer kind as its architecture lays it out: ``stack`` on every layer, the kind on every
    ``every``-th (layers ``every - 1, 2 * every - 1, ...``, as ``layer_overrides`` selects them)."""

    stack: str
    every: int
    source: str

    def describe(self, kind: str) -> str:
        layers = list(range(self.every - 1, LAYERS, self.every))
        return f"{self.stack} stack, {kind} on layers {layers} of 0..{LAYERS - 1} (period {self.every}: {self.source})"


LAYOUTS = {"zamba2": Layout(stack="mamba2", every=3, source="as zamba2-tiny; Zamba2 itself: every 6th")}


@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmark row: ``mixer`` on every layer, and ``layer_overrides`` where a layout places another."""

    name: str
    mixer: dict
    layer_overrides: tuple = ()
    layout: str = EVERY_LAYER


def benchmark_rows(kinds: list[str]) -> list[Row]:
    """The baseline, then each kind on every layer and, for a hybrid-layer kind, as laid out (``LAYOUTS``)."""
    rows = [Row("attention (GQA 8/2)", BASELINE)]
    for kind in kinds:
        rows.append(Row(kind, {"kind": kind}))
        if kind in LAYOUTS:
            lay = LAYOUTS[kind]
            rows.append(Row(f"{kind} every {lay.every} in {lay.stack}", {"kind": lay.stack},
                            ({"every": lay.every, "mixer": {"kind": kind}},), lay.describe(kind)))
    return rows


def model_config(mixer: dict, layer_overrides: tuple | list = ()) -> dict:
    config = {"vocab_size": VOCAB, "d_model": D, "n_layers": LAYERS, "max_seq_len": T, "mixer": mixer,
              "ffn": {"kind": "swiglu"}, "position": {"kind": "rope"}}
    return {**config, "layer_overrides": list(layer_overrides)} if layer_overrides else config


def benchmark_kinds(requested: list[str] | None = None) -> list[str]:
    """The mixers a run measures besides the baseline: ``requested``, or every registered mixer kind.

    Raises:
        ValueError: a requested kind that is not registered.
    """
    from archifactory.registry import MIXERS

    registered = MIXERS.kinds()
    unknown = sorted(set(requested or []) - set(registered))
    if unknown:
        raise ValueError(f"--kinds {' '.join(unknown)}: not registered mixer kinds; valid: {' '.join(registered)}")
    return list(requested) if requested else [k for k in registered if k != "attention"]


def measure(config: dict, steps: int, warmup: int, threads: int, queue, compile_model: bool = False) -> None:
    try:
        queue.put(_measure(config, steps, warmup, threads, compile_model))
    except Exception as err:  # reported in the table (a child that dies silently would hang the parent)
        queue.put({"error": f"{type(err).__name__}: {err}"})


def _measure(config: dict, steps: int, warmup: int, threads: int, compile_model: bool) -> dict:
    import torch

    import archifactory as af

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = af.CausalLM(af.load_model_config(config))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (B, T + 1))
    forward = torch.compile(model) if compile_model else model

    def step():
        forward(ids[:, :-1], ids[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    warm_start = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - warm_start
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "tokens_per_s": steps * B * T / elapsed,
        "cpu_s_per_step": round(cpu / steps, 3),
        "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
        "params": model.num_params(),
        "train_flops_per_token": model.flops_per_token(T, training=True),
        "warmup_s": round(warmup_s, 1),
        "kernel_paths": sorted(set(model.kernel_paths().values())),
    }


def run_isolated(config: dict, args) -> dict:
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=measure,
                                           args=(config, args.steps, args.warmup, args.threads, queue, args.compile))
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
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every model, the baseline too (warmup >= 2 steps absorbs compiling)")
    args = parser.parse_args()
    if args.compile:
        args.warmup = max(args.warmup, 2)
    import torch

    kinds = benchmark_kinds(args.kinds)
    load_before = load_average_1m()
    best: dict[str, dict] = {}
    for _ in range(args.rounds):  # whole rounds, so that a noisy minute hits every mixer alike
        for row in benchmark_rows(kinds):
            name = row.name
            result = run_isolated(model_config(row.mixer, row.layer_overrides), args)
            if "error" in result:  # a mixer that fails at these shapes is reported, not fatal
                best.setdefault(name, {"mixer": name, "layout": row.layout, "error": result["error"]})
                continue
            if name not in best or result["tokens_per_s"] > best[name].get("tokens_per_s", 0):
                best[name] = {"mixer": name, "layout": row.layout, **result}
    rows = list(best.values())
    base, base_flops = rows[0]["tokens_per_s"], rows[0]["train_flops_per_token"]
    print(f"{'mixer':<26}{'params':>12}{'tok/s':>10}{'vs GQA':>8}{'FLOPs/tok':>11}{'x GQA':>7}{'FLOP/s vs GQA':>15}"
          f"{'peak MB':>9}  kernels")
    for r in rows:
        if "error" in r:
            print(f"{r['mixer']:<26}  error: {r['error']}")
            continue
        r["ratio_vs_gqa"] = round(r["tokens_per_s"] / base, 3)
        r["flops_vs_gqa"] = round(r["train_flops_per_token"] / base_flops, 3)
        r["flop_rate_vs_gqa"] = round(r["ratio_vs_gqa"] * r["flops_vs_gqa"], 3)
        print(f"{r['mixer']:<26}{r['params']:>12,}{r['tokens_per_s']:>10,.0f}{r['ratio_vs_gqa']:>8.2f}"
              f"{r['train_flops_per_token'] / 1e6:>10.1f}M{r['flops_vs_gqa']:>7.2f}{r['flop_rate_vs_gqa']:>15.2f}"
              f"{r['peak_rss_growth_mb']:>9.0f}  {','.join(r['kernel_paths'])}")
    for r in rows:
        if r["layout"] != EVERY_LAYER:
            print(f"{r['mixer']}: {r['layout']}")
    if args.out:
        record = {
            **record_header("mixers_cpu"),
            "label": args.label,
            "compiled": args.compile,
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
