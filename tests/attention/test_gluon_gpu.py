"""Gluon Hopper kernels on an sm_90 GPU against the fp32 reference and against the Triton kernels.

    pytest -m gpu tests/attention/test_gluon_gpu.py -q

Skipped where the Gluon kernels cannot run (another GPU or triton version: attention.gluon.hopper_ready).
"""

import logging

import pytest
import torch
from gpu_utils import GPU_MARKS, cuda_qkv, gluon_skip, rel_err
from helpers import cu_seqlens

from attention import attn_forward, attn_varlen_forward, flash_attn_func, reference_attn_forward
from attention.backends import resolve_backend_name
from attention.gluon import dispatch, fwd


pytestmark = [*GPU_MARKS, gluon_skip()]

OUT_TOL = 1e-2

CASES = [  # B, Nq, Nk, H, Hkv, D, causal, window, dtype
    (2, 4096, 4096, 8, 8, 128, True, (-1, -1), torch.bfloat16),
    (2, 4096, 4096, 8, 8, 128, False, (-1, -1), torch.bfloat16),
    (2, 4096, 4096, 8, 2, 64, False, (-1, -1), torch.float16),
    (2, 4096, 4096, 8, 8, 64, True, (-1, -1), torch.bfloat16),
    (1, 3000, 4097, 8, 1, 128, True, (-1, -1), torch.bfloat16),  # Nq < Nk, MQA, ragged tails
    (1, 4097, 3000, 4, 4, 64, True, (-1, -1), torch.float16),  # Nq > Nk: 1097 rows see no key
    (2, 2048, 2048, 8, 4, 128, True, (256, -1), torch.bfloat16),  # causal sliding window
    (1, 1000, 1500, 4, 2, 128, False, (100, 50), torch.bfloat16),  # two-sided window, Nq != Nk
    (1, 777, 777, 4, 4, 64, True, (-1, -1), torch.float16),
    (3, 200, 333, 8, 1, 128, True, (-1, -1), torch.bfloat16),  # shorter than one key block pipeline
    (1, 129, 64, 2, 2, 128, True, (-1, -1), torch.bfloat16),  # Nq > Nk inside one tile
]


# forward tiles other than the shipped ones (fwd.FWD_CONFIG, FWD_VARLEN_CONFIG), each run on the cases of its head
# dim: two consumer warpgroups (BLOCK_M 128) and three (192), 64- and 128-key blocks
OTHER_TILES = [(64, (128, 128, 3)), (64, (192, 128, 2)), (64, (192, 64, 4)), (128, (128, 128, 2)), (128, (192, 64, 2))]
TILE_IDS = [f"d{d}-{'x'.join(map(str, t))}" for d, t in OTHER_TILES]


def _use_other_tile(config: dict, case_dim: int, D: int, tile: tuple, monkeypatch) -> None:
    """Run the case at `tile` (config: fwd.FWD_CONFIG or FWD_VARLEN_CONFIG); skip a case of another head dim, or a
    tile the shipped config already runs."""
    if case_dim != D or config[D] == tile:
        pytest.skip("another head dim, or the shipped tile (tested above)")
    monkeypatch.setitem(config, D, tile)


@pytest.mark.parametrize("B,nq,nk,H,hkv,D,causal,window,dtype", CASES)
def test_gluon_forward_matches_fp32_reference_and_triton(B, nq, nk, H, hkv, D, causal, window, dtype):
    _check_forward(B, nq, nk, H, hkv, D, causal, window, dtype)


@pytest.mark.parametrize("D,tile", OTHER_TILES, ids=TILE_IDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gluon_forward_at_other_tiles(D, tile, case, monkeypatch):
    _use_other_tile(fwd.FWD_CONFIG, CASES[case][5], D, tile, monkeypatch)
    _check_forward(*CASES[case])


def _check_forward(B, nq, nk, H, hkv, D, causal, window, dtype):
    q, k, v = cuda_qkv(B, nq, nk, H, hkv, D, dtype)
    out, lse = attn_forward(q, k, v, causal, None, window, backend="gluon")
    ref_out, ref_lse = reference_attn_forward(q.float(), k.float(), v.float(), causal, None, window)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, H, nq)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert rel_err(out, ref_out) < OUT_TOL
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max().item() < 2e-2
    assert (out.transpose(1, 2)[~fin] == 0).all()
    tri_out, tri_lse = attn_forward(q, k, v, causal, None, window, backend="triton")
    assert rel_err(out, tri_out) < OUT_TOL
    assert (lse[fin] - tri_lse[fin]).abs().max().item() < 2e-2


