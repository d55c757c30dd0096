"""Long-context memory features: checkpoint policies, CPU offload, chunked SwiGLU, lean norm/RoPE, compile.

Each policy must give the same loss and gradients as model.ckpt=none (fp64, reference attention); the
memory claims are checked by counting the bytes of live CPU tensors after the forward and by the shapes
of every tensor an op creates (no [tokens, vocab] or [tokens, ffn] tensor).
"""

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import trainer.model.activations
import trainer.model.fused
import trainer.model.gpt
from helpers import assert_close
from trainer.model.fused import rms_norm, rms_norm_math, rope, rope_math, swiglu, swiglu_math
from trainer.model.loss import chunked_cross_entropy
from trainer.model import GPT, ModelConfig, RopeScalingConfig, rope_cos_sin

VOCAB = 300


def build(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
    model = GPT(ModelConfig(**{**base, **kw}), attn_backend="reference").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)  # random norm gains: an unused gain gradient would show
    return model


def inputs(packed: bool, n: int = 23, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (batch, n), generator=g)
    labels = torch.randint(0, VOCAB, (batch, n), generator=g)
    if not packed:
        return tokens, labels, None, None, None
    lengths = [9, n - 9] * batch  # two documents per row, positions restart
    pos = torch.cat([torch.arange(L) for L in lengths]).view(batch, n)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return tokens, labels, pos, cu, max(lengths)


def loss_and_grads(model, packed=True, chunk=7):
    tokens, labels, pos, cu, mx = inputs(packed)
    hidden = model(tokens, pos, cu, mx)
    loss = chunked_cross_entropy(hidden.flatten(0, 1), model.output_weight, labels.flatten(), chunk)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_training_step(actual, expected, label):
    assert_close(actual[0], expected[0], f"{label}: loss")
    for name, grad in expected[1].items():
        assert_close(actual[1][name], grad, f"{label}: grad {name}")


POLICIES = [dict(ckpt="full"), dict(ckpt="selective"), dict(ckpt="selective", offload_activations="attention"),
            dict(ckpt="selective", offload_activations=True), dict(ckpt="full", offload_activations="true"),
            dict(ckpt="none", offload_activations="all"), dict(mlp_chunk=5),
            dict(ckpt="selective", mlp_chunk=4), dict(ckpt="full", mlp_chunk=16, offload_activations="all")]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_policy_matches_no_checkpointing(policy, packed):
    expected = loss_and_grads(build(), packed)
    assert_same_training_step(loss_and_grads(build(**policy), packed), expected, str(policy))


class CountCalls:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("ckpt,expected_calls", [("none", 2), ("full", 4), ("selective", 2)])
def test_selective_does_not_rerun_attention(monkeypatch, ckpt, expected_calls):
    for name in ("flash_attn_func", "flash_attn_varlen_func"):
        monkeypatch.setattr(trainer.model.gpt, name, CountCalls(getattr(trainer.model.gpt, name)))
    loss_and_grads(build(ckpt=ckpt), packed=True)
    calls = trainer.model.gpt.flash_attn_func.calls + trainer.model.gpt.flash_attn_varlen_func.calls
    assert calls == expected_calls  # 2 layers: forward only, or forward + recomputation


def test_offload_moves_what_checkpointing_keeps(monkeypatch):
    packed = []
    real = trainer.model.activations.pack_to_cpu
    monkeypatch.setattr(trainer.model.activations, "pack_to_cpu", lambda t: packed.append(tuple(t.shape)) or real(t))
    B, N, dim, H, D = 2, 23, 32, 4, 8
    loss_and_grads(build(ckpt="selective", offload_activations="attention"))
    assert packed == [(B * N, H, D), (H, B * N)] * 2  # per layer: varlen out, lse
    packed.clear()
    loss_and_grads(build(ckpt="selective", offload_activations="all"))
    assert sorted(packed) == sorted([(B, N, dim), (B * N, H, D), (H, B * N)] * 2)  # + each block's input


