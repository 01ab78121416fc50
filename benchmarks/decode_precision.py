"""Cached decoding against the full forward in a model cast to bf16, for every registered sequence mixer.

    python benchmarks/decode_precision.py [--tokens 1100] [--kinds mamba2 hymba lstm ...]
                                          [--out benchmarks/results/decode_precision.json]

The ``tiny`` preset (d_model 128, 4 layers, SwiGLU) with every layer's mixer swapped, random init
(seed 0), cast with ``.to(torch.bfloat16)``. One random sequence of ``--tokens`` tokens is run through
the whole-sequence forward and, separately, token by token with the model's cache; the figure is the
largest absolute difference between the two sets of logits. Both see the same bf16 weights and
activations, so what differs is how the state is carried between tokens: a recurrent state kept in bf16
rounds at every step and drifts from the full forward; kept in fp32 it stays within a bf16 rounding or
two of it, as attention's KV cache does. The same model in fp32 is measured beside it as the floor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def max_logit_error(kind: str, dtype, tokens: int, seed: int = 0) -> float:
    import torch

    from archifactory.model.config import ModelConfig
    from archifactory.model.lm import CausalLM
    from archifactory.model.presets import resolve_model_source
    from archifactory.config import load_yaml

    data = load_yaml(resolve_model_source("tiny"))
    data.update(mixer={"kind": kind}, max_seq_len=tokens, layer_overrides=[])
    if kind == "rwkv6":
        data["ffn"] = {"kind": "rwkv6_channel_mix"}
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.model_validate(data)).to(dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(ids).logits.float()
        cache = model.init_cache(1)
        steps = torch.cat([model(ids[:, t : t + 1], cache=cache).logits.float() for t in range(tokens)], dim=1)
    return float((steps - full).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1100)
    parser.add_argument("--kinds", nargs="*", default=None, help="mixer kinds (default: every registered one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from archifactory.registry import MIXERS

    torch.set_num_threads(args.threads)
    kinds = args.kinds or sorted(MIXERS)
    rows = []
    for kind in kinds:
        row = {"mixer": kind, "bf16": max_logit_error(kind, torch.bfloat16, args.tokens),
               "fp32": max_logit_error(kind, torch.float32, args.tokens)}
        rows.append(row)
        print(f"{kind:>16}  bf16 {row['bf16']:.4f}  fp32 {row['fp32']:.2e}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "machine": platform.machine(),
            "tokens": args.tokens, "rows": rows,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
