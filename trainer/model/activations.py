"""Activation memory for long sequences: checkpointing policies and CPU offload of what they keep.

    x = run_layer(layer, x, cos, sin, cu_seqlens, max_seqlen, ckpt="selective", offload="none")

ckpt (model.ckpt):
  none       every activation is kept
  full       a block keeps only its input; backward reruns the whole block, attention included
  selective  a block keeps its input plus the attention output and lse; backward reruns norms,
             projections, RoPE and the MLP but not attention, the one part whose cost grows as N^2
offload (model.offload_activations): what is kept goes to pinned CPU memory, asynchronously
  none       nothing
  attention  the attention output + lse kept by ckpt=selective (the block input stays on the GPU)
  all        everything kept: block inputs and attention outputs (with ckpt=none: every saved tensor)
  Copies run on a side stream and are prefetched in backward one block ahead (Offloaded), so they
  overlap with compute, the step has no host sync, and at most two blocks' tensors are back on the GPU.

How selective works: torch.utils.checkpoint (non-reentrant) with a context_fn whose two contexts mark a
Region as recording (forward) or replaying (recomputation in backward). While recording, the attention
core stores (out, lse) in the region; while replaying it runs no attention: `replay_attention` returns the
stored output and saves the tensors the attention Function saved (q, k, v, out, lse [, cu_q, cu_k]), in
the same order, so checkpoint hands the recomputed q/k/v and the stored out/lse to the original graph's
attention node, whose backward then runs as usual. (torch's create_selective_checkpoint_contexts cannot
do this: it caches aten ops, and our Triton attention is a Python autograd.Function, not an op.)
"""

from __future__ import annotations

import functools
import threading
import weakref
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

CKPT_MODES = ("none", "full", "selective")
OFFLOAD_MODES = ("none", "attention", "all")

_local = threading.local()  # .region: the Region whose forward or recomputation is running, else None


def normalize_offload(value) -> str:
    """model.offload_activations: true/false (YAML booleans arrive as bools or 'True'/'False') or a mode."""
    text = str(value).strip().lower()
    return {"true": "all", "false": "none"}.get(text, text)


# -- CPU offload ---------------------------------------------------------------------------------------

PREFETCH_DEPTH = 4  # at most this many handles walked ahead: bounds ckpt=none, whose blocks save many tensors


