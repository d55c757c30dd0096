"""Compile our Triton kernels for an H100 (sm_90a) on a machine without a GPU: registers, spills, shared memory.

    PYTHONPATH=$TRITON36:. python tools/compile_sm90.py [--kernel fwd|dkdv|dkdv_atomic|dq] [--causal 0] [--dump DIR]
    PYTHONPATH=$TRITON36:. python tools/compile_sm90.py --gluon      # the Gluon kernels (attention/gluon/), as shipped
    PYTHONPATH=$TRITON36:. python tools/compile_sm90.py --gluon --loops --only "fwd d64"   # + each MMA loop's SASS

Put the device's Triton first on PYTHONPATH (pip install --target DIR triton==3.6.0): codegen differs between
releases. ptxas from the Triton wheel does the register allocation offline, so a kernel change can be judged
on its register budget before it costs device time. Specialisation follows the JIT's: pointers and ints that
are multiples of 16 get the divisibility hint, ints equal to 1 become constants. Gluon has no interpreter, so
`--gluon` is how its kernels are compiled without a GPU; it needs the triton release they are written for
(attention.gluon.GLUON_TRITON).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget

from attention.triton import bwd as triton_bwd, fwd as triton_fwd

TARGET = GPUTarget("cuda", 90, 32)
GUARD = re.compile(r"^@!?U?P[T\d]\s+")  # a SASS instruction's predicate guard, "@!P0 "


def _branch_target(op: str) -> int | None:
    """The address a SASS branch (BRA, guarded or not) jumps to; None for any other instruction."""
    target = re.search(r"\bBRA\b.*0x([0-9a-f]+)\s*$", op)
    return int(target.group(1), 16) if target else None


def _signature(fn, args: dict, constexprs: dict):
    sig, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):  # a pointer's type, e.g. "*bf16": torch's allocations are 16-byte aligned
            sig[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif value == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs, consts


def compile_kernel(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int):
    sig, attrs, consts = _signature(fn, args, constexprs)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    backend = triton.compiler.make_backend(TARGET)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    return triton.compile(src, target=TARGET, options=options.__dict__)


def mma_loops(sass: str) -> list[dict]:
    """The innermost loops that issue tensor-core MMAs (HGMMA; QGMMA for FP8), in address order: each one's first
    address, instruction count, local-memory loads and stores (spills) and opcode counts (predicates and modifiers
    dropped). Both branches of an if inside a loop count, so a step runs fewer than `instructions`.
    A loop closes with a predicated backward branch; an unconditional one comes from an out-of-line block placed
    after the code (an mbarrier wait's retry) jumping back, and spans no loop."""
    ins = [(int(a, 16), op.strip()) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, op in ins:
        lo = _branch_target(op)
        if lo is not None and lo < addr and re.match(r"@!?U?P\d\s", op):  # a predicated backward branch
            if any(re.match(r"[HQ]GMMA\b", o) for a, o in ins if lo <= a <= addr):
                loops.append((lo, addr))
    inner = [(lo, hi) for lo, hi in loops if not any((lo, hi) != (a, b) and lo <= a and b <= hi for a, b in loops)]
    rows = []
    for lo, hi in sorted(inner):
        body = [(a, o) for a, o in ins if lo <= a <= hi]
        counts = Counter(GUARD.sub("", o).split()[0].split(".")[0] for a, o in body)
        rows.append(dict(start=lo, instructions=counts.total(), spills=counts["LDL"] + counts["STL"],
                         ops=dict(counts.most_common()), cycles=pipe_cycles(body), order=mma_order(body)))
    return rows


def mma_order(body: list[tuple[int, str]]) -> str:
    """A loop's MMAs (M), exponentials (e, MUFU.EX2) and warpgroup MMA waits (W<n>: until n are in flight) in
    address order, runs of M and e counted: "M16 W1 e64 W0 e2" is a forward step whose softmax runs while P.V is
    in flight, "M16 W1 W0 e66" one where ptxas moved the wait for P.V above the softmax (within a basic block it
    may: the wait has no register operands)."""
    runs = []
    for _, op in body:
        op = GUARD.sub("", op)
        wait = re.match(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)", op)
        mark = "M" if re.match(r"[HQ]GMMA\b", op) else "e" if op.startswith("MUFU.EX2") else \
            f"W{int(wait.group(1), 16)}" if wait else None
        if mark and runs and runs[-1][0] == mark and not mark.startswith("W"):
            runs[-1][1] += 1
        elif mark:
            runs.append([mark, 1])
    return " ".join(m if m.startswith("W") else f"{m}{n}" for m, n in runs)


def _pipes(op: str) -> tuple[int, int, int]:
    """(issue, MUFU, tensor) cycles of one instruction for one warp on an SM sub-partition, at the rates sm_90
    documents: one instruction issued a cycle; MUFU returns 16 results a cycle an SM, 8 cycles a warp instruction;
    a warpgroup MMA gives each warp 16 rows at 1024 dense 16-bit flops a cycle (2048 in FP8): N / 2 cycles for any
    m64nNk MMA."""
    op = GUARD.sub("", op)
    mma = re.match(r"[HQ]GMMA\.64x(\d+)x\d+", op)
    return 1, 8 if op.startswith("MUFU") else 0, int(mma.group(1)) // 2 if mma else 0


def pipe_cycles(body: list[tuple[int, str]]) -> dict:
    """The cycles one step of a loop (body: its (address, instruction) pairs, the closing branch last) keeps each
    pipe busy for one warp (_pipes): (cheapest, dearest) over the step's paths, pipe by pipe. An if / else costs one
    side, where the loop's instruction count holds both. Branches out of the loop (an mbarrier wait's out-of-line
    retry) count as not taken. The largest figure bounds the step if the warps on a sub-partition overlap
    perfectly, each pipe shared between them; latencies and waits are not modelled."""
    lo, hi = body[0][0], body[-1][0]
    reach = {lo: ((0, 0, 0), (0, 0, 0))}  # (cheapest, dearest) cycles on reaching an address, pipe by pipe
    for i, (addr, op) in enumerate(body):
        if addr not in reach:
            continue  # only reached by jumping past it
        cost = _pipes(op)
        low, high = (tuple(x + y for x, y in zip(r, cost)) for r in reach[addr])
        if addr == hi:
            return {pipe: (low[k], high[k]) for k, pipe in enumerate(("issue", "mufu", "tensor"))}
        target = _branch_target(op)
        nexts = [] if target is not None and not op.startswith("@") and lo <= target <= hi else [body[i + 1][0]]
        if target is not None and addr < target <= hi:
            nexts.append(target)
        for n in nexts:
            old_low, old_high = reach.get(n, (low, high))
            reach[n] = (tuple(map(min, old_low, low)), tuple(map(max, old_high, high)))
    raise ValueError(f"no path reaches the loop's closing branch at 0x{hi:x}")


def loop_spills(sass: str) -> int:
    """Spills inside the innermost MMA loops (mma_loops), the most of any one such loop: what a spill costs every
    key block, where spills outside the loops cost once per tile."""
    return max((loop["spills"] for loop in mma_loops(sass)), default=0)


def _cuobjdump(compiled, flag: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def sass_of(compiled) -> str:
    return _cuobjdump(compiled, "-sass")


def resource_usage(compiled, sass: str | None = None) -> dict:
    """REG / STACK (spill) / LOCAL / static SHARED from the cubin, as cuobjdump reads them, the dynamic shared
    memory the launch asks for, and the spills inside its MMA loops (loop_spills; sass: its SASS, if already
    disassembled)."""
    text = _cuobjdump(compiled, "-res-usage")
    usage = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    usage["loop_spill"] = loop_spills(sass_of(compiled) if sass is None else sass)
    usage["smem"] = compiled.metadata.shared  # the launch's dynamic shared memory (H100 limit: 232448 bytes)
    ptx = compiled.asm["ptx"]
    usage["wgmma"] = len(re.findall(r"wgmma\.mma_async", ptx))
    usage["wgmma_rs"] = len(re.findall(r"wgmma\.mma_async[^;]*\{[^}]*\}\s*,\s*\{", ptx))  # A from registers
    return usage


def _kernel_args(n: int, heads: int, d: int, atomic: bool) -> dict:
    """A (B, N, H, D) bf16 layout, lse (B, H, N): the strides the launcher passes."""
    row, head, bstride = heads * d, d, n * heads * d
    ptr = "*bf16"
    args = dict(Q=ptr, K=ptr, V=ptr, DO=ptr, DK=ptr, DV=ptr, DQ="*fp32" if atomic else ptr, Out=ptr,
                Lse2="*fp32", Delta="*fp32", CuQ=ptr, CuK=ptr, qk_scale=0.127, softmax_scale=0.088,
                win_left=0, win_right=0, len_class=48, seqlen_q_dense=n, seqlen_k_dense=n, max_seqlen_q=n,
                n_kv_heads=heads, n_heads=heads, group=1, stride_lb=heads * n, stride_lh=n)
    for t in ("q", "k", "v", "d", "dk", "dv", "dq"):
        args.update({f"stride_{t}b": bstride, f"stride_{t}n": row, f"stride_{t}h": head})
    args.update(stride_ob=bstride, stride_on=row, stride_oh=head, Lse="*fp32")
    return args


def gluon_variants():
    """(name, kernel, args, constexprs, num_warps, maxnreg) of every shipped Gluon kernel variant: D 64 / 128,
    causal, a two-sided window and no mask, the forward (dense and packed documents) and the warp-specialized
    backward with dQ by TMA reduce-add (dense, GQA groups split or not, and packed documents)."""
    import torch

    from attention.gluon import bwd as gluon_bwd, fwd as gluon_fwd
    from attention.gluon.plan import pairs_tiles
    from attention.gluon.plan_bwd import head_interleave
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    ints = dict(n_work=7, n_slots=7, n_bh=7, chunk=7, n_heads=7, n_kv_heads=7, group=7, kv_group=7, seqlen_q=1000,
                seqlen_k=1000, win_left=7, win_right=7, lse_stride=7, sem_stride=7)
    floats = dict(qk_scale=0.127, inv_qk_scale=7.9, softmax_scale=0.088)
    f32, i32 = torch.empty(4, dtype=torch.float32), torch.empty(4, dtype=torch.int32)
    scales = dict(QScale=f32, KScale=f32, VScale=f32, n_qblocks=7, n_kblocks=7)
    for d in (64, 128):
        t = torch.empty(2, 256, 4, d, dtype=torch.bfloat16)
        for left, right in ((-1, 0), (100, 50), (-1, -1)):
            flags = dict(HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0)
            for varlen in (False, True):  # dense causal MHA tiles go two by two (plan.pairs_tiles)
                bm, bn, st = (gluon_fwd.FWD_VARLEN_CONFIG if varlen else gluon_fwd.FWD_CONFIG)[d]
                n_wg = gluon_fwd.consumers(bm)
                part, kv = gluon_fwd.descriptor(t, bm // n_wg), gluon_fwd.descriptor(t, bn)
                tensors = dict(q_desc=part, k_desc=kv, v_desc=kv, o_desc=part, Out=t, Lse=f32, Plan=i32, CuQ=i32,
                               CuK=i32, Sched=i32, **scales)
                per_item = 2 if not varlen and pairs_tiles(False, (left, right), 1, d) else 1
                yield (f"gluon_fwd{'_varlen' if varlen else ''} d{d} win{left},{right}", gluon_fwd._fwd_ws_kernel,
                       {**ints, **floats, **tensors}, dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=st,
                                                            VARLEN=varlen, PER_ITEM=per_item, CONSUMERS=n_wg,
                                                            SCHEDULED=not varlen,
                                                            CONSUMER_REGS=gluon_fwd.WS_REGS[n_wg][1], FP8=False,
                                                            QBLOCK_M=1, QBLOCK_N=1, **flags),
                       4, gluon_fwd.WS_REGS[n_wg][0])
            if left < 0:  # FP8 (dense causal / non-causal): e4m3 Q, K and V transposed, bf16 out
                bm, bn, st = gluon_fwd.fwd_config(d, fp8=True)
                n_wg = gluon_fwd.consumers(bm)
                t8 = torch.empty(2, 256, 4, d, dtype=torch.float8_e4m3fn)
                vt = torch.empty(2, 4, d, 256, dtype=torch.float8_e4m3fn)
                block = [1, 1, d, bn]
                v_desc = TensorDescriptor(vt, list(vt.shape), list(vt.stride()), block,
                                          gluon_fwd.block_layout(block, vt.dtype))
                tensors = dict(q_desc=gluon_fwd.descriptor(t8, bm // n_wg), k_desc=gluon_fwd.descriptor(t8, bn),
                               v_desc=v_desc, o_desc=gluon_fwd.descriptor(t, bm // n_wg), Out=t, Lse=f32, Plan=i32,
                               CuQ=i32, CuK=i32, Sched=i32, **scales)
                yield (f"gluon_fwd_fp8 d{d} win{left},{right}", gluon_fwd._fwd_ws_kernel,
                       {**ints, **floats, **tensors},  # FP8 tiles go one by one (fwd._dense_forward)
                       dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=st, VARLEN=False, PER_ITEM=1,
                            SCHEDULED=True, CONSUMERS=n_wg, CONSUMER_REGS=gluon_fwd.WS_REGS[n_wg][1], FP8=True,
                            QBLOCK_M=128, QBLOCK_N=128, **flags), 4,
                       gluon_fwd.WS_REGS[n_wg][0])
            bm, bn, st = gluon_bwd.WS_BWD_CONFIG[d]
            q, k, v = gluon_fwd.descriptor(t, bm), gluon_bwd._k_descriptor(t, bn), gluon_fwd.descriptor(t, bn)
            dq = gluon_bwd.dq_descriptor(torch.empty(2, 4, 4, bm * d), bm, d)
            tensors = dict(q_desc=q, k_desc=k, v_desc=v, do_desc=q, dq_desc=dq, DK=t, DV=t, Lse2=f32, Delta=f32,
                           Plan=i32, Sem=i32, CuQ=i32, CuK=i32)
            # (DET, REVERSE): causal key blocks walk last to first in the non-deterministic mode and for packed
            # documents, and in the deterministic dense one where a head outgrows the L2; never with a left
            # window side or without a right one (plan_bwd.descending_walk)
            for varlen in (False, True):
                walks = ((False, False), (True, False)) if left >= 0 or right < 0 else \
                    ((False, True), (True, True)) if varlen else ((False, True), (True, False), (True, True))
                # dense GQA groups split over programs write fp32 dK / dV partials (plan_bwd.split_group)
                for det, rev in walks:
                    for split in (False, True) if not varlen else (False,):
                        name = "_varlen" * varlen + "_det" * det + "_rev" * rev + "_split" * split
                        parts = dict(DK=f32, DV=f32) if split else {}
                        # (batch, head) pairs interleave in the launch order where the deterministic mode has no
                        # mask (plan_bwd.head_interleave)
                        interleave = 1 if varlen else head_interleave(False, (left, right), det, pairs=2)
                        yield (f"gluon_bwd_ws{name} d{d} win{left},{right}", gluon_bwd._bwd_ws_kernel,
                               {**ints, **floats, **tensors, **parts},
                               dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=st, DET=det, REVERSE=rev,
                                    VARLEN=varlen, DQ_SMEM=gluon_bwd.dq_layouts(bm, d)[0],
                                    INTERLEAVE=interleave, CONSUMER_REGS=gluon_bwd.WS_BWD_REGS[1], **flags), 4,
                               gluon_bwd.WS_BWD_REGS[0])


def compile_gluon(fn, args: dict, constexprs: dict, num_warps: int, maxnreg):
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type
    sig = {}
    for name in fn.arg_names:
        if name in constexprs or name == "num_warps":
            sig[name] = "constexpr"
        elif isinstance(args[name], float):
            sig[name] = "fp32"
        elif isinstance(args[name], int):
            sig[name] = "i32"
        else:
            sig[name] = mangle_type(args[name])
    consts = {**constexprs, "num_warps": num_warps}
    options = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(GluonASTSource(fn, sig, constexprs=consts), target=TARGET, options=options)


def loop_lines(sass: str, top: int = 8) -> list[str]:
    """One line per innermost MMA loop (mma_loops): address, instructions and spills (both sides of an if), the
    `top` most frequent opcodes, one step's pipe cycles a warp (pipe_cycles: cheapest-dearest path) and the order
    of its MMAs, waits and exponentials (mma_order)."""
    lines = []
    for loop in mma_loops(sass):
        parts = [f"{loop['instructions']} instructions, {loop['spills']} spills",
                 ", ".join(f"{op} {n}" for op, n in list(loop["ops"].items())[:top]),
                 "cycles a warp: " + " / ".join(f"{pipe} {a}" + (f"-{b}" if b != a else "")
                                                for pipe, (a, b) in loop["cycles"].items()),
                 "order: " + loop["order"]]
        lines.append(f"  loop 0x{loop['start']:x}: " + "; ".join(p for p in parts if p))
    return lines


def _gluon_share(job: int, jobs: int, dump: str, loops: bool = False, only: str = "") -> list[tuple[int, str]]:
    """Compile every jobs-th Gluon variant from the job-th (those whose name contains `only`): (variant index, its
    report line, and with `loops` one line per innermost MMA loop)."""
    lines = []
    for i, (name, fn, args, consts, warps, maxnreg) in enumerate(gluon_variants()):
        if i % jobs != job or only not in name:
            continue
        compiled = compile_gluon(fn, args, consts, warps, maxnreg)
        sass = sass_of(compiled)
        line = f"{name} w{warps}: {resource_usage(compiled, sass)}"
        if loops:
            line = "\n".join([line] + loop_lines(sass))
        lines.append((i, line))
        if dump:
            os.makedirs(dump, exist_ok=True)
            with open(os.path.join(dump, name.replace(" ", "_") + ".ptx"), "w") as f:
                f.write(compiled.asm["ptx"])
    return lines


def main_gluon(dump: str, jobs: int, loops: bool = False, only: str = "") -> None:
    from attention.gluon import GLUON_COMPILES, triton_minor
    if triton_minor() not in GLUON_COMPILES:
        raise SystemExit(f"error: the Gluon kernels compile with triton {' / '.join(GLUON_COMPILES)}, "
                         f"not {triton.__version__}")
    if jobs == 1:
        shares = [_gluon_share(0, 1, dump, loops, only)]
    else:  # forked workers, each compiling its share; the report keeps the variants' order
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            shares = pool.starmap(_gluon_share, [(job, jobs, dump, loops, only) for job in range(jobs)])
    for _, line in sorted(line for share in shares for line in share):
        print(line, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gluon", action="store_true", help="compile the Gluon kernels (attention/gluon/) instead")
    ap.add_argument("--kernel", choices=["fwd", "dkdv", "dkdv_atomic", "dq"], default="dkdv")
    ap.add_argument("--causal", type=int, default=0)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--tma", type=int, default=None, help="TMA loads; default as shipped (the atomic kernel: off)")
    ap.add_argument("--dump", default="", help="write the TTGIR and PTX of each variant here")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="processes compiling the Gluon variants (default: the CPUs, at most 4)")
    ap.add_argument("--loops", action="store_true",
                    help="after each variant, its innermost MMA loops: instructions, spills, opcode counts, one "
                         "step's issue / MUFU / tensor cycles and the order of its MMAs, waits and exponentials")
    ap.add_argument("--only", default="", help="only the Gluon variants whose name contains this, e.g. 'fwd d64'")
    args = ap.parse_args()
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be at least 1, got {args.jobs}")
    if args.gluon:
        main_gluon(args.dump, args.jobs, args.loops, args.only)
        return
    atomic = args.kernel == "dkdv_atomic"
    tma = (not atomic) if args.tma is None else bool(args.tma)
    fn = {"fwd": triton_fwd._fwd_kernel, "dq": triton_bwd._dq_kernel}.get(args.kernel, triton_bwd._dkdv_kernel)
    configs = {"fwd": triton_fwd.FWD_CONFIGS, "dkdv": triton_bwd.DKDV_CONFIGS,
               "dkdv_atomic": triton_bwd.DKDV_ATOMIC_CONFIGS, "dq": triton_bwd.DQ_CONFIGS}[args.kernel]
    base = dict(HEAD_DIM=args.d, BLOCK_D=args.d, IS_VARLEN=False, HAS_LEFT=False, HAS_RIGHT=bool(args.causal),
                USE_TMA=tma)
    if args.kernel.startswith("dkdv"):
        base.update(ATOMIC_DQ=atomic, TMA_REDUCE=atomic and tma)
    for cfg in configs:
        if cfg.kwargs["WARP_SPEC"] and not tma:
            continue
        consts = {**base, **cfg.kwargs}
        if args.kernel != "fwd":
            consts = {"EARLY_DP": False, **consts}  # the kernels' default where a config leaves it out
        compiled = compile_kernel(fn, _kernel_args(args.n, 16, args.d, atomic), consts, cfg.num_warps, cfg.num_stages)
        sass = sass_of(compiled)
        usage = resource_usage(compiled, sass)
        print(f"{args.kernel} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: {usage}", flush=True)
        if args.loops:
            print("\n".join(loop_lines(sass)), flush=True)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            tag = f"{args.kernel}_{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}_w{cfg.num_warps}s{cfg.num_stages}"
            for ext in ("ttgir", "ptx"):
                with open(os.path.join(args.dump, f"{tag}.{ext}"), "w") as f:
                    f.write(compiled.asm[ext])


if __name__ == "__main__":
    main()
