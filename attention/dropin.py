"""Drop-in routes into ringflash attention for code we do not own: torch's SDPA and Hugging Face models.

    with register_sdpa():                      # F.scaled_dot_product_attention -> flash_attn_func
        y = model(x)
    name = register_hf()                       # "ringattn"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)

SDPA route: (B, H, N, D) inputs with is_causal / scale / enable_gqa go to `flash_attn_func`; everything we do
not express (an attn_mask, dropout_p > 0, other ranks, Dv != D, a batch-broadcast, non-positive scale, torch's
top-left is_causal with Nq < Nk, a dtype/head_dim the backend rejects) goes to the original torch function.

HF route: the attention function receives (B, H, N, D) and returns (B, N, H, D). Padding masks are unpadded to
cu_seqlens (the mask function hands us the 2-D padding mask, never a dense 4-D one; queries are the last Nq
mask positions, i.e. left padding, as FA2); packed rows (batch 1, position_ids not following on by 1) and
FlashAttentionKwargs cu_seq_lens_* go to `flash_attn_varlen_func`; config.sliding_window becomes
window_size. A user-built 4-D mask goes to transformers' SDPA function; softcap, sinks, position_bias and
training-time attention dropout raise ValueError. The name is "ringattn": transformers 5 sends every
implementation containing "flash" to its kernel loader.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .interface import flash_attn_func, flash_attn_varlen_func
from .validation import SUPPORTED_DTYPES

HF_NAME = "ringattn"

# -- torch SDPA ----------------------------------------------------------------------------------------------

_ORIGINAL_SDPA = None  # torch's function while patched
_ACTIVE: list["SdpaRegistration"] = []  # live registrations, newest last; the newest one's backend is used


def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def _ours_or_none(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend):
    """Our result for an SDPA call, or None where torch's semantics are not ours to give."""
    tensors = (query, key, value)
    if attn_mask is not None or dropout_p != 0.0 or (scale is not None and not scale > 0):
        return None
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and not t.is_nested for t in tensors):
        return None
    if query.dtype not in SUPPORTED_DTYPES or key.shape != value.shape or key.shape[0] != query.shape[0]:
        return None
    h, hkv, nq, nk = query.shape[1], key.shape[1], query.shape[2], key.shape[2]
    if hkv != h and not (enable_gqa and h % hkv == 0):
        return None  # torch raises its own error for that
    window = (-1, -1)
    if is_causal and nq != nk:
        if nq < nk:
            return None  # top-left causal hides the last keys from every query: no (left, right) window says so
        window, is_causal = (-1, nq - nk), False  # top-left j <= i is our j <= i + (Nk-Nq) + (Nq-Nk)
    try:
        out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              causal=bool(is_causal), softmax_scale=scale, window_size=window, backend=backend)
    except ValueError:
        return None  # dtype / head_dim / device the backend does not take
    return out.transpose(1, 2)  # (B, H, Nq, D)


def _patched_sdpa(*args, **kwargs):
    if not _ACTIVE:  # a stale reference kept after unregister_sdpa(): behave as torch
        return torch._C._nn.scaled_dot_product_attention(*args, **kwargs)
    ours = _ours_or_none(*_sdpa_args(*args, **kwargs), backend=_ACTIVE[-1].backend)
    return ours if ours is not None else _ORIGINAL_SDPA(*args, **kwargs)


class SdpaRegistration:
    """Returned by register_sdpa(); as a context manager it unregisters itself on exit."""

    def __init__(self, backend: str):
        self.backend = backend

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
            if not _ACTIVE:
                _restore_sdpa()


def register_sdpa(backend: str = "auto") -> SdpaRegistration:
    """Route F.scaled_dot_product_attention to ringflash until the context exits or unregister_sdpa()."""
    global _ORIGINAL_SDPA
    reg = SdpaRegistration(backend)
    if not _ACTIVE:
        _ORIGINAL_SDPA = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _patched_sdpa
    _ACTIVE.append(reg)
    return reg


def _restore_sdpa() -> None:
    global _ORIGINAL_SDPA
    if _ORIGINAL_SDPA is not None:
        F.scaled_dot_product_attention = _ORIGINAL_SDPA
        _ORIGINAL_SDPA = None


