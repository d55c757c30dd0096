"""One optimizer step of llama_220m's parameters, alone: the trainer's choices for `train.param_dtype` and
`optim.compensated`, timed in one process on the same weights.

    python scripts/bench_optim.py --out docs/bench/optim_h100      # GPU: table + optim.json
    python scripts/bench_optim.py --device cpu --steps 2            # CPU smoke (eager paths only)

Rows: torch's fused AdamW on fp32 weights (the default) and on bf16 weights (optim.compensated=false); our
CompensatedAdamW with its multi-tensor Triton kernel (the CUDA default for param_dtype=bf16) and with the compiled
per-tensor torch update it falls back to. Each step gets fresh gradients (zero_grad(set_to_none=True), as the
trainer). Columns: GPU time per step (CUDA events around the step) and host time per step (wall clock of the
step call, which returns before the GPU is done), medians over --steps after --warmup.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trainer.optim as optim  # noqa: E402
from trainer.model import GPT, ModelConfig  # noqa: E402

LLAMA_220M = dict(vocab_size=32000, dim=1024, n_layers=12, n_heads=8, n_kv_heads=8, head_dim=128, ffn_dim=2816)


def make_optimizer(kind: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = params[0].is_cuda
    if kind.startswith("torch"):
        return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=fused)
    return optim.CompensatedAdamW(groups, lr=3e-4, betas=(0.9, 0.95))


def time_steps(kind: str, model_cfg: dict, device: torch.device, warmup: int, steps: int) -> dict:
    dtype = torch.float32 if kind == "torch_fp32" else torch.bfloat16
    torch.manual_seed(0)
    model = GPT(ModelConfig(**model_cfg)).to(device=device, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(kind, params)
    grads = [torch.randn_like(p) * 1e-3 for p in params]  # copied in each step: new gradient tensors, as training
    host, gpu = [], []
    for i in range(warmup + steps):
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
        if i >= warmup:
            host.append(1e3 * (t1 - t0))
            gpu.append(start.elapsed_time(end) if device.type == "cuda" else host[-1])
    n = sum(p.numel() for p in params)
    return {"optimizer": kind, "tensors": len(params), "params_m": round(n / 1e6, 1),
            "host_ms": round(statistics.median(host), 3), "gpu_ms": round(statistics.median(gpu), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 256-wide model (CPU smoke)")
    p.add_argument("--out", default="outputs/bench_optim")
    args = p.parse_args()
    device = torch.device(args.device)
    model_cfg = dict(LLAMA_220M, dim=256, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=512) if args.tiny else LLAMA_220M
    kinds = ["torch_fp32", "torch_bf16", "compensated_kernel", "compensated_compiled"]
    if device.type != "cuda":
        kinds = ["torch_fp32", "torch_bf16", "compensated_eager"]
    rows = []
    for kind in kinds:
        real = optim.kernel_applies
        if kind == "compensated_compiled":
            optim.kernel_applies = lambda rows: False  # the fallback: one compiled call per tensor
        try:
            rows.append(time_steps(kind, model_cfg, device, args.warmup, args.steps))
        finally:
            optim.kernel_applies = real
        print(rows[-1], flush=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "warmup": args.warmup, "steps": args.steps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "optim.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"One optimizer step, {rows[0]['params_m']}M parameters in {rows[0]['tensors']} tensors; "
             f"{meta['device']}, torch {meta['torch']}, {meta['date']}; medians of {args.steps} steps.", "",
             "| optimizer | GPU ms / step | host ms / step |", "|---|---|---|"]
    lines += [f"| {r['optimizer']} | {r['gpu_ms']:.2f} | {r['host_ms']:.2f} |" for r in rows]
    (out / "optim.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
