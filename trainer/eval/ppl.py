"""Perplexity by position: per-token NLL on whole held-out documents, averaged within position buckets.

    docs = load_documents(data_cfg, tokenizer, seq_len=4096, count=8)     # (8, 4097) int64, one document a row
    result = evaluate_ppl(model, docs, buckets=[0, 64, 256, 1024], device=torch.device("cpu"))
    write_result(result, "outputs/run/ppl/step_300")                      # step_300.json + step_300.png

Each row is the first seq_len + 1 tokens of ONE document (documents shorter than that are skipped, never
packed together), so a late bucket measures how the model uses a long context it really has. Position p is
the 0-based index of an input token; its loss predicts token p + 1 from the p + 1 tokens read so far.
Buckets are boundaries [b0, b1, ..., seq_len): bucket i holds positions b_i <= p < b_{i+1}, with 0 and
seq_len added and boundaries at or past seq_len dropped. The default is relative to seq_len: the powers
of 4 from seq_len / 64 up (128K: 0-4K, 4K-16K, 16K-64K, 64K-128K; 256: 0-4, 4-16, 16-64, 64-256).
Losses come from the chunked lm head (trainer/model/loss.py): no [seq_len, vocab] logits are ever built.
"""

from __future__ import annotations

import itertools
import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from trainer.data.corpus import load_corpus
from trainer.eval import write_json_and_plot
from trainer.model.loss import DEFAULT_CHUNK, token_losses

log = logging.getLogger(__name__)

CURVE_POINTS = 48  # log-spaced position bins of the plotted curve


