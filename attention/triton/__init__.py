"""Triton FlashAttention kernels: shared pieces (common.py), forward (fwd.py), backward (bwd.py).

Imported on first use by attention/backends.py; on a machine without CUDA they run under TRITON_INTERPRET=1.
"""
