"""FP8 attention forward: accuracy (RMSE vs fp64) and speed (TFLOPS vs our bf16 kernel and cuDNN), one run.

    python scripts/bench_fp8.py                      # GPU: accuracy (kernel) + speed -> docs/bench/fp8_<gpu>.{json,md}
    python scripts/bench_fp8.py --accuracy-only      # also on CPU: the fp32 emulation of the kernel
    python scripts/bench_fp8.py --sweep              # GPU: fp8 kernel tiles / TMA at N=8K (for tuning)
    python scripts/bench_fp8.py --gluon-sweep        # GPU: the Gluon fp8 forward's tiles and stages at N=8K
    python scripts/bench_fp8.py --speed-only --head-dim 64

Accuracy: inputs N(0,1) ("gaussian"), FA3's setup (0.1% of entries from N(0,10^2), "sparse"), and outlier
channels shared by q and k ("channels xS": channels 3, 17, 40 scaled by S). Each is quantized per tensor /
per head / per block, with and without the Hadamard rotation; RMSE of out against fp64 attention, with bf16
attention as the yardstick. Speed: B*N = 65536 tokens, 16 heads, D=128 (--head-dim), bf16 inputs; TFLOPS
count 4*B*H*N^2*D (halved for causal); medians of triton.testing.do_bench. fp8_kernel (Triton) and fp8_gluon
(the Gluon Hopper forward) time the kernel on pre-quantized inputs (as FA3 reports), fp8_e2e the whole
flash_attn_func(fp8=True) path with the fused quantization (backend auto: Gluon on sm_90), fp8_quant the
quantization alone (ms); bf16_triton / bf16_gluon our bf16 forwards, sdpa_* PyTorch's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from attention import attn_forward, reference_attn_forward  # noqa: E402
from attention.fp8 import Fp8Config, emulate_fp8_attention, fp8_attn_forward, quantize_qkv  # noqa: E402

TOKENS, HEADS = 65536, 16
CHANNELS = [3, 17, 40]


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"


# -- accuracy ------------------------------------------------------------------------------------------------


def make_inputs(kind: str, B, n, H, d, device, seed=0):
    """q, k, v fp32 (B, N, H, D) for one accuracy setup."""
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, n, H, d, device=device, generator=g) for _ in range(3))
    if kind == "sparse":  # FA3: 0.1% of the entries drawn from N(0, 10^2)
        pick = lambda x: torch.where(torch.rand(x.shape, device=device, generator=g) < 1e-3,  # noqa: E731
                                     torch.randn(x.shape, device=device, generator=g) * 10, x)
        q, k, v = pick(q), pick(k), pick(v)
    elif kind.startswith("channels"):
        factor = float(kind.split("x")[1])
        q[..., CHANNELS] *= factor
        k[..., CHANNELS] *= factor
    return q, k, v


def accuracy(args, device) -> list[dict]:
    on_gpu = device.type == "cuda"
    rows = []
    kinds = ["gaussian", "sparse", "channels x10", "channels x30", "channels x100"]
    for kind in kinds:
        for causal in (False, True):
            q, k, v = make_inputs(kind, 1, args.acc_n, args.acc_heads, args.head_dim, device)
            ref, _ = reference_attn_forward(q.double(), k.double(), v.double(), causal)
            rmse = lambda out: (out.double() - ref).pow(2).mean().sqrt().item()  # noqa: E731
            base = dict(inputs=kind, causal=causal, N=args.acc_n, H=args.acc_heads, D=args.head_dim)
            bf16, _ = reference_attn_forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal)
            rows.append({**base, "variant": "bf16", "impl": "reference", "rmse": rmse(bf16)})
            for gran in ("tensor", "head", "block"):
                for rot in (False, True):
                    cfg = Fp8Config(granularity=gran, rotate=rot)
                    row = {**base, "variant": f"fp8 {gran}{' +rot' if rot else ''}"}
                    try:
                        if on_gpu:
                            out, _ = fp8_attn_forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal,
                                                      config=cfg, backend="triton")
                            row.update(impl="kernel", rmse=rmse(out))
                        else:
                            out, _ = emulate_fp8_attention(quantize_qkv(q, k, v, cfg), causal)
                            row.update(impl="emulation", rmse=rmse(out))
                    except Exception as e:  # one failing variant must not lose the others
                        row.update(impl="error", error=_short(e))
                        print(f"  accuracy {kind} {row['variant']}: {row['error']}", flush=True)
                    rows.append(row)
            print(f"  accuracy: {kind} causal={causal} done", flush=True)
    return rows


def accuracy_table(rows) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| inputs | causal | " + " | ".join(variants) + " | per-tensor / block+rot |",
             "|---" * (len(variants) + 3) + "|"]
    for key in dict.fromkeys((r["inputs"], r["causal"]) for r in rows):
        got = {r["variant"]: r.get("rmse") for r in rows if (r["inputs"], r["causal"]) == key}
        cells = [f"{got[v]:.2e}" if got.get(v) is not None else "err" for v in variants]
        t, b = got.get("fp8 tensor"), got.get("fp8 block +rot")
        ratio = f"{t / b:.2f}x" if t and b else "-"
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {ratio} |")
    impl = {r["impl"] for r in rows if r["variant"].startswith("fp8")} - {"error"}
    return "\n".join(lines) + f"\n\nRMSE of out vs fp64 attention; fp8 via the {'/'.join(sorted(impl))}."


# -- speed ---------------------------------------------------------------------------------------------------


def _bench_ms(fn):
    import triton
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _calls(q, k, v, causal):
    """provider -> zero-argument callable, built lazily so that one failing provider skips only itself."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    scale = q.shape[-1] ** -0.5

    def fp8_kernel():
        from attention.fp8.kernel import triton_fp8_forward, triton_quantize_qkv
        fq = triton_quantize_qkv(q, k, v, Fp8Config())
        return lambda: triton_fp8_forward(fq, causal, scale, torch.bfloat16)

    def fp8_gluon():
        from attention.fp8.kernel import triton_quantize_qkv
        from attention.gluon.fwd import gluon_fp8_forward
        fq = triton_quantize_qkv(q, k, v, Fp8Config())
        return lambda: gluon_fp8_forward(fq, causal, scale, torch.bfloat16)

    def fp8_quant():
        from attention.fp8.kernel import triton_quantize_qkv
        return lambda: triton_quantize_qkv(q, k, v, Fp8Config())

    def sdpa(backend):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D) views

        def call():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        return call

    return {
        "fp8_kernel": fp8_kernel,
        "fp8_gluon": fp8_gluon,
        "fp8_e2e": lambda: (lambda: attn_forward(q, k, v, causal, fp8=True)),
        "fp8_quant": fp8_quant,
        "bf16_triton": lambda: (lambda: attn_forward(q, k, v, causal, backend="triton")),
        "bf16_gluon": lambda: (lambda: attn_forward(q, k, v, causal, backend="gluon")),
        "sdpa_cudnn": lambda: sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION),
    }


