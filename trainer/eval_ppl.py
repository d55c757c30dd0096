"""Perplexity by position bucket on held-out long documents -> JSON + PNG (trainer/eval/ppl.py).

    python -m trainer.eval_ppl checkpoint=outputs/run seq_len=4096 docs=16
    python -m trainer.eval_ppl hf=outputs/run/hf seq_len=32768 model.rope_scaling.type=yarn model.rope_scaling.factor=4
    python -m trainer.eval_ppl checkpoint=outputs/run/checkpoints/step_300 data.path=long.jsonl buckets=[0,1024,8192]
    python -m trainer.eval_ppl --help

Arguments are key=value overrides of PplConfig (parsed by OmegaConf, as in trainer.eval_passkey). Documents:
the validation split of the run's data config (an HF directory: the stdlib corpus, tokenised with its own
tokenizer), or every document of data.path=FILE (.jsonl / .txt / ...). The trainer runs the same evaluation
every eval.ppl_every steps (trainer/loop.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .eval import load_checkpoint_model, model_config

HELP = {
    "checkpoint": "a run dir (its newest checkpoint) or a checkpoints/step_<N> dir (written with zero_stage 0)",
    "hf": "a Hugging Face model directory (config.json + safetensors + tokenizer), e.g. from trainer.export",
    "seq_len": "tokens per evaluated document; 0: the run's data.seq_len, or max_position_embeddings (hf)",
    "docs": "how many documents (each one document of >= seq_len + 1 tokens, never packed)",
    "buckets": "position boundaries, e.g. [0,4096,16384,65536]; 0 and seq_len are added; []: powers of 4 "
               "from seq_len/64",
    "out": "output stem (writes <out>.json and <out>.png); default <run dir>/ppl/step_<N>, or "
           "outputs/ppl/<hf dir name>_<seq_len> for hf",
    "data.path": "documents from this file instead of the run's validation split: every row of a .jsonl / .json / "
                 ".parquet / .csv (data.text_column), or a whole .txt file as one document; a dataset dir or hub "
                 "name: its validation split",
    "bos": "auto | true | false: prepend the tokenizer's bos (auto: when a Hugging Face tokenizer adds one itself)",
    "model.<key>": "ModelConfig overrides, e.g. model.rope_theta=1e6 or model.rope_scaling.type=yarn "
                   "model.rope_scaling.factor=4 (pretraining length: the checkpoint's, else the run's data.seq_len)",
    "device": "auto | cpu | cuda",
    "dtype": "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32",
    "attention_backend": "auto | gluon | triton | sdpa | reference",
    "loss_chunk": "tokens per lm-head chunk (memory: loss_chunk x vocab x 4 bytes)",
    "progress": "true | false: the progress bar over documents",
}


@dataclass
class PplConfig:
    checkpoint: Optional[str] = None
    hf: Optional[str] = None
    seq_len: int = 0
    docs: int = 8
    buckets: list[int] = field(default_factory=list)
    out: Optional[str] = None
    data: dict = field(default_factory=dict)  # DataConfig overrides
    bos: str = "auto"
    model: dict = field(default_factory=dict)  # ModelConfig overrides
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "auto"
    loss_chunk: int = 4096
    progress: bool = True


def usage() -> str:
    width = max(map(len, HELP)) + 2
    lines = [__doc__.strip().splitlines()[0], "", "usage: python -m trainer.eval_ppl (checkpoint=DIR | hf=DIR) "
             "[key=value ...]", ""]
    return "\n".join(lines + [f"  {k.ljust(width)}{v}" for k, v in HELP.items()])


def _resolve_dtype(cfg: PplConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"dtype must be auto, bf16 or fp32, got {cfg.dtype!r}")
    return torch.bfloat16 if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda") else None


def load_hf_model(cfg: PplConfig, device: torch.device, autocast: Optional[torch.dtype]):
    """(model, tokenizer, info) from a Hugging Face directory (trainer/model/hf.py), cfg.model overrides applied
    as `model=hf` training applies them: rope_theta / rope_scaling.type replace the checkpoint's when set."""
    from .data.tokenizer import HFTokenizer
    from .model.hf import build_pretrained, config_from_hf

    path = Path(cfg.hf)
    if not (path / "config.json").is_file():
        raise ValueError(f"hf={cfg.hf!r}: not a Hugging Face model directory (no config.json)")
    base = model_config({"name": "hf", "rope_theta": 0, "rope_scaling": {"type": ""}}, cfg.model)
    model_cfg = config_from_hf(str(path), base=base)
    # bf16 weights on the GPU: an 8B model in fp32 would take 32 GB before any activation.
    model = build_pretrained(model_cfg, attn_backend=cfg.attention_backend, device=device,
                             dtype=autocast or torch.float32).eval()
    return model, HFTokenizer(str(path)), {"hf": str(path)}


