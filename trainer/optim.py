"""AdamW for bf16 weights that keeps the updates bf16 would round away (Kahan-compensated summation).

    opt = CompensatedAdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8)   # params, m, v, compensation: bf16
    opt.found_inf = flag      # optional 0-d tensor: 1.0 skips this step on the device, no host sync
    opt.step()

A bf16 weight of magnitude 0.02 has a resolution of 1.2e-4, so an AdamW step of lr = 6e-6 (early warmup) or 6e-5
(a cosine tail) leaves it exactly where it was. Each weight here carries a bf16 compensation term, what the last
rounding dropped, added back into the next update: the pair holds about 16 bits of mantissa, so no update is
lost, for 2 more bytes per parameter (10 in all, against 16 for fp32 masters). The forward still sees the bf16
weight, which moves in whole bf16 steps. Deterministic, so a resumed run repeats its losses exactly. Measured
against fp32 masters and plain bf16 AdamW: README, `train.param_dtype`.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from .model.fused import compiled

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # CPU test processes: the eager torch update ...
KERNEL_IN_INTERPRETER = False  # ... unless a test sets this: then the Triton kernel runs on CPU tensors there


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 x rounded to the nearest bf16 value (ties to even), still fp32. Integer arithmetic on purpose: inside a
    compiled kernel Inductor drops the precision loss of x.to(bf16).float() (it keeps the fp32 value); on an H100
    that made every compensation zero."""
    bits = x.view(torch.int32)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # -65536: keep the top 16 bits, the bf16 ones
    return bits.view(torch.float32)


def adamw_update_(p, grad, exp_avg, exp_avg_sq, comp, step, lr, keep, beta1: float, beta2: float, eps: float,
                  weight_decay: float) -> None:
    """One AdamW step of one tensor, computed in fp32 and written back to its bf16 storage. step, lr and keep are
    0-d fp32 device tensors (no recompiles as the schedule moves); keep == 0 leaves every tensor as it was."""
    go = keep > 0
    g = torch.where(go, grad.float(), 0.0)  # a skipped step's gradient may be inf / nan
    m = exp_avg.float()
    v = exp_avg_sq.float()
    m = torch.where(go, m + (1 - beta1) * (g - m), m)
    v = torch.where(go, v + (1 - beta2) * (g * g - v), v)
    n = step.clamp_min(1.0)
    m_hat = m / (1 - beta1 ** n)
    v_hat = v / (1 - beta2 ** n)
    w = p.float()
    delta = -lr * (m_hat / (v_hat.sqrt() + eps) + weight_decay * w)
    exact = delta + comp.float()  # this step's change plus what earlier roundings dropped
    rounded = round_to_bf16(w + exact) if p.dtype == torch.bfloat16 else (w + exact).to(p.dtype).float()
    dropped = torch.where(go, exact - (rounded - w), comp.float())  # before p changes: w may alias p
    p.copy_(torch.where(go, rounded.to(p.dtype), p))
    comp.copy_(dropped)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


_BLOCK = 1024  # elements per program of the multi-tensor kernel


@triton.jit
def _adamw_multi_kernel(Table, Tiles, P0, G0, S0, Lr, Keep, log2_beta1, log2_beta2, beta1, beta2, eps, weight_decay,
                        BLOCK: tl.constexpr):
    """adamw_update_ for many contiguous tensors in one launch: program i updates BLOCK elements of tensor
    Tiles[i, 0] from element Tiles[i, 1]. P0, G0, S0 (a weight, its gradient, a state) only give the element
    types. All arithmetic in fp32; the casts are explicit in Triton's IR, so the rounding the compensation measures
    really happens (Inductor had removed it from the compiled torch update)."""
    if tl.load(Keep) == 0.0:
        return  # a skipped step (non-finite loss or gradient norm): nothing changes
    row = Table + tl.load(Tiles + 2 * tl.program_id(0)) * 7  # addresses of p, g, m, v, c and step, then numel
    offs = tl.load(Tiles + 2 * tl.program_id(0) + 1) + tl.arange(0, BLOCK)
    mask = offs < tl.load(row + 6)
    P = tl.load(row).to(tl.pointer_type(P0.dtype.element_ty))
    G = tl.load(row + 1).to(tl.pointer_type(G0.dtype.element_ty))
    M = tl.load(row + 2).to(tl.pointer_type(S0.dtype.element_ty))
    V = tl.load(row + 3).to(tl.pointer_type(S0.dtype.element_ty))
    C = tl.load(row + 4).to(tl.pointer_type(S0.dtype.element_ty))
    n = tl.maximum(tl.load(tl.load(row + 5).to(tl.pointer_type(tl.float32))), 1.0)
    lr = tl.load(Lr)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(C + offs, mask=mask, other=0.0).to(tl.float32)
    m = m + (1 - beta1) * (g - m)
    v = v + (1 - beta2) * (g * g - v)
    m_hat = m / (1 - tl.math.exp2(n * log2_beta1))
    v_hat = v / (1 - tl.math.exp2(n * log2_beta2))
    exact = -lr * (m_hat / (tl.sqrt(v_hat) + eps) + weight_decay * w) + c
    rounded = (w + exact).to(P0.dtype.element_ty)
    tl.store(C + offs, (exact - (rounded.to(tl.float32) - w)).to(S0.dtype.element_ty), mask=mask)
    tl.store(P + offs, rounded, mask=mask)
    tl.store(M + offs, m.to(S0.dtype.element_ty), mask=mask)
    tl.store(V + offs, v.to(S0.dtype.element_ty), mask=mask)


