"""Our Triton kernels compile for an H100 (sm_90a) on a machine without a GPU, through the real compiler rather than
the interpreter: code the interpreter accepts but the NVIDIA backend rejects fails here, on CPU CI.

tools/compile_sm90.py builds each shipped autotune candidate with this Triton's ptxas and prints its register,
stack (spill) and shared-memory use; every candidate must fit an H100's shared memory (the TMA-reduce atomic kernel
at four stages did not: 247808 bytes), and the dQ kernel, with one accumulator, must fit without spills. The Gluon
kernels (--gluon) compile with every triton in attention.gluon.GLUON_COMPILES; their spill bounds are those of the
release they run on (GLUON_TRITON). With --loops the tool also reads the order of each MMA loop's waits and
exponentials from the SASS: the softmax must run while an MMA is in flight.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT
triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not PTXAS.exists(), reason="this Triton wheel ships no ptxas")
H100_SMEM = 232448  # bytes of shared memory one block may use on sm_90


def _compile(*args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_sm90.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = []
    for line in done.stdout.splitlines():
        if "'reg'" in line:
            rows.append({"name": line[:line.index(": {'reg'")], "orders": [],
                         **{k: int(v) for k, v in re.findall(r"'(reg|stack|smem|wgmma|loop_spill)': (\d+)", line)}})
        elif line.startswith("  loop ") and rows:  # --loops: the variant's MMA loops (compile_sm90.mma_order)
            rows[-1]["orders"].append(line.split("order: ")[1])
    return rows


@pytest.mark.parametrize("kernel,causal,count", [("fwd", 1, 6), ("dkdv", 0, 3), ("dkdv_atomic", 1, 5)])
def test_kernels_compile_for_hopper(kernel, causal, count):
    rows = _compile("--kernel", kernel, "--causal", str(causal))
    assert len(rows) == count  # every shipped candidate (the atomic kernel: pointer loads, no warp-specialised ones)
    for row in rows:
        assert 0 < row["reg"] <= 255 and row["wgmma"] > 0, row  # tensor-core (wgmma) code, not a fallback
        assert row["smem"] <= H100_SMEM, row  # a candidate over the limit could never launch


def test_dq_kernel_does_not_spill():
    rows = _compile("--kernel", "dq")
    assert len(rows) == 3
    assert all(row["stack"] == 0 for row in rows), rows


def _gluon_triton(versions: str) -> bool:
    """Whether the installed triton is the one the Gluon kernels run on ("run") or one they compile with."""
    import attention.gluon as gluon
    return gluon.triton_minor() in ((gluon.GLUON_TRITON, ) if versions == "run" else gluon.GLUON_COMPILES)


@pytest.fixture(scope="module")
def gluon_rows() -> dict:
    return {row["name"].rsplit(" w", 1)[0]: row for row in _compile("--gluon", "--loops")}  # "gluon_fwd d64 win-1,0 w4"


@pytest.mark.skipif(not _gluon_triton("compile"), reason="the Gluon kernels do not compile with this triton")
def test_gluon_kernels_compile_for_hopper(gluon_rows):
    """Every variant compiles to tensor-core code that fits an H100, with the triton CI installs too (compat.py
    maps the calls renamed after triton 3.6), and the dense D=128 forward keeps its key-block loop free of spills."""
    rows = gluon_rows
    # D 64 / 128 x (causal, two-sided window, no mask) x (forward, varlen forward), and the warp-specialized
    # backward: causal, the non-deterministic mode walking last to first and the deterministic one either way
    # (packed documents: last to first); with a two-sided window or none, both modes walking first to last; dense
    # ones also with the GQA group split over programs (fp32 dK / dV); the FP8 forward, causal and no mask
    assert len(rows) == 56 and sum(name.startswith("gluon_bwd_ws") for name in rows) == 40, sorted(rows)
    assert sum(name.endswith(("_split d64 win-1,0", "_split d128 win-1,0")) for name in rows) == 6
    for name, row in rows.items():
        assert 0 < row["reg"] <= 255 and row["wgmma"] > 0 and row["smem"] <= H100_SMEM, (name, row)
    fwd = {name: row for name, row in rows.items() if name.startswith("gluon_fwd")}
    assert len(fwd) == 16, fwd
    assert sum(name.startswith("gluon_fwd_fp8") for name in fwd) == 4, fwd
    # none in the dense D=128 forward's key-block loop (tools/compile_sm90.loop_spills)
    assert all(row["loop_spill"] == 0 for name, row in fwd.items() if name.startswith("gluon_fwd d128")), fwd


@pytest.mark.skipif(not _gluon_triton("compile"), reason="the Gluon kernels do not compile with this triton")
def test_gluon_kernels_run_their_exponentials_under_an_mma(gluon_rows):
    """The forward issues S_j and P_{j-1} V_{j-1}, waits for S_j (W1) and runs block j's softmax while P V is in
    flight; the backward issues S^T and dP^T, waits for S^T and forms P^T while dP^T is. So in every MMA loop the
    exponentials lie between those two waits: a thread's 64 in the forward (a 64 x 128 block), 32 or 64 in the
    backward (64 keys by 64 or 128 query rows), twice that where both sides of the mask's if are counted. Within
    one basic block ptxas may hoist the second wait above them, and the overlap is gone."""
    orders = {name: row["orders"] for name, row in gluon_rows.items()}
    assert len(orders) == 56 and all(orders.values()), orders
    for name, loops in orders.items():
        for order in loops:
            under = re.search(r"W1 e(\d+) W0", order)
            assert under and int(under.group(1)) >= (64 if name.startswith("gluon_fwd") else 32), (name, order)


@pytest.mark.skipif(not _gluon_triton("run"), reason="the spill bounds are those of the triton the kernels run on")
def test_gluon_forward_spills_little(gluon_rows):
    fwd = {name: row for name, row in gluon_rows.items() if name.startswith("gluon_fwd")}
    fp8 = {name: fwd.pop(name) for name in list(fwd) if name.startswith("gluon_fwd_fp8")}
    # two consumers, each with a second tile for P.V: no spill
    assert len(fp8) == 4 and all(row["stack"] == 0 and row["loop_spill"] == 0 for row in fp8.values()), fp8
    # three consumers at D=64: 3 loads / stores per key block without a mask, 18-20 with one (triton 3.6)
    assert all(row["loop_spill"] <= 20 for name, row in fwd.items() if name.startswith("gluon_fwd d64")), fwd
    # two consumer warpgroups (D=128, 240 registers each) spill at most two words, loaded once per tile (the
    # unmasked packed-document forward: 8 bytes with triton 3.6); three (D=64, 160 each) spill a few
    # loop-invariant values, 32-72 bytes (triton 3.9's register allocation spills 160-208)
    assert all(row["stack"] <= 8 for name, row in fwd.items() if " d128 " in name), fwd
    assert all(row["stack"] <= 96 for name, row in fwd.items() if " d64 " in name), fwd


@pytest.mark.skipif(not _gluon_triton("compile"), reason="the Gluon kernels do not compile with this triton")
def test_k_layout_of_the_warp_specialized_backward_lets_each_consumer_read_half_the_columns():
    """Each consumer's dQ MMA reads half of K's columns: K's swizzle spans at most half a row (64 bytes at D=64),
    and at D=128 it is the default layout."""
    import torch
    from attention.gluon.bwd import _k_descriptor
    from attention.gluon.fwd import descriptor
    for d in (64, 128):
        k = torch.empty(2, 256, 4, d, dtype=torch.bfloat16)
        assert _k_descriptor(k, 128).layout.swizzle_byte_width == d
    k = torch.empty(2, 256, 4, 128, dtype=torch.float16)
    assert _k_descriptor(k, 128).layout == descriptor(k, 128).layout


def _tool():
    import importlib.util
    spec = importlib.util.spec_from_file_location("compile_sm90", ROOT / "tools" / "compile_sm90.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _sass(rows):
    return "\n".join(f"        /*{addr:04x}*/                   {op} ;" for addr, op in rows)


def test_loop_spills_counts_only_the_innermost_mma_loops():
    loop_spills = _tool().loop_spills
    sass = _sass([
        (0x0010, "STL [R1], R4"),  # before any loop: once per launch
        (0x0020, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ"),  # the tile loop's own MMA (first block)
        (0x0030, "LDL R6, [R1]"),  # per tile
        (0x0040, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ"),  # the key-block loop: 0x40..0x80
        (0x0050, "LDL R7, [R1+0x4]"),
        (0x0060, "STL [R1+0x8], R7"),
        (0x0070, "HGMMA.64x128x16.F32.BF16 R56, gdesc[UR12], RZ"),
        (0x0080, "@P0 BRA 0x40"),
        (0x0090, "LDL R8, [R1+0x8]"),  # per tile again
        (0x00a0, "@!P1 BRA 0x20"),  # closes the tile loop
        (0x00b0, "LDL R9, [R1]"),  # a loop without MMAs: not counted
        (0x00c0, "@P2 BRA 0xb0"),
        (0x00d0, "EXIT"),
        (0x00e0, "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2"),  # an mbarrier wait's retry, out of line
        (0x00f0, "BRA 0x50"),  # jumps back into the key-block loop: no loop of its own
    ])
    assert loop_spills(sass) == 2
    assert loop_spills("") == 0


def test_mma_loops_finds_the_fp8_loops_and_counts_their_instructions():
    tool = _tool()
    sass = _sass([
        (0x0010, "QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], RZ"),  # FP8: QGMMA, not HGMMA
        (0x0020, "@!P0 FMUL R2, R2, R3"),  # predicated: counted as FMUL
        (0x0030, "MUFU.EX2 R4, R2"),
        (0x0040, "STL [R1], R4"),
        (0x0050, "QGMMA.64x128x32.F32.E4M3.E4M3 R56, R4, gdesc[UR8], R56"),
        (0x0060, "@P1 BRA 0x10"),
        (0x0070, "EXIT"),
    ])
    (loop,) = tool.mma_loops(sass)
    assert (loop["start"], loop["instructions"], loop["spills"]) == (0x10, 6, 1)
    assert loop["ops"] == {"QGMMA": 2, "FMUL": 1, "MUFU": 1, "STL": 1, "BRA": 1}
    assert loop["cycles"] == {"issue": (6, 6), "mufu": (8, 8), "tensor": (128, 128)}  # two n128 MMAs, 64 cycles each
    assert tool.loop_spills(sass) == 1
    assert tool.loop_lines(sass, top=2) == [
        "  loop 0x10: 6 instructions, 1 spills; QGMMA 2, FMUL 1; cycles a warp: issue 6 / mufu 8 / tensor 128; "
        "order: M1 e1 M1"]
    assert tool.loop_lines(_sass([(0x10, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ"), (0x20, "@P0 BRA 0x40"),
                                  (0x30, "MUFU.EX2 R4, R4"), (0x40, "@P1 BRA 0x10")]), top=0) == [
        "  loop 0x10: 4 instructions, 0 spills; cycles a warp: issue 3-4 / mufu 0-8 / tensor 32; order: M1 e1"]


def test_pipe_cycles_reads_each_mma_width():
    """n64 (D=64's P.V) costs half an n128; k does not count (twice the k at FP8 rate): each is N / 2 cycles."""
    body = ["HGMMA.64x64x16.F32.BF16 R24, R8, gdesc[UR4], R24", "HGMMA.64x128x16.F32.BF16 R56, gdesc[UR8], RZ",
            "QGMMA.64x256x32.F32.E4M3.E4M3 R24, gdesc[UR4], RZ", "MUFU.EX2 R4, R2", "@!P2 MUFU.RCP R5, R3",
            "@P0 BRA 0x0"]
    cycles = _tool().pipe_cycles([(16 * i, op) for i, op in enumerate(body)])
    assert cycles == {"issue": (6, 6), "mufu": (16, 16), "tensor": (32 + 64 + 128,) * 2}


def test_pipe_cycles_takes_the_dearer_side_of_an_if():
    """The masked and unmasked softmax are the two sides of an if in one loop: a step runs one of them."""
    tool = _tool()
    sass = _sass([
        (0x0010, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ"),
        (0x0020, "@!P0 BRA 0x900"),  # an mbarrier wait's retry, out of line: not taken
        (0x0030, "@!P1 BRA P2, 0x80"),  # if: the masked side 0x40..0x70, else 0x80..0x90
        (0x0040, "FSEL R4, R4, -INF, P3"),
        (0x0050, "MUFU.EX2 R4, R4"),
        (0x0060, "FADD R5, R5, R4"),
        (0x0070, "BRA 0xa0"),  # past the else side
        (0x0080, "MUFU.EX2 R4, R4"),
        (0x0090, "MUFU.EX2 R6, R6"),
        (0x00a0, "HGMMA.64x128x16.F32.BF16 R56, R4, gdesc[UR8], R56"),
        (0x00b0, "@P0 BRA 0x10"),
        (0x00c0, "EXIT"),
        (0x0900, "BRA 0x20"),
    ])
    (loop,) = tool.mma_loops(sass)
    assert loop["instructions"] == 11  # both sides
    # issue: 3 + the masked side's 4 or the other's 2, + 2; MUFU: one exponential or two; tensor: both MMAs
    assert loop["cycles"] == {"issue": (7, 9), "mufu": (8, 16), "tensor": (128, 128)}


def test_mma_order_shows_whether_the_softmax_runs_under_p_v():
    """The forward issues S_j and P_{j-1} V_{j-1}, waits for S_j (W1), runs the softmax, then waits for P V (W0).
    Within one basic block ptxas may hoist W0 above the exponentials, and the overlap is gone."""
    tool = _tool()
    step = [(0x10, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT"),
            (0x20, "HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR8].tnspB, R88, gsb0"),
            (0x30, "WARPGROUP.DEPBAR.LE gsb0, 0x1")]
    tail = [(0x90, "@P0 BRA 0x10"), (0xa0, "EXIT")]
    under = _sass(step + [(0x40, "MUFU.EX2 R24, R24"), (0x50, "@!P1 MUFU.EX2 R25, R25"),
                          (0x60, "WARPGROUP.DEPBAR.LE gsb0, 0x0"), (0x70, "MUFU.EX2 R26, R26")] + tail)
    hoisted = _sass(step + [(0x40, "WARPGROUP.DEPBAR.LE gsb0, 0x0"), (0x50, "MUFU.EX2 R24, R24"),
                            (0x60, "MUFU.EX2 R25, R25"), (0x70, "MUFU.EX2 R26, R26")] + tail)
    assert [loop["order"] for loop in tool.mma_loops(under)] == ["M2 W1 e2 W0 e1"]
    assert [loop["order"] for loop in tool.mma_loops(hoisted)] == ["M2 W1 W0 e3"]
