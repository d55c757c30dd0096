"""Tests for trainer/data.py, trainer/packing.py, trainer/tokenizer.py (CPU, no network).

Packing is checked against oracles that need no trust in the packer: a store whose token ids are their own
positions (so "next token" is id + 1 and every id is unique), byte histograms of the real corpus, and
documents reassembled from streamed batches.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from trainer.data import (DataConfig, build_loader, build_tokenizer, load_stdlib, select_stdlib_files,
                          stdlib_files, validate_data_config)
from trainer.data.packing import PackedLoader, StreamingPackedLoader, TokenStore
from trainer.data.tokenizer import ByteTokenizer, encode_documents
from helpers import ROOT, save_tiny_bpe_tokenizer

PAD = -1   # sentinel pad id for the id-as-position stores: never a real token there


# ---- helpers ---------------------------------------------------------------------------------------------

def check_batch(batch, B, N):
    """Invariants of DATA_API.md that hold for every batch."""
    tokens, labels, pos, cu = batch["tokens"], batch["labels"], batch["position_ids"], batch["cu_seqlens"]
    assert tokens.shape == labels.shape == pos.shape == (B, N)
    assert tokens.dtype == labels.dtype == pos.dtype == torch.int64 and cu.dtype == torch.int32
    cu = cu.long()
    assert cu[0] == 0 and cu[-1] == B * N and bool((cu[1:] > cu[:-1]).all())
    assert set(range(0, B * N, N)) <= set(cu.tolist()), "a segment spans two rows"
    flat_pos = pos.reshape(-1)
    restarts = torch.nonzero(flat_pos == 0).reshape(-1)
    assert restarts.tolist() == cu[:-1].tolist(), "position restarts != cu_seqlens starts"
    seg_id = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    assert torch.equal(flat_pos, torch.arange(B * N) - cu[seg_id])
    assert batch["max_seqlen"] == int((cu[1:] - cu[:-1]).max())
    assert batch["num_valid"] == int((labels != -100).sum())
    return seg_id


def check_labels_within_segments(batch):
    """Inside a segment, a valid label is the next input token (the segment end may look past the row)."""
    tokens, labels = batch["tokens"].reshape(-1), batch["labels"].reshape(-1)
    cu = batch["cu_seqlens"].long()
    seg_last = torch.zeros_like(tokens, dtype=torch.bool)
    seg_last[cu[1:] - 1] = True
    inner = ~seg_last[:-1] & (labels[:-1] != -100)
    assert torch.equal(labels[:-1][inner], tokens[1:][inner])


def id_store(lengths):
    """Documents whose token ids are their positions in the store: doc d = arange(off_d, off_{d+1})."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenStore.from_arrays([np.arange(offsets[i], offsets[i + 1]) for i in range(len(lengths))])


def real_tokens(batch):
    t = batch["tokens"]
    return t[t != PAD]


def batches_equal(a, b):
    return all((torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]) for k in a)


# ---- tokenizer -------------------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip():
    tok = build_tokenizer(DataConfig())
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 258 and (tok.bos_id, tok.eos_id) == (256, 257)
    text = "def f(x):\n    return 'héllo ✓ 🐍'  # ok\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text      # specials carry no bytes
    docs = encode_documents(tok, [text, "a"])
    assert docs[0].tolist() == ids + [tok.eos_id] and docs[1].tolist() == [97, tok.eos_id]


def _save_tiny_hf_tokenizer(path):
    save_tiny_bpe_tokenizer(path, bos_first=False)


