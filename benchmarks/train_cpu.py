"""Training throughput of archifactory's Llama-style CausalLM against transformers' LlamaForCausalLM with
the identical configuration, side by side in one process.

    python benchmarks/train_cpu.py [--steps 20] [--threads 2] [--out benchmarks/results/train_cpu.json]

Config (issue 4): hidden 256, 6 layers, 8 heads, 4 kv heads, FFN 688, vocab 8192, batch 16 x 256 tokens;
fp32 and bf16 autocast; AdamW step included. Prints a table and the ratio ours / transformers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _common import cpu_model, record_header, write_record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import archifactory as af  # noqa: E402
from archifactory.model.hf import to_hf  # noqa: E402

CONFIG = {
    "vocab_size": 8192, "d_model": 256, "n_layers": 6, "max_seq_len": 256,
    "mixer": {"kind": "attention", "n_heads": 8, "n_kv_heads": 4},
    "ffn": {"kind": "swiglu", "hidden": 688},
    "norm": {"kind": "rmsnorm", "eps": 1e-6}, "position": {"kind": "rope", "theta": 10000.0},
    "tie_embeddings": False,
}
B, T = 16, 256


def step_fn(model, is_hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(ids, dtype):
        ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            if is_hf:
                loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
            else:
                loss = model(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(step, steps: int, warmup: int, dtype) -> float:
    ids = torch.randint(0, CONFIG["vocab_size"], (B, T + 1))
    for _ in range(warmup):
        step(ids, dtype)
    start = time.perf_counter()
    for _ in range(steps):
        step(ids, dtype)
    return steps * B * T / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the two models this many times")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = af.CausalLM(af.load_model_config(CONFIG))
    theirs = to_hf(ours)
    theirs.config._attn_implementation = "sdpa"
    ours.train(), theirs.train()
    rows = []
    for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        best = {"archifactory": 0.0, "transformers": 0.0}
        for _ in range(args.rounds):  # alternate so that machine noise hits both alike; keep the best
            best["archifactory"] = max(best["archifactory"], measure(step_fn(ours, False), args.steps, args.warmup, dtype))
            best["transformers"] = max(best["transformers"], measure(step_fn(theirs, True), args.steps, args.warmup, dtype))
        rows.append({"precision": name, "archifactory_tokens_per_s": round(best["archifactory"]),
                     "transformers_tokens_per_s": round(best["transformers"]),
                     "ratio": round(best["archifactory"] / best["transformers"], 3)})
    print(f"{'precision':<15}{'archifactory tok/s':>20}{'transformers tok/s':>20}{'ratio':>8}")
    for r in rows:
        print(f"{r['precision']:<15}{r['archifactory_tokens_per_s']:>20,}{r['transformers_tokens_per_s']:>20,}{r['ratio']:>8.3f}")
    record = {
        **record_header("train_cpu"),
        "device": f"{cpu_model()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "config": {**CONFIG, "batch": B, "seq_len": T},
        "params": ours.num_params(),
        "results": rows,
    }
    if args.out:
        write_record(args.out, record)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
