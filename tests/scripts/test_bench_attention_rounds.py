"""scripts/bench_attention.py --rounds: cells are the median over interleaved rounds (CPU, no timing)."""

import pytest

bench = pytest.importorskip("scripts.bench_attention")


def row(provider, rnd, fwd_ms, bwd_ms, status="ok", flops=1e12):
    r = dict(provider=provider, B=1, N=8192, H=16, D=128, causal=False, window=[-1, -1], docs=0, status=status,
             round=rnd)
    if status == "ok":
        r.update(fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_tflops=flops / fwd_ms * 1e-9, bwd_tflops=2.5 * flops / bwd_ms * 1e-9)
    return r


def test_median_over_rounds_and_failed_rounds():
    rows = [row("ours", 0, 2.0, 5.0), row("flex", 0, 3.0, 6.0),
            row("ours", 1, 9.0, 4.0), row("flex", 1, 0, 0, status="OOM"),
            row("ours", 2, 1.0, 4.5), row("flex", 2, 3.0, 6.0)]
    merged = {r["provider"]: r for r in bench.median_rows(rows)}
    ours = merged["ours"]
    assert (ours["fwd_ms"], ours["bwd_ms"], ours["rounds"]) == (2.0, 4.5, 3)
    assert ours["fwd_tflops"] == pytest.approx(1e12 / 2.0 * 1e-9)
    assert ours["fwd_tflops_range"] == [pytest.approx(1e12 / 9.0 * 1e-9), pytest.approx(1e12 / 1.0 * 1e-9)]
    assert merged["flex"]["status"] == "OOM"  # one failed round marks the cell


def test_markdown_states_the_rounds():
    rows = [row("ours", r, 2.0 + r, 5.0) for r in range(3)] + [row("flex", r, 4.0, 5.0) for r in range(3)]
    text = bench.markdown(rows, dict(gpu="GPU", date="today", torch="t", triton="tr"))
    assert "median of 3 rounds" in text
    assert "| 1.33, 1.00 |" in text  # ours: median 3.0 ms forward against flex 4.0 ms, so 4/3 the TFLOPS


def test_our_providers_set_and_restore_the_backward_mode():
    """ours-atomic / ours-atomic-tma switch the Triton backward to atomic dQ (the latter with TMA loads and
    reduce-add); _our_mode("ours") puts the defaults back, as run_case does after every cell."""
    import attention
    from attention.triton import common as triton_common
    try:
        for provider, deterministic, tma_reduce in (("ours-atomic", False, False), ("ours-atomic-tma", False, True),
                                                    ("ours", True, False)):
            bench._our_mode(provider)
            assert attention.get_deterministic() == deterministic, provider
            assert triton_common.FEATURES["tma_reduce"] == tma_reduce, provider
    finally:
        bench._our_mode("ours")