def test_hf_tokenizer_local_dir_and_errors(tmp_path):
    _save_tiny_hf_tokenizer(tmp_path / "tok")
    tok = build_tokenizer(DataConfig(tokenizer="hf", tokenizer_path=str(tmp_path / "tok")))
    text = "def f(self): return 1"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.eos_id != tok.bos_id and tok.vocab_size >= 259
    assert encode_documents(tok, [text])[0].tolist() == ids + [tok.eos_id]
    with pytest.raises(ValueError, match="data.tokenizer_path"):
        build_tokenizer(DataConfig(tokenizer="hf", tokenizer_path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="data.tokenizer_path"):
        build_tokenizer(DataConfig(tokenizer="hf"))


# ---- the embedded stdlib corpus --------------------------------------------------------------------------

def test_stdlib_split_is_deterministic_and_disjoint_by_file():
    files = stdlib_files()
    assert len(files) > 500 and not any("site-packages" in f for f in files)
    train = select_stdlib_files(files, "train", 0.05, None)
    val = select_stdlib_files(files, "validation", 0.05, None)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(files)
    assert 0.02 < len(val) / len(files) < 0.10
    assert val == select_stdlib_files(list(reversed(files)), "validation", 0.05, None)
    small = select_stdlib_files(files, "validation", 0.05, 20)     # capped: still a non-empty held-out file
    assert len(small) >= 1 and set(small) <= set(files)
    assert set(small).isdisjoint(select_stdlib_files(files, "train", 0.05, 20))
    cfg = DataConfig(max_files=60)
    tr, va = load_stdlib(cfg, "train"), load_stdlib(cfg, "validation")
    assert set(tr["path"]).isdisjoint(va["path"]) and len(va) >= 1 and len(tr) + len(va) <= 60


def _stdlib_digest():
    from trainer.data import DataConfig, build_loader, build_tokenizer
    cfg = DataConfig(max_files=20, seq_len=128, batch_size=2)
    tok = build_tokenizer(cfg)
    tr, va = build_loader(cfg, tok, "train", 0, 1, 0), build_loader(cfg, tok, "validation", 0, 1, 0)
    b, v = next(tr), next(iter(va.iter_epoch()))
    return [tr.store.num_tokens, va.store.num_tokens, int(b["tokens"].sum()), int(v["tokens"].sum())]


def test_stdlib_loads_offline_in_a_fresh_process():
    """No network: HF offline flags set before datasets is imported; same digest as this process."""
    code = "from tests.trainer.test_data import _stdlib_digest; print(*_stdlib_digest())"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT / "tests"))  # the test module imports the shared helpers
    root = str(ROOT)
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    digest = [int(x) for x in r.stdout.strip().splitlines()[-1].split()]
    assert digest == _stdlib_digest() and digest[0] > 10_000 and digest[1] > 0


def test_stdlib_every_token_once_per_epoch_across_ranks():
    cfg = DataConfig(max_files=12, seq_len=128, batch_size=3)
    tok = build_tokenizer(cfg)
    dp = 2
    loaders = [build_loader(cfg, tok, "train", r, dp, seed=3) for r in range(dp)]
    store = loaders[0].store
    seen = np.zeros(tok.vocab_size, dtype=np.int64)
    for loader in loaders:
        assert loader.num_batches == loaders[0].num_batches
        for batch in loader.iter_epoch(epoch=1):
            check_batch(batch, cfg.batch_size, cfg.seq_len)
            check_labels_within_segments(batch)
            seen += np.bincount(batch["tokens"].reshape(-1).numpy(), minlength=tok.vocab_size)
    expected = np.bincount(store.tokens, minlength=tok.vocab_size)
    slots = loaders[0].num_batches * cfg.batch_size * dp * cfg.seq_len
    expected[tok.pad_id] += slots - store.num_tokens                  # padding uses pad_id (= eos)
    assert np.array_equal(seen, expected)


def test_stdlib_cross_doc_attention():
    cfg = DataConfig(max_files=30, seq_len=256, batch_size=2, cross_doc_attention=True)
    tok = build_tokenizer(cfg)
    loader = build_loader(cfg, tok, "train", 0, 1, seed=0)
    crossed = 0
    for batch in loader.iter_epoch():
        check_batch(batch, 2, 256)
        assert batch["cu_seqlens"].tolist() == [0, 256, 512]
        tokens, labels = batch["tokens"].reshape(-1), batch["labels"].reshape(-1)
        eos_inner = torch.nonzero(tokens[:-1] == tok.eos_id).reshape(-1)
        eos_inner = eos_inner[(eos_inner + 1) % 256 != 0]
        assert torch.equal(labels[eos_inner], tokens[eos_inner + 1])     # targets run across documents
        crossed += len(eos_inner)
        if crossed >= 5:
            break
    assert crossed > 0


