"""Run the GPU presets through `trainer.train` (the path users take, not bench_train's own loop) and tabulate what
each run logged: tok/s, MFU and peak GiB per variant, each a fresh process with a time limit.

    python scripts/check_trainer_gpu.py --out outputs/trainer_gpu --steps 8 --variants 220m 220m_param_bf16
    python scripts/check_trainer_gpu.py --list

Speed is the median of the logged intervals after the first (which holds torch.compile and the autotuners). Peak
GiB is the largest `peak_mem_gib` logged (max_memory_allocated since the loop started). Writes trainer_gpu.json and
trainer_gpu.md under --out, rewritten after every variant so a cut-off call keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# one sequence per step with no document boundaries: the layout bench_train times (random tokens, one causal row)
BENCH_LIKE = ["data.cross_doc_attention=true"]
VARIANTS = {
    "220m": ["experiment=gpu_220m_64k", *BENCH_LIKE],
    "220m_param_bf16": ["experiment=gpu_220m_64k", "train.param_dtype=bf16", *BENCH_LIKE],
    "220m_param_bf16_plain": ["experiment=gpu_220m_64k", "train.param_dtype=bf16", "optim.compensated=false",
                              *BENCH_LIKE],
    "220m_fp32_residual": ["experiment=gpu_220m_64k", "model.fp32_residual=true", *BENCH_LIKE],
    "220m_eager": ["experiment=gpu_220m_64k", "model.compile=false", *BENCH_LIKE],
    "220m_sdpa_bf16": ["experiment=gpu_220m_64k", "attention.backend=sdpa", "train.param_dtype=bf16", *BENCH_LIKE],
    "220m_packed_docs": ["experiment=gpu_220m_64k"],  # the preset as shipped: stdlib files, one document each
    "1b": ["experiment=gpu_1b_128k", *BENCH_LIKE],
    "1b_param_bf16": ["experiment=gpu_1b_128k", "train.param_dtype=bf16", *BENCH_LIKE],
    "220m_1m": ["experiment=gpu_220m_1m", *BENCH_LIKE],
}


def run_variant(name: str, overrides: list[str], steps: int, log_every: int, work: Path, timeout: float) -> dict:
    out_dir = work / name
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "trainer.train", *overrides, f"train.steps={steps}", f"train.log_every={log_every}",
           "train.eval_every=0", "train.eval_batches=1", "train.ckpt_every=0", "train.resume=none",
           f"train.out_dir={out_dir}", f"run_name=check_{name}"]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        rc, tail = "timeout", out[-3000:]
    records = []
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    timed = [r for r in records if "tokens_per_s" in r][1:]
    saved = sorted(p.name for p in (out_dir / "checkpoints").glob("step_*"))  # glob of a missing dir: none
    row = {"variant": name, "overrides": overrides, "rc": rc, "wall_s": round(time.time() - t0, 1),
           "records": records, "checkpoints": saved,
           "tok_s": statistics.median(r["tokens_per_s"] for r in timed) if timed else None,
           "mfu": statistics.median(r["mfu"] for r in timed) if timed else None,
           "peak_gib": max((r.get("peak_mem_gib", 0.0) for r in records), default=None),
           "val_loss": next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)}
    if rc != 0:
        row["tail"] = tail
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # 2-17 GB each; only their names are kept
    return row


def write_table(rows: list[dict], out: Path, meta: dict) -> None:
    (out / "trainer_gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"trainer.train on {meta['gpu']}, torch {meta['torch']}, {meta['date']}; {meta['steps']} steps, "
             f"log every {meta['log_every']}; tok/s and MFU: median of the logged intervals after the first.", "",
             "| variant | overrides | rc | tok/s | MFU | peak GiB | final val loss | checkpoint |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tok = f"{r['tok_s'] / 1e3:.1f}K" if r["tok_s"] else "–"
        mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] else "–"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] else "–"
        val = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "–"
        lines.append(f"| {r['variant']} | `{' '.join(r['overrides'])}` | {r['rc']} | {tok} | {mfu} | {peak} | {val} | "
                     f"{', '.join(r['checkpoints']) or '–'} |")
    (out / "trainer_gpu.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["220m", "220m_param_bf16"], choices=sorted(VARIANTS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--log-every", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per variant")
    p.add_argument("--out", default="outputs/trainer_gpu")
    p.add_argument("--work", default="/tmp/ringflash_trainer_gpu", help="run directories (checkpoints are deleted)")
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every variant (e.g. a CPU smoke)")
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    if args.list:
        for name, ov in VARIANTS.items():
            print(f"{name:20s} {' '.join(ov)}")
        return
    import torch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps, "log_every": args.log_every,
            "host": os.uname().nodename}
    rows = []
    for name in args.variants:
        rows.append(run_variant(name, VARIANTS[name] + args.extra, args.steps, args.log_every, Path(args.work),
                                args.timeout))
        r = rows[-1]
        print(f"{name}: rc {r['rc']}, {r['wall_s']} s, tok/s {r['tok_s']}, peak {r['peak_gib']} GiB", flush=True)
        write_table(rows, out, meta)


if __name__ == "__main__":
    main()
