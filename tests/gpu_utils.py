"""Shared pieces of the Triton GPU test files (each runs in its own pytest process on a CUDA machine)."""

import os

import pytest
import torch

GPU_MARKS = [pytest.mark.gpu,
             pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="kernels interpreted: GPU tests run with pytest -m gpu")]


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| in fp32; fails on non-finite values."""
    got, want = got.float(), want.float()
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def cuda_qkv(B, nq, nk, H, hkv, D, dtype):
    """q (B, nq, H, D), k and v (B, nk, hkv, D) on CUDA, seeded by the shape."""
    g = torch.Generator(device="cuda").manual_seed(B * 1000 + nq + nk + D)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    return mk(B, nq, H, D), mk(B, nk, hkv, D), mk(B, nk, hkv, D)