# ---- the packer against an id-as-position oracle ---------------------------------------------------------

@pytest.mark.parametrize("dp_size", [1, 3])
@pytest.mark.parametrize("cross_doc", [False, True])
def test_packed_loader_oracle(dp_size, cross_doc):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=57)
    lengths[5] = 150                                               # a document longer than several rows
    store = id_store(lengths)
    doc_start = set(store.doc_offsets[:-1].tolist())
    doc_end = set((store.doc_offsets[1:] - 1).tolist())
    B, N = 2, 16
    everything = []
    for rank in range(dp_size):
        loader = PackedLoader(store, seq_len=N, batch_size=B, dp_rank=rank, dp_size=dp_size, seed=1,
                              shuffle=True, infinite=True, cross_doc=cross_doc, pad_id=PAD)
        for batch in loader.iter_epoch(epoch=2):
            check_batch(batch, B, N)
            tok, lab, pos = (batch[k].reshape(-1) for k in ("tokens", "labels", "position_ids"))
            for j, (t, l, p) in enumerate(zip(tok.tolist(), lab.tolist(), pos.tolist())):
                if t == PAD:
                    assert l == -100
                    continue
                everything.append(t)
                if t not in doc_end:
                    assert l == t + 1                              # next token, even past the row end
                elif cross_doc:
                    assert l == -100 or l in doc_start
                else:
                    assert l == -100                               # never a target across documents
                if cross_doc:
                    assert p == j % N
                else:
                    assert (p == 0) == (t in doc_start or j % N == 0)
    assert sorted(everything) == list(range(store.num_tokens))     # each token exactly once per epoch


def test_packed_loader_determinism_disjoint_ranks_and_resume():
    store = id_store(np.random.default_rng(1).integers(1, 50, size=80))
    kw = dict(seq_len=32, batch_size=2, dp_size=2, shuffle=True, infinite=True, cross_doc=False, pad_id=PAD)
    a = PackedLoader(store, dp_rank=0, seed=5, **kw)
    b = PackedLoader(store, dp_rank=0, seed=5, **kw)
    c = PackedLoader(store, dp_rank=0, seed=6, **kw)
    other = PackedLoader(store, dp_rank=1, seed=5, **kw)
    n = a.num_batches
    first = [next(a) for _ in range(n)]
    assert all(batches_equal(x, next(b)) for x in first)
    assert not all(batches_equal(x, next(c)) for x in first)
    mine = set(torch.cat([real_tokens(x) for x in first]).tolist())
    theirs = set(torch.cat([real_tokens(next(other)) for _ in range(n)]).tolist())
    assert mine.isdisjoint(theirs) and len(mine | theirs) == store.num_tokens
    epoch1 = next(a)                                              # epochs reshuffle
    assert a.epoch == 1 and not batches_equal(epoch1, first[0])
    for stop in (3, n, n + 2):                                    # mid-epoch, at and past the epoch end
        ref = PackedLoader(store, dp_rank=0, seed=5, **kw)
        for _ in range(stop):
            next(ref)
        resumed = PackedLoader(store, dp_rank=0, seed=5, **kw)
        resumed.load_state_dict(ref.state_dict())
        assert all(batches_equal(next(ref), next(resumed)) for _ in range(n + 1))
    with pytest.raises(ValueError, match="dp_size"):
        PackedLoader(store, dp_rank=0, seed=5, **{**kw, "dp_size": 1}).load_state_dict(a.state_dict())


def _list_opener(docs, dp_rank, dp_size, seed):
    """open_docs over in-memory arrays: reshuffled per epoch, dealt to ranks like split_dataset_by_node."""
    def open_docs(epoch, skip):
        order = np.random.default_rng([seed, epoch]).permutation(len(docs))
        return iter([docs[i] for i in order if i % dp_size == dp_rank][skip:])
    return open_docs


