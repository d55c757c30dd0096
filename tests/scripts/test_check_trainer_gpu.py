"""scripts/check_trainer_gpu.py on the CPU: a preset shrunk by --extra runs through trainer.train in a subprocess, and
the table holds what that run's metrics.jsonl says."""

import json
import statistics
import subprocess
import sys

from helpers import ROOT
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2", "model.head_dim=32",
        "model.ffn_dim=128", "model.mlp_chunk=256", "model.offload_activations=none", "model.compile=false",
        "data.seq_len=1024", "data.max_files=40", "train.device=cpu"]


def test_tiny_preset_row_matches_its_metrics(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "scripts/check_trainer_gpu.py", "--variants", "220m", "--steps", "6",
                    "--log-every", "2", "--out", str(out), "--work", str(tmp_path / "work"), "--extra", *TINY],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    row = json.loads((out / "trainer_gpu.json").read_text())["rows"][0]
    assert row["rc"] == 0 and row["checkpoints"] == ["step_6"], row.get("tail")
    assert [r["step"] for r in row["records"]] == [2, 4, 6]
    assert row["tok_s"] == statistics.median(r["tokens_per_s"] for r in row["records"][1:])  # first interval dropped
    assert row["peak_gib"] == max(r["peak_mem_gib"] for r in row["records"])
    assert row["val_loss"] == row["records"][-1]["val_loss"]
    assert "data.cross_doc_attention=true" in row["overrides"] and "train.device=cpu" in row["overrides"]
    assert "| 220m |" in (out / "trainer_gpu.md").read_text()
