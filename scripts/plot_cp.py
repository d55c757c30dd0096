"""Plots of a multi-GPU run (scripts/gpu_cp_suite.sh output): CP attention scaling and trainer loss curves.

    python scripts/plot_cp.py docs/bench/cp_h100x4        # writes scaling.png and loss_curves.png there

scaling.png: attention fwd+bwd TFLOPS per GPU against the full sequence length for each bench_cp.py row
(local = one GPU on its N/W tokens, the ceiling CP is measured against). loss_curves.png: training loss per
step of every train_curve_<impl><W>.jsonl (cp = ring), with the largest per-step difference to cp=1 in the legend.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, ax, out: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def plot_scaling(run: Path) -> Path | None:
    files = sorted(run.glob("bench_cp_*w*.json"))
    if not files:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    plotted = set()  # (impl, W, backend tag): a later file (e.g. a rerun adding hybrid) only adds what is new
    for f in files:
        data = json.loads(f.read_text())
        w, backend = data["meta"]["world_size"], data["meta"].get("attn_backend", "auto")
        kernels = "" if backend in ("auto", "triton") else f" [{backend}]"  # e.g. ring on torch's kernels
        for impl in dict.fromkeys(r["impl"] for r in data["rows"]):
            tag = "" if impl == "torch-cp" else kernels  # torch-cp runs torch's kernels whatever --backend says
            if (impl, w, tag) in plotted:
                continue
            plotted.add((impl, w, tag))
            rows = sorted((r for r in data["rows"] if r["impl"] == impl and r.get("tflops_per_rank")),
                          key=lambda r: r["seq_len"])
            if len(rows) > 1:
                ax.plot([r["seq_len"] for r in rows], [r["tflops_per_rank"] for r in rows], marker="o",
                        label=f"{impl}{tag} (W={w})")
    meta = json.loads(files[-1].read_text())["meta"]
    ax.set_xscale("log", base=2)
    ax.set_xlabel("full sequence length (tokens)")
    ax.set_ylabel("attention fwd+bwd TFLOPS per GPU")
    ax.set_title(f"{meta['device']}, {meta['heads']} heads x {meta['head_dim']}, causal, {meta['dtype']}",
                 fontsize=9)
    return _save(fig, ax, run / "scaling.png")


def _curve_name(path: Path) -> tuple[int, str]:
    """train_curve_cp4.jsonl -> (4, 'cp=4'); train_curve_hybrid4.jsonl -> (4, 'hybrid cp=4')."""
    name = path.stem.removeprefix("train_curve_")
    kind = name.rstrip("0123456789")
    cp = int(name[len(kind):])
    return cp, f"cp={cp}" if kind == "cp" else f"{kind} cp={cp}"


def plot_loss_curves(run: Path) -> Path | None:
    curves = {_curve_name(f): [json.loads(line) for line in f.read_text().splitlines()]
              for f in run.glob("train_curve_*.jsonl")}
    if not curves:
        return None
    base = curves.get((1, "cp=1"))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (cp, label), recs in sorted(curves.items()):
        if base is not None and cp != 1:
            diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(base, recs))
            label += f" (max |diff| to cp=1: {diff:.4f})"
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=label,
                linestyle="-" if cp == 1 else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    return _save(fig, ax, run / "loss_curves.png")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="directory with bench_cp_*w*.json and train_curve_*.jsonl")
    args = p.parse_args(argv)
    for out in (plot_scaling(args.run), plot_loss_curves(args.run)):
        print(out or "nothing to plot")


if __name__ == "__main__":
    main()