@pytest.mark.parametrize("cross_doc", [False, True])
def test_streaming_packer_oracle_and_resume(cross_doc):
    lengths = np.random.default_rng(2).integers(1, 45, size=40)
    store = id_store(lengths)
    docs = [store.tokens[store.doc_offsets[i]:store.doc_offsets[i + 1]] for i in range(store.num_docs)]
    doc_end = set((store.doc_offsets[1:] - 1).tolist())
    B, N, dp = 2, 16, 2
    seen = []
    for rank in range(dp):
        make = lambda: StreamingPackedLoader(_list_opener(docs, rank, dp, 7), seq_len=N, batch_size=B,  # noqa: E731
                                             dp_rank=rank, dp_size=dp, seed=7, infinite=True,
                                             cross_doc=cross_doc, pad_id=PAD)
        loader, epoch0 = make(), []
        while True:
            batch = next(loader)
            if loader.epoch > 0:
                break
            check_batch(batch, B, N)
            epoch0.append(batch)
            for t, l in zip(batch["tokens"].reshape(-1).tolist(), batch["labels"].reshape(-1).tolist()):
                if t != PAD and t not in doc_end:
                    assert l == t + 1
                elif t in doc_end and not cross_doc:
                    assert l == -100
        seen += torch.cat([real_tokens(x) for x in epoch0]).tolist()
        for stop in (1, len(epoch0) - 1, len(epoch0), len(epoch0) + 3):
            ref = make()
            for _ in range(stop):
                next(ref)
            resumed = make()
            resumed.load_state_dict(ref.state_dict())
            assert all(batches_equal(next(ref), next(resumed)) for _ in range(4))
    assert sorted(seen) == list(range(store.num_tokens))


# ---- source=hf on local files ----------------------------------------------------------------------------

def _write_corpus(tmp_path, n=60):
    rng = np.random.default_rng(4)
    words = ["alpha", "beta", "gamma", "delta", "é", "λ", "def", "return", "\n"]
    texts = [f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for i in range(n)]
    rows = [{"text": t, "id": i} for i, t in enumerate(texts)] + [{"text": "", "id": -1}]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "corpus.parquet"))
    return texts, jsonl


def _docs_of(loader, tok):
    st = loader.store
    return [tok.decode(st.tokens[st.doc_offsets[i]:st.doc_offsets[i + 1] - 1].tolist()) for i in range(st.num_docs)]


def test_hf_local_files_split_and_formats(tmp_path):
    texts, jsonl = _write_corpus(tmp_path)
    cfg = DataConfig(source="hf", path=str(jsonl), seq_len=32, batch_size=2, val_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"))
    tok = build_tokenizer(cfg)
    train = _docs_of(build_loader(cfg, tok, "train"), tok)
    val = _docs_of(build_loader(cfg, tok, "validation"), tok)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(texts) and len(val) >= 3
    pq = replace(cfg, path=str(tmp_path / "corpus.parquet"))
    assert _docs_of(build_loader(pq, tok, "validation"), tok) == val
    capped = _docs_of(build_loader(replace(cfg, max_files=10), tok, "train"), tok)
    assert set(capped) <= set(texts[:10]) and set(capped) <= set(train)
    with pytest.raises(ValueError, match="data.text_column"):
        build_loader(replace(cfg, text_column="body"), tok, "train")
    with pytest.raises(ValueError, match="data.path"):
        build_loader(replace(cfg, path=str(tmp_path / "nope.jsonl")), tok, "train")


def test_hf_directories_with_own_validation_split(tmp_path):
    import datasets

    texts, _ = _write_corpus(tmp_path, n=30)
    data_dir = tmp_path / "dir"
    data_dir.mkdir()
    for name, part in (("train", texts[:24]), ("validation", texts[24:])):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:24]}),
                          "validation": datasets.Dataset.from_dict({"text": texts[24:]})}
                         ).save_to_disk(str(tmp_path / "saved"))
    tok = ByteTokenizer()
    for path in (data_dir, tmp_path / "saved"):
        cfg = DataConfig(source="hf", path=str(path), seq_len=32, batch_size=2, cache_dir=str(tmp_path / "cache"))
        assert _docs_of(build_loader(cfg, tok, "train"), tok) == texts[:24]      # the whole train split
        assert _docs_of(build_loader(cfg, tok, "validation"), tok) == texts[24:]
        loaded = list(build_loader(cfg, tok, "validation").iter_epoch())
        streamed = list(build_loader(replace(cfg, streaming=True), tok, "validation").iter_epoch())
        assert len(loaded) == len(streamed) and all(map(batches_equal, loaded, streamed))


