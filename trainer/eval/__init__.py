"""Evaluations that run on a trained model: passkey retrieval (trainer/eval_passkey.py) and perplexity by
position (ppl.py). Both write their result as <stem>.json plus a plot, <stem>.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def write_json_and_plot(result: dict, stem, plot: Callable[[dict, Path, str], None], title: str = "") -> tuple[Path, Path]:
    """<stem>.json (the result) and <stem>.png (plot(result, path, title)); returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(result, indent=1))
    plot(result, png_path, title)
    return json_path, png_path
