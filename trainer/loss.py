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

IGNORE_INDEX = -100
DEFAULT_CHUNK = 4096


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    # Under autocast the matmuls run in the autocast dtype like nn.Linear would; softmax is always fp32.
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


def _chunk_loss(h, weight, labels, ignore_index):
    """Per-token CE of one chunk: h (C, dim), labels (C,) -> (losses (C,) fp32, logits fp32, valid mask)."""
    logits = (h @ weight.T).float()  # (C, V)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, safe[:, None]).squeeze(1)
    return torch.where(valid, lse - target, torch.zeros_like(lse)), logits, lse, valid, safe


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, ignore_index):
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            losses, logits, lse, valid, safe = _chunk_loss(h, weight, labels[start:start + chunk_size],
                                                           ignore_index)
            total += losses.sum()
            # d(sum of losses)/d(logits) = softmax - onehot(target) on valid rows, 0 elsewhere. Built in
            # place in the logits buffer so the chunk holds one [C, V] fp32 tensor.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(h.shape[0], device=h.device), safe] -= 1.0
            grad_logits.mul_(valid[:, None])
            grad_logits = grad_logits.to(hidden.dtype)
            grad_h[start:start + chunk_size] = grad_logits @ weight
            grad_w += grad_logits.T @ h
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def chunked_cross_entropy(hidden, weight, labels, chunk_size: int = DEFAULT_CHUNK,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum over tokens of CE(hidden @ weight.T, labels), fp32 scalar.

    hidden (T, dim), weight (vocab, dim), labels (T,) int64 with ignore_index for no target. Divide by the
    (global) number of valid labels for the mean.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked_cross_entropy: hidden must be (T, dim) and weight (vocab, dim); got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_cross_entropy: labels {tuple(labels.shape)} must be (T,) = "
                         f"({hidden.shape[0]},)")
    if chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    dtype = _compute_dtype(hidden)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_size, ignore_index)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        losses = _chunk_loss(hidden[start:start + chunk_size], weight, labels[start:start + chunk_size],
                             ignore_index)[0]
        total += losses.sum()
    return total


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
