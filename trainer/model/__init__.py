"""The model: a Llama-style GPT (gpt.py) and what it is built from: RoPE and its scaling types (rope.py), the
memory-lean fused blocks (fused.py), activation checkpointing and offload (activations.py), the chunked lm-head
loss (loss.py); Hugging Face checkpoints in and out (hf.py).

    from trainer.model import GPT, ModelConfig
"""

from .gpt import (GPT, Attention, Block, FeedForward, InnerAttention, ModelConfig, RMSNorm, check_context_parallel,
                  sliding_window_size)
from .rope import RopeScalingConfig, rope_cos_sin

__all__ = ["GPT", "Attention", "Block", "FeedForward", "InnerAttention", "ModelConfig", "RMSNorm",
           "RopeScalingConfig", "check_context_parallel", "rope_cos_sin", "sliding_window_size"]
