"""Datasets at scale: memory-mapped token stores, the token cache, passkey mixing in the streamed and loaded
loaders, 64K-token rows, and streamed DP shares that lose or repeat no document, also across a resume."""

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from trainer.data import passkey
from trainer.data import DataConfig, build_loader
from trainer.data.packing import PackedLoader, TokenStore
from trainer.data.token_cache import append_documents, build_token_cache, open_token_store
from trainer.data.tokenizer import ByteTokenizer, encode_documents

TOK = ByteTokenizer()


def batches_equal(a, b):
    return all((torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]) for k in a)


def corpus(tmp_path, n=80, seed=4):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "é", "λ", "def", "return", "\n"]
    texts = [f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(3, 60)))) for i in range(n)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts, path


def documents(batches):
    """Reassemble the documents of one rank's batches: its rows in order, split at eos (pads are empty)."""
    stream = torch.cat([b["tokens"].reshape(-1) for b in batches]).tolist()
    text = TOK.decode([t if t != TOK.eos_id else 0 for t in stream])
    return [d for d in text.split("\0") if d]


def epoch0(loader):
    out = []
    while True:
        batch = next(loader)
        if loader.epoch > 0:
            return out
        out.append(batch)


# -- memory-mapped token stores ---------------------------------------------------------------------------

def test_memmap_store_round_trip_and_same_batches(tmp_path):
    docs = encode_documents(TOK, [f"document number {i} " * (i % 7 + 1) for i in range(50)])
    mem = TokenStore.from_arrays(docs)
    chunks = [(np.concatenate(docs[i:i + 7]), [len(d) for d in docs[i:i + 7]]) for i in range(0, 50, 7)]
    disk = build_token_cache(tmp_path / "store", chunks, np.uint16)
    assert isinstance(disk.tokens, np.memmap) and not disk.tokens.flags.writeable
    assert np.array_equal(disk.tokens, mem.tokens) and np.array_equal(disk.doc_offsets, mem.doc_offsets)
    again = build_token_cache(tmp_path / "store", iter(()), np.uint16)  # complete store: opened, not rebuilt
    assert np.array_equal(again.tokens, mem.tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no temporary dirs left behind
    kw = dict(seq_len=48, batch_size=3, dp_rank=1, dp_size=2, seed=3, shuffle=True, infinite=True,
              cross_doc=False, pad_id=TOK.pad_id)
    a, b = PackedLoader(mem, **kw), PackedLoader(open_token_store(tmp_path / "store"), **kw)
    assert all(batches_equal(next(a), next(b)) for _ in range(12))


def test_appended_documents_read_as_one_store():
    base = TokenStore.from_arrays([np.arange(5, dtype=np.uint16), np.arange(10, 13, dtype=np.uint16)])
    extra = [np.array([100, 101], dtype=np.uint16)]
    both = append_documents(base, extra)
    flat = TokenStore.from_arrays([np.arange(5), np.arange(10, 13), np.array([100, 101])])
    assert np.array_equal(both.doc_offsets, flat.doc_offsets)
    idx = np.array([0, 4, 5, 7, 8, 9, 2])
    assert np.array_equal(both.tokens[idx], flat.tokens[idx]) and np.array_equal(both.tokens[3:9], flat.tokens[3:9])


def test_token_cache_gives_the_same_batches_without_the_corpus_in_memory(tmp_path):
    _, path = corpus(tmp_path)
    cfg = DataConfig(source="hf", path=str(path), seq_len=40, batch_size=2, val_fraction=0.2,
                     cache_dir=str(tmp_path / "hf"))
    cached = replace(cfg, token_cache=str(tmp_path / "tokens"))
    for split in ("train", "validation"):
        plain, disk = build_loader(cfg, TOK, split, 0, 2, seed=5), build_loader(cached, TOK, split, 0, 2, seed=5)
        assert isinstance(disk.store.tokens, np.memmap)
        assert all(batches_equal(next(plain), next(disk)) for _ in range(6))
    stores = sorted(p.name for p in (tmp_path / "tokens").iterdir())
    assert len(stores) == 2  # one per split
    build_loader(cached, TOK, "train")  # reuses it
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == stores


def test_64k_rows_from_a_memmap_store(tmp_path):
    # 2 ranks x 64K-token rows over a ~200K-token corpus: every token of the epoch appears exactly once.
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 9000, size=40)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    docs = [np.arange(offsets[i], offsets[i + 1], dtype=np.int32) for i in range(40)]  # ids = positions
    store = build_token_cache(tmp_path / "big", [(np.concatenate(docs), lengths)], np.int32)
    seen = []
    for rank in range(2):
        loader = PackedLoader(store, seq_len=65536, batch_size=1, dp_rank=rank, dp_size=2, seed=1, shuffle=True,
                              infinite=False, cross_doc=False, pad_id=-1)
        for batch in loader:
            assert batch["tokens"].shape == (1, 65536)
            seen += batch["tokens"][batch["tokens"] != -1].tolist()
    assert sorted(seen) == list(range(int(offsets[-1])))


# -- streaming: DP shares, resume, passkey mixing ---------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_streamed_ranks_cover_the_corpus_once_across_a_resume(tmp_path, ratio):
    texts, path = corpus(tmp_path)
    cfg = DataConfig(source="hf", path=str(path), streaming=True, seq_len=64, batch_size=2, val_fraction=0.0,
                     cache_dir=str(tmp_path / "hf"), shuffle_buffer=16, passkey_ratio=ratio, passkey_max_len=200)
    pieces = []
    for rank in range(2):
        full = epoch0(build_loader(cfg, TOK, "train", rank, 2, seed=9))
        again = epoch0(build_loader(cfg, TOK, "train", rank, 2, seed=9))
        assert len(full) == len(again) and all(map(batches_equal, full, again))  # deterministic
        stop = len(full) // 2  # resume from a checkpoint taken mid-epoch
        first = build_loader(cfg, TOK, "train", rank, 2, seed=9)
        head = [next(first) for _ in range(stop)]
        resumed = build_loader(cfg, TOK, "train", rank, 2, seed=9)
        resumed.load_state_dict(first.state_dict())
        tail = epoch0(resumed)
        assert len(head) + len(tail) == len(full) and all(map(batches_equal, head + tail, full))
        pieces += documents(head + tail)
    keyed = [p for p in pieces if passkey.QUESTION in p]
    assert Counter(p for p in pieces if passkey.QUESTION not in p) == Counter(texts)  # no loss, no repeat
    if ratio == 0:
        assert not keyed
    else:  # about ratio of all documents, each a well-formed passkey document
        assert 0.15 < len(keyed) / len(pieces) < 0.45 and len(set(keyed)) == len(keyed)  # ranks differ
        assert all(p.endswith(passkey.QUESTION + p.split("pass key is ")[1][:5]) for p in keyed)


def test_passkey_mixing_is_deterministic_and_seeded(tmp_path):
    _, path = corpus(tmp_path, n=30)
    cfg = DataConfig(source="hf", path=str(path), streaming=True, seq_len=64, batch_size=2, val_fraction=0.0,
                     cache_dir=str(tmp_path / "hf"), passkey_ratio=0.5, passkey_max_len=150)
    a, b, c = (next(build_loader(cfg, TOK, "train", seed=s)) for s in (1, 1, 2))
    assert batches_equal(a, b) and not batches_equal(a, c)
    loaded = replace(cfg, streaming=False, val_fraction=0.2)  # validation data is never mixed
    docs = documents(list(build_loader(loaded, TOK, "validation").iter_epoch()))
    assert docs and not any(passkey.QUESTION in d for d in docs)