@pytest.mark.parametrize("fp32_residual", [False, True])
def test_residual_stream_runs_in_the_autocast_dtype(monkeypatch, fp32_residual):
    """fp32 weights under bf16 autocast: the block inputs checkpointing keeps (and offloads) are bf16, half the
    bytes, unless model.fp32_residual. Either way the step stays close to fp64 with the same weights (measured:
    gradients 0.5-1.3% off with the bf16 residual, 0.3-0.7% with fp32)."""
    kept = []
    real = trainer.model.activations.pack_to_cpu
    monkeypatch.setattr(trainer.model.activations, "pack_to_cpu", lambda t: kept.append(t.dtype) or real(t))
    model = build(torch.float32, ckpt="full", offload_activations="all", fp32_residual=fp32_residual)
    oracle = build()
    oracle.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    expected = loss_and_grads(oracle, packed=True)
    kept.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, packed=True)
    assert kept == [torch.float32 if fp32_residual else torch.bfloat16] * 2  # one block input per layer
    assert abs(loss.item() - expected[0].item()) < 1e-4 * expected[0].item()
    for name, want in expected[1].items():
        assert grads[name].dtype == torch.float32, name  # fp32 weights keep fp32 gradients
        assert (grads[name].double() - want).norm() < 3e-2 * want.norm(), name


def test_offloaded_bytes_per_policy():
    f = trainer.model.activations.offloaded_bytes
    L, T, dim, H, D = 3, 1000, 64, 4, 16  # fp32 block inputs, bf16 attention outputs, fp32 lse
    assert f("full", "all", L, T, dim, H, D, 4, 2) == L * T * dim * 4
    assert f("selective", "attention", L, T, dim, H, D, 4, 2) == L * T * H * (D * 2 + 4)
    assert f("selective", "all", L, T, dim, H, D, 4, 2) == L * T * (dim * 4 + H * (D * 2 + 4))
    assert f("full", "none", L, T, dim, H, D, 4, 2) == 0
    assert f("none", "all", L, T, dim, H, D, 4, 2) is None  # whatever autograd saves: not estimated


@pytest.mark.parametrize("shape,dtype", [((5, 7, 3), torch.bfloat16), ((33,), torch.int64), ((0, 4), torch.float32),
                                         ((), torch.float32), ((10,), torch.bool)])
def test_offload_travels_in_fixed_size_pieces(monkeypatch, shape, dtype):
    """torch's pinned cache rounds each block up to a power of two; pieces of PIN_CHUNK_BYTES (one) round only
    the last piece. The tensor comes back bit for bit, non-contiguous ones too."""
    monkeypatch.setattr(trainer.model.activations, "PIN_CHUNK_BYTES", 64)
    t = (torch.randn(shape) * 100).to(dtype)
    for source in (t, t.unsqueeze(-1).expand(*shape, 2)[..., 1]):
        handle = trainer.model.activations.Offloaded(source)
        sizes = [piece.numel() for piece in handle.cpu]
        nbytes = source.numel() * source.element_size()
        assert sum(sizes) == nbytes and all(n == 64 for n in sizes[:-1]) and 0 < sizes[-1] <= 64 or nbytes == 0
        back = handle.get()
        assert back.shape == source.shape and back.dtype == dtype
        assert torch.equal(back.view(-1).view(torch.uint8), source.reshape(-1).view(torch.uint8))
    assert trainer.model.activations.PIN_CHUNK_BYTES & (trainer.model.activations.PIN_CHUNK_BYTES - 1) == 0


def test_exhausted_pinned_memory_says_what_to_change(monkeypatch):
    real = torch.empty

    def empty(*args, pin_memory=False, **kw):
        if pin_memory:  # what cudaHostAlloc's failure looks like from torch
            raise RuntimeError("CUDA error: out of memory")
        return real(*args, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="pinned CPU memory is exhausted.*data.seq_len"):
        trainer.model.activations._pinned(1 << 20)


