"""Token stores that live on disk: a tokenised corpus as one memory-mapped file, built chunk by chunk.

    store = build_token_cache(path, chunks, dtype)     # chunks: iterable of (values, doc lengths) arrays
    store = open_token_store(path)                       # TokenStore whose tokens are a read-only np.memmap
    store = append_documents(store, extra_docs)          # + in-memory documents, the memmap is not copied

Layout of `path/`: tokens.bin (raw ids, dtype in meta.json), offsets.npy (D + 1 int64) and meta.json,
written into a temporary sibling and renamed, so a crash or a concurrent builder (every dp rank builds the
same cache) never leaves a half store: the first complete rename wins, the others use it. The packer
(packing.PackedLoader) only gathers rows from `tokens`, so a memmap corpus costs page cache, not RAM.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np

from .packing import TokenStore


def open_token_store(path) -> TokenStore:
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    offsets = np.load(path / "offsets.npy")
    if meta["num_tokens"] == 0:
        return TokenStore(np.zeros(0, dtype=meta["dtype"]), offsets)
    tokens = np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
    assert int(offsets[-1]) == meta["num_tokens"], f"corrupt token store {path}"
    return TokenStore(tokens, offsets)


def build_token_cache(path, chunks: Iterable[tuple[np.ndarray, np.ndarray]], dtype) -> TokenStore:
    """Write (values, lengths) chunks to `path` (values: the chunk's concatenated ids, lengths: its documents'
    lengths) and open it; an existing complete store at `path` is opened instead."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return open_token_store(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        lengths, total = [np.zeros(1, dtype=np.int64)], 0
        with open(tmp / "tokens.bin", "wb") as f:
            for values, doc_lengths in chunks:
                f.write(np.ascontiguousarray(values, dtype=dtype).tobytes())
                lengths.append(np.asarray(doc_lengths, dtype=np.int64))
                total += len(values)
        offsets = np.cumsum(np.concatenate(lengths))
        assert int(offsets[-1]) == total, "document lengths do not add up to the tokens written"
        np.save(tmp / "offsets.npy", offsets)
        (tmp / "meta.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "num_tokens": total,
                                                   "num_docs": len(offsets) - 1}))
        try:
            os.rename(tmp, path)  # atomic; fails if another builder got there first
        except OSError:
            if not (path / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_token_store(path)


def arrow_chunks(column, rows_per_chunk: int = 65536):
    """(values, lengths) per slice of a pyarrow list<int> column (a tokenised datasets column, memory-mapped
    from its cache file): only one slice is in memory at a time."""
    chunks = column.chunks if hasattr(column, "chunks") else [column]
    for chunk in chunks:
        for start in range(0, len(chunk), rows_per_chunk):
            part = chunk.slice(start, rows_per_chunk)
            yield part.flatten().to_numpy(zero_copy_only=False), np.diff(part.offsets.to_numpy())


class ConcatTokens:
    """Two token arrays read as one (gathers and slices only, which is all the packer does)."""

    def __init__(self, first: np.ndarray, second: np.ndarray):
        self.first, self.second, self.split = first, second, len(first)
        self.dtype = np.promote_types(first.dtype, second.dtype)

    def __len__(self) -> int:
        return self.split + len(self.second)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        idx = np.asarray(idx)
        out = np.empty(idx.shape, dtype=self.dtype)
        low = idx < self.split
        out[low] = self.first[idx[low]]
        out[~low] = self.second[idx[~low] - self.split]
        return out


def append_documents(store: TokenStore, docs: list[np.ndarray]) -> TokenStore:
    """`store` followed by `docs` (each already ending with eos); store's tokens are not copied."""
    if not docs:
        return store
    extra = TokenStore.from_arrays(docs)
    offsets = np.concatenate([store.doc_offsets, extra.doc_offsets[1:] + store.num_tokens])
    return TokenStore(ConcatTokens(store.tokens, extra.tokens), offsets)
