"""trainer/model.py: packing isolation, causality, RoPE positions, GQA/tied shapes, checkpointing = none."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import assert_close, naive_attention
from trainer.model.fused import rope, rope_math
from trainer.model import GPT, ModelConfig, rope_cos_sin
from helpers import ROOT


def small_cfg(**kw):
    base = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
    return ModelConfig(**{**base, **kw})


def make_model(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = GPT(small_cfg(**kw), attn_backend="reference").to(dtype)
    # Random norm gains: with the init's all-ones gains some bugs (e.g. a mixed-up norm) would cancel out.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def packed_inputs(lengths, vocab=50):
    """One row holding documents of the given lengths: tokens (1, N), positions restarting, cu_seqlens."""
    tokens = torch.randint(0, vocab, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return tokens, positions, cu, max(lengths)


def test_packed_documents_are_isolated():
    model = make_model()
    tokens, pos, cu, mx = packed_inputs([7, 9, 5])
    out = model(tokens, pos, cu, mx)
    # Document 2 alone, as its own sequence, gives the same hidden states as inside the pack.
    alone = model(tokens[:, 7:16], None)
    assert_close(out[:, 7:16], alone, "doc 2 packed vs alone")
    # Changing document 1 changes document 1 but leaves documents 2 and 3 untouched.
    changed = tokens.clone()
    changed[0, :7] = (changed[0, :7] + 1) % 50
    out2 = model(changed, pos, cu, mx)
    assert_close(out2[:, 7:], out[:, 7:], "docs 2-3 after changing doc 1")
    assert (out2[:, :7] - out[:, :7]).abs().max() > 1e-3


def test_causality():
    model = make_model()
    tokens = torch.randint(0, 50, (2, 13))
    out = model(tokens)
    t = 6
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 3) % 50
    out2 = model(changed)
    assert_close(out2[:, :t], out[:, :t], "positions before t")
    assert (out2[:, t:] - out[:, t:]).abs().amax(-1).min() > 1e-6  # t and every later position see it


def test_varlen_one_doc_per_row_equals_dense():
    model = make_model()
    tokens = torch.randint(0, 50, (3, 8))
    cu = torch.arange(0, 25, 8, dtype=torch.int32)
    assert_close(model(tokens, None, cu, 8), model(tokens), "varlen rows vs dense")


def test_rope_relative_and_scaling():
    torch.manual_seed(1)
    q = torch.randn(1, 5, 2, 16, dtype=torch.float64)
    k = torch.randn(1, 5, 2, 16, dtype=torch.float64)
    pos = torch.arange(5)[None]

    def scores(offset, scaling=1.0, step=1):
        cos, sin = rope_cos_sin(pos * step + offset, 16, 10000.0, scaling, torch.float64)
        return torch.einsum("bihd,bjhd->bhij", rope(q, cos, sin), rope(k, cos, sin))

    # q.k after RoPE depends only on the relative position: a shift of every position changes nothing.
    assert_close(scores(37), scores(0), "rope shift invariance")
    # Position interpolation: factor s at positions s*p equals factor 1 at positions p.
    assert_close(scores(0, scaling=4.0, step=4), scores(0), "rope_scaling")
    assert (scores(0, scaling=4.0) - scores(0)).abs().max() > 1e-3


def test_rope_matches_complex_rotation():
    # Independent oracle: pair (x_i, x_{i+D/2}) as a complex number rotated by pos * theta^(-2i/D).
    torch.manual_seed(2)
    x = torch.randn(2, 6, 3, 8, dtype=torch.float64)
    pos = torch.randint(0, 1000, (2, 6))
    cos, sin = rope_cos_sin(pos, 8, 500000.0, 1.0, torch.float64)
    freqs = 500000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(torch.ones(2, 6, 1, 4, dtype=torch.float64),
                                                             pos[..., None, None] * freqs)
    want = torch.cat([z.real, z.imag], -1)
    assert_close(rope(x, cos, sin), want, "rope (eager Function) vs complex rotation")
    assert_close(rope_math(x, cos, sin), want, "rope_math (compiled path) vs complex rotation")


def test_model_with_positions_restarting_matches_separate_rows():
    # Packed row [a | b] with restarting positions equals the rows a and b run separately (dense).
    model = make_model()
    tokens, pos, cu, mx = packed_inputs([6, 6])
    assert_close(model(tokens, pos, cu, mx).view(2, 6, -1), model(tokens.view(2, 6)), "packed vs batch")


@pytest.mark.parametrize("tie", [False, True])
def test_shapes_gqa_tied_untied(tie):
    model = make_model(dtype=torch.float32, tie_embeddings=tie, n_heads=4, n_kv_heads=1)
    attn = model.layers[0].attention
    assert attn.wq.weight.shape == (4 * 8, 32) and attn.wk.weight.shape == (8, 32)
    assert attn.wv.weight.shape == (8, 32) and attn.wo.weight.shape == (32, 32)
    assert model.output_weight.shape == (50, 32)
    assert (model.output_weight is model.tok_embeddings.weight) == tie
    assert (model.output is None) == tie
    hidden = model(torch.randint(0, 50, (2, 5)))
    assert hidden.shape == (2, 5, 32)
    per_layer = 32 * 32 * 2 + 8 * 32 * 2 + 3 * 32 * 48 + 2 * 32
    expected = 50 * 32 * (1 if tie else 2) + 2 * per_layer + 32
    assert model.num_params() == expected
    assert model.num_params(exclude_embedding=True) == expected - (0 if tie else 50 * 32)


def test_gqa_matches_repeated_kv_heads():
    # GQA with 2 kv heads equals MHA whose kv projections repeat each kv head for its query group.
    gqa = make_model(n_heads=4, n_kv_heads=2)
    mha = make_model(n_heads=4, n_kv_heads=4)
    mha.load_state_dict({k: v for k, v in gqa.state_dict().items() if not k.endswith(("wk.weight", "wv.weight"))},
                        strict=False)
    with torch.no_grad():
        for lg, lm in zip(gqa.layers, mha.layers):
            for name in ("wk", "wv"):
                w = getattr(lg.attention, name).weight.view(2, 8, 32)  # (Hkv, D, dim)
                getattr(lm.attention, name).weight.copy_(w.repeat_interleave(2, 0).reshape(32, 32))
    tokens = torch.randint(0, 50, (2, 9))
    assert_close(gqa(tokens), mha(tokens), "GQA vs repeated-kv MHA")


def test_inner_attention_is_swappable():
    # The seam context parallelism uses: replacing inner_attention from outside changes nothing here.
    model = make_model()
    tokens = torch.randint(0, 50, (2, 7))
    expected = model(tokens)

    class Naive(torch.nn.Module):
        def forward(self, q, k, v, cu_seqlens=None, max_seqlen=None):
            return naive_attention(q, k, v, causal=True)[0].to(q.dtype)

    for layer in model.layers:
        layer.attention.inner_attention = Naive()
    assert_close(model(tokens), expected, "naive inner attention")


def test_full_checkpointing_matches_none():
    tokens, pos, cu, mx = packed_inputs([5, 11])
    labels = torch.randint(0, 50, tokens.shape)
    results = []
    for mode in ("none", "full"):
        model = make_model(ckpt=mode)
        h = model(tokens, pos, cu, mx)
        loss = torch.nn.functional.cross_entropy(h.flatten(0, 1) @ model.output_weight.T, labels.flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert_close(results[1][0], results[0][0], "loss")
    for name, grad in results[0][1].items():
        assert_close(results[1][1][name], grad, f"grad {name}")


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="n_kv_heads"):
        GPT(small_cfg(n_heads=4, n_kv_heads=3))
    with pytest.raises(ValueError, match="model.ckpt"):
        GPT(small_cfg(ckpt="sometimes"))
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(small_cfg(vocab_size=0))
    with pytest.raises(ValueError, match="head_dim"):
        GPT(small_cfg(head_dim=7))
    model = make_model()
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seqlen"):
        model(torch.zeros(1, 4, dtype=torch.long), None, torch.tensor([0, 4], dtype=torch.int32))


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, dim=256, n_layers=8, n_heads=4, ffn_dim=512))
    std = model.layers[0].attention.wq.weight.std().item()
    resid = model.layers[0].attention.wo.weight.std().item()
    assert abs(std - 0.02) < 2e-3 and abs(resid - 0.02 / 4) < 1e-3
    assert torch.equal(model.norm.weight, torch.ones(256))


@pytest.mark.parametrize("name,low,high", [("tiny", 2e6, 5e6), ("llama_220m", 215e6, 225e6),
                                           ("llama_1b", 0.9e9, 1.1e9)])
def test_model_size_configs(name, low, high):
    # Built on the meta device: shapes and parameter counts without allocating a billion floats.
    yaml = OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), yaml))
    cfg.vocab_size = 32000 if name != "tiny" else 258
    with torch.device("meta"):
        model = GPT(cfg)
    assert low <= model.num_params() <= high, model.num_params()
