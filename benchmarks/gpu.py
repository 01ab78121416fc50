"""The GPU path, measured: gpt2-124m training throughput and MFU, and every mixer's training speed on both
kernel backends at long context.

    python benchmarks/gpu.py [--parts mfu mixers] [--out benchmarks/results/gpu.json]

Part ``mfu``: the ``gpt2-124m`` preset (SDPA attention), T 1024, bf16 autocast, one training step =
forward + backward + gradient clipping (1.0) + fused AdamW, as the trainer runs it; eager and
``torch.compile``; the batch is the largest of ``--batches`` that fits in memory (probed eagerly, largest
first). MFU is reported two ways against the device's dense bf16 peak (``train/metrics.PEAK_FLOPS``,
989 TFLOP/s for H100/H200 SXM):

- ``mfu``: archifactory's own count, ``CausalLM.flops_per_token(T, training=True)`` (causal attention
  counts the keys each query really attends to, ~T/2);
- ``mfu_palm``: the convention of nanoGPT / llm.c / PaLM (Chowdhery et al. 2022, App. B),
  ``6 N + 12 L d T`` per token with N the parameters less the position embedding (full T x T scores).

Part ``mixers``: every registered mixer's defaults in a model of d_model 768, 6 layers, SwiGLU, vocab
8192, bf16 autocast, 32,768 tokens a step, at T 1024 and 4096, on ``backend: torch`` and ``backend: fla``
where the mixer has the field (``Mixer.kernel_path()`` records what ran). Attention runs SDPA.

Every row is printed as it is measured and the results file is rewritten after each row, so a run cut
short keeps what it measured. Needs CUDA; the ``fla`` rows need flash-linear-attention.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from _common import record_header, write_record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MIXER_MODEL = {"vocab_size": 8192, "d_model": 768, "n_layers": 6, "ffn": {"kind": "swiglu"},
               "position": {"kind": "rope"}}
TOKENS_PER_STEP = 32768


def train_step_fn(model, opt, ids, torch):
    """One training step as the trainer runs it (bf16 autocast, clip 1.0, optimizer step)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def time_steps(step, steps: int, warmup: int, torch, max_s: float = 60.0) -> tuple[float, int]:
    """Seconds per step (CUDA events) after ``warmup`` steps; fewer timed steps if one is slow."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    per_warm = (time.perf_counter() - t0) / max(warmup, 1)
    steps = max(1, min(steps, int(max_s / max(per_warm, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / steps, steps


class Recorder:
    def __init__(self, out: Path | None, args) -> None:
        import torch

        self.out = out
        self.record = {
            **record_header("gpu"), "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__, "python": platform.python_version(), "fla": fla_version(),
            "triton": module_version("triton"), "mfu": [], "mixers": [],
        }

    def add(self, part: str, row: dict) -> None:
        self.record[part].append(row)
        print(json.dumps(row), flush=True)
        write_record(self.out, self.record)


def module_version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except Exception:  # noqa: BLE001 - absent or broken: recorded as missing
        return None


def fla_version() -> str | None:
    return module_version("fla")


def gpt2_mfu(rec: Recorder, args) -> None:
    import torch

    import archifactory as af
    from archifactory.train.metrics import device_peak_flops

    cfg = af.load_model_config("gpt2-124m")
    T = 1024
    peak = device_peak_flops(torch.device("cuda"))

    def build():
        torch.manual_seed(0)
        model = af.CausalLM(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=True)
        return model, opt

    batch = None
    for B in sorted(args.batches, reverse=True):  # the largest that fits
        model = opt = None
        torch.cuda.empty_cache()
        try:
            model, opt = build()
            ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device="cuda")
            step = train_step_fn(model, opt, ids, torch)
            step()
            step()
            torch.cuda.synchronize()
            batch = B
            break
        except torch.OutOfMemoryError:
            print(f"gpt2-124m: B={B} does not fit", flush=True)
    del model, opt
    torch.cuda.empty_cache()
    if batch is None:
        rec.add("mfu", {"model": "gpt2-124m", "error": f"no batch in {args.batches} fits"})
        return
    for compiled in (False, True):
        model, opt = build()
        n_params = sum(p.numel() for p in model.parameters())
        n_pos = sum(p.numel() for n, p in model.named_parameters() if "pos" in n)
        train_model = torch.compile(model) if compiled else model
        ids = torch.randint(0, cfg.vocab_size, (batch, T + 1), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step = train_step_fn(train_model, opt, ids, torch)
        step()
        torch.cuda.synchronize()
        first_step_s = time.perf_counter() - t0
        seconds, steps = time_steps(step, args.steps, args.warmup, torch)
        tokens_per_s = batch * T / seconds
        flops_ours = model.flops_per_token(T, training=True)
        flops_palm = 6 * (n_params - n_pos) + 12 * cfg.n_layers * cfg.d_model * T
        rec.add("mfu", {
            "model": "gpt2-124m", "params": n_params, "compile": compiled, "batch": batch, "seq_len": T,
            "precision": "bf16", "attention": model.kernel_paths()[0], "steps_timed": steps,
            "first_step_s": round(first_step_s, 2), "step_ms": round(seconds * 1e3, 2),
            "tokens_per_s": round(tokens_per_s), "flops_per_token": flops_ours, "flops_per_token_palm": flops_palm,
            "mfu": round(tokens_per_s * flops_ours / peak, 4) if peak else None,
            "mfu_palm": round(tokens_per_s * flops_palm / peak, 4) if peak else None,
            "peak_flops": peak, "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        })
        del model, opt, train_model
        torch.cuda.empty_cache()


def mixer_speed(rec: Recorder, args) -> None:
    import torch

    import archifactory as af
    from archifactory.registry import MIXERS

    kinds = args.kinds or MIXERS.kinds()
    for T in args.seq_lens:
        B = max(1, args.tokens_per_step // T)
        for kind in kinds:
            cls = MIXERS.get(kind)
            backends = ("torch", "fla") if "backend" in cls.model_fields else (None,)
            for backend in backends:
                mixer = {"kind": kind} | ({"backend": backend} if backend else {})
                row = {"mixer": kind, "backend": backend or "torch", "seq_len": T, "batch": B}
                model = opt = None
                try:
                    torch.manual_seed(0)
                    cfg = af.load_model_config(MIXER_MODEL | {"max_seq_len": T, "mixer": mixer})
                    model = af.CausalLM(cfg).cuda()
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
                    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device="cuda")
                    torch.cuda.reset_peak_memory_stats()
                    seconds, steps = time_steps(train_step_fn(model, opt, ids, torch), args.steps, args.warmup,
                                                torch, max_s=args.max_case_s)
                    row.update({
                        "kernel_path": model.kernel_paths()[0], "params": sum(p.numel() for p in model.parameters()),
                        "steps_timed": steps, "step_ms": round(seconds * 1e3, 2),
                        "tokens_per_s": round(B * T / seconds),
                        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    })
                except Exception as err:  # noqa: BLE001 - a failing kernel is a result, recorded
                    row["error"] = f"{type(err).__name__}: {err}"[:400]
                del model, opt
                torch.cuda.empty_cache()
                rec.add("mixers", row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="*", default=["mfu", "mixers"], choices=["mfu", "mixers"])
    parser.add_argument("--batches", type=int, nargs="*", default=[16, 32, 64, 96, 128])
    parser.add_argument("--seq-lens", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--tokens-per-step", type=int, default=TOKENS_PER_STEP, help="mixers part: batch x T")
    parser.add_argument("--kinds", nargs="*", default=None, help="mixers to time (default: every one)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-case-s", type=float, default=20.0, help="cap on timed seconds per mixer case")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device")
    rec = Recorder(args.out, args)
    if "mfu" in args.parts:
        gpt2_mfu(rec, args)
    if "mixers" in args.parts:
        mixer_speed(rec, args)


if __name__ == "__main__":
    main()
