"""FP8 attention forward: block quantization with Hadamard rotation and its fp32 emulation (quant.py), and the
Hopper Triton kernel (kernel.py, imported on first use).

    from attention.fp8 import Fp8Config, fp8_attn_forward, quantize_qkv, emulate_fp8_attention
"""

from .quant import (E4M3_MAX, FP8_DTYPE, GRANULARITIES, LOG2_P_SCALE, Fp8Config, Fp8Qkv, block_amax, dequantize,
                    emulate_fp8_attention, fp8_attn_forward, quantize, quantize_qkv, rotate_qk, rotation_matrix,
                    signed_hadamard, transpose_pad_keys)

__all__ = ["E4M3_MAX", "FP8_DTYPE", "GRANULARITIES", "LOG2_P_SCALE", "Fp8Config", "Fp8Qkv", "block_amax",
           "dequantize", "emulate_fp8_attention", "fp8_attn_forward", "quantize", "quantize_qkv", "rotate_qk",
           "rotation_matrix", "signed_hadamard", "transpose_pad_keys"]
