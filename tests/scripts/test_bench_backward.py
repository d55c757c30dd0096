"""scripts/bench_backward.py on CPU: its FLOP count, its refusal to run without a GPU, that rows reach the JSON as
they finish, and how --against imports another checkout (the timing itself needs cuDNN and the Gluon kernels)."""

import json
import shutil
import sys

import pytest
from helpers import ROOT, run_bench_cut_after_first_case

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


def _checkout_copy(tmp_path):
    """A directory holding a copy of this tree's attention package, as another checkout would."""
    shutil.copytree(ROOT / "attention", tmp_path / "attention", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_against_imports_the_other_checkout_apart_from_this_one(tmp_path, monkeypatch):
    from attention.gluon import bwd
    monkeypatch.setattr(sys, "modules", dict(sys.modules))  # the imported copy leaves with the test
    package, other = bench_backward.load_checkout(_checkout_copy(tmp_path), name="attention_copy")
    assert package.__name__ == "attention_copy" and other.__name__ == "attention_copy.gluon.bwd"
    assert other is not bwd and other.__file__.startswith(str(tmp_path))
    assert other.WS_BWD_CONFIG == bwd.WS_BWD_CONFIG
    assert other.preprocess.__module__ == "attention_copy.triton.bwd"  # its relative imports stay inside it


def test_against_refuses_a_directory_without_the_package_and_the_gqa_split(tmp_path):
    with pytest.raises(SystemExit, match=f"--against takes a checkout with an attention/ package, got {tmp_path}"):
        bench_backward.main(["--against", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not combine with --gqa-split"):
        bench_backward.main(["--against", str(tmp_path), "--gqa-split"])


def test_against_passes_the_other_kernel_to_each_case_and_names_it_in_the_meta(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # the copy is no git checkout
    checkout = _checkout_copy(tmp_path / "base")
    out = tmp_path / "b.json"
    calls = run_bench_cut_after_first_case(monkeypatch, bench_backward, ["--out", str(out), "--against", str(checkout)])
    data = json.loads(out.read_text())
    assert data["meta"]["against"] == {"path": str(checkout), "commit": None}
    assert data["rows"] == [{"N": bench_backward.CASES[0][1]}]
    assert [kwargs["against"].__name__ for _, kwargs in calls] == ["attention_against.gluon.bwd"] * 2
    assert calls[0][1]["against"].__file__.startswith(str(checkout))


def test_cases_picks_positions_in_order_with_repeats_and_refuses_others_in_one_line(monkeypatch, tmp_path):
    out = tmp_path / "b.json"
    calls = run_bench_cut_after_first_case(monkeypatch, bench_backward,
                                           ["--out", str(out), "--cases", "2", "2", "0", "--rounds", "5"])
    assert [args for args, _ in calls] == [bench_backward.CASES[2]] * 2  # the second call is the cut
    assert calls[0][1]["rounds"] == 5
    assert json.loads(out.read_text())["meta"]["rounds"] == 5
    last = len(bench_backward.CASES) - 1
    with pytest.raises(SystemExit, match=rf"--cases takes positions 0-{last} of CASES, got \[{last + 1}, -1\]"):
        bench_backward.main(["--cases", "1", str(last + 1), "-1"])
    with pytest.raises(SystemExit, match="--rounds takes a count of at least 1, got 0"):
        bench_backward.main(["--rounds", "0"])
    with pytest.raises(SystemExit, match="--against-commit names the commit of --against DIR"):
        bench_backward.main(["--against-commit", "abc1234"])


def test_against_commit_names_a_copy_without_git(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    checkout = _checkout_copy(tmp_path / "base")
    out = tmp_path / "b.json"
    run_bench_cut_after_first_case(monkeypatch, bench_backward,
                                   ["--out", str(out), "--against", str(checkout), "--against-commit", "85df715"])
    assert json.loads(out.read_text())["meta"]["against"] == {"path": str(checkout), "commit": "85df715"}


def test_a_row_holds_both_modes_errors_against_the_reference_and_the_repeat_check(monkeypatch):
    import itertools

    import torch
    monkeypatch.setattr(bench_backward, "_timed", lambda fn: 2.0)  # ms per call
    ref = [torch.ones(4), torch.ones(4), torch.ones(4)]
    drift = itertools.count()
    fns = {"ref": lambda: ref, "det": lambda: [t * 1.5 for t in ref],
           "nondet": lambda: [t + next(drift) for t in ref]}  # a different answer on every call
    row = bench_backward._modes_row({"N": 8}, fns, "ref", "det", "nondet", "base", flops=4e12)
    assert row["N"] == 8 and row["err_det_vs_base"] == [0.5, 0.5, 0.5]
    assert row["err_nondet_vs_base"] == [0.0, 1.0, 2.0] and row["det_repeats_bitwise"] is True
    assert row["ref"] == row["det"] == row["nondet"] == 2000.0  # TFLOPS: 4e12 FLOPs in 2 ms
    fns["det"] = fns["nondet"]
    assert bench_backward._modes_row({}, fns, "ref", "det", "nondet", "base", flops=1.0)["det_repeats_bitwise"] is False
