"""model.attn_window: sliding-window attention in the model, its FLOP count, and its refusal under CP."""

import pytest
import torch

from tests.helpers import assert_close, naive_attention
from tests.test_model import make_model, packed_inputs
from tests.trainer_utils import compose_cfg
from trainer.metrics import causal_pairs
from trainer.model import InnerAttention, ModelConfig
from trainer.parallelize import apply_context_parallel


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


def test_bad_window_and_window_under_context_parallelism():
    with pytest.raises(ValueError, match="model.attn_window"):
        ModelConfig(vocab_size=50, attn_window=-1).resolved()
    with pytest.raises(ValueError, match="model.attn_window=4.*parallel.cp=1"):
        apply_context_parallel(make_model(attn_window=4), "ring", group=None, packed_documents=False)


def test_hydra_config_takes_attn_window():
    cfg = compose_cfg(["model.attn_window=4096"])
    assert cfg.model.attn_window == 4096
    with pytest.raises(Exception, match="attn_windw"):
        compose_cfg(["model.attn_windw=4096"])
