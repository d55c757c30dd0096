"""RoPE: inverse frequencies of every scaling type Hugging Face Llama-family checkpoints use, and the cos/sin
tables for explicit position ids.

    scaling = RopeScalingConfig(type="yarn", factor=8.0, original_max_position_embeddings=8192)
    cos, sin = rope_cos_sin(position_ids, head_dim=128, theta=500000.0, scaling=scaling)   # (B, N, 1, 64) each

Types (the formulas of transformers' modeling_rope_utils.py, computed in fp64):
  none     theta^(-2i/d)
  linear   position interpolation: every frequency divided by `factor`
  dynamic  NTK-aware: the base grows with the current length L = max(position_ids) + 1 once L exceeds
           `original_max_position_embeddings` (Hugging Face's `max_position_embeddings` for this type). Hugging
           Face takes L the same way, over the whole batch, so packed rows use their longest document's end.
           A context-parallel shard sees only its own positions, so this type is refused with parallel.cp > 1.
  llama3   Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between
  yarn     YaRN: per-frequency blend of interpolation and extrapolation, and cos/sin multiplied by the
           attention factor (default 0.1 ln(factor) + 1), so q.k grows by its square
The tables depend on the position ids alone: positions restart per packed document and stay global under
context parallelism because the trainer shards the position ids with the tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

ROPE_TYPES = ("none", "linear", "dynamic", "llama3", "yarn")


@dataclass
class RopeScalingConfig:
    # none | linear | dynamic | llama3 | yarn; "" (model=hf only): the checkpoint's, with any field set here
    # that differs from its default applied on top
    type: str = "none"
    factor: float = 1.0
    original_max_position_embeddings: int = 0  # the pretraining length (0: the checkpoint's when model=hf)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: Optional[float] = None  # yarn: None or 0 -> from factor (and mscale / mscale_all_dim)
    mscale: float = 0.0  # yarn (DeepSeek-style attention factor, used with mscale_all_dim)
    mscale_all_dim: float = 0.0  # yarn
    truncate: bool = True  # yarn: round the correction range outwards to whole dims

    def validate(self, key: str = "model.rope_scaling") -> None:
        if self.type not in ROPE_TYPES:
            raise ValueError(f"{key}.type must be one of {ROPE_TYPES}, got {self.type!r}")
        if self.type != "none" and not self.factor > 0:
            raise ValueError(f"{key}.factor must be > 0, got {self.factor}")
        if self.type in ("dynamic", "llama3", "yarn") and self.original_max_position_embeddings < 1:
            raise ValueError(f"{key}.original_max_position_embeddings must be >= 1 for type {self.type}, got "
                             f"{self.original_max_position_embeddings}")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(f"{key}: llama3 needs high_freq_factor > low_freq_factor > 0, got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")


def as_rope_scaling(value) -> RopeScalingConfig:
    """A RopeScalingConfig from itself, a dict (a saved config) or a float (the former linear factor)."""
    if isinstance(value, RopeScalingConfig):
        return value
    if value is None:
        return RopeScalingConfig()
    if isinstance(value, (int, float)):
        return RopeScalingConfig(type="none" if value == 1 else "linear", factor=float(value))
    if isinstance(value, dict) or hasattr(value, "items"):
        fields = RopeScalingConfig.__dataclass_fields__
        unknown = [k for k in value if k not in fields]
        if unknown:
            raise ValueError(f"model.rope_scaling: unknown keys {unknown} (known: {list(fields)})")
        return RopeScalingConfig(**dict(value))
    raise ValueError(f"model.rope_scaling must be a mapping of type/factor/..., got {value!r}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_scaling(scaling: RopeScalingConfig) -> float:
    """The factor cos and sin are multiplied by: YaRN's attention factor, 1 for the other types."""
    if scaling.type != "yarn":
        return 1.0
    if scaling.attention_factor:
        return float(scaling.attention_factor)
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return yarn_mscale(scaling.factor)


def _yarn_inv_freq(base_inv: torch.Tensor, head_dim: int, theta: float, s: RopeScalingConfig) -> torch.Tensor:
    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
        return head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64, device=base_inv.device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the frequency (high frequencies), 0: interpolate it
    return base_inv / s.factor * (1 - extrapolate) + base_inv * extrapolate


def _llama3_inv_freq(base_inv: torch.Tensor, s: RopeScalingConfig) -> torch.Tensor:
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / base_inv
    scaled = torch.where(wavelen > low_wavelen, base_inv / s.factor, base_inv)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inv_freq(head_dim: int, theta: float, scaling: RopeScalingConfig, position_ids: Optional[torch.Tensor] = None,
             device=None) -> torch.Tensor:
    """fp64 inverse frequencies (head_dim/2,); `dynamic` reads the current length from position_ids."""
    device = position_ids.device if position_ids is not None else device
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    t = scaling.type
    if t == "dynamic":
        if position_ids is None:
            raise ValueError("rope: type dynamic needs the position ids (its base depends on the length)")
        orig = scaling.original_max_position_embeddings
        # On the device (no host sync): L = max(max position + 1, orig), base * (f L / orig - (f - 1))^(d/(d-2))
        length = (position_ids.max().double() + 1).clamp(min=orig)
        base = theta * (scaling.factor * length / orig - (scaling.factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / base ** exponent
    base_inv = 1.0 / (theta ** exponent)
    if t == "none":
        return base_inv
    if t == "linear":
        return base_inv / scaling.factor
    if t == "llama3":
        return _llama3_inv_freq(base_inv, scaling)
    if t == "yarn":
        return _yarn_inv_freq(base_inv, head_dim, theta, scaling)
    raise ValueError(f"model.rope_scaling.type must be one of {ROPE_TYPES}, got {t!r}")


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 scaling: Union[RopeScalingConfig, float, None] = None, dtype=torch.float32):
    """cos/sin tables for explicit positions: position_ids (B, N) -> two (B, N, 1, head_dim/2) tensors, already
    multiplied by the attention scaling (YaRN). `scaling` may be a float: a linear factor.

    Angles are formed in fp64: at position 1e6 an fp32 product pos * inv_freq is off by ~0.03 rad.
    """
    scaling = as_rope_scaling(scaling)
    freqs = inv_freq(head_dim, theta, scaling, position_ids)  # (head_dim/2,)
    angles = position_ids.double()[..., None] * freqs  # (B, N, head_dim/2)
    m = attention_scaling(scaling)
    cos, sin = angles.cos(), angles.sin()
    if m != 1.0:
        cos, sin = cos * m, sin * m
    return cos.to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]  # broadcast over heads
