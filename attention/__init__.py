"""ringflash attention: FlashAttention-style kernels behind one API (see DESIGN.md).

    from attention import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True)      # q (B, N, H, D), k/v (B, N, Hkv, D)
"""

from .backends import (attn_backward, attn_forward, attn_varlen_backward, attn_varlen_forward,
                       available_backends, get_deterministic, set_deterministic)
from .dropin import register_hf, register_sdpa, unregister_sdpa
from .interface import flash_attn_func, flash_attn_varlen_func
from .merge import merge_attn_outputs
from .reference import reference_attn_backward, reference_attn_forward

__all__ = [
    "flash_attn_func", "flash_attn_varlen_func", "merge_attn_outputs",
    "attn_forward", "attn_backward", "attn_varlen_forward", "attn_varlen_backward", "available_backends",
    "set_deterministic", "get_deterministic",
    "reference_attn_forward", "reference_attn_backward",
    "register_sdpa", "unregister_sdpa", "register_hf",
]