VARLEN_CASES = [  # query lengths, key lengths (None: the same), H, Hkv, D, causal, window, dtype
    ([1000, 0, 1, 2049, 517, 4096], None, 8, 2, 128, True, (-1, -1), torch.bfloat16),
    ([1000, 0, 1, 2049, 517, 4096], None, 8, 8, 64, False, (-1, -1), torch.float16),
    ([128, 64, 192, 63, 65, 256, 1], None, 4, 1, 128, True, (-1, -1), torch.bfloat16),  # tile-edge lengths
    ([3000, 700, 1500], None, 8, 4, 128, True, (300, -1), torch.bfloat16),  # sliding window per document
    ([900, 1200], None, 4, 4, 64, False, (100, 50), torch.bfloat16),
    ([300, 1000, 5], [700, 1000, 0], 4, 2, 128, True, (-1, -1), torch.bfloat16),  # Nq != Nk per document
]


@pytest.mark.parametrize("lens_q,lens_k,H,hkv,D,causal,window,dtype", VARLEN_CASES)
def test_gluon_packed_documents_match_fp32_reference_and_triton(lens_q, lens_k, H, hkv, D, causal, window, dtype,
                                                                monkeypatch):
    _check_packed(lens_q, lens_k, H, hkv, D, causal, window, dtype, monkeypatch)


@pytest.mark.parametrize("D,tile", OTHER_TILES, ids=TILE_IDS)
@pytest.mark.parametrize("case", range(len(VARLEN_CASES)))
def test_gluon_packed_documents_at_other_tiles(D, tile, case, monkeypatch):
    _use_other_tile(fwd.FWD_VARLEN_CONFIG, VARLEN_CASES[case][4], D, tile, monkeypatch)
    _check_packed(*VARLEN_CASES[case], monkeypatch)


def _check_packed(lens_q, lens_k, H, hkv, D, causal, window, dtype, monkeypatch):
    monkeypatch.setattr(dispatch, "GLUON_VARLEN_HEAD_DIMS", (64, 128))  # the kernel at every head dim it takes
    lens_k = lens_q if lens_k is None else lens_k
    cu = [cu_seqlens(lens, "cuda") for lens in (lens_q, lens_k)]
    q, k, v = (t[0] for t in cuda_qkv(1, sum(lens_q), sum(lens_k), H, hkv, D, dtype))
    args = (*cu, max(lens_q), max(lens_k), causal, None, window)
    out, lse = attn_varlen_forward(q, k, v, *args, backend="gluon")
    ref_out, ref_lse = attn_varlen_forward(q.float(), k.float(), v.float(), *args, backend="reference")
    assert lse.shape == (H, sum(lens_q)) and not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert rel_err(out, ref_out) < OUT_TOL
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max().item() < 2e-2
    assert (out.transpose(0, 1)[~fin] == 0).all()
    tri_out, _ = attn_varlen_forward(q, k, v, *args, backend="triton")
    assert rel_err(out, tri_out) < OUT_TOL


def test_packed_documents_leave_no_row_unwritten():
    """Every output row is written by its own document's tile (the rows past a document's end go to the next)."""
    lens = [65, 127, 1, 129, 200]
    cu = cu_seqlens(lens, "cuda")
    q, k, v = (t[0] for t in cuda_qkv(1, sum(lens), sum(lens), 2, 2, 128, torch.bfloat16))
    runs = [attn_varlen_forward(q, k, v, cu, cu, max(lens), max(lens), True, None, (-1, -1), backend="gluon")[0]
            for _ in range(3)]
    want = attn_varlen_forward(q.float(), k.float(), v.float(), cu, cu, max(lens), max(lens), True, None, (-1, -1),
                               backend="reference")[0]
    for out in runs:
        assert torch.equal(out, runs[0]) and rel_err(out, want) < OUT_TOL


def test_strided_inputs_from_a_packed_qkv_projection():
    """q/k/v as views of one (B, N, 3, H, D) tensor: TMA reads them in place."""
    qkv = torch.randn(2, 1024, 3, 4, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    out, lse = attn_forward(q, k, v, True, None, (-1, -1), backend="gluon")
    ref_out, ref_lse = reference_attn_forward(q.float(), k.float(), v.float(), True)
    assert rel_err(out, ref_out) < OUT_TOL


def test_auto_picks_gluon_on_hopper_and_logs_each_case_once(caplog):
    assert resolve_backend_name("auto", torch.device("cuda")) == "gluon"
    q, k, v = cuda_qkv(1, 512, 512, 2, 2, 128, torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with caplog.at_level(logging.INFO, logger="ringflash.attention"):
        for _ in range(2):
            out = flash_attn_func(q, k, v, causal=True)
            out.float().sum().backward()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("attention forward: gluon" in m for m in lines) <= 1
    want = flash_attn_func(q.detach(), k.detach(), v.detach(), causal=True, backend="triton")
    assert rel_err(out, want) < OUT_TOL
