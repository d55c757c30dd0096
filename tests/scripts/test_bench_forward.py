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