def speed(args) -> list[dict]:
    rows = []
    D = args.head_dim
    for n in args.seqlens:
        B = max(1, TOKENS // n)
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, n, HEADS, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for causal in (False, True):
            flops = 4.0 * B * HEADS * n * n * D / (2 if causal else 1)
            for name, make in _calls(q, k, v, causal).items():
                row = dict(provider=name, B=B, N=n, H=HEADS, D=D, causal=causal)
                try:
                    ms = _bench_ms(make())
                    row.update(status="ok", ms=ms, tflops=None if name == "fp8_quant" else flops / ms * 1e-9)
                except torch.OutOfMemoryError:
                    row.update(status="OOM")
                except Exception as e:  # a provider that cannot run here is marked, not fatal
                    row.update(status=f"error: {_short(e)}")
                finally:
                    torch.cuda.empty_cache()
                rows.append(row)
                shown = (f"{row['tflops']:.0f} TFLOPS" if row.get("tflops") else f"{row['ms']:.3f} ms") \
                    if row["status"] == "ok" else row["status"]
                print(f"  N={n:>6} causal={causal!s:5} {name:12} {shown}", flush=True)
        del q, k, v
    return rows


def speed_table(rows) -> str:
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    lines = ["| N | causal | " + " | ".join(providers) + " | fp8/bf16 | fp8/cuDNN | gluon fp8/cuDNN |",
             "|---" * (len(providers) + 5) + "|"]
    for key in dict.fromkeys((r["N"], r["causal"]) for r in rows):
        got = {r["provider"]: r for r in rows if (r["N"], r["causal"]) == key}
        cells = []
        for p in providers:
            r = got.get(p, {})
            if r.get("status") != "ok":  # the full message is in the log and the JSON
                cells.append("err" if str(r.get("status", "")).startswith("error") else r.get("status", "-"))
            else:
                cells.append(f"{r['ms']:.2f} ms" if r["tflops"] is None else f"{r['tflops']:.0f}")
        tf = {p: got[p].get("tflops") for p in got if got[p].get("status") == "ok"}
        ratio = lambda a, b: f"{tf[a] / tf[b]:.2f}x" if tf.get(a) and tf.get(b) else "-"  # noqa: E731
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells)
                     + f" | {ratio('fp8_kernel', 'bf16_triton')} | {ratio('fp8_kernel', 'sdpa_cudnn')}"
                     + f" | {ratio('fp8_gluon', 'sdpa_cudnn')} |")
    return "\n".join(lines) + "\n\nTFLOPS (fp8_quant: ms); fp8/bf16 and fp8/cuDNN use fp8_kernel (Triton)."


# -- kernel sweep (tuning aid) -------------------------------------------------------------------------------


