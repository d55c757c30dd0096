"""Llama-style GPT: RMSNorm, RoPE on explicit position ids, GQA attention, SwiGLU, tied or untied head; with
the options Hugging Face Llama / Mistral / Qwen2 / Qwen3 checkpoints need (hf.py loads and exports them): q/k/v
bias, q/k RMSNorm over the head dim before RoPE, explicit head_dim, RoPE scaling (rope.py), sliding windows on
all layers or on those from model.window_layers_from on.

    model = GPT(ModelConfig(vocab_size=320, dim=256, n_layers=4, n_heads=4, n_kv_heads=2))
    hidden = model(tokens, position_ids, cu_seqlens=cu, max_seqlen=m)   # (B, N, dim); loss lives in loss.py
    logits = hidden @ model.output_weight.T                            # only for tiny checks

Packed documents: position ids restart at 0 per document and cu_seqlens (over the flattened B*N tokens)
keeps attention inside each document. The attention core is the swappable submodule
`block.attention.inner_attention`; context parallelism replaces it from outside, so this file imports
neither torch.distributed nor parallel/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from attention import flash_attn_func, flash_attn_varlen_func

from .activations import (CKPT_MODES, OFFLOAD_MODES, attention_keep_mode, keep_attention, normalize_offload,
                          replay_attention, run_layer)
from .fused import compiled, compute_dtype, rms_norm, rms_norm_math, rope, rope_math, swiglu, swiglu_math
from .rope import RopeScalingConfig, as_rope_scaling, rope_cos_sin


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 0  # 0: taken from the tokenizer by the trainer
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: n_heads (MHA); fewer: GQA / MQA
    head_dim: Optional[int] = None  # None: dim // n_heads
    ffn_dim: Optional[int] = None  # None: Llama rule, 8/3 * dim rounded up to multiple_of
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # model=hf: 0 takes the checkpoint's, any other value overrides it
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # type linear|dynamic|llama3|yarn
    tie_embeddings: bool = False
    path: str = ""  # model=hf: a local Hugging Face directory (config.json + safetensors)
    hf_model_type: str = ""  # llama | mistral | qwen2 | qwen3: the family an export writes ("": llama)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over the head dim of q and k before RoPE (Qwen3)
    max_position_embeddings: int = 0  # the context the weights are meant for (export writes it; 0: unknown)
    ckpt: str = "none"  # activation checkpointing per block: none | full | selective (keeps attention out)
    offload_activations: str = "none"  # what checkpointing keeps, on pinned CPU: none|attention|all (true=all)
    mlp_chunk: int = 0  # tokens per SwiGLU chunk (0: unchunked); no [N, ffn] tensor is kept when > 0
    compile: bool = False  # torch.compile the norms, projections, RoPE, SwiGLU and residuals of each block
    attn_window: int = 0  # sliding-window attention: each token sees itself and the window-1 before it (0: all)
    window_layers_from: int = 0  # attn_window applies to layers >= this (Qwen2's max_window_layers); 0: all
    # Under bf16 autocast the residual stream (what checkpointing keeps and offloads) runs in bf16, as with bf16
    # weights; true keeps it in the weights' fp32: twice the block-input memory, on the GPU or the host.
    fp32_residual: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        # A saved config holds a dict here; checkpoints from before the nested form, a linear factor.
        self.rope_scaling = as_rope_scaling(self.rope_scaling)

    def layer_window(self, layer: int) -> int:
        """The sliding window of one layer (0: full causal attention)."""
        return self.attn_window if layer >= self.window_layers_from else 0

    def resolved(self) -> "ModelConfig":
        """Fill the derived sizes and validate; the returned config has no None left."""
        kv = self.n_kv_heads or self.n_heads
        hd = self.head_dim or self.dim // max(self.n_heads, 1)
        ffn = self.ffn_dim or self.multiple_of * math.ceil(int(8 * self.dim / 3) / self.multiple_of)
        cfg = ModelConfig(**{**self.__dict__, "n_kv_heads": kv, "head_dim": hd, "ffn_dim": ffn,
                             "offload_activations": normalize_offload(self.offload_activations)})
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"model.vocab_size must be >= 1 (0 means 'from the tokenizer'), "
                             f"got {self.vocab_size}")
        if self.n_heads < 1 or self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be a positive multiple of model.n_kv_heads "
                             f"({self.n_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if self.ckpt not in CKPT_MODES:
            raise ValueError(f"model.ckpt must be one of {CKPT_MODES}, got {self.ckpt!r}")
        if self.offload_activations not in OFFLOAD_MODES:
            raise ValueError(f"model.offload_activations must be true, false or one of {OFFLOAD_MODES}, got "
                             f"{self.offload_activations!r}")
        if self.offload_activations == "attention" and self.ckpt != "selective":
            raise ValueError(f"model.offload_activations=attention offloads what model.ckpt=selective keeps; "
                             f"got model.ckpt={self.ckpt!r}")
        if self.attn_window < 0:
            raise ValueError(f"model.attn_window must be >= 0 (0: full causal attention), got {self.attn_window}")
        if self.mlp_chunk < 0:
            raise ValueError(f"model.mlp_chunk must be >= 0 (0: unchunked), got {self.mlp_chunk}")
        if self.window_layers_from < 0:
            raise ValueError(f"model.window_layers_from must be >= 0, got {self.window_layers_from}")
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta must be > 0 (0 means 'from the checkpoint' only with model.path), "
                             f"got {self.rope_theta}")
        self.rope_scaling.validate()


def check_context_parallel(cfg: ModelConfig, cp: int) -> None:
    """What a context-parallel run cannot reproduce: dynamic RoPE reads the length from the positions a shard
    holds, and the CP attention takes one window for every layer."""
    if cp <= 1:
        return
    if cfg.rope_scaling.type == "dynamic":
        raise ValueError("model.rope_scaling.type=dynamic derives RoPE from the sequence length, which a "
                         f"context-parallel shard does not see: use linear, llama3 or yarn with parallel.cp={cp}")
    if cfg.attn_window > 0 and 0 < cfg.window_layers_from < cfg.n_layers:
        raise ValueError(f"model.window_layers_from={cfg.window_layers_from} (a window on some layers only) is not "
                         f"supported with parallel.cp={cp}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)  # fp32 statistics; keeps x and one fp32 per row


def sliding_window_size(window: int) -> tuple[int, int]:
    """model.attn_window -> the attention functions' window_size: itself and the window-1 keys before it."""
    return (window - 1, 0) if window > 0 else (-1, -1)


