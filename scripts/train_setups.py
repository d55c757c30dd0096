"""The setups bench_train.py compares: our GPT and Hugging Face LlamaForCausalLM (+ Liger kernels).

    name, opts = parse_setup("ringflash:ckpt=full,compile=0")
    model, loss_fn = build_ringflash(model_shape("llama_220m"), opts, device, torch.bfloat16)
    loss = loss_fn(tokens, labels)                                    # mean CE over the shifted tokens

Imports stay lazy and narrow (trainer.model / trainer.model.loss, transformers, liger_kernel) so a GPU image
without hydra, datasets, wandb or deepspeed runs the benchmark.
"""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32000
# ringflash's defaults: no attention recompute; the kept attention outputs go to pinned CPU memory (side
# stream, prefetched), so what stays on the GPU is about what HF's full checkpointing keeps.
# det=0: atomic-dQ attention backward (attention.set_deterministic); loss_compile: the loss chunks' softmax
# gradient through torch.compile (-1: as compile); window: model.attn_window (0: full causal attention)
RINGFLASH = dict(ckpt="selective", offload="attention", mlp_chunk=8192, compile=1, loss_chunk=2048,
                 backend="auto", det=1, loss_compile=-1, window=0)
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, ffn_dim=128, rope_theta=500000.0)


def parse_setup(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    if name not in ("ringflash", "hf", "hf_liger"):
        raise ValueError(f"--setups: unknown setup {name!r} in {spec!r} (ringflash, hf, hf_liger)")
    opts = dict(RINGFLASH) if name == "ringflash" else {"attn": "sdpa"}
    given = set()
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in opts:
            raise ValueError(f"--setups: bad option {item!r} in {spec!r}; {name} takes {sorted(opts)}")
        opts[key] = type(opts[key])(value) if not isinstance(opts[key], str) else value
        given.add(key)
    if name == "ringflash" and opts["ckpt"] != "selective" and "offload" not in given:
        opts["offload"] = "none"  # the default offloads what only ckpt=selective keeps
    return name, opts

def model_shape(name: str) -> dict:
    """configs/model/<name>.yaml (flat `key: value` lines), its vocab_size or 32000 where it has none (0), or the CPU
    dry-run shape `tiny`."""
    if name == "tiny":
        return dict(TINY, vocab_size=VOCAB)
    cfg = {}
    for line in (ROOT / "configs" / "model" / f"{name}.yaml").read_text().splitlines():
        key, _, value = line.split("#")[0].partition(":")
        if value.strip() and key.strip() != "name":
            v = value.strip()
            cfg[key.strip()] = {"true": True, "false": False}[v] if v in ("true", "false") else _number(v)
    return {**cfg, "vocab_size": int(cfg.get("vocab_size") or VOCAB)}


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def build_ringflash(shape: dict, opts: dict, device, dtype):
    from attention import set_deterministic
    from trainer.model.loss import chunked_cross_entropy
    from trainer.model import GPT, ModelConfig

    set_deterministic(bool(opts["det"]))
    backend = opts["backend"] if device.type == "cuda" else "reference"
    cfg = ModelConfig(**shape, ckpt=opts["ckpt"], offload_activations=opts["offload"],
                      mlp_chunk=opts["mlp_chunk"], compile=bool(opts["compile"]), attn_window=opts["window"])
    with torch.device(device):
        model = GPT(cfg, attn_backend=backend).to(dtype)

    loss_compile = opts["compile"] if opts["loss_compile"] < 0 else opts["loss_compile"]

    def loss_fn(tokens, labels):
        hidden = model(tokens)  # (1, N, dim)
        loss = chunked_cross_entropy(hidden.flatten(0, 1), model.output_weight, labels.flatten(),
                                     opts["loss_chunk"], compile=bool(loss_compile))
        return loss / (labels.numel() - 1)

    return model, loss_fn

def _liger_patch(model):
    """Apply Liger to this instance; returns a restore() for the module globals it also replaces."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama as ml

    saved = {n: getattr(ml, n) for n in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    saved_forward = ml.LlamaForCausalLM.forward
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True,
                                cross_entropy=False, model=model)

    def restore():
        for n, v in saved.items():
            setattr(ml, n, v)
        ml.LlamaForCausalLM.forward = saved_forward

    return restore

def build_hf(shape: dict, opts: dict, device, dtype, seq_len: int, liger: bool):
    import warnings

    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["dim"],
                         intermediate_size=shape["ffn_dim"], num_hidden_layers=shape["n_layers"],
                         num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_kv_heads"],
                         head_dim=shape["head_dim"], max_position_embeddings=max(seq_len, 8192),
                         rope_theta=shape.get("rope_theta", 10000.0), rms_norm_eps=1e-5,
                         tie_word_embeddings=bool(shape.get("tie_embeddings", False)), use_cache=False)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=opts["attn"], dtype=dtype)
        except TypeError:  # transformers before `dtype` replaced `torch_dtype`
            model = AutoModelForCausalLM.from_config(config, attn_implementation=opts["attn"], torch_dtype=dtype)
    model.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_enable in 5.2x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if liger:
        _liger_patch(model)  # the worker process ends after this cell: nothing to restore

    def loss_fn(tokens, labels):
        return model(input_ids=tokens, labels=tokens).loss  # HF shifts the labels itself

    return model, loss_fn

def n_flop_params(shape: dict) -> int:
    """Parameters that do matmuls (everything but the input embedding), from our model on the meta device."""
    from trainer.model import GPT, ModelConfig

    with torch.device("meta"):
        return GPT(ModelConfig(**shape)).num_params(exclude_embedding=True)

