"""Shared test helpers: the one assert_close that reports max/mean error, and the naive fp64 oracle."""

import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository

TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(actual, expected, name="", atol=None, rtol=None):
    """Compare with a tolerance scaled to the worse dtype; report max and mean abs error on failure."""
    tol = max(TOL[actual.dtype], TOL[expected.dtype])
    atol = tol if atol is None else atol
    rtol = tol if rtol is None else rtol
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    both_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    err = torch.where(both_inf, torch.zeros_like(a), (a - e).abs())
    bad = err > atol + rtol * e.abs().nan_to_num(0, 0, 0)
    assert not torch.isnan(a).any(), f"{name}: NaN in result"
    assert not bad.any(), (f"{name}: {int(bad.sum())}/{a.numel()} elements off; max err {err.max().item():.3e}, "
                           f"mean err {err.mean().item():.3e} (atol {atol:g}, rtol {rtol:g})")


def visible_mask(nq, nk, causal=False, window_size=(-1, -1)):
    """Bool (Nq, Nk), straight from DESIGN.md: query i sees key j iff i + off - left <= j <= i + off + right with
    off = Nk - Nq (bottom-right aligned), -1 meaning unbounded, causal meaning right = 0."""
    i = torch.arange(nq)[:, None] + nk - nq
    j = torch.arange(nk)[None, :]
    left, right = window_size
    if causal:
        right = 0
    mask = torch.ones(nq, nk, dtype=torch.bool)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


def naive_attention(q, k, v, causal=False, softmax_scale=None, window_size=(-1, -1)):
    """softmax(QK^T)V in fp64 on the full (Nq, Nk) matrix, with autograd; returns (out, lse)."""
    B, nq, H, D = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D) if softmax_scale is None else softmax_scale
    qd, kd, vd = q.double(), k.double().repeat_interleave(H // hkv, 2), v.double().repeat_interleave(H // hkv, 2)
    s = torch.einsum("bihd,bjhd->bhij", qd, kd) * scale
    s = s.masked_fill(~visible_mask(nq, nk, causal, window_size).to(s.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.einsum("bhij,bjhd->bihd", p, vd)
    return out, lse


def cu_seqlens(lengths, device="cpu") -> torch.Tensor:
    """int32 (len(lengths) + 1,) offsets of packed documents: [0, l0, l0 + l1, ...]."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| in fp32 (the GPU tests' bf16 measure); fails on non-finite values."""
    got, want = got.float(), want.float()
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def save_tiny_bpe_tokenizer(path, text: str = "def return import class self lambda yield", bos_first: bool = True):
    """A byte-level BPE tokenizer (vocab 300, <unk> <s> </s>) trained on `text`, saved with save_pretrained as
    transformers would write it; bos_first: its encoding starts with <s>, as Llama's does. Returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([text] * 20, trainer=bpe)
    raw.decoder = decoders.ByteLevel()
    if bos_first:
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(path)
    return tok


def run_bench_cut_after_first_case(monkeypatch, bench, argv) -> list:
    """bench.main(argv) for a GPU benchmark script (bench_forward, bench_backward) on CPU: a GPU and the Gluon kernels
    pretended, meta() stubbed, and bench.bench_case replaced by one that returns {"N": its second argument} once and
    then fails, as a run cut short after its first row. The caller checks what reached the JSON; returned: the
    (args, kwargs) of each bench_case call."""
    import pytest

    import attention.gluon
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention.gluon, "hopper_ready", lambda device: (True, ""))
    monkeypatch.setattr(bench, "meta", lambda: {"gpu": "NVIDIA H200"})
    calls = []

    def case(*args, **kwargs):
        calls.append((args, kwargs))
        if len(calls) > 1:
            raise RuntimeError("cut")
        return {"N": args[1]}
    monkeypatch.setattr(bench, "bench_case", case)
    with pytest.raises(RuntimeError, match="cut"):
        bench.main(argv)
    return calls