def _data_config(cfg: PplConfig, saved_data: Optional[dict], tokenizer_path: Optional[str]):
    """(DataConfig, split): the run's data config (or the stdlib corpus) with cfg.data overrides; a file given
    as data.path is read whole."""
    import os

    from .data import DataConfig

    known = DataConfig.__dataclass_fields__
    base = {k: v for k, v in (saved_data or {}).items() if k in known}
    if tokenizer_path:
        base.update(tokenizer="hf", tokenizer_path=tokenizer_path)
    for key in cfg.data:
        if key not in known:
            raise ValueError(f"data.{key}: not a DataConfig field")
    base.update(cfg.data)
    split = "validation"
    if cfg.data.get("path"):
        base["source"] = "hf"
        if os.path.isfile(cfg.data["path"]):  # an evaluation file: every document (no validation carve-out)
            base.update(val_fraction=0.0, max_files=cfg.data.get("max_files"))
            split = "train"
    return DataConfig(**base), split


def _check(cfg: PplConfig) -> None:
    if (cfg.checkpoint is None) == (cfg.hf is None):
        raise ValueError("give exactly one of checkpoint=<run dir or checkpoints/step_N dir> or hf=<Hugging Face "
                         "model dir> (python -m trainer.eval_ppl --help)")
    if cfg.docs < 1 or cfg.seq_len < 0 or cfg.loss_chunk < 1:
        raise ValueError(f"need docs >= 1, seq_len >= 0 and loss_chunk >= 1, got {cfg.docs}, {cfg.seq_len}, "
                         f"{cfg.loss_chunk}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.bos not in ("auto", "true", "false"):
        raise ValueError(f"bos must be auto, true or false, got {cfg.bos!r}")


def _load(cfg: PplConfig, device, autocast):
    """(model, tokenizer, seq_len, (DataConfig, split), default output stem, info) for checkpoint= or hf=."""
    if cfg.checkpoint is not None:
        model, tok, saved, info = load_checkpoint_model(cfg.checkpoint, cfg.model, cfg.attention_backend, device)
        seq_len = cfg.seq_len or int(saved["data"]["seq_len"])
        stem = Path(info["checkpoint"]).parent.parent / "ppl" / f"step_{info['step']}"
        return model, tok, seq_len, _data_config(cfg, saved["data"], None), stem, info
    model, tok, info = load_hf_model(cfg, device, autocast)
    seq_len = cfg.seq_len or model.config.max_position_embeddings
    if not seq_len:
        raise ValueError(f"hf={cfg.hf!r}: config.json has no max_position_embeddings; give seq_len=")
    stem = Path("outputs") / "ppl" / f"{Path(cfg.hf).resolve().name}_{seq_len}"
    return model, tok, seq_len, _data_config(cfg, None, cfg.hf), stem, info


def _documents(data_cfg, split: str, tok, seq_len: int, count: int, bos: bool):
    from .data.corpus import validate_data_config
    from .eval.ppl import load_documents, select_documents

    validate_data_config(data_cfg)
    if split == "train" and data_cfg.path.lower().endswith(".txt"):  # datasets would make each line a document
        text = Path(data_cfg.path).read_text(encoding="utf-8", errors="replace")
        return select_documents([text], tok, seq_len, count, bos, f"data.path={data_cfg.path!r}")
    return load_documents(data_cfg, tok, seq_len, count, bos=bos, split=split)


def run(cfg: PplConfig) -> dict:
    from .eval.ppl import evaluate_ppl, resolve_buckets, write_result
    from .parallelize import resolve_device

    _check(cfg)
    device = resolve_device(cfg.device, 0)
    autocast = _resolve_dtype(cfg, device)
    model, tok, seq_len, (data_cfg, split), stem, info = _load(cfg, device, autocast)
    buckets = resolve_buckets(cfg.buckets, seq_len)
    bos = cfg.bos == "true" or (cfg.bos == "auto" and getattr(tok, "add_bos", False))  # HFTokenizer.add_bos
    docs = _documents(data_cfg, split, tok, seq_len, cfg.docs, bos)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = evaluate_ppl(model, docs, buckets, device, autocast, cfg.loss_chunk, cfg.progress)
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result.update(info, model_overrides=dict(cfg.model), bos=bos,
                  data={"source": data_cfg.source, "path": data_cfg.path, "split": split})
    name = f"step {info['step']}" if "step" in info else Path(info["hf"]).name
    paths = write_result(result, cfg.out or stem, f"perplexity by position, {name}: {result['docs']} documents "
                                                  f"of {seq_len} tokens")
    table = ", ".join(f"{lab} {p:.3f}" for lab, p in zip(result["labels"], result["ppl"]))
    print(f"ppl {name} ({result['docs']} docs x {seq_len}): {table}; all {result['ppl_all']:.3f} "
          f"-> {paths[0]}, {paths[1]}")
    return result


def main(argv=None) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        print(usage())
        raise SystemExit(0)
    try:
        cli = OmegaConf.from_dotlist(args)
        cfg: PplConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PplConfig), cli))
    except OmegaConfBaseException as exc:
        raise ValueError(f"bad argument ({str(exc).splitlines()[0]}); python -m trainer.eval_ppl --help lists "
                         f"the keys") from None
    return run(cfg)


if __name__ == "__main__":
    try:
        main()
    except ValueError as exc:  # a user error: one line, no trace
        sys.exit(f"eval_ppl: {exc}")
