"""Torch vs flash-linear-attention kernel paths of the recurrent mixers on a CUDA GPU.

    python benchmarks/mixers_gpu.py [--seq-lens 1024 4096] [--out benchmarks/results/mixers_gpu.json]

For every mixer config with a ``backend`` field, times forward + backward of one layer at d_model 1024,
B=8, bf16 autocast, with ``backend: torch`` and ``backend: fla``, checks the two outputs agree, and
records which kernel path each ran (``Mixer.kernel_path()``). Needs CUDA and flash-linear-attention.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    from archifactory.config import BuildContext
    from archifactory.nn.init import InitConfig
    from archifactory.nn.norms import RMSNormConfig
    from archifactory.nn.positions import RoPEConfig
    from archifactory.registry import MIXERS

    if not torch.cuda.is_available():
        sys.exit("mixers_gpu.py needs a CUDA device")
    ctx = BuildContext(d_model=args.d_model, n_layers=1, layer_idx=0, max_seq_len=max(args.seq_lens),
                       norm=RMSNormConfig(), position=RoPEConfig(), init=InitConfig())
    rows = []
    for kind, cls in MIXERS.items():
        if "backend" not in cls.model_fields:
            continue
        for T in args.seq_lens:
            torch.manual_seed(0)
            x = torch.randn(args.batch, T, args.d_model, device="cuda")
            row = {"mixer": kind, "seq_len": T}
            outputs = {}
            for backend in ("torch", "fla"):
                torch.manual_seed(0)
                mixer = cls(backend=backend).build(ctx).cuda()
                try:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        y = mixer(x)[0]
                        y.float().square().mean().backward()
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(args.iters):
                        with torch.autocast("cuda", dtype=torch.bfloat16):
                            y = mixer(x)[0]
                            y.float().square().mean().backward()
                    end.record()
                    torch.cuda.synchronize()
                    row[f"{backend}_ms"] = start.elapsed_time(end) / args.iters
                    row[f"{backend}_path"] = mixer.kernel_path()
                    outputs[backend] = y.float()
                except Exception as err:
                    row[f"{backend}_error"] = f"{type(err).__name__}: {err}"[:300]
            if len(outputs) == 2:
                ref = outputs["torch"]
                row["max_rel_diff"] = float((outputs["fla"] - ref).norm() / ref.norm())
                row["speedup"] = row["torch_ms"] / row["fla_ms"]
            rows.append(row)
            print(json.dumps(row))
    if args.out:
        record = {"benchmark": "mixers_gpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "command": " ".join(["python", *sys.argv]), "device": torch.cuda.get_device_name(0),
                  "torch": torch.__version__, "results": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
