"""Kernel selection (mixers/kernels.py): ``auto`` takes an fla kernel only where it was verified on a GPU."""

import pytest
import torch

from archifactory.mixers import kernels
from archifactory.mixers.kernels import select_backend


def test_torch_backend_everywhere():
    assert select_backend("torch", "cuda", "chunk_gla") == "torch"
    assert select_backend("auto", "cpu", "chunk_gla") == "torch"


def test_auto_takes_only_verified_fla_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "fla_installed", lambda: True)
    monkeypatch.setattr(kernels, "FLA_VERIFIED", {"chunk_gla": "verified"})
    assert select_backend("auto", torch.device("cuda"), "chunk_gla") == "fla"
    assert select_backend("auto", torch.device("cuda"), "chunk_rwkv7") == "torch"  # never compared: not a default
    assert select_backend("auto", torch.device("cpu"), "chunk_gla") == "torch"
    monkeypatch.setattr(kernels, "fla_installed", lambda: False)
    assert select_backend("auto", torch.device("cuda"), "chunk_gla") == "torch"


def test_explicit_fla_needs_cuda_and_fla():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        select_backend("fla", "cpu", "chunk_gla")
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend("triton", "cpu", "chunk_gla")


def test_verified_and_rejected_are_disjoint():
    assert not set(kernels.FLA_VERIFIED) & set(kernels.FLA_REJECTED)


def test_every_fla_kernel_a_mixer_calls_has_a_recorded_verdict():
    """A mixer that gains an fla path must say whether the GPU test verified it (kernels.py)."""
    from archifactory.config import BuildContext
    from archifactory.nn.init import InitConfig
    from archifactory.nn.norms import RMSNormConfig
    from archifactory.nn.positions import RoPEConfig
    from archifactory.registry import MIXERS

    ctx = BuildContext(d_model=32, n_layers=2, layer_idx=0, max_seq_len=16, norm=RMSNormConfig(),
                       position=RoPEConfig(), init=InitConfig())
    ops = set()
    for kind, cls in MIXERS.items():
        if "backend" in cls.model_fields:
            mixer = cls.contract_examples(32)[0].build(ctx)
            ops |= {m.fla_op for m in mixer.modules() if getattr(m, "fla_op", "")}
    assert ops, "no mixer declares an fla kernel"
    assert ops <= set(kernels.FLA_VERIFIED) | set(kernels.FLA_REJECTED), ops - set(kernels.FLA_VERIFIED)
    assert all(kernels.FLA_VERIFIED.values()) and all(kernels.FLA_REJECTED.values())
