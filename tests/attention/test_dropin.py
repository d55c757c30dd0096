"""Drop-in routes: torch code calling F.scaled_dot_product_attention, and a transformers Llama with "ringattn"."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attention.dropin as dropin
from attention import register_hf, register_sdpa, unregister_sdpa
from helpers import assert_close, cu_seqlens

TORCH_SDPA = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _always_unpatched():
    yield
    unregister_sdpa()
    assert F.scaled_dot_product_attention is TORCH_SDPA


@pytest.fixture
def ours(monkeypatch):
    """Count calls that reach ringflash (as opposed to torch's fallback)."""
    calls = []
    real = dropin.flash_attn_func

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(dropin, "flash_attn_func", spy)
    return calls


class TinyAttention(nn.Module):
    """A module written against torch's SDPA, (B, H, N, D) layout, with an optional KV prefix length."""

    def __init__(self, dim=32, heads=4, kv_heads=2, **sdpa_kwargs):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, heads * self.hd)
        self.wkv = nn.Linear(dim, 2 * kv_heads * self.hd)
        self.wo = nn.Linear(heads * self.hd, dim)
        self.sdpa_kwargs = sdpa_kwargs

    def forward(self, x, memory):
        B, N, _ = x.shape
        M = memory.shape[1]
        q = self.wq(x).view(B, N, self.heads, self.hd).transpose(1, 2)  # (B, H, N, hd)
        k, v = self.wkv(memory).view(B, M, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)  # (B, Hkv, M, hd)
        y = F.scaled_dot_product_attention(q, k, v, **self.sdpa_kwargs)
        return self.wo(y.transpose(1, 2).reshape(B, N, -1))


def _run(module, x, memory):
    x, memory = x.clone().requires_grad_(), memory.clone().requires_grad_()
    module.zero_grad()
    y = module(x, memory)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.detach(), x.grad, memory.grad] + [p.grad.clone() for p in module.parameters()]


MASK = torch.rand(9, 13) > 0.3
SDPA_CASES = [
    # (sdpa kwargs, heads, kv_heads, N, M, routed to ringflash?)
    (dict(), 4, 4, 11, 11, True),
    (dict(is_causal=True), 4, 4, 11, 11, True),
    (dict(is_causal=True, enable_gqa=True), 4, 2, 11, 11, True),
    (dict(enable_gqa=True, scale=0.21), 4, 1, 9, 13, True),
    (dict(is_causal=True), 4, 4, 13, 9, True),  # Nq > Nk: torch's top-left causal as a window
    (dict(is_causal=True), 4, 4, 9, 13, False),  # Nq < Nk top-left: not expressible -> torch
    (dict(attn_mask=MASK), 4, 4, 9, 13, False),  # arbitrary mask -> torch
    (dict(attn_mask=MASK, enable_gqa=True), 4, 2, 9, 13, False),
]


@pytest.mark.parametrize("kwargs,heads,kv_heads,N,M,routed", SDPA_CASES)
def test_torch_module_unchanged_by_register_sdpa(kwargs, heads, kv_heads, N, M, routed, ours):
    module = TinyAttention(heads=heads, kv_heads=kv_heads, **kwargs)
    x, memory = torch.randn(2, N, 32), torch.randn(2, M, 32)
    if N == M and "attn_mask" not in kwargs:
        memory = x  # self-attention
    expected = _run(module, x, memory)
    with register_sdpa() as reg:
        assert F.scaled_dot_product_attention is not TORCH_SDPA and reg.backend == "auto"
        got = _run(module, x, memory)
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert (len(ours) > 0) == routed
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, f"output/grad {i}", atol=1e-5, rtol=1e-5)


def test_dropout_falls_back_to_torch(ours):
    module = TinyAttention(kv_heads=4, dropout_p=0.3, is_causal=True)
    x = torch.randn(2, 10, 32)
    torch.manual_seed(1)
    expected = _run(module, x, x)
    with register_sdpa():
        torch.manual_seed(1)  # same dropout mask, because torch draws it in both runs
        got = _run(module, x, x)
    assert ours == []
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, f"output/grad {i}")


def test_unsupported_inputs_fall_back(ours):
    with register_sdpa():
        q3 = torch.randn(4, 7, 8)  # 3-D (no batch): torch's business
        assert_close(F.scaled_dot_product_attention(q3, q3, q3), TORCH_SDPA(q3, q3, q3), "3-D")
        qi = torch.randn(1, 2, 5, 8)
        vd = torch.randn(1, 2, 5, 4)  # Dv != D
        assert_close(F.scaled_dot_product_attention(qi, qi, vd), TORCH_SDPA(qi, qi, vd), "Dv")
        with pytest.raises(RuntimeError):  # torch's own error for H != Hkv without enable_gqa
            F.scaled_dot_product_attention(torch.randn(1, 4, 5, 8), qi, qi)
    assert ours == []


