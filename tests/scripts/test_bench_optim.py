"""scripts/bench_optim.py on the CPU (--tiny): every optimizer row steps the same model, and the optimizer it times
has the trainer's betas and weight decay (0.9, 0.95; 0.1 on matrices), lr 3e-4."""

import json
import sys

import torch

from scripts import bench_optim


def test_tiny_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_optim.py", "--device", "cpu", "--tiny", "--warmup", "0", "--steps", "1",
                                      "--out", str(tmp_path)])
    bench_optim.main()
    rows = json.loads((tmp_path / "optim.json").read_text())["rows"]
    model = bench_optim.GPT(bench_optim.ModelConfig(**dict(bench_optim.LLAMA_220M, dim=256, n_layers=2, n_heads=2,
                                                           n_kv_heads=2, ffn_dim=512)))
    params = [p for p in model.parameters() if p.requires_grad]
    assert [r["optimizer"] for r in rows] == ["torch_fp32", "torch_bf16", "compensated_eager"]
    assert {r["tensors"] for r in rows} == {len(params)}
    assert {r["params_m"] for r in rows} == {round(sum(p.numel() for p in params) / 1e6, 1)}
    assert all(r["host_ms"] > 0 for r in rows)


def test_compensated_step_is_adamw():
    """The first AdamW step is lr * (sign + weight_decay * w): under bf16's half-step at 0.5, so it lands in the
    compensation, and weight + compensation hold it."""
    p = torch.nn.Parameter(torch.full((4, 4), 0.5, dtype=torch.bfloat16))
    opt = bench_optim.make_optimizer("compensated_eager", [p])
    p.grad = torch.ones_like(p)
    opt.step()
    held = p.float() + opt.state[p]["compensation"].float()
    assert torch.allclose(held, torch.full_like(held, 0.5 - 3e-4 * (1 + 0.1 * 0.5)), atol=1e-6)