class InnerAttention(nn.Module):
    """The attention core: q (B, N, H, D), k/v (B, N, Hkv, D) -> out (B, N, H, D), causal.

    A module of its own so context parallelism can swap it (ring / Ulysses) without touching the model.
    With cu_seqlens it runs the varlen kernel over the flattened B*N tokens (packed documents).
    window > 0: sliding-window attention, query i sees keys i-window+1 .. i (the kernels skip the rest); kept
    as the attention API's window_size (left, right), which context parallelism reads from here too.
    """

    def __init__(self, backend: str = "auto", fp8: bool = False, window: int = 0):
        super().__init__()
        self.backend = backend
        self.fp8 = fp8  # FP8 forward (attention/fp8.py) on the dense path; varlen has no fp8 kernel
        self.window_size = sliding_window_size(window)

    def forward(self, q, k, v, cu_seqlens=None, max_seqlen=None):
        # model.ckpt=selective: inside a checkpointed block the forward keeps (out, lse) and the
        # recomputation reuses them instead of running attention again (trainer/activations.py). The fp8
        # path saves other tensors, so it is recomputed as with ckpt=full.
        mode = None if self.fp8 else attention_keep_mode()
        B, N, H, D = q.shape
        if cu_seqlens is not None:
            q, k, v = q.reshape(B * N, H, D), k.reshape(B * N, -1, D), v.reshape(B * N, -1, D)  # (B*N, H, D)
        if mode == "replay":
            extra = () if cu_seqlens is None else (cu_seqlens, cu_seqlens)
            return replay_attention(q, k, v, *extra).view(B, N, H, D)
        if cu_seqlens is None:
            out, lse = flash_attn_func(q, k, v, causal=True, window_size=self.window_size, backend=self.backend,
                                       return_lse=True, fp8=self.fp8)
        else:
            out, lse = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                              causal=True, window_size=self.window_size, backend=self.backend,
                                              return_lse=True)
        if mode == "record":
            keep_attention(out, lse)
        return out.view(B, N, H, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str = "auto", layer: int = 0):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # Qwen3: RMSNorm over each head's dims, before RoPE
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.inner_attention = InnerAttention(backend, window=cfg.layer_window(layer))

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None):
        B, N, _ = x.shape
        # Head counts come from the weights (-1), so a later tensor-parallel split needs no change here.
        q = self.wq(x).view(B, N, -1, self.head_dim)  # (B, N, H, D)
        k = self.wk(x).view(B, N, -1, self.head_dim)  # (B, N, Hkv, D)
        v = self.wv(x).view(B, N, -1, self.head_dim)  # (B, N, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        out = self.inner_attention(q, k, v, cu_seqlens, max_seqlen)  # (B, N, H, D)
        return self.wo(out.reshape(B, N, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); chunk > 0 runs it over that many tokens at a time (fused.py)."""

    def __init__(self, dim: int, hidden: int, chunk: int = 0, compile: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.chunk, self.compile = chunk, compile

    def forward(self, x):
        return swiglu(x, self.w1.weight, self.w3.weight, self.w2.weight, self.chunk, self.compile)


# -- model.compile: the block's non-attention parts as three compiled functions ---------------------------
# Weights are arguments, so one compiled graph serves every layer (no per-module guards or recompiles);
# the attention core stays an opaque eager call between them (its Triton Function and the selective
# checkpoint hooks are not traced).

def _qkv_stage(x, norm_w, wq, wk, wv, cos, sin, eps: float, head_dim: int, bq=None, bk=None, bv=None, qn=None,
               kn=None):
    # bq/bk/bv: q/k/v biases (Qwen2); qn/kn: q/k head-dim RMSNorm gains (Qwen3). None: absent (one graph each).
    B, N, _ = x.shape
    h = rms_norm_math(x, norm_w, eps)
    q = F.linear(h, wq, bq).view(B, N, -1, head_dim)  # (B, N, H, D)
    k = F.linear(h, wk, bk).view(B, N, -1, head_dim)  # (B, N, Hkv, D)
    v = F.linear(h, wv, bv).view(B, N, -1, head_dim)
    if qn is not None:
        q, k = rms_norm_math(q, qn, eps), rms_norm_math(k, kn, eps)
    return rope_math(q, cos, sin), rope_math(k, cos, sin), v


def _post_attention_stage(x, out, wo, norm_w, eps: float):
    y = x + F.linear(out.flatten(2), wo)  # out (B, N, H, D) -> (B, N, H*D)
    return y, rms_norm_math(y, norm_w, eps)


def _mlp_stage(y, h, w1, w3, w2):
    return y + swiglu_math(h, w1, w3, w2)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str = "auto", layer: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, backend, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim, cfg.mlp_chunk, cfg.compile)
        self.compile = cfg.compile

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None):
        # The MLP must stay the block's last op: a checkpoint recomputation skips the chunked MLP's
        # forward because the recomputed block output is discarded (fused.ChunkedSwiGLU).
        if self.compile:
            return self._forward_compiled(x, cos, sin, cu_seqlens, max_seqlen)
        x = x + self.attention(self.attention_norm(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.feed_forward(self.ffn_norm(x))

    def _forward_compiled(self, x, cos, sin, cu_seqlens, max_seqlen):
        a, f, eps = self.attention, self.feed_forward, self.attention_norm.eps
        qn, kn = (None, None) if a.q_norm is None else (a.q_norm.weight, a.k_norm.weight)
        q, k, v = compiled(_qkv_stage)(x, self.attention_norm.weight, a.wq.weight, a.wk.weight, a.wv.weight,
                                       cos, sin, eps, a.head_dim, a.wq.bias, a.wk.bias, a.wv.bias, qn, kn)
        out = a.inner_attention(q, k, v, cu_seqlens, max_seqlen)  # (B, N, H, D)
        y, h = compiled(_post_attention_stage)(x, out, a.wo.weight, self.ffn_norm.weight, eps)
        if f.chunk > 0:
            return y + f(h)
        return compiled(_mlp_stage)(y, h, f.w1.weight, f.w3.weight, f.w2.weight)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_backend: str = "auto"):
        super().__init__()
        cfg = cfg.resolved()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, attn_backend, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @property
    def output_weight(self) -> torch.Tensor:
        """(vocab, dim) weight of the lm head (the embedding when tied); the loss applies it in chunks."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def reset_parameters(self) -> None:
        # GPT-2 / Llama init: N(0, std) everywhere, residual output projections scaled by 1/sqrt(2 * n_layers)
        # so the residual stream's variance does not grow with depth.
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=resid_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self, exclude_embedding: bool = False) -> int:
        # ds_numel: the whole size of a parameter ZeRO-3 has partitioned (its own tensor is then empty)
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())
        if exclude_embedding and self.output is not None:
            emb = self.tok_embeddings.weight
            n -= getattr(emb, "ds_numel", emb.numel())  # a lookup, not a matmul (a tied one is the head too)
        return n

    def forward(self, tokens, position_ids=None, cu_seqlens=None, max_seqlen=None):
        """tokens (B, N) int64; position_ids (B, N) (default 0..N-1); cu_seqlens int32 over the flattened
        B*N tokens with max_seqlen its longest piece. Returns the final normed hidden states (B, N, dim)."""
        B, N = tokens.shape
        if position_ids is None:
            position_ids = torch.arange(N, device=tokens.device).expand(B, N)
        elif position_ids.shape != tokens.shape:
            raise ValueError(f"GPT.forward: position_ids {tuple(position_ids.shape)} must match tokens "
                             f"{tuple(tokens.shape)}")
        if cu_seqlens is not None and max_seqlen is None:
            raise ValueError("GPT.forward: max_seqlen is required with cu_seqlens")
        table_dtype = torch.float64 if self.tok_embeddings.weight.dtype == torch.float64 else torch.float32
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta,
                                self.config.rope_scaling, table_dtype)  # YaRN's attention factor included
        x = self.tok_embeddings(tokens)  # (B, N, dim)
        if not self.config.fp32_residual:
            x = x.to(compute_dtype(x))
        for layer in self.layers:
            x = self._run_layer(layer, x, cos, sin, cu_seqlens, max_seqlen)
        return self.norm(x)

    def _run_layer(self, layer, x, cos, sin, cu_seqlens, max_seqlen):
        # Activation checkpointing (none | full | selective) and CPU offload: trainer/activations.py.
        return run_layer(layer, x, cos, sin, cu_seqlens, max_seqlen, self.config.ckpt,
                         self.config.offload_activations)