def test_offload_in_pieces_matches_no_checkpointing(monkeypatch):
    monkeypatch.setattr(trainer.model.activations, "PIN_CHUNK_BYTES", 96)  # every offloaded tensor in several pieces
    expected = loss_and_grads(build(), True)
    for policy in (dict(ckpt="full", offload_activations="all"), dict(ckpt="selective", offload_activations="all")):
        assert_same_training_step(loss_and_grads(build(**policy), True), expected, str(policy))


@pytest.mark.parametrize("ckpt,per_block", [("full", 1), ("selective", 3)])
def test_offload_prefetches_one_block_ahead(monkeypatch, ckpt, per_block):
    """In backward every offloaded tensor of a block is already on its way back when the block needs it, and
    no more than one block's tensors are back ahead of use (under ckpt=full 4 GiB each at 2M tokens)."""
    handles, fetched = [], []
    real_init, real_get = trainer.model.activations.Offloaded.__init__, trainer.model.activations.Offloaded.get

    def init(self, t):
        real_init(self, t)
        handles.append(self)

    def get(self):
        warm = self.gpu is not None
        t = real_get(self)
        fetched.append((self.block, warm, sum(h.gpu is not None for h in handles)))
        return t

    monkeypatch.setattr(trainer.model.activations.Offloaded, "__init__", init)
    monkeypatch.setattr(trainer.model.activations.Offloaded, "get", get)
    layers = 4
    loss_and_grads(build(ckpt=ckpt, offload_activations="all", n_layers=layers))
    assert len(fetched) == len(handles) == layers * per_block
    assert [b for b, _, _ in fetched[::per_block]] == sorted({h.block for h in handles}, reverse=True)
    last = fetched[0][0]  # the last block's tensors come back when backward reaches it: nothing ran before
    assert all(warm for block, warm, _ in fetched if block != last)
    # back ahead of use at most: the rest of the block in use and the whole next one
    assert max(resident for _, _, resident in fetched) == 2 * per_block - 1