def unregister_sdpa() -> None:
    """Undo every register_sdpa(): F.scaled_dot_product_attention is torch's again."""
    _ACTIVE.clear()
    _restore_sdpa()


# -- Hugging Face transformers -----------------------------------------------------------------------------------

_HF_BACKEND = {"backend": "auto"}


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """AttentionMaskInterface entry: the 2-D bool padding mask (B, kv_length), or None if nothing is padded."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def _doc_starts_to_cu(position_ids: torch.Tensor) -> torch.Tensor:
    """(1, N) positions -> int32 cu_seqlens: a document starts wherever the position does not follow on by 1."""
    pos = position_ids.reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    idx = starts.nonzero().flatten().to(torch.int32)
    return torch.cat([idx, idx.new_tensor([pos.numel()])])


def _varlen(q, k, v, cu_q, cu_k, causal, scale, window):
    """q (T, H, D) packed; cu_* int32 on q's device; returns (T, H, D)."""
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    max_q, max_k = int(cu_q.diff().max()), int(cu_k.diff().max())
    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scale,
                                  window_size=window, backend=_HF_BACKEND["backend"])


def _unpadded(q, k, v, mask, causal, scale, window):
    """q (B, Nq, H, D), k/v (B, Nk, Hkv, D), mask (B, Nk) bool -> out (B, Nq, H, D), zeros at padding.

    Queries are the last Nq positions of the mask (left padding, as FA2 assumes with a cache).
    """
    B, nq = q.shape[:2]
    mask_k = mask[:, -k.shape[1]:].bool()
    mask_q = mask_k[:, -nq:]
    idx_q, idx_k = mask_q.flatten().nonzero().flatten(), mask_k.flatten().nonzero().flatten()
    cu_q = F.pad(mask_q.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(mask_k.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    out = _varlen(q.flatten(0, 1)[idx_q], k.flatten(0, 1)[idx_k], v.flatten(0, 1)[idx_k], cu_q, cu_k, causal,
                  scale, window)
    full = out.new_zeros(B * nq, *out.shape[1:])
    full[idx_q] = out
    return full.view(B, nq, *out.shape[1:])


def _hf_window(causal: bool, sliding_window) -> tuple[int, int]:
    if not sliding_window:
        return (-1, -1)
    # HF's sliding window keeps key j for query i iff i - sliding_window < j (and j <= i when causal)
    return (sliding_window - 1, 0 if causal else sliding_window - 1)


def ringattn_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                     softcap=None, is_causal=None, **kwargs):
    """transformers AttentionInterface function: query (B, H, Nq, D), key/value (B, Hkv, Nk, D) -> (B, Nq, H, D)."""
    if softcap is not None or kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        raise ValueError(f"{HF_NAME}: softcap / attention sinks / position_bias are not supported")
    if dropout and module.training:
        raise ValueError(f"{HF_NAME}: attention dropout ({dropout}) is not supported; set attention_dropout=0")
    if attention_mask is not None and attention_mask.dim() == 4:
        # A prepared or custom 4-D mask (passed by the user): only torch SDPA can apply it.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = _hf_window(causal, sliding_window)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, N, H, D)
    B, nq = q.shape[:2]
    if attention_mask is not None:
        return _unpadded(q, k, v, attention_mask, causal, scaling, window), None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:  # padding-free batches (DataCollatorWithFlattening)
        out = _varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, causal, scaling, window)
        return out.view(B, nq, *out.shape[1:]), None
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and B == 1 and nq == k.shape[1] and nq > 1:
        cu = _doc_starts_to_cu(position_ids)
        if cu.numel() > 2:  # more than one document packed in the row
            out = _varlen(q[0], k[0], v[0], cu, cu, causal, scaling, window)
            return out[None], None
    out = flash_attn_func(q, k, v, causal=causal, softmax_scale=scaling, window_size=window,
                          backend=_HF_BACKEND["backend"])
    return out, None


def register_hf(backend: str = "auto") -> str:
    """Register ringflash with transformers' AttentionInterface (+ a padding-only mask); returns "ringattn"."""
    from transformers import AttentionInterface

    _HF_BACKEND["backend"] = backend
    AttentionInterface.register(HF_NAME, ringattn_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53 builds 4-D masks itself; ringattn_forward then defers to SDPA
        return HF_NAME
    AttentionMaskInterface.register(HF_NAME, _padding_mask)
    return HF_NAME
