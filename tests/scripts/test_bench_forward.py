"""scripts/bench_forward.py on CPU: its tile parsing, the tile swap around a call, its refusal to run without a GPU,
and that rows reach the JSON as they finish (the timing itself needs cuDNN and the Gluon kernels)."""

import json

import pytest
from helpers import run_bench_cut_after_first_case

from scripts import bench_forward


def test_without_a_gpu_it_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(bench_forward.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_forward.main(["--head-dim", "64"])


@pytest.mark.parametrize("text", ["100,128,2", "192,96,2", "192,128,5", "192,128", "a,b,c"])
def test_a_tile_the_kernel_cannot_take_is_refused_in_one_line(text, capsys):
    with pytest.raises(SystemExit):
        bench_forward.main(["--tiles", text])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"BLOCK_M 128 or 192, BLOCK_N 64 or 128 and 1-4 stages, got {text!r}"), err


def test_tiles_parse_and_name():
    assert bench_forward.parse_tile("192,128,2") == (192, 128, 2)
    assert bench_forward.tile_name((192, 128, 2)) == "gluon_192x128x2"


def test_the_tile_is_swapped_in_for_the_call_and_restored_after_it_even_on_error():
    config = {64: (128, 128, 3)}
    seen = []
    run = bench_forward._at_tile(config, 64, (192, 128, 2), lambda: seen.append(config[64]) or "out")
    assert run() == "out" and seen == [(192, 128, 2)] and config[64] == (128, 128, 3)

    def fail():
        raise RuntimeError("kernel error")
    with pytest.raises(RuntimeError):
        bench_forward._at_tile(config, 64, (192, 128, 2), fail)()
    assert config[64] == (128, 128, 3)


def test_rows_reach_the_json_as_they_finish(monkeypatch, tmp_path):
    """A run cut short (here: the second case fails) keeps the rows before it."""
    from attention.gluon import fwd
    out = tmp_path / "f.json"
    run_bench_cut_after_first_case(monkeypatch, bench_forward, ["--head-dim", "64", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["rows"] == [{"N": bench_forward.CASES[0][1]}]
    assert data["meta"]["head_dim"] == 64 and data["meta"]["shipped"]["dense"] == list(fwd.FWD_CONFIG[64])


def test_against_passes_the_other_checkouts_forward_to_each_case_with_the_cases_and_rounds(monkeypatch, tmp_path):
    import shutil
    import sys

    from helpers import ROOT
    monkeypatch.setattr(sys, "modules", dict(sys.modules))  # the imported copy leaves with the test
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # the copy is no git checkout
    checkout = tmp_path / "base"
    shutil.copytree(ROOT / "attention", checkout / "attention", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "f.json"
    calls = run_bench_cut_after_first_case(monkeypatch, bench_forward,
                                           ["--out", str(out), "--against", str(checkout), "--against-commit",
                                            "37e53ee", "--cases", "2", "2", "0", "--rounds", "5"])
    assert [args for args, _ in calls] == [bench_forward.CASES[2]] * 2  # the second call is the cut
    other = calls[0][1]["against"]
    assert other.__name__ == "attention_against.gluon.fwd" and other.__file__.startswith(str(checkout))
    assert calls[0][1]["rounds"] == 5
    meta = json.loads(out.read_text())["meta"]
    assert meta["against"] == {"path": str(checkout), "commit": "37e53ee"} and meta["rounds"] == 5


def test_bad_cases_rounds_and_a_lone_against_commit_are_refused_in_one_line():
    last = len(bench_forward.CASES) - 1
    with pytest.raises(SystemExit, match=rf"--cases takes positions 0-{last} of CASES, got \[{last + 1}\]"):
        bench_forward.main(["--cases", "0", str(last + 1)])
    with pytest.raises(SystemExit, match="--rounds takes a count of at least 1, got 0"):
        bench_forward.main(["--rounds", "0"])
    with pytest.raises(SystemExit, match="--against-commit names the commit of --against DIR"):
        bench_forward.main(["--against-commit", "abc1234"])
    with pytest.raises(SystemExit, match="--against takes a checkout with an attention/ package"):
        bench_forward.main(["--against", "/nonexistent"])


def test_the_other_checkouts_forward_is_timed_and_compared_beside_each_tile(monkeypatch):
    import torch
    monkeypatch.setattr(bench_forward, "time_rounds", lambda row, fns, flops, rounds: row.update(
        {name: {"cudnn": 400.0, "triton": 380.0, "against": 420.0}.get(name, 441.0) for name in fns}))
    ref = (torch.ones(4, 8), torch.zeros(4))
    fns = {"cudnn": lambda: None, "triton": lambda: ref, "gluon_192x128x2": lambda: (ref[0] * 1.5, ref[1] + 0.25),
           "against": lambda: ref}
    row = bench_forward._finish({}, fns, [(192, 128, 2)], 1.0, ratio_to="cudnn")
    assert row["err_vs_triton"] == {"gluon_192x128x2": [0.5, 0.25], "against": [0.0, 0.0]}
    assert row["gluon_192x128x2/cudnn"] == 1.103 and row["gluon_192x128x2/against"] == 1.05