class LiveTensors(TorchDispatchMode):
    """Bytes of live CPU storages allocated inside the mode (views of older storages, such as weight.t() of a
    parameter, do not count; nor do `model`'s parameters), their peak, and the shape of every op output."""

    def __init__(self, model=None):
        super().__init__()
        self.live, self.now, self.peak, self.shapes = {}, 0, 0, set()
        self.params = set() if model is None else {p.untyped_storage().data_ptr() for p in model.parameters()}

    def _free(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if not func.is_view and key not in self.live and key not in self.params and storage.nbytes() > 0:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out


def bytes_kept_by_forward(model, tokens):
    """Bytes alive after the forward (what autograd keeps for backward), with the hidden output freed."""
    with LiveTensors(model) as mode:
        hidden = model(tokens)
        graph = hidden.grad_fn  # keeps the graph (and what it saved) alive
        del hidden
        gc.collect()
        kept = mode.now
    del graph
    return kept


def test_kept_activation_bytes_follow_the_policy():
    # fp32, one 96-token row: none keeps everything; full keeps each block's input (B, N, dim);
    # selective keeps that plus the attention output (B, N, H, D) and lse (B, H, N) fp32.
    B, N, dim, L, H, D = 1, 96, 32, 2, 4, 8
    tokens = torch.randint(0, VOCAB, (B, N))
    kept = {}
    for name, kw in {"none": {}, "full": dict(ckpt="full"), "selective": dict(ckpt="selective"),
                     "none_chunked": dict(mlp_chunk=16)}.items():
        kept[name] = bytes_kept_by_forward(build(torch.float32, **kw), tokens)
    # full: each block's input, plus what the final norm keeps (its input, 1 fp32 per row) and the
    # (B, N, 1, D/2) cos/sin tables the checkpoint closures hold.
    assert kept["full"] == (L + 1) * B * N * dim * 4 + B * N * 4 + 2 * B * N * (D // 2) * 4
    assert kept["selective"] - kept["full"] == L * (B * N * H * D * 4 + B * H * N * 4)
    assert kept["none"] > 3 * kept["selective"]
    ffn_bytes = B * N * 48 * 4
    assert kept["none"] - kept["none_chunked"] >= L * 2 * ffn_bytes  # w1 x, w3 x (and more) not kept


def test_no_tokens_by_vocab_or_tokens_by_ffn_tensor():
    # A training step with loss chunk 64 and mlp chunk 32 over 2 x 200 tokens: every tensor with a
    # vocab-sized or ffn-sized dimension has at most one chunk of tokens.
    ffn, chunk, mlp_chunk = 48, 64, 32
    model = build(torch.float32, ckpt="selective", mlp_chunk=mlp_chunk)
    tokens = torch.randint(0, VOCAB, (2, 200))
    with LiveTensors(model) as mode:
        hidden = model(tokens)
        chunked_cross_entropy(hidden.flatten(0, 1), model.output_weight, tokens.flatten(), chunk).backward()
    for shape in mode.shapes:
        numel = torch.Size(shape).numel()
        if VOCAB in shape:
            assert numel // VOCAB <= max(chunk, 32), shape  # 32 = dim: the (vocab, dim) weight / its grad
        if ffn in shape:
            assert numel // ffn <= max(mlp_chunk, 32), shape


def test_chunked_swiglu_matches_plain():
    torch.manual_seed(3)
    x = torch.randn(2, 13, 16, dtype=torch.float64, requires_grad=True)
    w1, w3 = (torch.randn(24, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w2 = torch.randn(16, 24, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 13, 16, dtype=torch.float64)
    grads = []
    for chunk in (0, 5, 26, 100):  # plain, uneven chunks, exactly all tokens, more than all
        out = swiglu(x, w1, w3, w2, chunk)
        grads.append((out.detach(), *torch.autograd.grad(out, (x, w1, w3, w2), dy)))
    for chunk, got in zip((5, 26, 100), grads[1:]):
        for name, a, b in zip(("out", "dx", "dw1", "dw3", "dw2"), got, grads[0]):
            assert_close(a, b, f"chunk {chunk}: {name}")
    with torch.no_grad():
        assert_close(swiglu(x, w1, w3, w2, 4), swiglu_math(x, w1, w3, w2), "no-grad chunked")


def test_lean_norm_and_rope_match_plain_autograd():
    torch.manual_seed(4)
    x = torch.randn(2, 7, 3, 16, dtype=torch.float64, requires_grad=True)
    w = torch.rand(16, dtype=torch.float64, requires_grad=True) + 0.5
    dy = torch.randn_like(x)
    for lean, math in ((lambda: rms_norm(x, w, 1e-5), lambda: rms_norm_math(x, w, 1e-5)),):
        a, b = lean(), math()
        assert_close(a, b, "rms_norm")
        for g1, g2, name in zip(torch.autograd.grad(a, (x, w), dy), torch.autograd.grad(b, (x, w), dy),
                                ("dx", "dw")):
            assert_close(g1, g2, f"rms_norm {name}")
    cos, sin = rope_cos_sin(torch.randint(0, 5000, (2, 7)), 16, 10000.0, 1.0, torch.float64)
    a, b = rope(x, cos, sin), rope_math(x, cos, sin)
    assert_close(a, b, "rope")
    assert_close(torch.autograd.grad(a, x, dy)[0], torch.autograd.grad(b, x, dy)[0], "rope dx")


@pytest.mark.parametrize("chunk", [40, 100, 10**6])
def test_chunked_norm_and_rope_match_plain_autograd(monkeypatch, chunk):
    """The eager RMSNorm and RoPE run over CHUNK_ELEMENTS at a time (2-6 rows or 1-2 tokens here); uneven chunks, a
    non-contiguous input and one chunk for everything all give the plain-autograd values."""
    monkeypatch.setattr(trainer.model.fused, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(5)
    x = torch.randn(2, 11, 3, 16, dtype=torch.float64).transpose(1, 2).requires_grad_()  # (2, 3, 11, 16), strided
    w = (torch.rand(16, dtype=torch.float64) + 0.5).requires_grad_()
    dy = torch.randn(2, 3, 11, 16, dtype=torch.float64)
    a, b = rms_norm(x, w, 1e-5), rms_norm_math(x, w, 1e-5)
    assert_close(a, b, "rms_norm")
    for g1, g2, name in zip(torch.autograd.grad(a, (x, w), dy), torch.autograd.grad(b, (x, w), dy), ("dx", "dw")):
        assert_close(g1, g2, f"rms_norm {name}")
    q = torch.randn(2, 13, 3, 16, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_cos_sin(torch.randint(0, 5000, (2, 13)), 16, 10000.0, 1.0, torch.float64)
    dq = torch.randn_like(q)
    assert_close(rope(q, cos, sin), rope_math(q, cos, sin), "rope")
    assert_close(torch.autograd.grad(rope(q, cos, sin), q, dq)[0],
                 torch.autograd.grad(rope_math(q, cos, sin), q, dq)[0], "rope dx")


def test_chunked_norm_backward_keeps_fp32_temporaries_small(monkeypatch):
    """bf16 rows: unchunked, the norm's backward peaked at 11 units of its input's size (dx and five fp32
    temporaries); in chunks of 64 of 4096 rows, dx (1 unit) and a chunk's temporaries."""
    x = torch.randn(4096, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(4096, 64, dtype=torch.bfloat16)
    unit = x.numel() * x.element_size()
    extra = {}
    for chunk in (10**6, 64 * 64):
        monkeypatch.setattr(trainer.model.fused, "CHUNK_ELEMENTS", chunk)
        y = rms_norm(x, w, 1e-5)
        with LiveTensors() as mode:
            torch.autograd.grad(y, (x, w), dy)
        extra[chunk] = mode.peak / unit
    assert extra[10**6] > 6 and extra[64 * 64] < 1.5, extra


def test_rope_theta_and_scaling_reach_the_model():
    tokens = torch.randint(0, VOCAB, (1, 40))
    base = build(rope_theta=10000.0)(tokens)
    assert (build(rope_theta=500000.0)(tokens) - base).abs().max() > 1e-6
    # Position interpolation: scaling s over positions s*p equals scaling 1 over positions p.
    pos = torch.arange(40)[None]
    linear4 = RopeScalingConfig(type="linear", factor=4.0)
    assert_close(build(rope_scaling=linear4)(tokens, pos * 4), build()(tokens, pos), "rope_scaling linear 4 at 4p")


def test_compiled_model_matches_eager():
    # fp32, one compiled graph per stage shared by both layers; selective + chunked MLP, so the compiled
    # stages also run inside the checkpoint recomputation.
    torch._dynamo.reset()
    eager = loss_and_grads(build(torch.float32, ckpt="selective"), packed=True)
    compiled = loss_and_grads(build(torch.float32, ckpt="selective", compile=True), packed=True)
    assert_same_training_step(compiled, eager, "compile")
    compiled_chunked = loss_and_grads(build(torch.float32, compile=True, mlp_chunk=8), packed=False)
    assert_same_training_step(compiled_chunked, loss_and_grads(build(torch.float32), packed=False),
                              "compile + mlp_chunk")


def test_compiled_model_takes_many_lengths():
    """Eval prompts come in many lengths: more than torch's recompile limit (8) must neither fail (fullgraph) nor
    drift from eager."""
    torch._dynamo.reset()
    model, ref = build(torch.float32, compile=True), build(torch.float32)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n in range(3, 14):
            tokens = torch.randint(0, VOCAB, (1, n))
            assert_close(model(tokens), ref(tokens), f"compiled vs eager at {n} tokens", atol=1e-4, rtol=1e-4)


def test_bad_memory_options():
    with pytest.raises(ValueError, match="offload_activations"):
        build(offload_activations="sometimes")
    with pytest.raises(ValueError, match="ckpt=selective"):
        build(ckpt="full", offload_activations="attention")
    with pytest.raises(ValueError, match="mlp_chunk"):
        build(mlp_chunk=-1)
    with pytest.raises(ValueError, match="model.ckpt"):
        build(ckpt="partial")
