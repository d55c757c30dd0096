"""Chunked lm-head + cross-entropy: never materialises the [tokens, vocab] logits.

    loss_sum = chunked_cross_entropy(hidden.flatten(0, 1), model.output_weight, labels.flatten())
    loss = loss_sum / global_valid_count(num_valid, device, group)     # the mean over every dp x cp rank

At 128K tokens and a 32K vocab the full fp32 logits would be 16 GiB (and as much again for their
gradient). When gradients are needed the Function computes them in the forward, one chunk of tokens at a
time (logits -> softmax - onehot -> d_hidden, d_weight), so only one [chunk, vocab] block is ever alive
and no logits are recomputed; backward only scales the stored gradients by the incoming scalar.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .fused import compiled, compute_dtype

IGNORE_INDEX = -100
DEFAULT_CHUNK = 4096


def _losses(logits, labels, ignore_index: int):
    """Per-token CE of one chunk, logits (C, V): (losses (C,) fp32, fp32 logits, lse, valid mask, safe labels)."""
    x = logits.float()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(x, dim=-1)
    target = x.gather(1, safe[:, None]).squeeze(1)
    return torch.where(valid, lse - target, torch.zeros_like(lse)), x, lse, valid, safe


def ce_chunk_grad(logits, labels, ignore_index: int):
    """(sum of the chunk's losses fp32, d(sum)/d(logits) in logits' dtype) for logits (C, V), labels (C,).

    d(loss)/d(logits) = softmax - onehot(target) on valid rows, 0 elsewhere. Written as one expression over
    the [C, V] block so that torch.compile makes it a reduction and one pointwise pass over the bf16 logits."""
    losses, x, lse, valid, safe = _losses(logits, labels, ignore_index)
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == safe[:, None]
    grad = (torch.exp(x - lse[:, None]) - onehot.float()) * valid[:, None].float()
    return losses.sum(), grad.to(logits.dtype)


def _in_place_chunk_grad(logits, labels, ignore_index: int):
    """ce_chunk_grad for eager runs, built in place in the fp32 logits so that a chunk holds one [C, V] fp32
    tensor (the expression form would allocate several)."""
    losses, x, lse, valid, safe = _losses(logits, labels, ignore_index)
    grad = x.sub_(lse[:, None]).exp_()
    grad[torch.arange(x.shape[0], device=x.device), safe] -= 1.0
    grad.mul_(valid[:, None])
    return losses.sum(), grad.to(logits.dtype)


# torch.addmm(fp32, bf16, bf16, out_dtype=fp32) on CUDA: cuBLAS adds into the fp32 buffer in its epilogue.
# None until the first CUDA call tries it; False where this torch lacks it.
_ADDMM_FP32_OUT: list = [None]


def _add_grad_w(grad_w, grad_logits, h):
    """grad_w (fp32) + grad_logits^T h. Where it works, one GEMM with an fp32 output instead of a [V, dim]
    product in the compute dtype and a separate add."""
    if grad_w.is_cuda and grad_logits.dtype != torch.float32 and _ADDMM_FP32_OUT[0] is not False:
        try:
            out = torch.addmm(grad_w, grad_logits.T, h, out_dtype=torch.float32)
            _ADDMM_FP32_OUT[0] = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_FP32_OUT[0] = False
    return grad_w.add_(grad_logits.T @ h)


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, ignore_index, compile):
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        loss_and_grad = compiled(ce_chunk_grad) if compile else _in_place_chunk_grad
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            loss, grad_logits = loss_and_grad(h @ weight.T, labels[start:start + chunk_size], ignore_index)
            total += loss
            grad_h[start:start + chunk_size] = grad_logits @ weight
            grad_w = _add_grad_w(grad_w, grad_logits, h)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None


def chunked_cross_entropy(hidden, weight, labels, chunk_size: int = DEFAULT_CHUNK,
                          ignore_index: int = IGNORE_INDEX, compile: bool = False) -> torch.Tensor:
    """Sum over tokens of CE(hidden @ weight.T, labels), fp32 scalar.

    hidden (T, dim), weight (vocab, dim), labels (T,) int64 with ignore_index for no target. Divide by the
    (global) number of valid labels for the mean. compile=True (CUDA only; model.compile in the trainer):
    each chunk's softmax gradient is one torch.compile'd pass over the logits instead of ~6 eager fp32 ones.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked_cross_entropy: hidden must be (T, dim) and weight (vocab, dim); got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_cross_entropy: labels {tuple(labels.shape)} must be (T,) = "
                         f"({hidden.shape[0]},)")
    if chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    dtype = compute_dtype(hidden)  # the matmuls run as nn.Linear would; softmax is always fp32
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_size, ignore_index,
                                         compile and hidden.is_cuda)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start:start + chunk_size]
        total += _losses(h @ weight.T, labels[start:start + chunk_size], ignore_index)[0].sum()
    return total


@torch.no_grad()
def token_losses(hidden, weight, labels, chunk_size: int = DEFAULT_CHUNK,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token CE(hidden @ weight.T, labels) as an fp32 (T,) tensor, 0 where labels == ignore_index.

    The same chunks as chunked_cross_entropy (one [chunk, vocab] block of logits alive), without gradients:
    for evaluations that aggregate losses by position (trainer/eval/ppl.py)."""
    dtype = compute_dtype(hidden)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start:start + chunk_size]
        out[start:start + chunk_size] = _losses(h @ weight.T, labels[start:start + chunk_size], ignore_index)[0]
    return out


def global_valid_count(num_valid: int, device, group=None) -> torch.Tensor:
    """Number of valid target tokens summed over `group` (the dp x cp ranks), as an fp32 tensor.

    All-reduced on the device, so reading it needs no host sync; without an initialised process group it is
    just the local count.
    """
    # torch.full launches a fill kernel; torch.tensor(x, device="cuda") would copy from pageable memory
    # and wait for the GPU queue.
    count = torch.full((), float(num_valid), dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, group=group)
    return count