def sweep(args) -> list[dict]:
    """Each fp8 config and TMA on/off at N=8K, bypassing the autotuner."""
    from attention.fp8 import kernel as triton_fp8
    rows = []
    n, D = 8192, args.head_dim
    B = TOKENS // n
    q, k, v = (torch.randn(B, n, HEADS, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fq = triton_fp8.triton_quantize_qkv(q, k, v, Fp8Config())
    for causal in (False, True):
        flops = 4.0 * B * HEADS * n * n * D / (2 if causal else 1)
        for cfg in triton_fp8.FP8_CONFIGS:
            for tma in (True, False):
                row = dict(N=n, causal=causal, tma=tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                           **cfg.kwargs)
                try:
                    ms = _bench_ms(lambda: triton_fp8.launch_config(fq, causal, D ** -0.5, cfg, tma))
                    row.update(status="ok", ms=ms, tflops=flops / ms * 1e-9)
                except Exception as e:
                    row.update(status=f"error: {_short(e)}")
                rows.append(row)
                print(f"  causal={causal!s:5} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages} tma={tma!s:5} "
                      + (f"{row['tflops']:.0f} TFLOPS" if row["status"] == "ok" else row["status"]), flush=True)
    return rows


# (BLOCK_M, BLOCK_N, STAGES) the Gluon sweep tries at each head dim; each compiles for sm_90a without spills
GLUON_SWEEP = {64: [(128, 128, 2), (128, 128, 3), (128, 128, 4), (192, 64, 4), (128, 64, 4)],
               128: [(128, 128, 2), (128, 128, 3), (128, 128, 4), (128, 64, 4)]}


def gluon_sweep(args) -> list[dict]:
    """The Gluon fp8 forward at each GLUON_SWEEP config at N=8K (and its error against the shipped config's)."""
    from attention.fp8.kernel import triton_quantize_qkv
    from attention.gluon import fwd
    rows = []
    n, D = 8192, args.head_dim
    B = TOKENS // n
    q, k, v = (torch.randn(B, n, HEADS, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fq = triton_quantize_qkv(q, k, v, Fp8Config())
    shipped = fwd.FWD_FP8_CONFIG[D]
    try:
        for causal in (False, True):
            flops = 4.0 * B * HEADS * n * n * D / (2 if causal else 1)
            want = fwd.gluon_fp8_forward(fq, causal, D ** -0.5)[0].float()
            for cfg in GLUON_SWEEP[D]:
                fwd.FWD_FP8_CONFIG[D] = cfg
                row = dict(N=n, D=D, causal=causal, block_m=cfg[0], block_n=cfg[1], stages=cfg[2],
                           shipped=cfg == shipped)
                try:
                    got = fwd.gluon_fp8_forward(fq, causal, D ** -0.5)[0].float()
                    row["err_vs_shipped"] = ((got - want).norm() / want.norm()).item()
                    ms = _bench_ms(lambda: fwd.gluon_fp8_forward(fq, causal, D ** -0.5))
                    row.update(status="ok", ms=ms, tflops=flops / ms * 1e-9)
                except Exception as e:
                    row.update(status=f"error: {_short(e)}")
                rows.append(row)
                print(f"  gluon fp8 D={D} causal={causal!s:5} {cfg} "
                      + (f"{row['tflops']:.0f} TFLOPS, err {row['err_vs_shipped']:.1e}" if row["status"] == "ok"
                         else row["status"]), flush=True)
    finally:
        fwd.FWD_FP8_CONFIG[D] = shipped
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/bench", help="directory for fp8_<device>.json / .md")
    ap.add_argument("--accuracy-only", action="store_true")
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="fp8 kernel configs at N=8K instead of the tables")
    ap.add_argument("--gluon-sweep", action="store_true", help="Gluon fp8 forward configs at N=8K instead")
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--acc-n", type=int, default=None, help="accuracy sequence length (GPU 4096, CPU 1024)")
    ap.add_argument("--acc-heads", type=int, default=None, help="accuracy heads (GPU 16, CPU 4)")
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    args.acc_n = args.acc_n or (4096 if on_gpu else 1024)
    args.acc_heads = args.acc_heads or (16 if on_gpu else 4)
    machine = torch.cuda.get_device_name() if on_gpu else "cpu"
    report = dict(machine=machine, date=datetime.datetime.now().isoformat(timespec="seconds"),
                  torch=torch.__version__)
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        pass
    md = [f"# FP8 attention forward — {machine}, {report['date'][:10]}"]
    if args.gluon_sweep:
        report["gluon_sweep"] = gluon_sweep(args)
    elif args.sweep:
        report["sweep"] = sweep(args)
    else:
        if not args.speed_only:
            report["accuracy"] = accuracy(args, device)
            md += ["", "## Accuracy", "", accuracy_table(report["accuracy"])]
        if not args.accuracy_only:
            if not on_gpu:
                print("speed needs CUDA: skipped (use --accuracy-only on CPU)")
            else:
                report["speed"] = speed(args)
                md += ["", "## Speed (forward)", "", speed_table(report["speed"])]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "fp8_" + "".join(c if c.isalnum() else "_" for c in machine.lower()))
    stem += f"_d{args.head_dim}" if args.head_dim != 128 else ""
    stem += "_gluon_sweep" if args.gluon_sweep else "_sweep" if args.sweep else ""
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
