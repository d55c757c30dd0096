"""Shared pieces of the Triton GPU test files (each runs in its own pytest process on a CUDA machine)."""

import os

import pytest
import torch

from helpers import rel_err  # noqa: F401  (re-exported for the GPU test files)

GPU_MARKS = [pytest.mark.gpu,
             pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="kernels interpreted: GPU tests run with pytest -m gpu")]


def cuda_qkv(B, nq, nk, H, hkv, D, dtype):
    """q (B, nq, H, D), k and v (B, nk, hkv, D) on CUDA, seeded by the shape."""
    g = torch.Generator(device="cuda").manual_seed(B * 1000 + nq + nk + D)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    return mk(B, nq, H, D), mk(B, nk, hkv, D), mk(B, nk, hkv, D)


def gluon_skip():
    """skipif mark for the Gluon GPU tests: they need an sm_90 GPU and the triton the kernels are written for."""
    ready, why = (False, "needs CUDA")
    if torch.cuda.is_available():
        from attention.gluon import hopper_ready
        ready, why = hopper_ready(torch.device("cuda"))
    return pytest.mark.skipif(not ready, reason=f"Gluon kernels unavailable: {why}")
