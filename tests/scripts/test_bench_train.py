"""scripts/bench_train.py helpers on CPU: the memory trace of a cut-off cell, and windowed FLOPs (no timing)."""

import json

import pytest

bench = pytest.importorskip("scripts.bench_train")


def test_trace_summary_reports_peak_and_span(tmp_path):
    path = tmp_path / "cell.jsonl"
    rows = [dict(t=0.0, alloc_gib=1.0, peak_gib=1.5), dict(t=5.0, alloc_gib=9.0, peak_gib=30.25),
            dict(t=10.1, alloc_gib=2.0, peak_gib=30.25)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = bench._trace_summary(str(path))
    assert got["traced_peak_gib"] == 30.25 and got["traced_s"] == 10.1
    assert bench._trace_summary(str(tmp_path / "missing.jsonl")) == {}
    assert "peak 30.2 GiB in its first 10 s" in bench.describe({"status": "timeout", **got})


@pytest.mark.parametrize("name,group", [
    ("_bwd_ws_kernel", "attention"), ("_fwd_ws_kernel", "attention"), ("_fwd_kernel", "attention"),
    ("_dkdv_kernel", "attention"), ("_dq_kernel", "attention"), ("_preprocess_kernel", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128", "attention"),
    ("nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_TNN", "matmul"), ("Memcpy DtoH (Device -> Pinned)", "copy"),
    ("_rms_norm_backward_kernel", "other")])
def test_profile_groups_our_attention_kernels_with_attention(name, group):
    assert bench.kernel_group(name) == group


def test_windowed_cell_counts_only_window_pairs():
    cells = {w: bench.run_cell(dict(setup=f"ringflash:window={w},compile=0", model="tiny", seq_len=128,
                                    device="cpu", dtype="bf16", warmup=0, steps=1, peak_tflops=1.0, layers=None))
             for w in (0, 16)}
    flops = {w: c["tflops"] * c["step_s"] * 1e12 for w, c in cells.items()}
    shape = bench.model_shape("tiny")
    per_pair = 12 * shape["n_layers"] * shape["n_heads"] * shape["head_dim"]
    want_drop = per_pair * (128 * 128 / 2 - (128 * 16 - 16 * 16 / 2))  # full-causal pairs minus windowed pairs
    assert flops[0] - flops[16] == pytest.approx(want_drop, rel=1e-9)


@pytest.mark.parametrize("exc,status", [(RuntimeError("CUDA error: out of memory"), "OOM"),
                                        (RuntimeError("CUDA error: an illegal memory access"), "error"),
                                        (ValueError("bad"), "error")])
def test_worker_counts_a_host_memory_failure_as_oom(monkeypatch, tmp_path, exc, status):
    """A failed pinned (host) allocation raises a plain CUDA error: it ends the max-context search as OOM
    instead of sending the cell to the fallbacks, and keeps its message."""
    def fail(cell):
        raise exc

    monkeypatch.setattr(bench, "run_cell", fail)
    out = tmp_path / "r.json"
    bench.worker_main("{}", str(out))
    got = json.loads(out.read_text())
    assert got["status"] == status and str(exc) in got["error"]