def test_backend_rejection_falls_back(monkeypatch):
    def reject(*args, **kwargs):
        raise ValueError("attn_forward: head_dim 8 is not supported by this backend")

    monkeypatch.setattr(dropin, "flash_attn_func", reject)
    q = torch.randn(1, 2, 5, 8)
    with register_sdpa():
        assert_close(F.scaled_dot_product_attention(q, q, q, is_causal=True), TORCH_SDPA(q, q, q, is_causal=True),
                     "out")


def test_plain_call_nesting_and_backend_choice(ours):
    reg = register_sdpa()  # patches until unregister_sdpa()
    q = torch.randn(1, 2, 6, 8)
    F.scaled_dot_product_attention(q, q, q)
    with register_sdpa(backend="sdpa"):
        F.scaled_dot_product_attention(q, q, q)
    assert F.scaled_dot_product_attention is not TORCH_SDPA  # the outer registration is still live
    F.scaled_dot_product_attention(q, q, q)
    assert [c["backend"] for c in ours] == ["auto", "sdpa", "auto"]
    unregister_sdpa()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    reg.close()  # already undone: a no-op
    assert F.scaled_dot_product_attention is TORCH_SDPA


# -- Hugging Face transformers ------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _llama_pair():
    import copy

    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    # one config object each: from_config writes attn_implementation into the config it is given
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    name = register_hf()
    assert name == "ringattn"
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=name)
    ours.load_state_dict(ref.state_dict())
    assert (ref.config._attn_implementation, ours.config._attn_implementation) == ("sdpa", "ringattn")
    return ref, ours


@pytest.fixture(scope="module")
def llamas():
    return _llama_pair()


def _logits_and_grads(model, ids, weights=None, **kwargs):
    model.zero_grad()
    logits = model(ids, use_cache=False, **kwargs).logits
    w = torch.linspace(-1, 1, logits.shape[-1]) if weights is None else weights
    (logits * w).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(got, expected, what):
    assert_close(got[0], expected[0], f"{what} logits", atol=1e-5, rtol=1e-5)
    for n, g in got[1].items():
        assert_close(g, expected[1][n], f"{what} grad {n}", atol=1e-5, rtol=1e-4)


def test_hf_llama_matches_sdpa(llamas):
    ref, ours = llamas
    ids = torch.randint(0, 96, (2, 21))
    _assert_same(_logits_and_grads(ours, ids), _logits_and_grads(ref, ids), "dense")


def test_hf_llama_padding_is_unpadded_not_masked(llamas, monkeypatch):
    ref, ours = llamas
    masks_seen = []
    real = dropin.ringattn_forward

    def spy(module, q, k, v, attention_mask, **kwargs):
        masks_seen.append(None if attention_mask is None else attention_mask.dim())
        return real(module, q, k, v, attention_mask, **kwargs)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "ringattn", spy)
    ids = torch.randint(0, 96, (2, 17))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[0, :6] = 0  # left padding
    keep = mask.bool()[..., None].float()  # padded positions' logits are garbage in both: leave them out
    got = _logits_and_grads(ours, ids, attention_mask=mask, weights=keep * torch.linspace(-1, 1, 96))
    expected = _logits_and_grads(ref, ids, attention_mask=mask, weights=keep * torch.linspace(-1, 1, 96))
    _assert_same(((got[0] * keep), got[1]), ((expected[0] * keep), expected[1]), "padded")
    assert masks_seen == [2, 2]  # the 2-D padding mask only, never a dense (B, 1, N, N) one


def _packed(lengths):
    ids = torch.randint(0, 96, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, pos


@pytest.mark.parametrize("via", ["position_ids", "cu_seq_lens"])
def test_hf_llama_packed_equals_separate_documents(llamas, via):
    _, ours = llamas
    lengths = [7, 1, 12, 5]
    ids, pos = _packed(lengths)
    kwargs = dict(position_ids=pos)
    if via == "cu_seq_lens":  # what DataCollatorWithFlattening hands the model
        cu = cu_seqlens(lengths)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    packed = _logits_and_grads(ours, ids, **kwargs)
    # oracle: each document alone, gradients summed over documents
    logits, grads, start = [], {}, 0
    for n in lengths:
        lg, g = _logits_and_grads(ours, ids[:, start:start + n])
        logits.append(lg)
        for name, t in g.items():
            grads[name] = grads.get(name, 0) + t
        start += n
    _assert_same(packed, (torch.cat(logits, 1), grads), f"packed via {via}")


def test_hf_llama_decode_with_cache_matches_sdpa(llamas):
    ref, ours = llamas
    ids = torch.randint(0, 96, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        a = ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
        b = ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    for i, (x, y) in enumerate(zip(b.logits, a.logits)):
        assert_close(y, x, f"step {i} logits", atol=1e-5, rtol=1e-5)
