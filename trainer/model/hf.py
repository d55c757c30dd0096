"""Hugging Face Llama / Mistral / Qwen2 / Qwen3 checkpoints in and out of the trainer's GPT.

    cfg = config_from_hf("/models/llama-3.2-1b", base=ModelConfig(ckpt="selective", rope_theta=0,
                                                                  rope_scaling=RopeScalingConfig(type="")))
    model = build_pretrained(cfg, device="cuda")          # built on meta, each tensor read once from the mmap
    save_hf(model.state_dict(), cfg, "out/hf", source_dir=cfg.path)   # config.json, safetensors, tokenizer

The weights need no conversion: the GPT rotates the half-split pairs (rotate_half) as Hugging Face does, and
every projection keeps the [out, in] layout of nn.Linear. Names map one to one (`hf_key_map`). The config is
read with transformers' AutoConfig and written with its config classes, so the keys are the ones the installed
transformers reads (`rope_parameters` in transformers 5, `rope_scaling` + `rope_theta` before).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import fields, replace
from pathlib import Path
from typing import Iterator, Optional

import torch

from .gpt import GPT, ModelConfig
from .rope import RopeScalingConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
HF_ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3", "yarn": "yarn"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "generation_config.json")
# config.json keys an export of the same family copies from the source: without a window Qwen's max_window_layers
# is unread, and Qwen2 / Mistral attention ignores attention_bias (Qwen2 always has q/k/v biases)
SOURCE_ONLY_KEYS = ("max_window_layers", "attention_bias")
# Buffers some older exports saved; recomputed here from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# -- config.json -> ModelConfig ----------------------------------------------------------------------------

def _read_hf_config(path):
    from transformers import AutoConfig

    d = Path(path)
    if not d.is_dir():
        raise ValueError(f"model.path: {d} is not a directory")
    if not (d / "config.json").is_file():
        raise ValueError(f"model.path: {d / 'config.json'} not found (a Hugging Face model directory has one)")
    try:
        return AutoConfig.from_pretrained(str(d), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{d / 'config.json'}: {str(e).splitlines()[0]}") from None


def _rope_params(hf) -> dict:
    params = getattr(hf, "rope_parameters", None)
    if params is None:  # transformers 4: rope_scaling plus a separate rope_theta
        params = {**(getattr(hf, "rope_scaling", None) or {}), "rope_theta": getattr(hf, "rope_theta", 10000.0)}
    return dict(params)


def _check_supported(hf, where: str) -> None:
    mt = hf.model_type
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where}: model_type={mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    bad = []
    if getattr(hf, "hidden_act", "silu") != "silu":
        bad.append(("hidden_act", hf.hidden_act, "silu"))
    # only Llama and Qwen3 read these (Qwen2 always has q/k/v biases and Mistral none, whatever config.json says)
    if mt in ("llama", "qwen3") and getattr(hf, "attention_bias", False):
        bad.append(("attention_bias", True, "false (it also puts a bias on o_proj)"))
    if mt == "llama" and getattr(hf, "mlp_bias", False):
        bad.append(("mlp_bias", True, "false"))
    params = _rope_params(hf)
    prf = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None))
    if prf is not None and prf != 1.0:
        bad.append(("partial_rotary_factor", prf, "1.0"))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in HF_ROPE_TYPES:
        bad.append(("rope_type", rope_type, " | ".join(HF_ROPE_TYPES)))
    if bad:
        key, value, want = bad[0]
        raise ValueError(f"{where}: {key}={value!r} is not supported (need {want})")


def _window_from_hf(hf, where: str) -> tuple[int, int]:
    """(attn_window, window_layers_from) of the checkpoint."""
    window = getattr(hf, "sliding_window", None) or 0
    if hf.model_type == "mistral" or not window:
        return window, 0
    if hf.model_type == "llama":
        return 0, 0
    kinds = list(getattr(hf, "layer_types", None) or [])
    sliding = [i for i, t in enumerate(kinds) if t == "sliding_attention"]
    if not sliding:
        return 0, 0
    if sliding != list(range(sliding[0], len(kinds))) or set(kinds) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"{where}: layer_types={kinds} is not supported (sliding layers must be the last ones)")
    return window, sliding[0]


def _rope_from_hf(hf, params: dict) -> RopeScalingConfig:
    t = HF_ROPE_TYPES[params.get("rope_type", params.get("type", "default"))]
    if t == "none":
        return RopeScalingConfig()
    defaults = RopeScalingConfig()
    factor = params.get("factor")
    orig = params.get("original_max_position_embeddings") or hf.max_position_embeddings
    if t == "dynamic":  # transformers scales dynamic NTK against max_position_embeddings itself
        orig = hf.max_position_embeddings
    if factor is None:  # yarn without a factor: the ratio of the two lengths, as transformers takes it
        factor = hf.max_position_embeddings / orig
    kw = {f.name: params[f.name] for f in fields(RopeScalingConfig)
          if f.name in params and params[f.name] is not None and f.name not in ("type", "factor")}
    kw["original_max_position_embeddings"] = int(orig)
    for key in ("beta_fast", "beta_slow"):  # transformers: a falsy value means the default
        kw[key] = kw.get(key) or getattr(defaults, key)
    return RopeScalingConfig(type=t, factor=float(factor), **kw)


def _merge_rope(checkpoint: RopeScalingConfig, base: RopeScalingConfig, hf) -> RopeScalingConfig:
    """RoPE scaling of a model=hf run: type "" keeps the checkpoint's, with base fields that differ from their
    defaults on top; a named type replaces it (its pretraining length defaulting to the checkpoint's)."""
    defaults = RopeScalingConfig()
    changed = {f.name: getattr(base, f.name) for f in fields(RopeScalingConfig)
               if f.name != "type" and getattr(base, f.name) != getattr(defaults, f.name)}
    if base.type == "":
        if checkpoint.type == "none" and changed:
            raise ValueError(f"model.rope_scaling: {changed} would be ignored, the checkpoint has no RoPE scaling: "
                             f"name model.rope_scaling.type too")
        return replace(checkpoint, **changed)
    out = replace(base)
    if out.original_max_position_embeddings == 0:
        same = checkpoint.type == base.type and checkpoint.original_max_position_embeddings
        out.original_max_position_embeddings = (checkpoint.original_max_position_embeddings if same
                                                else hf.max_position_embeddings)
    return out


def config_from_hf(path, base: Optional[ModelConfig] = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face directory. Training knobs (ckpt, compile, mlp_chunk, offload,
    fp32_residual, init_std ...) come from `base`; so do RoPE overrides: base.rope_theta != 0 replaces the
    checkpoint's theta and base.rope_scaling.type != "" its scaling (no base: everything from the checkpoint).
    base.attn_window > 0 and base.max_position_embeddings > 0 replace the checkpoint's too."""
    if base is None:
        base = ModelConfig(name="hf", rope_theta=0, rope_scaling=RopeScalingConfig(type=""))
    hf = _read_hf_config(path)
    where = str(Path(path) / "config.json")
    _check_supported(hf, where)
    params = _rope_params(hf)
    window, window_from = _window_from_hf(hf, where)
    if base.attn_window > 0:
        window, window_from = base.attn_window, base.window_layers_from
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    cfg = replace(
        base, name=base.name or "hf", path=str(path), hf_model_type=hf.model_type, vocab_size=hf.vocab_size,
        dim=hf.hidden_size, n_layers=hf.num_hidden_layers, n_heads=hf.num_attention_heads,
        n_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads, head_dim=head_dim,
        ffn_dim=hf.intermediate_size, norm_eps=hf.rms_norm_eps,
        rope_theta=base.rope_theta or float(params.get("rope_theta", 10000.0)),
        rope_scaling=_merge_rope(_rope_from_hf(hf, params), base.rope_scaling, hf),
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=hf.model_type == "qwen2", qk_norm=hf.model_type == "qwen3",
        attn_window=window, window_layers_from=window_from,
        max_position_embeddings=base.max_position_embeddings or hf.max_position_embeddings)
    return cfg.resolved()


# -- safetensors -> GPT ------------------------------------------------------------------------------------

def hf_key_map(cfg: ModelConfig) -> dict:
    """Our parameter name -> the Hugging Face one (lm_head only when untied)."""
    keys = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        keys["output.weight"] = "lm_head.weight"
    attn = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
    mlp = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        keys[ours + "attention_norm.weight"] = theirs + "input_layernorm.weight"
        keys[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for a, b in attn.items():
            keys[f"{ours}attention.{a}.weight"] = f"{theirs}self_attn.{b}.weight"
            if cfg.qkv_bias and a != "wo":
                keys[f"{ours}attention.{a}.bias"] = f"{theirs}self_attn.{b}.bias"
        if cfg.qk_norm:
            for n in ("q_norm", "k_norm"):
                keys[f"{ours}attention.{n}.weight"] = f"{theirs}self_attn.{n}.weight"
        for a, b in mlp.items():
            keys[f"{ours}feed_forward.{a}.weight"] = f"{theirs}mlp.{b}.weight"
    return keys


def _weight_files(path: Path) -> dict:
    """HF tensor name -> the safetensors file holding it (from the index, or by listing a single file)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        for name in sorted(set(weight_map.values())):
            if not (path / name).is_file():
                raise ValueError(f"{index}: shard {name} is named in the index but {path / name} is missing")
        return {k: path / v for k, v in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model.path: no *.safetensors (nor model.safetensors.index.json) in {path}")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            out.update({k: f for k in st.keys()})
    return out


def hf_tensors(path, cfg: ModelConfig) -> Iterator[tuple[str, str, Path, torch.Tensor]]:
    """(our name, HF name, file, tensor) for every parameter, one tensor at a time from the memory-mapped files, after
    checking that the names match. ValueError naming the missing / unexpected keys."""
    from safetensors import safe_open

    path = Path(path)
    files = _weight_files(path)
    keys = hf_key_map(cfg)
    known = set(keys.values()) | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing = sorted(set(keys.values()) - set(files))
    unexpected = sorted(k for k in set(files) - known if not k.endswith(IGNORED_SUFFIXES))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit the config: missing keys {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}, unexpected keys {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
    theirs_to_ours = {v: k for k, v in keys.items()}
    by_file: dict = {}
    for name in keys.values():
        by_file.setdefault(files[name], []).append(name)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as st:
            for name in names:
                yield theirs_to_ours[name], name, f, st.get_tensor(name)


def _shape(p: torch.Tensor) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter is empty outside a gather


@torch.no_grad()
def load_hf_weights(model: GPT, path, *, dtype: Optional[torch.dtype] = None, device=None) -> None:
    """Copy a Hugging Face checkpoint into `model`, one tensor at a time. A model built on the meta device is
    first materialised on `device` (default cpu) in `dtype` (default its own); a built one is moved there if asked.
    A model built under deepspeed.zero.Init (ZeRO-3, dtype and device fixed there) is filled parameter by
    parameter: gathered, written by rank 0, partitioned again, so one whole parameter exists at a time."""
    params = dict(model.named_parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params.values())
    if partitioned:
        import deepspeed  # deepspeed.zero is an attribute of the package, not an importable module
        import torch.distributed as dist

        writer = dist.get_rank() == 0
    elif any(p.is_meta for p in params.values()):
        if dtype is not None:
            model.to(dtype)
        model.to_empty(device=device or "cpu")  # GPT keeps no buffers: cos/sin come from the positions each call
        params = dict(model.named_parameters())
    elif dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    # every rank reads and checks each tensor (the mmap is shared), so a bad file stops all ranks alike
    for ours, theirs, f, tensor in hf_tensors(path, model.config):
        p = params[ours]
        if tuple(tensor.shape) != _shape(p):
            raise ValueError(f"{f}: shape mismatch for {theirs}: checkpoint {tuple(tensor.shape)}, model "
                             f"{_shape(p)}")
        if not partitioned:
            p.copy_(tensor)
            continue
        # on exit, rank 0's values are partitioned out to every rank
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if writer:
                p.copy_(tensor)


def build_pretrained(cfg: ModelConfig, attn_backend: str = "auto", device="cpu", dtype=torch.float32,
                     zero_init=None) -> GPT:
    """The GPT of a model=hf config (config_from_hf) with its weights: built on the meta device, then each tensor
    read once into its place, so no second copy of the model exists at any time. zero_init: a
    parallel.data_parallel.zero3_init(...) context (ZeRO-3): the model is built inside it instead, partitioned
    over the ranks as it is created (its random init lands on shards the checkpoint then overwrites), and no
    rank ever holds more than its shard plus one gathered parameter; dtype and device are the context's."""
    if not cfg.path:
        raise ValueError("build_pretrained: cfg.path (model.path) is empty")
    if zero_init is not None:
        with zero_init:
            model = GPT(cfg, attn_backend=attn_backend)
        load_hf_weights(model, cfg.path)
        return model
    with torch.device("meta"):
        model = GPT(cfg, attn_backend=attn_backend)
    load_hf_weights(model, cfg.path, dtype=dtype, device=device)
    return model


# -- GPT -> Hugging Face directory -------------------------------------------------------------------------

def to_hf_state_dict(state_dict: dict, cfg: ModelConfig) -> dict:
    """Our parameter names -> Hugging Face's (no lm_head when tied). A prefix such as `model.` or `module.`
    left by a wrapper is not expected: pass the GPT's own state dict."""
    keys = hf_key_map(cfg.resolved())
    missing = sorted(set(keys) - set(state_dict))
    if missing:
        raise ValueError(f"to_hf_state_dict: state dict lacks {missing[:6]} (keys look like "
                         f"{sorted(state_dict)[:3]})")
    return {theirs: state_dict[ours] for ours, theirs in keys.items()}


def export_model_type(cfg: ModelConfig) -> str:
    """The family an export writes: cfg.hf_model_type, else the one the features need (a from-scratch model:
    llama, or mistral with a sliding window). ValueError when the family cannot express the model."""
    mt = cfg.hf_model_type or ("qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else
                               "mistral" if cfg.attn_window else "llama")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model.hf_model_type must be one of {SUPPORTED_MODEL_TYPES}, got {mt!r}")
    wants = {"qkv_bias": mt == "qwen2", "qk_norm": mt == "qwen3"}
    for key, need in wants.items():
        if getattr(cfg, key) != need:
            raise ValueError(f"export as {mt}: model.{key}={getattr(cfg, key)} cannot be expressed by that family")
    if cfg.attn_window and (mt == "llama" or (mt == "mistral" and cfg.window_layers_from)):
        raise ValueError(f"export as {mt}: model.attn_window={cfg.attn_window} (from layer "
                         f"{cfg.window_layers_from}) cannot be expressed by that family")
    return mt


def _hf_rope(cfg: ModelConfig) -> dict:
    s = cfg.rope_scaling
    out = {"rope_type": "default" if s.type == "none" else s.type, "rope_theta": float(cfg.rope_theta)}
    if s.type == "none":
        return out
    out["factor"] = float(s.factor)
    if s.type in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = int(s.original_max_position_embeddings)
    if s.type == "llama3":
        out.update(low_freq_factor=float(s.low_freq_factor), high_freq_factor=float(s.high_freq_factor))
    if s.type == "yarn":
        out.update(beta_fast=float(s.beta_fast), beta_slow=float(s.beta_slow), truncate=bool(s.truncate))
        if s.attention_factor:
            out["attention_factor"] = float(s.attention_factor)
        if s.mscale and s.mscale_all_dim:
            out.update(mscale=float(s.mscale), mscale_all_dim=float(s.mscale_all_dim))
    return out


def hf_config(cfg: ModelConfig, source_dir=None, dtype: torch.dtype = torch.bfloat16):
    """The transformers config object of `cfg` (built by the family's own config class)."""
    import transformers
    from transformers import AutoConfig

    cfg = cfg.resolved()
    mt = export_model_type(cfg)
    s = cfg.rope_scaling
    # dynamic NTK scales against max_position_embeddings itself, so that one keeps the pretraining length
    max_pos = (s.original_max_position_embeddings if s.type == "dynamic" else
               cfg.max_position_embeddings or s.original_max_position_embeddings or 2048)
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
              head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=int(max_pos),
              rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std)
    if mt == "mistral":
        kw["sliding_window"] = cfg.attn_window or None
    elif mt in ("qwen2", "qwen3"):
        kw.update(use_sliding_window=bool(cfg.attn_window), sliding_window=cfg.attn_window or None)
        if cfg.attn_window:  # without a window the source's value (or the class default) stays, unread
            kw["max_window_layers"] = cfg.window_layers_from
    rope = _hf_rope(cfg)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kw["rope_parameters"] = rope
    else:
        theta = rope.pop("rope_theta")
        kw.update(rope_theta=theta, rope_scaling=None if rope["rope_type"] == "default" else
                  {"type": rope["rope_type"], **rope})
    if source_dir is not None and (Path(source_dir) / "config.json").is_file():
        src = json.loads((Path(source_dir) / "config.json").read_text())
        kw.update({k: src[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in src})
        if src.get("model_type") == mt:  # keys the family's modeling ignores here, kept as the source wrote them
            kw.update({k: src[k] for k in SOURCE_ONLY_KEYS if k in src and k not in kw})
    config = AutoConfig.for_model(mt, **kw)
    config.architectures = [ARCHITECTURES[mt]]
    config.dtype = str(dtype).removeprefix("torch.")  # written as "dtype" (transformers 5) / "torch_dtype"
    return config


def _shards(tensors: dict, max_shard_size: int) -> list[dict]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    return shards + [current] if current else shards


def save_hf(state_dict: dict, cfg: ModelConfig, out_dir, *, source_dir=None, dtype: torch.dtype = torch.bfloat16,
            max_shard_size: int = 5 * 2**30) -> Path:
    """Write a Hugging Face directory: config.json, model.safetensors (or model-0000i-of-0000n.safetensors with
    model.safetensors.index.json), and the tokenizer files and generation_config.json of `source_dir`.
    max_position_embeddings comes from cfg.max_position_embeddings (callers set the trained context)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(cfg, source_dir, dtype)
    tensors = {k: v.detach().to(device="cpu", dtype=dtype).contiguous()
               for k, v in to_hf_state_dict(state_dict, cfg).items()}
    shards = _shards(tensors, max_shard_size)
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()  # a previous export into the same directory must not leave extra shards
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.save_pretrained(str(out))
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(source_dir) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
    return out
