"""Runs flash-linear-attention's RWKV-7 model (``fla.models.RWKV7ForCausalLM``) on CPU for
tests/test_rwkv7_fla.py, in a process of its own: Triton's interpreter must be switched on before fla's
kernels are decorated, which the test process (that imports fla elsewhere) cannot promise.

    python tests/fla_rwkv7_reference.py IN OUT

IN (``torch.save``): ``config`` (keyword arguments of fla's ``RWKV7Config``), ``state_dict`` (fla's names),
``input_ids`` (B, T). OUT: ``logits`` of one forward over the whole sequence. Without gradients, in eval mode and under 64 tokens fla's layer runs its
``fused_mul_recurrent_rwkv7`` kernel (the chunk kernels do not run in the interpreter).
"""

import os
import sys
import warnings

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton.runtime.autotuner as autotuner  # noqa: E402

# The autotuner times each config with the GPU driver's benchmarker, which the interpreter lacks; every config
# computes the same function, so a constant time (the first config wins) changes nothing but speed.
autotuner.Autotuner.do_bench = staticmethod(lambda fn, quantiles=None, **kwargs: [1.0, 1.0, 1.0])

from fla.models import RWKV7Config, RWKV7ForCausalLM  # noqa: E402


def main(src: str, dst: str) -> None:
    warnings.filterwarnings("ignore")
    data = torch.load(src)
    model = RWKV7ForCausalLM(RWKV7Config(**data["config"])).eval()
    model.load_state_dict(data["state_dict"], strict=True)
    ids = data["input_ids"]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    torch.save({"logits": logits}, dst)


if __name__ == "__main__":
    main(*sys.argv[1:])