def default_buckets(seq_len: int) -> list[int]:
    """0, the powers of 4 in [seq_len / 64, seq_len), seq_len: about four buckets at any length."""
    low = max(1, seq_len // 64)
    powers = [4 ** k for k in range(1, 32) if low <= 4 ** k < seq_len]
    return [0, *powers, seq_len]


def resolve_buckets(buckets: Optional[Sequence[int]], seq_len: int, key: str = "buckets") -> list[int]:
    """Boundaries from 0 to seq_len: the default when empty, else the given ones clipped to seq_len."""
    if not buckets:
        return default_buckets(seq_len)
    b = [int(x) for x in buckets]
    if any(x < 0 for x in b) or any(y <= x for x, y in zip(b, b[1:])):
        raise ValueError(f"{key} must be increasing non-negative positions, got {list(buckets)}")
    inside = [x for x in b if 0 < x < seq_len]
    return [0, *inside, seq_len]


def bucket_label(lo: int, hi: int) -> str:
    return f"{_short(lo)}-{_short(hi)}"


def _short(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


# -- documents ------------------------------------------------------------------------------------------

def _batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def select_documents(texts: Iterable[str], tokenizer, seq_len: int, count: int, bos: bool = False,
                     source: str = "the documents") -> np.ndarray:
    """The first seq_len + 1 tokens of each of the first `count` documents that have that many: (n, seq_len+1)
    int64, n <= count (a warning when fewer are found; ValueError when none is). bos: prepend tokenizer.bos_id."""
    need, rows, seen, longest = seq_len + 1, [], 0, 0
    for group in _batched(texts, 64):
        for ids in tokenizer.encode_batch(group):
            if bos:
                ids = np.concatenate([[tokenizer.bos_id], ids])
            seen += 1
            longest = max(longest, len(ids))
            if len(ids) >= need:
                rows.append(np.asarray(ids[:need], dtype=np.int64))
                if len(rows) == count:
                    return np.stack(rows)
    if not rows:
        raise ValueError(f"{source}: none of the {seen} documents has seq_len + 1 = {need} tokens (the longest has "
                         f"{longest}); lower seq_len or give data.path=FILE with longer documents")
    log.warning("%s: only %d of the %d documents asked for have %d tokens", source, len(rows), count, need)
    return np.stack(rows)


def load_documents(data_cfg, tokenizer, seq_len: int, count: int, bos: bool = False,
                   split: str = "validation") -> np.ndarray:
    """select_documents over `split` of a DataConfig's corpus (trainer.data.load_corpus), in corpus order."""
    docs = load_corpus(data_cfg, split)
    column = data_cfg.text_column
    source = (f"data.path={data_cfg.path!r} ({split})" if data_cfg.source == "hf"
              else f"data.source={data_cfg.source!r} ({split} split)")
    return select_documents((ex[column] for ex in docs), tokenizer, seq_len, count, bos, source)


# -- evaluation -----------------------------------------------------------------------------------------

@torch.no_grad()
def position_nll(model, documents, device, autocast_dtype: Optional[torch.dtype] = None,
                 chunk: int = DEFAULT_CHUNK, progress: bool = True) -> np.ndarray:
    """Mean NLL over documents at every position: documents (D, N + 1) -> (N,) float64.

    model: a trainer GPT (forward -> hidden states, lm head `output_weight`); one document per forward."""
    docs = torch.as_tensor(np.asarray(documents), dtype=torch.long)
    total = torch.zeros(docs.shape[1] - 1, dtype=torch.float64)
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    for row in tqdm(docs, desc="ppl", unit="doc", disable=not progress, dynamic_ncols=True):
        row = row.to(device)
        with ctx:
            hidden = model(row[None, :-1])[0]  # (N, dim)
            losses = token_losses(hidden, model.output_weight, row[1:], chunk)  # (N,) fp32
        total += losses.double().cpu()
    return (total / docs.shape[0]).numpy()


def summarize(nll: np.ndarray, buckets: Sequence[int], docs: int) -> dict:
    """Per-bucket mean NLL, ppl = exp(mean NLL) and token counts from per-position mean NLL `nll` (N,)."""
    seq_len = len(nll)
    bounds = resolve_buckets(buckets, seq_len)
    pairs = list(zip(bounds, bounds[1:]))
    mean = [float(nll[lo:hi].mean()) for lo, hi in pairs]
    # The plotted curve: log-spaced bins of x = p + 1 (tokens read), so each octave gets a few points.
    edges = np.unique(np.floor(np.geomspace(1, seq_len + 1, CURVE_POINTS + 1)).astype(np.int64) - 1)
    edges[-1] = seq_len
    curve = [(int(a), int(b), float(nll[a:b].mean())) for a, b in zip(edges, edges[1:]) if b > a]
    return {"seq_len": seq_len, "docs": int(docs), "boundaries": bounds, "buckets": [list(p) for p in pairs],
            "labels": [bucket_label(lo, hi) for lo, hi in pairs], "nll": mean, "ppl": [math.exp(v) for v in mean],
            "tokens": [(hi - lo) * int(docs) for lo, hi in pairs], "nll_all": float(nll.mean()),
            "ppl_all": math.exp(float(nll.mean())), "tokens_all": seq_len * int(docs),
            "curve": {"start": [c[0] for c in curve], "end": [c[1] for c in curve], "nll": [c[2] for c in curve]}}


def evaluate_ppl(model, documents, buckets: Optional[Sequence[int]], device, autocast_dtype=None,
                 chunk: int = DEFAULT_CHUNK, progress: bool = True) -> dict:
    """Perplexity by position bucket of `model` on `documents` (D, seq_len + 1); see summarize for the keys."""
    documents = np.asarray(documents)
    nll = position_nll(model, documents, device, autocast_dtype, chunk, progress)
    return summarize(nll, buckets, documents.shape[0])


# -- output ---------------------------------------------------------------------------------------------

def save_plot(result: dict, path, title: str = "") -> None:
    """ppl against tokens read (log x): the binned per-position curve and one segment per bucket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["curve"]
    x = [math.sqrt((a + 1) * b) for a, b in zip(c["start"], c["end"])]  # geometric middle of tokens read
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    ax.plot(x, np.exp(c["nll"]), color="0.55", lw=1.2, marker=".", ms=3, label="per position (binned)")
    for i, ((lo, hi), ppl) in enumerate(zip(result["buckets"], result["ppl"])):
        ax.hlines(ppl, lo + 1, hi + 1, colors="C0", lw=2.5, label=None if i else "bucket mean")
        ax.annotate(f"{ppl:.3g}", (math.sqrt((lo + 1) * hi), ppl), textcoords="offset points", xytext=(0, 5),
                    ha="center", fontsize=8, color="C0")
    ax.set_xscale("log")
    ax.set_xlim(1, result["seq_len"] + 1)
    ax.set_xlabel("tokens read (position + 1)")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"perplexity by position: {result['docs']} documents of {result['seq_len']} tokens",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_result(result: dict, stem, title: str = "") -> tuple[Path, Path]:
    """<stem>.json and <stem>.png."""
    return write_json_and_plot(result, stem, save_plot, title)


def metrics_of(result: dict) -> dict:
    """Scalars for metrics.jsonl: ppl over all positions and ppl_<lo>_<hi> per bucket."""
    out = {"ppl": result["ppl_all"]}
    out.update({f"ppl_{lo}_{hi}": p for (lo, hi), p in zip(result["buckets"], result["ppl"])})
    return out


def evaluate_during_training(model, documents, buckets, device, autocast_dtype, out_dir, step: int,
                             chunk: int = DEFAULT_CHUNK) -> dict:
    """The trainer's periodic eval (eval.ppl_*): writes <out_dir>/ppl/step_<N>.{json,png}, returns metrics_of."""
    was_training = model.training
    model.eval()
    try:
        # Eager, as the passkey eval: a compiled graph for the eval length would displace the training one.
        with torch.compiler.set_stance("force_eager"):
            result = evaluate_ppl(model, documents, buckets, device, autocast_dtype, chunk, progress=False)
    finally:
        model.train(was_training)
    result["step"] = step
    write_result(result, Path(out_dir) / "ppl" / f"step_{step}", f"perplexity by position, step {step}")
    return metrics_of(result)