def test_hf_streaming_matches_map_style_and_splits_ranks(tmp_path):
    texts, jsonl = _write_corpus(tmp_path)
    cfg = DataConfig(source="hf", path=str(jsonl), seq_len=32, batch_size=2, val_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"), shuffle_buffer=16)
    scfg = replace(cfg, streaming=True)
    tok = build_tokenizer(cfg)
    train_docs = _docs_of(build_loader(cfg, tok, "train"), tok)
    for rank in range(2):                              # validation: same batches streamed or loaded
        loaded = list(build_loader(cfg, tok, "validation", rank, 2).iter_epoch())
        streamed = list(build_loader(scfg, tok, "validation", rank, 2).iter_epoch())
        assert len(loaded) == len(streamed) and all(map(batches_equal, loaded, streamed))
    pieces = []
    for rank in range(2):                              # train: split_dataset_by_node shares, epoch 0
        loader = build_loader(scfg, tok, "train", rank, 2, seed=1)
        tokens, first = [], None
        while True:
            batch = next(loader)
            if loader.epoch > 0:
                break
            check_batch(batch, 2, 32)
            check_labels_within_segments(batch)
            tokens += batch["tokens"].reshape(-1).tolist()
            first = batch if len(tokens) == 64 else first
        text = ByteTokenizer().decode([t if t != tok.eos_id else 0 for t in tokens])
        pieces += [p for p in text.split("\0") if p]       # pads are empty documents
        ref = build_loader(scfg, tok, "train", rank, 2, seed=1)
        for _ in range(3):
            next(ref)
        resumed = build_loader(scfg, tok, "train", rank, 2, seed=1)
        resumed.load_state_dict(ref.state_dict())
        assert all(batches_equal(next(ref), next(resumed)) for _ in range(3))
        assert not batches_equal(first, batch)           # epoch 1 is reshuffled (batch: its first batch)
    assert Counter(pieces) == Counter(train_docs)


def test_hf_tokenizer_with_hf_dataset(tmp_path):
    texts, jsonl = _write_corpus(tmp_path, n=20)
    _save_tiny_hf_tokenizer(tmp_path / "tok")
    cfg = DataConfig(source="hf", path=str(jsonl), seq_len=24, batch_size=2, tokenizer="hf",
                     tokenizer_path=str(tmp_path / "tok"), val_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    tok = build_tokenizer(cfg)
    loader = build_loader(cfg, tok, "train")
    st = loader.store
    got = [st.tokens[st.doc_offsets[i]:st.doc_offsets[i + 1]].tolist() for i in range(st.num_docs)]
    assert got == [tok.encode(t) + [tok.eos_id] for t in texts]
    check_batch(next(loader), 2, 24)


# ---- bad configuration -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (dict(source="s3"), "data.source"),
    (dict(source="hf"), "data.path"),
    (dict(seq_len=1), "data.seq_len"),
    (dict(batch_size=0), "data.batch_size"),
    (dict(tokenizer="bpe"), "data.tokenizer"),
    (dict(tokenizer="hf"), "data.tokenizer_path"),
    (dict(val_fraction=1.0), "data.val_fraction"),
    (dict(max_files=0), "data.max_files"),
    (dict(streaming=True), "data.streaming"),
    (dict(num_workers=-1), "data.num_workers"),
])
def test_bad_config_names_the_field(overrides, field):
    cfg = DataConfig(**overrides)
    with pytest.raises(ValueError, match=field):
        validate_data_config(cfg)
    with pytest.raises(ValueError, match=field):
        build_loader(cfg, ByteTokenizer(), "train")


def test_bad_loader_arguments():
    cfg, tok = DataConfig(max_files=5), ByteTokenizer()
    with pytest.raises(ValueError, match="split"):
        build_loader(cfg, tok, "test")
    with pytest.raises(ValueError, match="dp_rank"):
        build_loader(cfg, tok, "train", dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="validation"):
        build_loader(replace(cfg, val_fraction=0.0), tok, "validation")
