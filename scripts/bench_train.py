"""Long-context training on one GPU: ringflash vs Hugging Face LlamaForCausalLM (SDPA, +/- Liger kernels).

    python scripts/bench_train.py --out docs/bench/train_h100                  # grid: 2 models x 4 lengths
    python scripts/bench_train.py --out /tmp/b --quick                          # 220M at 32K/64K, short timing
    python scripts/bench_train.py --out docs/bench/train_h100 --max-context     # + largest context per setup
    python scripts/bench_train.py --setups ringflash ringflash:ckpt=full,compile=0 hf_liger ...
    python scripts/bench_train.py --device cpu --models tiny --lengths 256 512 --quick   # harness dry run
    python scripts/bench_train.py --models llama_220m --lengths 2097152 --setups ringflash:ckpt=full,offload=all \
        --layers 2 --warmup 0 --steps 1                                 # memory probe: does 2M fit?
    ... --warmup 0 --steps 1 --cell-timeout 540 --memory-trace DIR      # a step longer than the timeout: the
                                                                        # peak so far, sampled every 5 s

A setup is `name[:key=value,...]`: ringflash (keys ckpt, offload, mlp_chunk, compile, loss_chunk, backend, det,
loss_compile, window), hf and hf_liger (key attn: an attn_implementation, default sdpa). Every setup trains the same
shapes from random tokens, batch 1, with fused AdamW; --dtype bf16 (default) keeps parameters and AdamW states
in bf16 for every setup, --dtype amp keeps fp32 parameters under bf16 autocast. HF runs with gradient
checkpointing (non-reentrant). Each (setup, model, length) runs in its own subprocess (a crash or OOM never
poisons the next cell): warm-up steps, then the median of timed steps (CUDA events, no host sync inside a
step). MFU uses trainer/metrics.py's formula for every setup: 6 * params (no input embedding) * tokens +
causal attention FLOPs (halved), no recompute counted; peak GiB = torch.cuda.max_memory_allocated.
Results go to <out>/bench_train.json after every cell (--resume skips cells already there) and a markdown
table to <out>/bench_train.md. Imports only torch, transformers, liger_kernel and trainer.{model,loss,metrics}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.provenance import source_commit  # noqa: E402
from scripts.train_setups import (RINGFLASH, build_hf, build_ringflash, model_shape,  # noqa: E402
                          n_flop_params, parse_setup)

GRID = [32768, 65536, 131072, 262144]
DEFAULT_SETUPS = ["ringflash", "ringflash:offload=none", "hf", "hf_liger"]
# A ringflash cell that errors (not OOM) is rerun with these options, in order; the table marks it with *.
FALLBACKS = ("compile=0", "compile=0,offload=none")
MAX_CONTEXT_EXTRA = "ringflash:ckpt=full,offload=all"  # the memory-lean variant for the max-context search


# -- one cell (runs in a worker process) -------------------------------------------------------------------

def run_cell(cell: dict) -> dict:
    from trainer.metrics import causal_pairs, train_flops

    device = torch.device(cell["device"])
    dtype = torch.bfloat16 if cell["dtype"] == "bf16" else torch.float32
    shape, N = model_shape(cell["model"]), cell["seq_len"]
    if cell.get("layers"):  # a memory probe: fewer blocks, each the full size (see --layers)
        shape = {**shape, "n_layers": cell["layers"]}
    name, opts = parse_setup(cell["setup"])
    torch.manual_seed(0)
    if name == "ringflash":
        model, loss_fn = build_ringflash(shape, opts, device, dtype)
    else:
        model, loss_fn = build_hf(shape, opts, device, dtype, N, liger=name == "hf_liger")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
    tokens = torch.randint(0, shape["vocab_size"], (1, N), device=device)
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cell["dtype"] == "amp")

    def step():
        with amp:
            loss = loss_fn(tokens, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times, loss = _timed_steps(step, device, cell["warmup"], cell["steps"], cell.get("memory_trace"))
    sec = statistics.median(times)
    pairs = causal_pairs(None, 1, N, window=opts.get("window", 0))
    flops = train_flops(n_flop_params(shape), N, pairs, shape["n_layers"], shape["n_heads"], shape["head_dim"])
    result = {"status": "ok", "tokens_per_s": N / sec, "step_s": sec, "tflops": flops / sec / 1e12,
              "mfu": flops / sec / 1e12 / cell["peak_tflops"], "peak_gib": _peak_gib(device),
              "loss": float(loss), "step_times": times}
    if cell.get("profile"):
        result["profile"] = profile_step(step, device)
    return result


def _timed_steps(step, device, warmup: int, steps: int, memory_trace: str | None = None):
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)  # parameters are counted (allocated), as the peak goes
        if memory_trace:
            _start_memory_trace(memory_trace, device)
    for _ in range(warmup):
        loss = step()
    if cuda:
        torch.cuda.synchronize(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            loss = step()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])], loss.item()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    return times, loss.item()


def _start_memory_trace(path: str, device, every_s: float = 5.0) -> None:
    """Write {t, alloc_gib, peak_gib} to a JSONL file every few seconds from a daemon thread, flushed each time,
    so a step cut off by the cell timeout still tells its peak so far (read back by `launch`, which also clears
    an earlier run's file first)."""
    def sample():
        t0 = time.perf_counter()
        with open(path, "w") as f:
            while True:
                f.write(json.dumps({"t": round(time.perf_counter() - t0, 1),
                                    "alloc_gib": round(torch.cuda.memory_allocated(device) / 2**30, 3),
                                    "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}) + "\n")
                f.flush()
                time.sleep(every_s)

    threading.Thread(target=sample, daemon=True).start()


def _trace_summary(path: str) -> dict:
    """What a memory trace saw: its peak and how many seconds it covered ({} if there is none)."""
    if not path or not os.path.exists(path):
        return {}
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        return {}
    return {"traced_peak_gib": max(r["peak_gib"] for r in rows), "traced_s": rows[-1]["t"], "memory_trace": path}


def _peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def worker_main(cell_json: str, out_path: str) -> None:
    cell = json.loads(cell_json)
    try:
        result = run_cell(cell)
    except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
        error = f"{type(exc).__name__}: {str(exc)[:400]}"
        # a failed pinned-memory (host) allocation surfaces as a plain CUDA error, not OutOfMemoryError
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)
        result = {"status": "OOM" if oom else "error", "error": error}
    Path(out_path).write_text(json.dumps(result))


# kernel name substrings per group, first match wins; ringflash's own attention kernels are the Triton and Gluon
# _fwd_kernel, _fwd_ws_kernel, _bwd_ws_kernel, _dkdv_kernel, _dq_kernel and _preprocess_kernel
KERNEL_GROUPS = (("attention", ("attn", "flash", "fmha", "cudnn", "sdpa", "fwd_kernel", "ws_kernel", "dkdv_kernel",
                                "dq_kernel", "preprocess_kernel")),
                 ("matmul", ("gemm", "nvjet", "sm90", "cutlass", "matmul", "aten::mm", "aten::bmm", "addmm")),
                 ("copy", ("memcpy", "copy")), ("cross-entropy", ("cross_entropy", "log_softmax", "logsumexp")))


def kernel_group(name: str) -> str:
    """The KERNEL_GROUPS group of a kernel (or profiler event) name, "other" where none matches."""
    name = name.lower()
    return next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")


def profile_step(step, device) -> dict:
    """One more step under torch.profiler: GPU time per kernel group and the top kernels (what limits it)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"] or list(prof.key_averages())
    time_of = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    total = sum(time_of(e) for e in kernels) or 1.0
    groups: dict[str, float] = {}
    for e in kernels:
        group = kernel_group(e.key)
        groups[group] = groups.get(group, 0.0) + time_of(e) / total
    top = sorted(kernels, key=time_of, reverse=True)[:15]
    return {"share": {g: round(v, 4) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": e.key[:120], "ms": round(time_of(e) / 1e3, 3), "calls": e.count} for e in top]}


# -- orchestration -------------------------------------------------------------------------------------------

def launch(cell: dict, timeout: float, env: dict) -> dict:
    """Run one cell in a subprocess; OOM / crash / timeout become a status, never an exception."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    cmd = [sys.executable, __file__, "--worker", json.dumps(cell), "--worker-out", out_path]
    if cell.get("memory_trace"):  # a cell that fails before sampling must not report an earlier run's trace
        Path(cell["memory_trace"]).unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        text = Path(out_path).read_text() if os.path.getsize(out_path) else ""
        result = json.loads(text) if text else {
            "status": "error", "error": f"worker exited {proc.returncode}: {proc.stderr[-600:]}"}
    except subprocess.TimeoutExpired:
        result = {"status": "timeout"}
    finally:
        os.unlink(out_path)
    result.update(_trace_summary(cell.get("memory_trace")))
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


class Results:
    """All results of the run, rewritten to JSON after every cell."""

    def __init__(self, path: Path, meta: dict, resume: bool):
        self.path, self.data = path, {"meta": meta, "cells": [], "max_context": []}
        if resume and path.exists():
            old = json.loads(path.read_text())
            self.data["cells"], self.data["max_context"] = old.get("cells", []), old.get("max_context", [])

    def find(self, kind: str, **key):
        return next((r for r in self.data[kind] if all(r.get(k) == v for k, v in key.items())), None)

    def add(self, kind: str, record: dict) -> None:
        self.data[kind].append(record)
        self.path.write_text(json.dumps(self.data, indent=1))


def cell_for(args, setup: str, model: str, seq_len: int, warmup: int, steps: int, profile=False) -> dict:
    trace = None
    if getattr(args, "memory_trace", None):
        os.makedirs(args.memory_trace, exist_ok=True)
        tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{model}_{seq_len}_{setup}")
        trace = os.path.join(args.memory_trace, tag + ".jsonl")
    return {"setup": setup, "model": model, "seq_len": seq_len, "device": args.device, "dtype": args.dtype,
            "warmup": warmup, "steps": steps, "peak_tflops": args.peak_tflops, "profile": profile,
            "layers": args.layers, "memory_trace": trace}


def run_grid(args, results: Results, env: dict) -> None:
    for model in args.models:
        for setup in args.setups:
            oom = False
            for n in args.lengths:
                key = dict(setup=setup, model=model, seq_len=n)
                if results.find("cells", **key):
                    continue
                if oom:  # a longer sequence needs more memory: no need to try
                    results.add("cells", {**key, "status": "OOM", "skipped": True})
                    continue
                r = run_with_fallbacks(args, setup, model, n, env, args.warmup, args.steps, args.cell_timeout,
                                       args.profile)
                results.add("cells", {**key, **r})
                oom = r["status"] == "OOM"
                print(f"{model:>11} {setup:<40} {n:>8}: {describe(r)}", flush=True)


def run_with_fallbacks(args, setup: str, model: str, n: int, env: dict, warmup: int, steps: int,
                       timeout: float, profile: bool = False) -> dict:
    """One cell; a ringflash error (say, torch.compile or offload failing on this machine) is retried with
    FALLBACKS so the row still gets numbers, recorded with the first error."""
    r = launch(cell_for(args, setup, model, n, warmup, steps, profile), timeout, env)
    if r["status"] != "error" or not setup.startswith("ringflash"):
        return r
    first = r["error"]
    for extra in FALLBACKS:
        spec = setup + ("," if ":" in setup else ":") + extra
        r = launch(cell_for(args, spec, model, n, warmup, steps, profile), timeout, env)
        if r["status"] != "error":
            return {**r, "fallback": extra, "first_error": first}
    return {**r, "first_error": first}


def fits(args, setup, model, n, env, log) -> tuple[bool, dict]:
    r = run_with_fallbacks(args, setup, model, n, env, 0, 1, args.probe_timeout)
    log.append({"seq_len": n, **{k: r.get(k) for k in ("status", "peak_gib", "wall_s", "error")}})
    print(f"  max-context {model} {setup} {n}: {r['status']} ({r['wall_s']} s)", flush=True)
    return r["status"] == "ok", r


def search_max_context(args, setup: str, model: str, known_ok: int, env: dict) -> dict:
    """Double from max(2 * known_ok, --max-start) until a step fails, then bisect to --max-resolution; every
    probe is one full training step in a fresh process. Stops early at --max-time (then a lower bound)."""
    t0, log, ok, bad = time.perf_counter(), [], known_ok, None
    n, note = max(2 * known_ok, args.max_start), ""
    while n <= args.max_limit:
        if time.perf_counter() - t0 > args.max_time:
            note = "time cap"
            break
        good, r = fits(args, setup, model, n, env, log)
        if not good:
            bad, note = n, "" if r["status"] == "OOM" else r["status"]
            break
        ok, n = n, 2 * n
    while bad is not None and not note and bad - ok > max(args.max_resolution, ok // 16):
        if time.perf_counter() - t0 > args.max_time:
            note = "time cap"
            break
        mid = (ok + bad) // 2 // 8192 * 8192
        good, r = fits(args, setup, model, mid, env, log)
        if good:
            ok = mid
        elif r["status"] == "OOM":
            bad = mid
        else:
            note = r["status"]
    if bad is None and not note:
        note = f"--max-limit {args.max_limit}"
    return {"setup": setup, "model": model, "max_seq_len": ok, "first_fail": bad, "note": note, "probes": log}


def run_max_context(args, results: Results, env: dict) -> None:
    setups = list(dict.fromkeys(args.setups + ([MAX_CONTEXT_EXTRA] if args.max_extra else [])))
    for model in args.models:
        for setup in setups:
            if results.find("max_context", setup=setup, model=model):
                continue
            done = [r["seq_len"] for r in results.data["cells"]
                    if r.get("setup") == setup and r.get("model") == model and r.get("status") == "ok"]
            results.add("max_context", search_max_context(args, setup, model, max(done, default=0), env))


# -- reporting -----------------------------------------------------------------------------------------------

def describe(r: dict) -> str:
    if r.get("status") != "ok":
        traced = ""
        if r.get("traced_s"):  # a cut-off cell with a memory trace: the peak it had reached
            traced = f" (peak {r['traced_peak_gib']:.1f} GiB in its first {r['traced_s']:.0f} s)"
        return r.get("status", "?") + traced + (f" ({r['error'][:120]})" if r.get("error") else "")
    gib = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
    note = f" [ran with {r['fallback']}]" if r.get("fallback") else ""
    return f"{r['tokens_per_s'] / 1e3:.1f}K tok/s, MFU {100 * r['mfu']:.1f}%, {gib} GiB{note}"


def _k(n: int) -> str:
    if n % 1048576 == 0:
        return f"{n // 1048576}M"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def render(data: dict) -> str:
    meta, cells = data["meta"], data["cells"]
    probe = f"**Memory probe: every model cut to {meta['layers']} blocks.** " if meta.get("layers") else ""
    lines = [probe + f"Training step, batch 1, random tokens - {meta['gpu']}, {meta['date']}, torch {meta['torch']}, "
             f"transformers {meta['transformers']}, liger {meta['liger']}, dtype {meta['dtype']}.",
             "Cells: tok/s, MFU, peak GiB (max_memory_allocated). MFU: 6*P*T + causal attention (halved), "
             "no recompute counted, peak " + f"{meta['peak_tflops']:.0f} TFLOPS.",
             "ringflash = " + ", ".join(f"{k}={v}" for k, v in meta["ringflash_defaults"].items())
             + " (a `ringflash:key=value` row overrides those); hf = LlamaForCausalLM, SDPA, gradient "
             "checkpointing; hf_liger = hf + Liger RoPE/RMSNorm/SwiGLU/fused linear CE. Fused AdamW everywhere.", ""]
    for model in dict.fromkeys(c["model"] for c in cells):
        lengths = sorted({c["seq_len"] for c in cells if c["model"] == model})
        maxc = {m["setup"]: m for m in data["max_context"] if m["model"] == model}
        lines += [f"**{model}**", "", "| setup | " + " | ".join(_k(n) for n in lengths) + " | max context |",
                  "|---" * (len(lengths) + 2) + "|"]
        for setup in dict.fromkeys(c["setup"] for c in cells if c["model"] == model):
            row = [_cell_text(data, setup, model, n) for n in lengths]
            m = maxc.get(setup)
            mc = "–" if m is None else f"{_k(m['max_seq_len']) if m['max_seq_len'] else 'none'}" + (
                f" ({m['note']})" if m["note"] else "")
            lines.append(f"| {setup} | " + " | ".join(row) + f" | {mc} |")
        lines += _ratio_rows(data, model, lengths) + [""]
    extra = [m for m in data["max_context"] if not any(c["setup"] == m["setup"] for c in cells)]
    for m in extra:
        lines.append(f"Max context {m['model']} {m['setup']}: {_k(m['max_seq_len']) if m['max_seq_len'] else 'none'}"
                     + (f" ({m['note']})" if m["note"] else ""))
    if any(c.get("fallback") for c in cells):
        lines += ["", "\\* the setup failed as given (see first_error in the JSON) and ran with a fallback: "
                  + ", ".join(sorted({c["fallback"] for c in cells if c.get("fallback")}))]
    profiled = [c for c in cells if c.get("profile")]
    if profiled:
        lines += ["", "GPU time share of one step (torch.profiler):", ""]
    for c in profiled:
        shares = ", ".join(f"{g} {100 * v:.0f}%" for g, v in c["profile"]["share"].items())
        lines.append(f"- {c['model']} {c['setup']} {_k(c['seq_len'])}: {shares}")
    return "\n".join(lines) + "\n"


def _cell_text(data, setup, model, n) -> str:
    r = next((c for c in data["cells"] if c["setup"] == setup and c["model"] == model and c["seq_len"] == n), None)
    if r is None:
        return "–"
    if r["status"] != "ok":
        return r["status"]
    gib = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
    return f"{r['tokens_per_s'] / 1e3:.1f}K, {100 * r['mfu']:.0f}%, {gib}" + ("*" if r.get("fallback") else "")


def _ratio_rows(data, model, lengths) -> list[str]:
    """ringflash tok/s over each HF setup's, per length, for every ringflash variant."""
    ok = {(c["setup"], c["seq_len"]): c for c in data["cells"] if c["model"] == model and c["status"] == "ok"}
    setups = list(dict.fromkeys(c["setup"] for c in data["cells"] if c["model"] == model))
    rows = []
    for ours in (s for s in setups if s.startswith("ringflash")):
        for base in (s for s in setups if s.startswith("hf")):
            vals = [f"{ok[(ours, n)]['tokens_per_s'] / ok[(base, n)]['tokens_per_s']:.2f}x"
                    if (ours, n) in ok and (base, n) in ok else "–" for n in lengths]
            rows.append(f"| {ours} / {base} | " + " | ".join(vals) + " | |")
    return rows


# -- main ----------------------------------------------------------------------------------------------------

def metadata(args) -> dict:
    def version(mod):
        import importlib.metadata
        try:  # liger_kernel has no __version__; its distribution metadata has
            return getattr(__import__(mod), "__version__", None) or importlib.metadata.version(mod)
        except Exception:  # noqa: BLE001 - absent on this machine
            return "absent"

    gpu = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    return {"date": datetime.date.today().isoformat(), "commit": source_commit(), "gpu": gpu,
            "torch": torch.__version__, "triton": version("triton"), "transformers": version("transformers"),
            "liger": version("liger_kernel"),
            "dtype": args.dtype, "peak_tflops": args.peak_tflops, "setups": args.setups,
            "ringflash_defaults": RINGFLASH, "warmup": args.warmup, "steps": args.steps,
            "expandable_segments": args.expandable_segments, "layers": args.layers}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/bench/train", help="directory for bench_train.json / .md")
    p.add_argument("--models", nargs="+", default=["llama_220m", "llama_1b"])
    p.add_argument("--lengths", nargs="+", type=int, default=GRID)
    p.add_argument("--setups", nargs="+", default=DEFAULT_SETUPS)
    p.add_argument("--dtype", choices=["bf16", "amp"], default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="llama_220m at 32K/64K, 1 warm-up + 2 timed steps")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="MFU denominator (H100 SXM dense bf16)")
    p.add_argument("--cell-timeout", type=float, default=1800.0)
    p.add_argument("--resume", action="store_true", help="keep the cells already in <out>/bench_train.json")
    p.add_argument("--no-expandable-segments", dest="expandable_segments", action="store_false",
                   help="do not set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for the workers")
    p.add_argument("--profile", action="store_true", help="add a kernel-time profile of one step to each cell")
    p.add_argument("--layers", type=int, default=None,
                   help="memory probe: build every model with this many blocks (full width). With offload=all a "
                        "block's kept input lives on the CPU, so the GPU peak of a 2-block model is the full "
                        "model's, less the missing blocks' weights, grads and AdamW states (8 bytes a parameter "
                        "in bf16), at a fraction of the step time; the table says so")
    m = p.add_argument_group("max context (grow x2 until a step fails, then bisect)")
    m.add_argument("--max-context", action="store_true")
    m.add_argument("--max-start", type=int, default=131072)
    m.add_argument("--max-limit", type=int, default=8 * 1048576)
    m.add_argument("--max-resolution", type=int, default=65536)
    m.add_argument("--max-time", type=float, default=1800.0, help="seconds per (setup, model) search")
    m.add_argument("--probe-timeout", type=float, default=1800.0, help="seconds per probe step")
    m.add_argument("--no-max-extra", dest="max_extra", action="store_false",
                   help=f"do not add {MAX_CONTEXT_EXTRA} to the max-context search")
    p.add_argument("--memory-trace", metavar="DIR",
                   help="each cell samples its GPU memory every 5 s into DIR/<cell>.jsonl; a cell that times out "
                        "still reports the peak it reached (traced_peak_gib)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models = ["llama_220m"] if args.models == ["llama_220m", "llama_1b"] else args.models
        args.lengths = GRID[:2] if args.lengths == GRID else args.lengths
        args.warmup, args.steps = 1, 2
    for spec in args.setups:
        parse_setup(spec)  # a typo fails before any GPU time is spent
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.worker_out)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.expandable_segments:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    results = Results(out / "bench_train.json", metadata(args), args.resume)
    for model in args.models:
        model_shape(model)  # a missing config fails now
    run_grid(args, results, env)
    if args.max_context:
        run_max_context(args, results, env)
    table = render(results.data)
    (out / "bench_train.md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