def kernel_applies(rows: list[tuple]) -> bool:
    """Whether adamw_multi_ can take these (p, grad, exp_avg, exp_avg_sq, compensation, step) rows: CUDA (or the
    interpreter, see KERNEL_IN_INTERPRETER), one device, contiguous, one weight / gradient / state dtype each, fp32
    steps on the weights' device."""
    if not rows:
        return False
    p0, g0, s0 = rows[0][0], rows[0][1], rows[0][2]
    on_cuda = p0.is_cuda and not INTERPRET
    in_interpreter = INTERPRET and KERNEL_IN_INTERPRETER and p0.device.type == "cpu"
    return (on_cuda or in_interpreter) and all(
        p.device == p0.device and p.dtype == p0.dtype and g.dtype == g0.dtype and
        m.dtype == v.dtype == c.dtype == s0.dtype and step.dtype == torch.float32 and step.device == p0.device and
        all(t.is_contiguous() and t.numel() == p.numel() for t in (p, g, m, v, c))
        for p, g, m, v, c, step in rows)


class _Tables:
    """The kernel's device tables for one parameter group. The tile table depends only on the tensor sizes and is
    built once; the address table is uploaded again only when an address changed (gradients freed by
    zero_grad(set_to_none=True) may come back elsewhere), from pinned memory, without a host sync."""

    def __init__(self):
        self.sizes = self.tiles = self.addresses = self.table = None

    def get(self, rows: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        device = rows[0][0].device
        sizes = [p.numel() for p, *_ in rows]
        if sizes != self.sizes:
            tiles = [(i, start) for i, n in enumerate(sizes) for start in range(0, n, _BLOCK)]
            self.sizes, self.tiles = sizes, torch.tensor(tiles, dtype=torch.int64).to(device)
        addresses = [x for row, n in zip(rows, sizes) for x in (*(t.data_ptr() for t in row), n)]
        if addresses != self.addresses:
            host = torch.tensor(addresses, dtype=torch.int64)
            self.addresses = addresses
            self.table = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
        return self.table, self.tiles


def adamw_multi_(rows: list[tuple], tables: _Tables, lr: torch.Tensor, keep: torch.Tensor, beta1: float,
                 beta2: float, eps: float, weight_decay: float) -> None:
    """adamw_update_ of every (p, grad, exp_avg, exp_avg_sq, compensation, step) row in one Triton launch (the
    steps already counted; lr and keep 0-d fp32 device tensors, as there). One launch per parameter group instead
    of one compiled call per tensor: for llama_220m's 111 tensors on an H100, 2.8 ms per step against 11.5 ms
    (scripts/bench_optim.py)."""
    table, tiles = tables.get(rows)
    p0, g0, s0 = rows[0][0], rows[0][1], rows[0][2]
    with torch.cuda.device(p0.device) if p0.is_cuda else contextlib.nullcontext():
        _adamw_multi_kernel[(tiles.shape[0],)](table, tiles, p0, g0, s0, lr, keep,
                                               math.log2(beta1) if beta1 > 0 else -math.inf,
                                               math.log2(beta2) if beta2 > 0 else -math.inf,
                                               beta1, beta2, eps, weight_decay, BLOCK=_BLOCK, num_warps=4)


class CompensatedAdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (torch.optim.AdamW's arithmetic) whose states live in the weights' dtype plus
    one compensation tensor per weight. On CUDA one Triton launch per parameter group updates every tensor
    (adamw_multi_); tensors it cannot take (non-contiguous, mixed dtypes) get one compiled call each, and the CPU
    runs the eager update."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        if not (lr > 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1 and eps > 0 and weight_decay >= 0):
            raise ValueError(f"CompensatedAdamW: bad hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.found_inf = None
        self._tables: list[_Tables] = []  # per parameter group, for the CUDA kernel

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        keep = None
        for i, group in enumerate(self.param_groups):
            rows = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if "compensation" not in state:  # also a checkpoint of torch's AdamW (optim.compensated=false)
                    state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if state["step"].device != p.device or state["step"].dtype != torch.float32:  # a loaded checkpoint
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
                rows.append((p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["compensation"], state["step"]))
            if not rows:
                continue
            if keep is None:  # one device per optimizer (one GPU, or DDP's replica on this rank)
                keep = self._keep(rows[0][0].device)
            torch._foreach_add_([row[5] for row in rows], keep)  # the step counts, one launch
            beta1, beta2 = group["betas"]
            hyper = (beta1, beta2, group["eps"], group["weight_decay"])
            lr = torch.full((), group["lr"], dtype=torch.float32, device=rows[0][0].device)  # a fill, not a copy
            if kernel_applies(rows):
                while len(self._tables) <= i:  # groups added later (add_param_group) get theirs here
                    self._tables.append(_Tables())
                adamw_multi_(rows, self._tables[i], lr, keep, *hyper)
                continue
            for row in rows:
                (compiled(adamw_update_) if row[0].is_cuda else adamw_update_)(*row, lr, keep, *hyper)
        return loss

    def _keep(self, device: torch.device) -> torch.Tensor:
        if self.found_inf is None:
            return torch.ones((), dtype=torch.float32, device=device)
        return 1.0 - self.found_inf.to(device=device, dtype=torch.float32)