def _offload_stream(device: torch.device):
    streams = _local.__dict__.setdefault("streams", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def start_offload_block() -> None:
    """Tensors offloaded from here on belong to a new block (run_layer calls this per block)."""
    _local.block = getattr(_local, "block", 0) + 1


# torch's pinned-memory cache rounds every block up to a power of two: a 5 GiB block input (1B model, 1.25M
# tokens) took 8 GiB, and 16 of them exhausted a 128 GiB host. Offloaded tensors travel as pieces of
# PIN_CHUNK_BYTES, so only the last piece of each rounds up.
PIN_CHUNK_BYTES = 1 << 28


def byte_chunks(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Views of a contiguous tensor's bytes, PIN_CHUNK_BYTES each but the last."""
    return t.reshape(-1).view(torch.uint8).split(PIN_CHUNK_BYTES)


def _pinned(nbytes: int) -> torch.Tensor:
    try:
        return torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=True)
    except RuntimeError as exc:
        if "out of memory" not in str(exc):
            raise
        raise torch.cuda.OutOfMemoryError(
            f"model.offload_activations: pinned CPU memory is exhausted ({_pinned_gib():.1f} GiB held, "
            f"{nbytes / 2**20:.0f} MiB more asked). Use a shorter data.seq_len, offload_activations=attention, "
            f"or a host with more memory.") from exc


def _pinned_gib() -> float:
    stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    return stats.get("allocated_bytes.current", 0) / 2**30


def offloaded_bytes(ckpt: str, offload: str, n_layers: int, tokens: int, dim: int, n_heads: int, head_dim: int,
                    input_bytes: int, attn_bytes: int) -> Optional[int]:
    """Host memory one micro-batch's offloaded activations hold at the end of its forward (`tokens` on this
    rank; block inputs of input_bytes per element, attention outputs of attn_bytes). None where it is not
    estimated: ckpt=none offloads whatever autograd saves."""
    if offload == "none":
        return 0
    if ckpt == "none":
        return None
    per_layer = tokens * dim * input_bytes if offload == "all" else 0
    if ckpt == "selective":  # the attention output and its fp32 lse
        per_layer += tokens * n_heads * (head_dim * attn_bytes + 4)
    return n_layers * per_layer


def host_memory_available() -> Optional[int]:
    """MemAvailable of this host in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Offloaded:
    """One tensor in pinned CPU memory. The copies run on a side stream, so compute does not wait for
    them; nothing waits on the host. Handles are chained in creation (forward) order and tagged with their
    block: fetching one in backward prefetches up to PREFETCH_DEPTH handles before it, but none from two
    blocks back, i.e. what the next block's backward needs. Why the block bound: under ckpt=full a block
    keeps one tensor, so four tensors ahead were four block inputs, 4 GiB each at 2M tokens."""

    def __init__(self, t: torch.Tensor):
        self.device, self.gpu, self.event = t.device, None, None
        self.shape, self.dtype = t.shape, t.dtype
        self.block = getattr(_local, "block", 0)
        previous = getattr(_local, "last_offloaded", None)
        self.previous = previous if previous is not None else (lambda: None)
        _local.last_offloaded = weakref.ref(self)
        if t.device.type != "cuda":  # CPU runs exercise the same bookkeeping and pieces
            self.cpu = [piece.clone() for piece in byte_chunks(t.contiguous())]
            return
        stream = _offload_stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete before it is copied
        with torch.cuda.stream(stream):
            pieces = byte_chunks(t.contiguous())
            self.cpu = [_pinned(piece.numel()) for piece in pieces]
            for host, piece in zip(self.cpu, pieces):
                host.copy_(piece, non_blocking=True)
            self.event = stream.record_event()
        t.record_stream(stream)  # t's memory is not reused before the copy has read it

    def _join(self) -> torch.Tensor:
        flat = torch.empty(sum(c.numel() for c in self.cpu), dtype=torch.uint8, device=self.device)
        for piece, host in zip(byte_chunks(flat), self.cpu):
            piece.copy_(host, non_blocking=True)
        return flat.view(self.dtype).view(self.shape)

    def prefetch(self) -> None:
        if self.gpu is not None or self.cpu is None:
            return
        if self.device.type != "cuda":
            self.gpu = self._join()
            return
        stream = _offload_stream(self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(self.event)
            self.gpu = self._join()
            self.event = stream.record_event()

    def get(self) -> torch.Tensor:
        self.prefetch()
        t, self.gpu, self.cpu = self.gpu, None, None
        if self.device.type == "cuda":
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.event)
            t.record_stream(current)  # allocated on the side stream, used (and freed) on this one
        handle = self.previous()
        for _ in range(PREFETCH_DEPTH):
            if handle is None or handle.block < self.block - 1:
                break
            handle.prefetch()
            handle = handle.previous()
        return t


def pack_to_cpu(t: torch.Tensor):
    # Parameters (saved by ckpt=none + offload=all for their matmuls) stay where they are.
    if t.is_leaf and t.requires_grad:
        return t
    with torch.no_grad():  # the copies must not join the autograd graph
        return Offloaded(t.detach())


def unpack_from_cpu(packed) -> torch.Tensor:
    if not isinstance(packed, Offloaded):
        return packed
    with torch.no_grad():
        return packed.get()


def offload_saved_tensors():
    """Every tensor autograd saves inside this context lives on the CPU until backward needs it."""
    return torch.autograd.graph.saved_tensors_hooks(pack_to_cpu, unpack_from_cpu)


# -- checkpoint regions ----------------------------------------------------------------------------------

class Region:
    """One checkpointed block: the attention results kept for its recomputation."""

    def __init__(self, keep_attention: bool, offload: bool):
        self.keep_attention = keep_attention
        self.offload = offload
        self.recording = True
        self.kept: list = []  # per attention call: (out, lse), possibly packed to CPU
        self.cursor = 0

    def keep(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        pair = (out.detach(), lse.detach())
        self.kept.append(tuple(pack_to_cpu(t) for t in pair) if self.offload else pair)

    def next_kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.cursor < len(self.kept), "recomputation made more attention calls than the forward"
        pair = self.kept[self.cursor]
        self.cursor += 1
        return tuple(unpack_from_cpu(p) for p in pair) if self.offload else pair


@contextmanager
def _enter(region: Region, recording: bool):
    previous = getattr(_local, "region", None)
    _local.region, region.recording, region.cursor = region, recording, 0
    try:
        yield
    finally:
        _local.region = previous


def _region_contexts(keep_attention: bool, offload: bool):
    region = Region(keep_attention, offload)
    return _enter(region, True), _enter(region, False)


def current_region() -> Optional[Region]:
    return getattr(_local, "region", None)


def recomputing() -> bool:
    """True inside a checkpointed block's recomputation (its output is discarded there)."""
    region = current_region()
    return region is not None and not region.recording


def attention_keep_mode() -> Optional[str]:
    """'record' / 'replay' when the attention core should keep / reuse its results, else None."""
    region = current_region()
    if region is None or not region.keep_attention:
        return None
    return "record" if region.recording else "replay"


class _ReplayAttention(torch.autograd.Function):
    """Saves what the attention Function saved, computes nothing (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, out, lse, *extra):
        ctx.save_for_backward(q, k, v, out, lse, *extra)
        # Returned as an output so it requires grad like the real attention output: the ops after it
        # (wo) then save the same tensors as in the forward.
        return out.view_as(out)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("replay_attention is only used inside a checkpoint recomputation, whose graph "
                           "is never differentiated")


def keep_attention(out: torch.Tensor, lse: torch.Tensor) -> None:
    current_region().keep(out, lse)


def replay_attention(q, k, v, *extra) -> torch.Tensor:
    """The kept attention output of this call; q, k, v (and cu_seqlens extras) as the Function saw them."""
    out, lse = current_region().next_kept()
    return _ReplayAttention.apply(q, k, v, out, lse, *extra)


# -- running one block -----------------------------------------------------------------------------------

def _call(layer, x, *, cos, sin, cu_seqlens, max_seqlen):
    return layer(x, cos, sin, cu_seqlens, max_seqlen)


def run_layer(layer, x, cos, sin, cu_seqlens=None, max_seqlen=None, ckpt: str = "none",
              offload: str = "none"):
    """layer(x, cos, sin, cu_seqlens, max_seqlen) under the given checkpointing / offload policy."""
    if not torch.is_grad_enabled() or (ckpt == "none" and offload == "none"):
        return layer(x, cos, sin, cu_seqlens, max_seqlen)
    start_offload_block()
    if ckpt == "none":  # offload == "all": every saved tensor of the block
        with offload_saved_tensors():
            return layer(x, cos, sin, cu_seqlens, max_seqlen)
    # cos/sin/cu_seqlens ride in the closure: only x is saved per block (and offloaded with "all"); the
    # tables are shared by every layer.
    fn = functools.partial(_call, layer, cos=cos, sin=sin, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    context_fn = functools.partial(_region_contexts, ckpt == "selective", offload != "none")
    with offload_saved_tensors() if offload == "all" else nullcontext():
        # No RNG in the block (no dropout): skipping the RNG stash saves a device query per block.
        return checkpoint(fn, x, use_reentrant=False, context_fn=context_fn, preserve_rng_state=False)
