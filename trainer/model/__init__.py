"""The model: a Llama-style GPT (gpt.py) and what it is built from: RoPE, the memory-lean fused blocks
(fused.py), activation checkpointing and offload (activations.py), the chunked lm-head loss (loss.py).

    from trainer.model import GPT, ModelConfig
"""

from .gpt import GPT, Attention, Block, FeedForward, InnerAttention, ModelConfig, RMSNorm, rope_cos_sin, sliding_window_size

__all__ = ["GPT", "Attention", "Block", "FeedForward", "InnerAttention", "ModelConfig", "RMSNorm", "rope_cos_sin",
           "sliding_window_size"]
