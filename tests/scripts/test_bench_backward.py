"""scripts/bench_backward.py on CPU: its FLOP count, its refusal to run without a GPU, and that rows reach the JSON as
they finish (the timing itself needs cuDNN and the Gluon kernels)."""

import json

import pytest
from helpers import run_bench_cut_after_first_case

from scripts import bench_backward


def test_backward_flops_count_two_and_a_half_forwards_and_halve_causal():
    assert bench_backward.backward_flops(2, 1024, 8, 128, False) == 2.5 * 4 * 2 * 8 * 1024 * 1024 * 128
    assert bench_backward.backward_flops(2, 1024, 8, 128, True) == bench_backward.backward_flops(2, 1024, 8, 128,
                                                                                                 False) / 2


def test_without_a_gpu_it_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(bench_backward.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_backward.main([])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_backward.main(["--gqa-split"])


def test_the_gqa_split_cases_have_groups_and_fit_the_token_budget():
    for d, n, heads, kv_heads in bench_backward.SPLIT_CASES:
        assert d in (64, 128) and heads % kv_heads == 0 and heads >= kv_heads
        assert max(1, 65536 // n) * n * heads <= 65536 * 32  # as large as the 32-head cases at most


def test_a_tile_the_kernel_cannot_take_is_refused_in_one_line():
    with pytest.raises(SystemExit, match=r"--ws-tile takes BLOCK_M 64 or 128.*got \[32, 128, 2\]"):
        bench_backward.main(["--ws-tile", "32", "128", "2"])


def test_rows_reach_the_json_as_they_finish(monkeypatch, tmp_path):
    """A run cut short (here: the second case fails) keeps the rows before it."""
    out = tmp_path / "b.json"
    run_bench_cut_after_first_case(monkeypatch, bench_backward, ["--out", str(out)])
    assert json.loads(out.read_text())["rows"] == [{"N": bench_backward.CASES[0][1]}]
