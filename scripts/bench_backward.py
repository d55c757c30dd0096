"""The attention backward alone, both determinism modes, against the Triton backward and cuDNN, on one GPU.

    python scripts/bench_backward.py                    # -> docs/bench/backward_<gpu>.json
    python scripts/bench_backward.py --out /tmp/b.json
    python scripts/bench_backward.py --head-dim 64 --ws-tile 64 128 2 --out /tmp/b64.json   # a tile to try
    python scripts/bench_backward.py --gqa-split --out /tmp/split.json   # GQA groups split over programs or not
    git worktree add /tmp/base da46f0f && python scripts/bench_backward.py --against /tmp/base   # this tree's
                                                                  # Gluon backward against another checkout's
    python scripts/bench_backward.py --against DIR --against-commit 85df715 --cases 0 0 0 --rounds 5   # one case,
                                                                  # three times; DIR a copy without .git

--ws-tile runs the warp-specialized Gluon backward with (BLOCK_M, BLOCK_N, STAGES) at the head dim given, in
place of attention.gluon.bwd.WS_BWD_CONFIG's entry. --gqa-split runs SPLIT_CASES (causal GQA, D=128 and 64) with
plan_bwd.split_group forced on and off in both modes, and records where the shipped rule splits. --against DIR
imports the attention package of the checkout at DIR under another name and times its Gluon backward beside this
tree's, both modes, on the same tensors in the same process, in place of the Triton backward: the A/B of a kernel
change (errors against DIR's deterministic run; meta.against names DIR's commit, or --against-commit's where DIR is
no git checkout). --cases runs only those positions of CASES (SPLIT_CASES with --gqa-split), in the order given,
repeats included; --rounds sets the interleaved rounds (3).

Per case (bf16, D=128 or --head-dim, B*N = 65536 tokens for N <= 64K, else B = 1): cuDNN's backward (torch
SDPA, the graph retained), the Triton backward (deterministic), and the Gluon backward (attention.gluon.bwd,
sm_90 only) in its deterministic and non-deterministic modes, all from the same out / lse. The providers are timed
in 3 (--rounds) interleaved rounds of triton.testing.do_bench; each figure is the median round, TFLOPS at 2.5x the
forward's FLOPs (causal counts half). Each row also holds the relative error of both Gluon modes against the
Triton backward (dq, dk, dv) and whether two deterministic runs gave the same bits. Rows are written to the JSON as
they finish.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scripts.bench_attention import meta, visible_pairs  # noqa: E402
from scripts.provenance import source_commit  # noqa: E402

# (causal, N, heads, kv heads)
CASES = [(True, 8192, 16, 16), (True, 32768, 16, 16), (False, 8192, 16, 16), (False, 32768, 16, 16),
         (True, 131072, 16, 16), (True, 32768, 32, 8)]
# --gqa-split: (D, N, heads, kv heads)
SPLIT_CASES = [(128, 8192, 32, 8), (128, 16384, 32, 8), (128, 32768, 32, 8), (128, 131072, 8, 2), (128, 32768, 32, 4),
               (128, 131072, 8, 1), (64, 8192, 32, 8), (64, 32768, 32, 8), (64, 131072, 8, 2)]
ROUNDS = 3


def backward_flops(batch: int, n: int, heads: int, head_dim: int, causal: bool) -> float:
    """2.5x the forward's 4 * B * H * D per visible (query, key) pair, bench_attention's count (causal: N^2 / 2)."""
    return 2.5 * 4 * batch * heads * visible_pairs(n, causal, (-1, -1)) * head_dim


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _timed(fn) -> float:
    import triton
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _inputs(causal: bool, n: int, heads: int, kv_heads: int, head_dim: int):
    """B*N = 65536 tokens (B = 1 past 64K): (B, q, k, v, out, lse, dout) from the Triton forward, and cuDNN's
    backward (torch SDPA, the graph retained) on copies of q, k, v."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attention.triton.fwd import triton_attn_forward
    D, B = head_dim, max(1, 65536 // n)
    q = torch.randn(B, n, heads, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, n, kv_heads, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, n, kv_heads, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=heads != kv_heads)
    do_ = torch.randn_like(o)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, lse = triton_attn_forward(qd, kd, vd, causal, D ** -0.5, (-1, -1))
    cudnn = lambda: torch.autograd.grad(o, (q, k, v), do_, retain_graph=True)  # noqa: E731
    return B, qd, kd, vd, out, lse, torch.randn_like(out), cudnn


def time_rounds(row: dict, fns: dict, flops: float, rounds: int = ROUNDS) -> dict:
    """Time fns in `rounds` interleaved rounds; row[name] = TFLOPS of the median round."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    for name, ts in times.items():
        row[name] = round(flops / sorted(ts)[len(ts) // 2] * 1e-9, 1)
    return row


def load_checkout(path: Path, name: str = "attention_against", module: str = "gluon.bwd"):
    """The attention package of the checkout at path, imported as `name` (its modules import one another
    relatively, so they resolve inside it): (the package, its `module`: gluon.bwd, or gluon.fwd for
    bench_forward)."""
    import importlib
    import importlib.util
    init = Path(path) / "attention" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"error: --against takes a checkout with an attention/ package, got {path}")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package, importlib.import_module(f"{name}.{module}")


def add_ab_options(ap: argparse.ArgumentParser, kernel: str, cases_name: str = "CASES") -> None:
    """--against, --against-commit, --cases and --rounds, as bench_backward and bench_forward take them."""
    ap.add_argument("--against", type=Path, metavar="DIR",
                    help=f"another checkout (e.g. a git worktree): its Gluon {kernel} beside this tree's")
    ap.add_argument("--against-commit", metavar="SHA", help="DIR's commit, where DIR is no git checkout")
    ap.add_argument("--cases", type=int, nargs="+", metavar="I",
                    help=f"only these positions of {cases_name}, repeats included")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help=f"interleaved timing rounds ({ROUNDS})")


def check_ab_options(args, cases: list, cases_name: str, module: str):
    """One line of error for a lone --against-commit, --cases outside `cases` or --rounds below 1; then the other
    checkout's `module` (load_checkout), or None without --against."""
    if args.against_commit is not None and args.against is None:
        raise SystemExit("error: --against-commit names the commit of --against DIR; give --against too")
    bad = [i for i in args.cases or () if not 0 <= i < len(cases)]
    if bad:
        raise SystemExit(f"error: --cases takes positions 0-{len(cases) - 1} of {cases_name}, got {bad}")
    if args.rounds < 1:
        raise SystemExit(f"error: --rounds takes a count of at least 1, got {args.rounds}")
    return None if args.against is None else load_checkout(args.against, module=module)[1]


def against_meta(args) -> dict:
    """meta.against of an A/B run: DIR and its commit (from its git, else --against-commit)."""
    return dict(path=str(args.against), commit=source_commit(args.against) or args.against_commit)


def bench_case(causal: bool, n: int, heads: int, kv_heads: int, head_dim: int = 128, against=None,
               rounds: int = ROUNDS) -> dict:
    """One case; against: another checkout's gluon.bwd module (load_checkout), timed in place of Triton."""
    from attention.gluon.bwd import gluon_attn_backward
    from attention.triton.bwd import triton_attn_backward

    D = head_dim
    B, q, k, v, out, lse, dout, cudnn = _inputs(causal, n, heads, kv_heads, D)
    run = lambda fn, det: lambda: fn(dout, q, k, v, out, lse, causal, D ** -0.5, (-1, -1), None, det)  # noqa: E731
    head = dict(causal=causal, N=n, B=B, H=heads, Hkv=kv_heads, D=D)
    flops = backward_flops(B, n, heads, D, causal)
    if against is not None:  # cuDNN, the other checkout's Gluon backward and this tree's, both modes
        fns = {"cudnn": cudnn, "against_det": run(against.gluon_attn_backward, True),
               "det": run(gluon_attn_backward, True), "against_nondet": run(against.gluon_attn_backward, False),
               "nondet": run(gluon_attn_backward, False)}
        row = _modes_row(head, fns, "against_det", "det", "nondet", "against", flops, rounds)
        for mode in ("det", "nondet"):
            row[f"{mode}/against"] = round(row[mode] / row[f"against_{mode}"], 3)
            row[f"{mode}/cudnn"] = round(row[mode] / row["cudnn"], 3)
        return row
    fns = {"cudnn": cudnn, "triton": run(triton_attn_backward, True), "gluon_det": run(gluon_attn_backward, True),
           "gluon_nondet": run(gluon_attn_backward, False)}
    row = _modes_row(head, fns, "triton", "gluon_det", "gluon_nondet", "triton", flops, rounds)
    row["det/cudnn"] = round(row["gluon_det"] / row["cudnn"], 3)
    row["nondet/cudnn"] = round(row["gluon_nondet"] / row["cudnn"], 3)
    row["det/triton"] = round(row["gluon_det"] / row["triton"], 3)
    return row


def _modes_row(head: dict, fns: dict, ref: str, det: str, nondet: str, label: str, flops: float,
               rounds: int = ROUNDS) -> dict:
    """head plus the relative errors (dq, dk, dv) of the fns[det] and fns[nondet] runs against fns[ref]'s
    (err_det_vs_<label>, err_nondet_vs_<label>), whether two fns[det] runs give the same bits, and the timings."""
    want = fns[ref]()
    got, again, loose = fns[det](), fns[det](), fns[nondet]()
    row = dict(head, **{f"err_det_vs_{label}": [round(rel(a, b), 6) for a, b in zip(got, want)],
                        f"err_nondet_vs_{label}": [round(rel(a, b), 6) for a, b in zip(loose, want)]},
               det_repeats_bitwise=all(torch.equal(a, b) for a, b in zip(got, again)))
    del want, got, again, loose
    return time_rounds(row, fns, flops, rounds)


def bench_split_case(head_dim: int, n: int, heads: int, kv_heads: int, rounds: int = ROUNDS) -> dict:
    """Causal GQA: the Gluon backward in both modes with the group split over programs and not
    (plan_bwd.split_group forced either way), against cuDNN and the Triton backward; errors of the split runs
    against the unsplit deterministic one, and whether two split deterministic runs gave the same bits."""
    from attention.gluon import bwd
    from attention.triton.bwd import triton_attn_backward

    D, sc, rule = head_dim, head_dim ** -0.5, bwd.split_group
    B, qd, kd, vd, out, lse, dout, cudnn = _inputs(True, n, heads, kv_heads, D)

    def gluon(deterministic: bool, split: bool):
        def run():
            bwd.split_group = lambda *args: split
            try:
                return bwd.gluon_attn_backward(dout, qd, kd, vd, out, lse, True, sc, (-1, -1), None, deterministic)
            finally:
                bwd.split_group = rule
        return run

    fns = {"cudnn": cudnn,
           "triton": lambda: triton_attn_backward(dout, qd, kd, vd, out, lse, True, sc, (-1, -1), None, True),
           "det": gluon(True, False), "det_split": gluon(True, True),
           "nondet": gluon(False, False), "nondet_split": gluon(False, True)}
    ref = fns["det"]()
    row = dict(causal=True, N=n, B=B, H=heads, Hkv=kv_heads, D=D,
               rule_splits={mode: rule(heads // kv_heads, n, D, bwd.l2_bytes(qd.device), mode == "det")
                            for mode in ("det", "nondet")},
               err_vs_det={name: [round(rel(a, b), 5) for a, b in zip(fns[name](), ref)]
                           for name in ("det_split", "nondet_split")},
               det_split_repeats_bitwise=all(torch.equal(a, b) for a, b in zip(fns["det_split"](),
                                                                                fns["det_split"]())))
    del ref
    return time_rounds(row, fns, backward_flops(B, n, heads, D, True), rounds)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (default docs/bench/backward_<gpu>.json)")
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    ap.add_argument("--ws-tile", type=int, nargs=3, metavar=("BLOCK_M", "BLOCK_N", "STAGES"),
                    help="the warp-specialized Gluon backward's tile at --head-dim, in place of WS_BWD_CONFIG's")
    ap.add_argument("--gqa-split", action="store_true",
                    help="GQA groups split over programs against not (SPLIT_CASES; --head-dim is ignored)")
    add_ab_options(ap, "backward", "CASES (SPLIT_CASES with --gqa-split)")
    args = ap.parse_args(argv)
    if args.against is not None and args.gqa_split:
        raise SystemExit("error: --against times the dense CASES; it does not combine with --gqa-split")
    cases = SPLIT_CASES if args.gqa_split else CASES
    against = check_ab_options(args, cases, "SPLIT_CASES" if args.gqa_split else "CASES", "gluon.bwd")
    if args.ws_tile is not None and (args.ws_tile[0] not in (64, 128) or args.ws_tile[1] != 128
                                     or not 1 <= args.ws_tile[2] <= 4):
        raise SystemExit(f"error: --ws-tile takes BLOCK_M 64 or 128, BLOCK_N 128 and 1-4 STAGES, got {args.ws_tile}")
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_backward.py needs a CUDA GPU (cuDNN and the Gluon kernels)")
    from attention.gluon import hopper_ready
    ready, why = hopper_ready(torch.device("cuda"))
    if not ready:
        raise SystemExit(f"error: the Gluon kernels cannot run here: {why}")
    if args.ws_tile is not None:
        from attention.gluon import bwd
        bwd.WS_BWD_CONFIG[args.head_dim] = tuple(args.ws_tile)
    info = dict(meta(), ws_tile=args.ws_tile, rounds=args.rounds)
    if against is not None:
        info["against"] = against_meta(args)
    name = "backward_gqa_split" if args.gqa_split else "backward_against" if against else "backward"
    out = Path(args.out or f"docs/bench/{name}_{info['gpu'].split()[-1].lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in [cases[i] for i in args.cases] if args.cases else cases:
        rows.append(bench_split_case(*case, rounds=args.rounds) if args.gqa_split else
                    bench_case(*case, head_dim=args.head_dim, against=against, rounds=args.rounds))
        print(json.dumps(rows[-1]), flush=True)
        out.write_text(json.dumps(dict(meta=info, rows=rows), indent=1))  # after every row: a cut run keeps them
        torch.cuda.empty_cache()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
