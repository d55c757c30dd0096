"""Evaluations that run on a trained model: passkey retrieval (trainer/eval_passkey.py) and perplexity by
position (ppl.py). Both load a trainer checkpoint the same way and write their result as <stem>.json plus a
plot, <stem>.png."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch


def write_json_and_plot(result: dict, stem, plot: Callable[[dict, Path, str], None],
                        title: str = "") -> tuple[Path, Path]:
    """<stem>.json (the result) and <stem>.png (plot(result, path, title)); returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(result, indent=1))
    plot(result, png_path, title)
    return json_path, png_path


def model_config(base: dict, overrides: dict, train_len: int = 0):
    """ModelConfig from a saved dict (unknown keys dropped) with key=value overrides merged by OmegaConf, so
    nested keys (model.rope_scaling.factor=4) and types are checked against the schema. A scaling type that
    needs the pretraining length and has none takes max_position_embeddings, else `train_len`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from trainer.model import ModelConfig

    known = ModelConfig.__dataclass_fields__
    base = {k: v for k, v in base.items() if k in known}
    base.update(ckpt="none", offload_activations="none", compile=False)  # inference: nothing to keep
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), base, OmegaConf.create(dict(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ValueError(f"model overrides {dict(overrides)}: {str(exc).splitlines()[0]}") from None
    rs = cfg.rope_scaling
    if rs.type in ("dynamic", "llama3", "yarn") and not rs.original_max_position_embeddings:
        rs.original_max_position_embeddings = cfg.max_position_embeddings or train_len
    return cfg


def load_checkpoint_model(checkpoint, overrides: dict, attention_backend: str, device: torch.device):
    """(model, tokenizer, saved run config, info) from a trainer checkpoint (a run dir or checkpoints/step_N),
    with key=value ModelConfig `overrides`; info: {"checkpoint": dir, "step": N}."""
    from trainer.checkpoint import resolve_checkpoint, weights_misfit
    from trainer.data.tokenizer import build_tokenizer
    from trainer.model import GPT

    ckpt = resolve_checkpoint(checkpoint, "checkpoint")
    shared = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    if "model" not in shared:
        raise ValueError(f"checkpoint={str(ckpt)!r} was written under ZeRO (its weights are shards): export it "
                         f"with python -m trainer.export and evaluate the Hugging Face directory")
    saved = shared["config"]
    model_cfg = model_config(saved["model"], overrides, train_len=int(saved["data"]["seq_len"]))
    model = GPT(model_cfg, attn_backend=attention_backend)
    misfit = weights_misfit(model, shared["model"])
    if misfit:  # a model override that changes a shape (dim, layers, heads, vocab)
        raise ValueError(f"checkpoint={str(ckpt)!r} does not fit the model built with overrides {overrides}: {misfit}")
    model.load_state_dict(shared["model"])
    model.to(device).eval()
    data = saved["data"]
    tok_path = data.get("tokenizer_path") or saved["model"].get("path")  # data.tokenizer=hf defaults to model.path
    tok = build_tokenizer(SimpleNamespace(tokenizer=data["tokenizer"], tokenizer_path=tok_path))
    return model, tok, saved, {"checkpoint": str(ckpt), "step": int(shared["step"])}
