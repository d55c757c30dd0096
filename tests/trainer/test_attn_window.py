"""model.attn_window: sliding-window attention in the model, its FLOP count, and where it is refused (the sdpa
backend, the fp8 forward). Under CP: test_ring.py, test_ulysses.py, test_hybrid.py and test_trainer_cp.py."""

import pytest
import torch

from helpers import assert_close, naive_attention
from tests.trainer.test_model import make_model, packed_inputs
from trainer_utils import compose_cfg
from trainer.metrics import causal_pairs
from trainer.model import InnerAttention, ModelConfig


@pytest.mark.parametrize("window", [1, 3, 8])
def test_inner_attention_window_matches_masked_softmax(window):
    torch.manual_seed(0)
    q = torch.randn(2, 11, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 11, 2, 8, dtype=torch.float64), torch.randn(2, 11, 2, 8, dtype=torch.float64)
    out = InnerAttention("reference", window=window)(q, k, v)
    want, _ = naive_attention(q, k, v, causal=True, window_size=(window - 1, 0))
    assert_close(out, want, f"window {window}")
    if window < 11:  # the window must matter: full causal attention differs
        full, _ = naive_attention(q, k, v, causal=True)
        assert (out - full).abs().max() > 1e-3


def test_receptive_field_grows_by_window_minus_one_per_layer():
    window, n_layers = 3, 2
    model = make_model(attn_window=window, n_layers=n_layers)
    tokens = torch.randint(0, 50, (1, 12))
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] + 7) % 50
    out, out2 = model(tokens), model(changed)
    reach = n_layers * (window - 1)  # position p sees tokens down to p - reach
    assert (out2[:, : reach + 1] - out[:, : reach + 1]).abs().amax(-1).min() > 1e-6
    assert_close(out2[:, reach + 1:], out[:, reach + 1:], "positions beyond the receptive field")


def test_window_covering_the_sequence_is_full_causal():
    tokens = torch.randint(0, 50, (2, 9))
    assert_close(make_model(attn_window=9)(tokens), make_model()(tokens), "window 9 over 9 tokens")


def test_window_in_packed_documents():
    model = make_model(attn_window=4)
    tokens, pos, cu, mx = packed_inputs([7, 9, 5])
    out = model(tokens, pos, cu, mx)
    assert_close(out[:, 7:16], model(tokens[:, 7:16]), "doc 2 packed vs alone, windowed")


def test_causal_pairs_with_window():
    assert causal_pairs(None, 2, 10) == 100.0
    assert causal_pairs(None, 2, 10, window=10) == 100.0  # the window covers the row
    assert causal_pairs(None, 1, 10, window=4) == 10 * 4 - 8  # len * w - w^2 / 2
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)  # documents of 3 and 7 tokens, window 4
    assert causal_pairs(cu, 1, 10, window=4) == (3 * 3 - 4.5) + (7 * 4 - 8)


def test_bad_window():
    with pytest.raises(ValueError, match="model.attn_window"):
        ModelConfig(vocab_size=50, attn_window=-1).resolved()


@pytest.mark.parametrize("overrides, match", [
    (["attention.backend=sdpa"], "attention.backend=auto or triton"),
    (["attention.fp8_forward=true", "data.cross_doc_attention=true"], "fp8_forward"),
])
def test_config_refuses_window_where_no_kernel_takes_it(overrides, match):
    with pytest.raises(ValueError, match=match):
        compose_cfg(["model.attn_window=16", *overrides])
    compose_cfg(overrides)  # the same settings without a window are fine


def test_hydra_config_takes_attn_window():
    cfg = compose_cfg(["model.attn_window=4096"])
    assert cfg.model.attn_window == 4096
    with pytest.raises(Exception, match="attn_windw"):
        compose_cfg(["model.attn_windw=4096"])


def test_trainer_runs_windowed_model_and_counts_window_flops(tmp_path):
    from tests.trainer.test_trainer import FAST, metrics
    from trainer_utils import train_one_process

    runs = {}
    for w in (0, 16):
        out = tmp_path / f"w{w}"
        result = train_one_process(FAST, out, "train.steps=3", "data.cross_doc_attention=true",
                                   f"model.attn_window={w}")
        assert result["loss"] == result["loss"]  # not NaN
        runs[w] = metrics(out)[3]
    flops_per_token = {w: m["tflops"] * 1e12 / m["tokens_per_s"] for w, m in runs.items()}
    # FAST: 2 layers x 4 heads x head_dim 16, rows of 64 tokens; the window drops 64*64/2 - (64*16 - 16*16/2) pairs
    per_pair = 12 * 2 * 4 * 16
    want = per_pair * (64 * 64 / 2 - (64 * 16 - 16 * 16 / 2)) / 64
    assert flops_per_token[0] - flops_per_token[16] == pytest.approx(want, rel=1e-6)
