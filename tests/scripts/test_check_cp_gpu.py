"""scripts/check_cp_gpu.py in its CPU mode (gloo, reference backend, fp32) on 2 ranks: --impls picks the
implementations, and each row's error against one-process attention is at fp32 rounding."""

import json
import subprocess
import sys

from helpers import ROOT


def test_cpu_mode_rows(tmp_path, free_port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}",
           "scripts/check_cp_gpu.py", "--cpu", "--seq-lens", "256", "--heads", "4", "--kv-heads", "2",
           "--head-dim", "16", "--impls", "ulysses,ring", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    rows = json.loads((tmp_path / "cp_correctness_cpu_w2.json").read_text())["rows"]
    # causal, non-causal, packed; then a window of 256 // 5 + 7 tokens, dense and packed
    cases = [(True, False, 0), (False, False, 0), (True, True, 0), (True, False, 58), (True, True, 58)]
    assert [(r["impl"], r["causal"], r["packed"], r["window"]) for r in rows] == [
        (impl, *case) for impl in ("ulysses", "ring") for case in cases]  # in --impls order
    assert all(r["ok"] and r["worst_rel_err"] < 1e-5 for r in rows), rows
