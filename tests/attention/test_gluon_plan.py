"""The Gluon kernels' planning and dispatch, on the CPU: loop bounds against a brute-force mask, the tile order,
and which cases go to which kernel. The kernels themselves run in test_gluon_gpu.py."""

import pytest
import torch

from attention.backends import get_backend, resolve_backend_name
from attention.gluon import dispatch, hopper_ready, triton_status
from attention.gluon.plan import (balanced_schedule, cached_schedule, cached_table, document_tiles,
                                  forward_pairs, forward_plan, heads_per_chunk, key_blocks, key_range, pairs_tiles,
                                  persistent_grid, uncovered_reason, work_item)
from helpers import cu_seqlens, visible_mask


SHAPES = [(256, 256), (300, 700), (700, 300), (1, 1), (129, 64), (1000, 1000)]
WINDOWS = [(True, (-1, -1)), (False, (-1, -1)), (True, (100, -1)), (False, (37, 50)), (False, (-1, 0)),
           (True, (0, 0)), (False, (5, -1))]


@pytest.mark.parametrize("nq,nk", SHAPES)
@pytest.mark.parametrize("causal,window", WINDOWS)
@pytest.mark.parametrize("bm,bn", [(128, 128), (64, 32)])
def test_forward_plan_visits_every_visible_key_and_masks_only_edge_blocks(nq, nk, causal, window, bm, bn):
    keep = visible_mask(nq, nk, causal, window)
    plan = forward_plan(nq, nk, causal, window, bm, bn)
    assert sorted(plan.order) == list(range(-(-nq // bm)))
    for t, (lo, a, b, hi) in enumerate(plan.bounds):
        rows = keep[t * bm:min((t + 1) * bm, nq)]
        seen = rows.any(0).nonzero().flatten()
        n_blocks = -(-(hi - lo) // bn)
        covered = torch.zeros(nk, dtype=torch.bool)
        for blk in range(n_blocks):
            s = lo + blk * bn
            covered[s:min(s + bn, nk)] = True
            if a <= s < b:  # an unmasked block: in bounds and visible to every row of the tile
                assert s + bn <= nk and rows[:, s:s + bn].all(), (t, s)
            else:
                assert s < a or s >= b
        assert covered[seen].all(), f"tile {t} misses visible keys"
        assert lo <= a <= b  # block-aligned thresholds: a and b may sit past hi


def test_tile_order_puts_the_longest_causal_rows_first():
    plan = forward_plan(1024, 1024, True, (-1, -1), 128, 128)
    assert plan.order == tuple(range(7, -1, -1))
    work = [plan.blocks(t) for t in plan.order]
    assert work == sorted(work, reverse=True)
    table = plan.table("cpu")
    assert table.dtype == torch.int32 and table.shape == (8, 5)
    assert table[0].tolist() == [7, *plan.bounds[7]]


def test_key_range_of_a_tile_that_sees_nothing_is_empty():
    lo, a, b, hi = key_range(0, 128, 1000, 100, -1, 0, 128)  # Nq > Nk, causal: the first rows see no key
    assert hi == lo
    assert persistent_grid(0, 132) == 1 and persistent_grid(10, 132) == 10 and persistent_grid(10 ** 6, 132) == 132


def _qkv(D=128, dtype=torch.bfloat16, H=4, hkv=2):
    return torch.zeros(1, 64, H, D, dtype=dtype), torch.zeros(1, 64, hkv, D, dtype=dtype), \
        torch.zeros(1, 64, hkv, D, dtype=dtype)


def test_route_covers_dense_fp16_bf16_d64_d128_and_names_the_rest():
    q, k, v = _qkv()
    assert dispatch.route("forward", q, k, v) == ("gluon", "dense, D=128")
    assert dispatch.route("backward", q, k, v) == ("gluon", "dense, D=128, deterministic")
    assert dispatch.route("backward", q, k, v, deterministic=False) == ("gluon", "dense, D=128, non-deterministic")
    assert dispatch.route("forward", *_qkv(64, torch.float16)) == ("gluon", "dense, D=64")
    assert dispatch.route("forward", q, k, v, varlen=True) == ("gluon", "packed documents, D=128")
    assert dispatch.route("backward", q, k, v, varlen=True) == ("gluon", "packed documents, D=128, deterministic")
    kernel, why = dispatch.route("forward", *_qkv(64), varlen=True)
    assert kernel == "triton" and "D=64" in why
    kernel, why = dispatch.route("forward", *_qkv(96), varlen=True)  # not covered at all: that is the reason given
    assert kernel == "triton" and "head_dim 96" in why
    kernel, why = dispatch.route("backward", *_qkv(64), varlen=True)
    assert kernel == "triton" and "D=64" in why
    assert dispatch.route("backward", q, k, v, varlen=True, max_seqlen=dispatch.GLUON_VARLEN_BWD_MIN_SEQLEN)[0] == \
        "gluon"
    kernel, why = dispatch.route("backward", q, k, v, varlen=True, max_seqlen=700)
    assert kernel == "triton" and "at most 700 rows" in why and "GLUON_VARLEN_BWD_MIN_SEQLEN" in why
    assert dispatch.route("forward", q, k, v, varlen=True, max_seqlen=700)[0] == "gluon"
    kernel, why = dispatch.route("forward", *_qkv(96))
    assert kernel == "triton" and "head_dim 96" in why
    kernel, why = dispatch.route("forward", *_qkv(128, torch.float32))
    assert kernel == "triton" and "float32" in why
    qkv = torch.zeros(1, 64, 3, 4, 128, dtype=torch.bfloat16)
    assert dispatch.route("forward", *qkv.unbind(2))[0] == "gluon"  # strided views are fine for TMA
    odd = torch.zeros(1, 64, 4, 129, dtype=torch.bfloat16)[..., :128]  # row stride 129 elements: not 16-byte
    kernel, why = dispatch.route("forward", odd, k, v)
    assert kernel == "triton" and "16 bytes" in why
    assert uncovered_reason(q, k, v) is None
    kernel, why = dispatch.route("forward", q, k[:, :, :1].expand(-1, -1, 2, -1), v)  # a broadcast (0) stride
    assert kernel == "triton" and "16 bytes" in why


def test_auto_resolves_to_gluon_only_where_hopper_is_ready(monkeypatch):
    import attention.gluon as gluon_pkg
    assert resolve_backend_name("auto", torch.device("cpu")) == "reference"
    monkeypatch.setattr(gluon_pkg, "_READY", {"cuda:0": (True, "")})
    assert resolve_backend_name("auto", torch.device("cuda:0")) == "gluon"
    monkeypatch.setattr(gluon_pkg, "_READY", {"cuda:0": (False, "compute capability (8, 0)")})
    assert resolve_backend_name("auto", torch.device("cuda:0")) == "triton"
    with pytest.raises(ValueError, match="backend 'gluon' is not available here: compute capability"):
        get_backend("gluon", torch.device("cuda:0"))
    assert hopper_ready(torch.device("cpu")) == (False, "device cpu")


def test_triton_status_names_a_version_it_was_not_written_for(monkeypatch):
    import triton
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    assert "written for triton 3.6" in triton_status()


@pytest.mark.parametrize("nq,nk,causal,window", [(8192, 8192, True, (-1, -1)), (1000, 1000, True, (-1, -1)),
                                                 (3000, 3000, False, (-1, -1)), (2000, 3100, True, (300, 0)),
                                                 (128, 128, True, (-1, -1))])
def test_forward_pairs_visit_every_tile_once_heaviest_with_lightest(nq, nk, causal, window):
    plan = forward_plan(nq, nk, causal, window, 128, 128)
    pairs = forward_pairs(nq, nk, causal, window, 128, 128)
    assert pairs.bounds == plan.bounds
    assert len(pairs.order) % 2 == 0 and pairs.order[::2] == plan.order[:len(pairs.order) // 2]
    assert sorted(t for t in pairs.order if t is not None) == list(range(len(plan.order)))
    assert [i for i, t in enumerate(pairs.order) if t is None] in ([], [len(pairs.order) - 1])  # odd count: last
    cost = [sum(pairs.blocks(t) for t in pairs.order[i:i + 2] if t is not None) for i in range(0, len(pairs.order), 2)]
    if causal and window == (-1, -1) and nq == nk:  # tile t has t + 1 blocks: every full pair costs n + 1
        n = len(plan.order)
        assert cost[:n // 2] == [n + 1] * (n // 2)
    table = pairs.table("cpu")
    assert table.shape == (len(pairs.order), 5)
    empty = [i for i, t in enumerate(pairs.order) if t is None]
    assert all((table[i] == -1).all() for i in empty)


def test_paired_causal_tiles_keep_the_programs_on_two_key_blocks():
    """Every causal pair costs n + 1 blocks, and at step t of a pair its program reads key block t (first tile) or
    n - t (second tile, last-first): programs that start pairs together read two blocks of a head, whatever pair."""
    n = 64
    pairs = forward_pairs(n * 128, n * 128, True, (-1, -1), 128, 128)
    for i in range(0, len(pairs.order), 2):
        steps = []
        for half, t in enumerate(pairs.order[i:i + 2]):
            lo, _, _, hi = pairs.bounds[t]
            steps += key_blocks(lo, hi, 128, rev=half == 1)
        assert len(steps) == n + 1
        assert all(key // 128 in (step, n - step) for step, key in enumerate(steps)), steps
    assert key_blocks(0, 300, 128, rev=False) == [0, 128, 256] and key_blocks(0, 300, 128, rev=True) == [256, 128, 0]


def test_tiles_go_two_by_two_only_for_causal_mha_at_d128():
    assert pairs_tiles(True, (-1, -1), 1, 128)
    assert pairs_tiles(False, (-1, 0), 1, 128)  # causal spelled as a window
    assert not pairs_tiles(True, (-1, -1), 4, 128)  # GQA: the K/V of a head chunk stay in L2
    assert not pairs_tiles(True, (-1, -1), 1, 64)
    assert not pairs_tiles(False, (-1, -1), 1, 128)  # every tile costs the same
    assert not pairs_tiles(True, (4095, 0), 1, 128)  # a sliding window: the same


@pytest.mark.parametrize("n_slots,n_bh,chunk", [(8, 32, 2), (5, 7, 3), (1, 1, 1), (16, 3, 8), (3, 10, 10)])
def test_work_items_cover_every_tile_once_in_head_chunks(n_slots, n_bh, chunk):
    items = [work_item(w, n_slots, n_bh, chunk) for w in range(n_slots * n_bh)]
    assert sorted(items) == [(s, bh) for s in range(n_slots) for bh in range(n_bh)]
    for w, (slot, bh) in enumerate(items):  # a chunk's heads are finished before the next chunk starts
        assert bh // chunk == w // (chunk * n_slots)
    first = [slot for slot, bh in items[:min(chunk, n_bh)]]
    assert first == [0] * len(first)  # every head of the first chunk starts with the heaviest slot


def _program_loads(layout, plan, per_item, n_bh, chunk, programs):
    """Work (key blocks + 1 per tile) of each program's positions p, p + programs, ... of a schedule layout."""
    n_slots = len(plan.order) // per_item

    def cost(w):
        tiles = plan.order[per_item * work_item(w, n_slots, n_bh, chunk)[0]:][:per_item]
        return sum(plan.blocks(t) + 1 for t in tiles if t is not None)
    return [sum(cost(w) for w in layout[p::programs] if w >= 0) for p in range(programs)]


@pytest.mark.parametrize("n,n_bh,bm,causal,paired", [(8192, 128, 192, True, False), (32768, 32, 192, True, False),
                                                     (2000, 6, 128, True, False), (8192, 16, 128, True, True),
                                                     (8192, 128, 128, False, False), (300, 3, 128, True, False)])
def test_the_balanced_schedule_runs_every_item_once_in_order_and_evens_out_the_programs(n, n_bh, bm, causal, paired):
    plan = (forward_pairs if paired else forward_plan)(n, n, causal, (-1, -1), bm, 128)
    per_item = 2 if paired else 1
    n_work = len(plan.order) // per_item * n_bh
    programs = persistent_grid(n_work, 132)
    chunk = heads_per_chunk(n_bh, n, 64, 2, 60 * 2 ** 20)
    layout = balanced_schedule(plan, per_item, n_bh, chunk, programs)
    assert len(layout) % programs == 0 and sorted(w for w in layout if w >= 0) == list(range(n_work))
    for p in range(programs):  # each program walks its items in work_item's order: head chunks stay together
        run = [w for w in layout[p::programs] if w >= 0]
        assert run == sorted(run) and -1 not in layout[p::programs][:len(run)]
    if not causal or paired:  # every item costs the same: the round robin
        assert layout[:n_work] == list(range(n_work)) and set(layout[n_work:]) <= {-1}
    loads = _program_loads(layout, plan, per_item, n_bh, chunk, programs)
    robin = _program_loads(list(range(n_work)), plan, per_item, n_bh, chunk, programs)
    assert max(loads) <= max(robin)
    if causal and not paired and n_work >= 20 * programs:  # D=64's causal single tiles at 8K and 32K
        mean = sum(loads) / programs
        assert max(loads) <= 1.01 * mean and max(robin) >= 1.02 * mean


def test_the_schedule_table_is_built_once_per_shape_and_launch():
    first = cached_schedule(forward_plan, 3000, 3000, True, (-1, -1), 192, 128, 1, 4, 2, 7, "cpu")
    assert first.dtype == torch.int32 and first is cached_schedule(forward_plan, 3000, 3000, True, (-1, -1), 192,
                                                                   128, 1, 4, 2, 7, "cpu")
    assert first.tolist() == balanced_schedule(forward_plan(3000, 3000, True, (-1, -1), 192, 128), 1, 4, 2, 7)
    assert cached_schedule(forward_plan, 3000, 3000, True, (-1, -1), 192, 128, 1, 4, 2, 8, "cpu") is not first


def test_heads_per_chunk_keeps_a_chunk_of_k_and_v_within_half_the_l2():
    l2 = 50 * 2 ** 20
    assert heads_per_chunk(64, 131072, 128, 2, l2) == 1  # one head's K/V (64 MiB) is larger than the L2
    assert heads_per_chunk(64, 8192, 128, 2, l2) == 6  # 4 MiB per head, 25 MiB budget
    assert heads_per_chunk(4, 1024, 64, 2, l2) == 4  # never more than there are


def test_the_gluon_backward_runs_at_d64_and_d128_where_the_case_is_covered(monkeypatch):
    q, k, v = _qkv()
    assert dispatch.route("backward", *_qkv(64), deterministic=False) == ("gluon", "dense, D=64, non-deterministic")
    assert dispatch.route("backward", q, k, v) == ("gluon", "dense, D=128, deterministic")
    kernel, why = dispatch.route("backward", *_qkv(128, torch.float32))
    assert kernel == "triton" and "float32" in why  # only where the case is covered
    monkeypatch.setattr(dispatch, "GLUON_BWD_HEAD_DIMS", {128})
    kernel, why = dispatch.route("backward", *_qkv(64))
    assert kernel == "triton" and "D=64" in why and "GLUON_BWD_HEAD_DIMS" in why
    monkeypatch.setattr(dispatch, "GLUON_PASSES", {"forward"})
    kernel, why = dispatch.route("backward", q, k, v)
    assert kernel == "triton" and "GLUON_PASSES" in why
    assert dispatch.route("forward", q, k, v) == ("gluon", "dense, D=128")


def test_the_backward_stays_on_triton_where_the_fp32_dq_buffer_would_crowd_the_gpu(monkeypatch):
    q, k, v = _qkv()  # 1 x 64 x 4 x 128: a 128 KiB fp32 dQ buffer
    assert dispatch.device_memory(q.device) is None  # CPU tensors: no limit
    monkeypatch.setattr(dispatch, "device_memory", lambda device: 16 * 4 * q.numel())
    assert dispatch.route("backward", q, k, v)[0] == "gluon"  # exactly 1/16 of the memory: still fits
    monkeypatch.setattr(dispatch, "device_memory", lambda device: 16 * 4 * q.numel() - 1)
    kernel, why = dispatch.route("backward", q, k, v, deterministic=False)
    assert kernel == "triton" and "fp32 dQ buffer" in why and "GLUON_BWD_MAX_DQ_FRACTION" in why
    assert dispatch.route("forward", q, k, v)[0] == "gluon"  # the forward needs no such buffer


@pytest.mark.parametrize("lens", [[1000, 0, 1, 2049, 517, 4096], [128, 128, 128], [1], [0, 5, 0], [300] * 40])
def test_document_tiles_list_every_tile_once_in_tile_order(lens):
    cu = cu_seqlens(lens)
    table = document_tiles(cu, sum(lens), 128)
    assert table.dtype == torch.int32 and table.shape == (sum(lens) // 128 + len(lens), 2)
    rows = [tuple(r) for r in table.tolist()]
    real = [r for r in rows if r[0] >= 0]
    assert sorted(real) == [(d, t) for d, n in enumerate(lens) for t in range(-(-n // 128))]
    assert rows[len(real):] == [(-1, -1)] * (len(rows) - len(real))  # padding only at the end
    assert [t for _, t in real] == sorted((t for _, t in real), reverse=True)
    up = [tuple(r) for r in document_tiles(cu, sum(lens), 128, descending=False).tolist()]
    assert up == sorted(real, key=lambda r: r[1]) + rows[len(real):]  # lowest first, documents in order on ties


def test_cached_table_is_built_once_per_planner_and_shape():
    """Two planners never share a table, even under one name (a copy of a planner module, say), and a plan option
    is part of the key."""
    args = (1000, 1000, True, (-1, -1), 128, 128, "cpu")
    first = cached_table(forward_plan, *args)
    assert cached_table(forward_plan, *args) is first
    assert torch.equal(first, forward_plan(*args[:-1]).table("cpu"))

    def renamed(*a):
        return forward_pairs(*a)
    renamed.__name__ = forward_plan.__name__
    assert torch.equal(cached_table(renamed, *args), forward_pairs(*args[:-1]).table("cpu"))
    from attention.gluon.plan_bwd import ordered_backward_plan
    plans = [cached_table(ordered_backward_plan, *args, d) for d in (False, True)]
    assert plans[0][0, 0].item() == 7 and plans[1][0, 0].item() == 0  # last key block first / first first


def test_each_forward_tile_names_two_or_three_consumer_warpgroups_and_others_are_refused():
    fwd = pytest.importorskip("attention.gluon.fwd")
    assert fwd.consumers(128) == 2 and fwd.consumers(192) == 3
    for config in (fwd.FWD_CONFIG, fwd.FWD_VARLEN_CONFIG, fwd.FWD_FP8_CONFIG):
        for d, (bm, bn, stages) in config.items():
            assert fwd.consumers(bm) * fwd.CONSUMER_ROWS == bm and bn in (64, 128) and stages >= 2, (d, bm)
    for bad in (64, 100, 256):
        with pytest.raises(ValueError, match=f"BLOCK_M must be one of \\[128, 192\\], got {bad}"):
            fwd.consumers(bad)


def test_the_backward_splits_dq_by_rows_only_where_each_consumer_gets_64_rows(monkeypatch):
    bwd = pytest.importorskip("attention.gluon.bwd")
    assert bwd.dq_rows(128) and not bwd.dq_rows(64)
    assert bwd.dq_rows(bwd.WS_BWD_CONFIG[64][0]) and not bwd.dq_rows(bwd.WS_BWD_CONFIG[128][0])
    assert bwd.dq_box(128, 64) == (64, 64) and bwd.dq_box(64, 128) == (64, 64)  # the dQ descriptor's box
    monkeypatch.setattr(bwd, "DQ_BY_ROWS", False)
    assert not bwd.dq_rows(128) and bwd.dq_box(128, 64) == (128, 32)


def _fp8(nq=200, nk=300, d=128, **config):
    from attention.fp8 import Fp8Config, quantize_qkv
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, nq, 4, d, generator=g), torch.randn(1, nk, 2, d, generator=g), torch.randn(1, nk, 2, d)
    return quantize_qkv(q, k, v, Fp8Config(**config))


def test_the_fp8_forward_goes_to_gluon_where_switched_on_and_its_blocks_fit_the_quantization_blocks(monkeypatch):
    kernel, why = dispatch.route_fp8(_fp8(), torch.bfloat16)  # off by default: the Triton FP8 kernel is faster
    assert kernel == "triton" and "GLUON_PASSES" in why
    monkeypatch.setattr(dispatch, "GLUON_PASSES", {"forward", "backward", "fp8"})
    assert dispatch.route_fp8(_fp8(), torch.bfloat16) == ("gluon", "dense, D=128")
    assert dispatch.route_fp8(_fp8(d=64, block_m=256, block_n=256), torch.float16) == ("gluon", "dense, D=64")
    for fq, dtype, words in [
        (_fp8(block_n=64), torch.bfloat16, "Fp8Config.block_n=64 is not a multiple of the Gluon FP8 forward's 128"),
        (_fp8(d=32, block_n=128), torch.bfloat16, "head_dim 32"),
        (_fp8(), torch.float32, "output dtype torch.float32"),
        (_fp8(nq=0), torch.bfloat16, "an empty sequence (Nq=0, Nk=300)"),
    ]:
        kernel, why = dispatch.route_fp8(fq, dtype)
        assert kernel == "triton" and words in why, why
    fq = _fp8()
    fq.k = torch.empty(1, 300, 1, 129, dtype=fq.k.dtype)[..., :128]  # rows 129 bytes apart: TMA refuses them
    kernel, why = dispatch.route_fp8(fq, torch.bfloat16)
    assert kernel == "triton" and why.startswith("fp8 k strides (38700, 129, 129, 1)"), why
    monkeypatch.setattr(dispatch, "GLUON_PASSES", {"forward", "backward"})
    kernel, why = dispatch.route_fp8(_fp8(), torch.bfloat16)
    assert kernel == "triton" and "GLUON_PASSES" in why


def test_fp8_auto_resolves_like_the_other_passes_and_gluon_is_refused_off_hopper():
    from attention.fp8 import emulate_fp8_attention, fp8_attn_forward, quantize_qkv
    q, k, v = torch.randn(1, 64, 2, 64), torch.randn(1, 64, 2, 64), torch.randn(1, 64, 2, 64)
    out, _ = fp8_attn_forward(q, k, v, True)  # auto on CPU: the emulation
    assert torch.equal(out, emulate_fp8_attention(quantize_qkv(q, k, v), True, 64 ** -0.5, q.dtype)[0])
    with pytest.raises(ValueError, match="attention backend 'gluon' is not available here: device cpu"):
        fp8_attn_forward(q, k, v, True, backend="gluon")


class _Recorded:
    """Stands in for a Gluon kernel: kernel[grid](*args, **kwargs) records the call instead of compiling it."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))

    def bound(self, i=0):
        """The i-th call's arguments by the kernel's own parameter names (launch options dropped)."""
        import inspect
        grid, args, kwargs = self.calls[i]
        kwargs = {k: v for k, v in kwargs.items() if k != "maxnreg"}
        return grid, inspect.signature(self.kernel.fn).bind(*args, **kwargs).arguments


@pytest.fixture
def recorded_forward(monkeypatch):
    """attention.gluon.fwd with its kernel recorded and an H200's SM count / L2, so the host side runs on CPU."""
    import contextlib
    fwd = pytest.importorskip("attention.gluon.fwd")
    rec = _Recorded(fwd._fwd_ws_kernel)
    monkeypatch.setattr(fwd, "_fwd_ws_kernel", rec)
    monkeypatch.setattr(fwd, "num_sms", lambda device: 132)
    monkeypatch.setattr(fwd, "l2_bytes", lambda device: 50 * 2 ** 20)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return fwd, rec


@pytest.mark.parametrize("d", [64, 128])
def test_the_fp8_launch_binds_e4m3_descriptors_and_each_scale_to_its_parameter(recorded_forward, d):
    fwd, rec = recorded_forward
    fq = _fp8(nq=300, nk=500, d=d)
    out, lse = fwd.gluon_fp8_forward(fq, True, 0.1, torch.bfloat16)
    assert out.shape == (1, 300, 4, d) and out.dtype == torch.bfloat16 and lse.shape == (1, 4, 300)
    grid, a = rec.bound()
    block_m, block_n, stages = fwd.FWD_FP8_CONFIG[d]
    assert a["FP8"] is True and (a["QBLOCK_M"], a["QBLOCK_N"]) == (fq.block_m, fq.block_n) and a["PER_ITEM"] == 1
    assert (a["BLOCK_M"], a["BLOCK_N"], a["STAGES"], a["CONSUMERS"]) == (block_m, block_n, stages, 2)
    assert a["QScale"] is fq.q_scale and a["KScale"] is fq.k_scale and a["VScale"] is fq.v_scale
    assert (a["n_qblocks"], a["n_kblocks"]) == (3, 4)  # ceil(300 / 128), ceil(500 / 128)
    assert a["q_desc"].base is fq.q and a["q_desc"].block_shape == [1, 64, 1, d]  # one part per consumer
    assert a["k_desc"].base is fq.k and a["k_desc"].block_shape == [1, block_n, 1, d]
    assert a["v_desc"].base is fq.v_t and a["v_desc"].shape == [1, 2, d, 512]  # keys padded to whole blocks
    assert a["v_desc"].block_shape == [1, 1, d, block_n]
    assert a["o_desc"].base.dtype == torch.bfloat16 and a["o_desc"].block_shape == [1, 64, 1, d]
    assert (a["n_heads"], a["group"], a["seqlen_q"], a["seqlen_k"]) == (4, 2, 300, 500)
    assert a["qk_scale"] == pytest.approx(0.1 * 1.4426950408889634) and a["HAS_RIGHT"] and not a["HAS_LEFT"]
    assert a["n_work"] == 3 * 4 and grid == (12,)  # three query tiles per (batch, head), one program each


def test_the_bf16_launch_leaves_the_fp8_parameters_unread(recorded_forward):
    fwd, rec = recorded_forward
    q, k, v = torch.randn(1, 300, 4, 128, dtype=torch.bfloat16), *torch.randn(2, 1, 500, 2, 128,
                                                                              dtype=torch.bfloat16)
    fwd.gluon_attn_forward(q, k, v, True, 0.1, (-1, -1))
    _, a = rec.bound()
    assert a["FP8"] is False and a["q_desc"].base is q and a["v_desc"].base is v and a["PER_ITEM"] == 1  # GQA
    assert a["v_desc"].block_shape == [1, 128, 1, 128] and (a["QBLOCK_M"], a["QBLOCK_N"]) == (1, 1)
