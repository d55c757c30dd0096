"""Packing tokenised documents into fixed-length rows with document boundaries kept.

    store = TokenStore.from_arrays(encode_documents(tok, texts))          # tokenise once, reuse every epoch
    loader = PackedLoader(store, seq_len=512, batch_size=4, dp_rank=0, dp_size=1, seed=0,
                          shuffle=True, infinite=True, cross_doc=False, pad_id=tok.pad_id)
    batch = next(loader)      # tokens/labels/position_ids (B, N), cu_seqlens, max_seqlen, num_valid

Layout of one epoch: documents (each already ending with eos) are permuted by (seed, epoch) and laid end
to end into one virtual stream; row r is stream[r*N : (r+1)*N]. Nothing is copied until a row is asked
for, so memory is O(corpus tokens + num_docs), never O(rows * N) or O(N^2).
- A document longer than the room left in a row is cut at the row end and continues in the next row of
  the stream; its **positions restart at 0** in every piece (attention never sees the earlier piece, and
  positions never exceed seq_len). The label of a row's last token is still the document's next token.
- labels = next token inside a document, -100 on each document's last token (its eos: the following
  token belongs to another document) and on padding. With cross_doc=True the stream is one long
  document: labels run across documents, positions are 0..N-1 per row, one cu_seqlens segment per row.
- Padding (only the stream's last row and the empty rows that even out the ranks) is its own cu_seqlens
  segment with positions 0..pad-1, tokens = pad_id and labels -100, so cu_seqlens always ends at B*N.
- Rows are shuffled by (seed, epoch) and dealt to ranks: rank k gets slots k, k + dp, k + 2dp, ...; every
  rank has the same number of batches per epoch (ceil(rows / (dp * B)), trailing slots are padding rows).
- A store may carry a per-token loss mask (supervised fine-tuning): a token whose mask is 0 is never a
  target, so the label pointing at it is -100 too (num_valid counts only loss-carrying targets).
- whole_docs=True (documents of at most seq_len tokens): rows are cut only at document boundaries, by
  next-fit over the epoch's document order, and padded; no document is ever split across rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

IGNORE = -100


@dataclass
class TokenStore:
    """All documents' ids concatenated; doc d = tokens[doc_offsets[d]:doc_offsets[d+1]] (ends with eos)."""

    tokens: np.ndarray       # (T,) uint16 / int32
    doc_offsets: np.ndarray  # (D + 1,) int64, starts at 0
    loss_mask: Optional[np.ndarray] = None  # (T,) bool: token t may be a target; None: every token may

    @classmethod
    def from_arrays(cls, docs: list[np.ndarray], masks: Optional[list[np.ndarray]] = None) -> "TokenStore":
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate(docs) if docs else np.zeros(0, dtype=np.uint16)
        mask = None
        if masks is not None:
            assert [len(m) for m in masks] == lengths.tolist(), "one mask entry per token"
            mask = np.concatenate(masks).astype(bool) if masks else np.zeros(0, dtype=bool)
        return cls(tokens, offsets, mask)

    @classmethod
    def from_arrow(cls, column) -> "TokenStore":
        """column: a pyarrow (Chunked)Array of list<int> (e.g. a tokenised datasets column); zero Python loops."""
        chunks = column.chunks if hasattr(column, "chunks") else [column]
        values, lengths = [], []
        for chunk in chunks:
            offsets = chunk.offsets.to_numpy()
            lengths.append(np.diff(offsets).astype(np.int64))
            values.append(chunk.flatten().to_numpy(zero_copy_only=False))  # flatten honours slicing
        if not values:
            return cls(np.zeros(0, dtype=np.uint16), np.zeros(1, dtype=np.int64))
        lengths = np.concatenate(lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(np.concatenate(values), offsets)

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])


@dataclass
class Row:
    """One packed row before padding: n <= seq_len tokens, their labels, and the piece lengths."""

    tokens: np.ndarray    # (n,)
    labels: np.ndarray    # (n,) int64
    segments: list[int]   # lengths of the document pieces; sum == n; positions restart at each


EMPTY_ROW = Row(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), [])


def stream_row(store: TokenStore, order: np.ndarray, starts: np.ndarray, a: int, b: int,
               cross_doc: bool) -> Row:
    """Row holding stream positions [a, b); order (D,) doc ids in stream order, starts (D+1,) their offsets."""
    total = int(starts[-1])
    end = min(b + 1, total)                                   # one token more: the last position's label
    k0 = int(np.searchsorted(starts, a, side="right")) - 1
    k1 = int(np.searchsorted(starts, end, side="left"))       # docs k0..k1-1 overlap [a, end)
    ks = np.arange(k0, k1)
    piece_start = np.maximum(starts[ks], a)
    piece_end = np.minimum(starts[ks + 1], end)
    src = store.doc_offsets[order[ks]] + (piece_start - starts[ks])
    # gather index per stream position: the piece's source start plus the offset inside the piece
    idx = np.repeat(src - piece_start, piece_end - piece_start) + np.arange(a, end)
    ext = store.tokens[idx].astype(np.int64)
    n = b - a
    labels = np.full(n, IGNORE, dtype=np.int64)
    labels[:len(ext) - 1] = ext[1:]
    if store.loss_mask is not None:            # a masked token is nobody's target
        labels[:len(ext) - 1][~store.loss_mask[idx[1:]]] = IGNORE
    if cross_doc:
        return Row(ext[:n], labels, [n])
    doc_last = starts[ks + 1] - 1 - a                         # each doc's eos, relative to a
    labels[doc_last[(doc_last >= 0) & (doc_last < n)]] = IGNORE
    seg = np.minimum(starts[ks + 1], b) - np.maximum(starts[ks], a)
    return Row(ext[:n], labels, [int(s) for s in seg if s > 0])


def collate(rows: list[Row], seq_len: int, pad_id: int) -> dict:
    """Pad rows to seq_len and build the batch dict of DATA_API.md (CPU tensors)."""
    N = seq_len
    tokens = np.full((len(rows), N), pad_id, dtype=np.int64)
    labels = np.full((len(rows), N), IGNORE, dtype=np.int64)
    segments: list[int] = []
    for i, row in enumerate(rows):
        n = len(row.tokens)
        assert n <= N and sum(row.segments) == n, (n, N, row.segments)
        tokens[i, :n] = row.tokens
        labels[i, :n] = row.labels
        segments.extend(row.segments)
        if n < N:
            segments.append(N - n)                            # padding is a segment of its own
    seg = np.asarray(segments, dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(seg)])
    positions = np.arange(len(rows) * N) - np.repeat(cu[:-1], seg)  # restart at each segment, (B*N,)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions.reshape(len(rows), N)),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "max_seqlen": int(seg.max()),
        "num_valid": int((labels != IGNORE).sum()),
    }


def _rng(seed: int, epoch: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed % (1 << 63), epoch, salt])


def whole_doc_rows(starts: np.ndarray, seq_len: int) -> np.ndarray:
    """Row bounds (R + 1,) in stream positions: next-fit of the documents (stream offsets `starts`, each at
    most seq_len long) into rows of at most seq_len tokens, cut only between documents."""
    bounds, prev_end = [0], 0
    for doc_end in starts[1:].tolist():
        if doc_end - bounds[-1] > seq_len:      # this document does not fit: it opens the next row
            bounds.append(prev_end)
        prev_end = doc_end
    bounds.append(int(starts[-1]))
    return np.asarray(bounds, dtype=np.int64)


class PackedLoader:
    """Batches from an in-memory TokenStore; random access by (epoch, batch), so resume is O(1).

    whole_docs=True: rows end only at document boundaries (see the module docstring); the row count then
    depends on the epoch's document order, so num_rows / num_batches describe epoch 0 (all of a validation
    pass) and each train epoch counts its own, the same on every rank.
    """

    def __init__(self, store: TokenStore, *, seq_len: int, batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle: bool, infinite: bool, cross_doc: bool, pad_id: int,
                 max_batches: Optional[int] = None, whole_docs: bool = False):
        assert store.num_tokens > 0 and 0 <= dp_rank < dp_size
        assert not (whole_docs and cross_doc), "whole_docs keeps documents apart"
        assert not whole_docs or int(np.diff(store.doc_offsets).max()) <= seq_len, "whole_docs: a doc > seq_len"
        self.store, self.seq_len, self.batch_size = store, seq_len, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.shuffle, self.infinite, self.cross_doc, self.pad_id = shuffle, infinite, cross_doc, pad_id
        self.whole_docs, self.max_batches = whole_docs, max_batches
        self.epoch, self.batch_index = 0, 0
        self._layout_epoch, self._layout = None, None
        self.num_rows = self._rows(self._epoch_layout(0))
        self.num_batches = self.batches_in_epoch(0)   # per rank per epoch, all ranks equal

    def _epoch_layout(self, epoch: int):
        """(doc order, their stream offsets, row permutation or None, row bounds or None) of `epoch`."""
        if self._layout_epoch != epoch:
            D = self.store.num_docs
            order = _rng(self.seed, epoch, 0).permutation(D) if self.shuffle else np.arange(D)
            lengths = np.diff(self.store.doc_offsets)[order]
            starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            bounds = whole_doc_rows(starts, self.seq_len) if self.whole_docs else None
            num_rows = self._rows((order, starts, None, bounds))
            rows = _rng(self.seed, epoch, 1).permutation(num_rows) if self.shuffle else None
            self._layout_epoch, self._layout = epoch, (order, starts, rows, bounds)
        return self._layout

    def _rows(self, layout) -> int:
        bounds = layout[3]
        return len(bounds) - 1 if bounds is not None else -(-self.store.num_tokens // self.seq_len)

    def batches_in_epoch(self, epoch: int) -> int:
        count = -(-self._rows(self._epoch_layout(epoch)) // (self.dp_size * self.batch_size))
        if self.max_batches is not None and not self.infinite:
            count = min(count, self.max_batches)
        return count

    def get_batch(self, epoch: int, index: int) -> dict:
        """Batch `index` of `epoch` for this rank (pure function of its arguments and the config)."""
        layout = self._epoch_layout(epoch)
        order, starts, row_perm, bounds = layout
        num_rows = self._rows(layout)
        rows = []
        for i in range(self.batch_size):
            slot = (index * self.batch_size + i) * self.dp_size + self.dp_rank
            if slot >= num_rows:
                rows.append(EMPTY_ROW)
                continue
            r = int(row_perm[slot]) if row_perm is not None else slot
            if bounds is not None:
                a, b = int(bounds[r]), int(bounds[r + 1])
            else:
                a = r * self.seq_len
                b = min(a + self.seq_len, self.store.num_tokens)
            rows.append(stream_row(self.store, order, starts, a, b, self.cross_doc))
        return collate(rows, self.seq_len, self.pad_id)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.batch_index >= self.batches_in_epoch(self.epoch):
            if not self.infinite:
                raise StopIteration
            self.epoch, self.batch_index = self.epoch + 1, 0
        batch = self.get_batch(self.epoch, self.batch_index)
        self.batch_index += 1
        return batch

    def iter_epoch(self, max_batches: Optional[int] = None, epoch: int = 0) -> Iterator[dict]:
        """One full pass (e.g. validation) from the start; does not touch the iterator state."""
        count = self.batches_in_epoch(epoch)
        count = count if max_batches is None else min(max_batches, count)
        for index in range(count):
            yield self.get_batch(epoch, index)

    def state_dict(self) -> dict:
        return {"kind": "packed", "epoch": self.epoch, "batch_index": self.batch_index, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        _check_identity(self._identity(), state, "packed")
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])

    def _identity(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "num_tokens": self.store.num_tokens,
                **({"whole_docs": True} if self.whole_docs else {})}


def _check_identity(mine: dict, state: dict, kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"state_dict: loader kind {state.get('kind')!r} does not match this loader ({kind!r})")
    diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
    if diff:
        raise ValueError(f"state_dict was saved with a different data layout (saved, now): {diff}")


OpenDocs = Callable[[int, int], Iterator[np.ndarray]]
"""(epoch, docs_to_skip) -> this epoch's documents (each ending with eos), the first docs_to_skip dropped."""


class _DocCursor:
    """Cuts rows off one epoch's document iterator; (docs_done, offset) is its exact, resumable position."""

    def __init__(self, docs: Iterator[np.ndarray], docs_done: int = 0, offset: int = 0):
        self._docs, self.docs_done, self.offset = docs, docs_done, offset
        self._cur = next(docs, None)
        self._next, self._peeked = None, False

    def _peek(self):
        if not self._peeked:
            self._next, self._peeked = next(self._docs, None), True
        return self._next

    def _advance(self):
        self._cur, self._next, self._peeked = self._peek(), None, False
        self.docs_done, self.offset = self.docs_done + 1, 0

    def next_row(self, seq_len: int, cross_doc: bool) -> Optional[Row]:
        """Up to seq_len tokens (fewer only at the end of the epoch); None once the epoch is exhausted."""
        tokens, labels, segments, room = [], [], [], seq_len
        while room and self._cur is not None:
            doc, o = self._cur, self.offset
            assert len(doc) > o, "documents are never empty (eos is appended)"
            take = min(room, len(doc) - o)
            piece = doc[o:o + take].astype(np.int64)
            label = np.empty(take, dtype=np.int64)
            label[:-1] = piece[1:]
            if o + take < len(doc):
                label[-1] = doc[o + take]                  # the document goes on in the next row
            else:
                nxt = self._peek() if cross_doc else None
                label[-1] = nxt[0] if nxt is not None else IGNORE
            tokens.append(piece), labels.append(label), segments.append(take)
            room, self.offset = room - take, o + take
            if self.offset == len(doc):
                self._advance()
        if not tokens:
            return None
        return Row(np.concatenate(tokens), np.concatenate(labels), [seq_len - room] if cross_doc else segments)


class StreamingPackedLoader:
    """Batches packed on the fly from a document stream (HF IterableDataset): memory O(B * N).

    infinite=True (train): open_docs yields this rank's own share (split_dataset_by_node), reshuffled per
    epoch; an epoch's last batch is padded rather than mixed with the next epoch. State = (epoch, docs
    consumed, tokens consumed of the current doc): resume skips that many docs and continues exactly.
    infinite=False (validation): open_docs yields the whole stream and rows are dealt round-robin to
    ranks, so every rank yields the same number of batches (ceil(rows / (dp * B)), padded) - no rank
    waits on a collective the others never reach.
    """

    num_batches = None   # unknown without reading the stream

    def __init__(self, open_docs: OpenDocs, *, seq_len: int, batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, infinite: bool, cross_doc: bool, pad_id: int, max_batches: Optional[int] = None):
        assert 0 <= dp_rank < dp_size
        self.open_docs, self.seq_len, self.batch_size = open_docs, seq_len, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.infinite, self.cross_doc, self.pad_id, self.max_batches = infinite, cross_doc, pad_id, max_batches
        self.epoch, self.batches_done = 0, 0
        self._cursor: Optional[_DocCursor] = None
        self._resume_at = (0, 0)          # (docs_done, offset) for the next cursor this epoch
        self._finite: Optional[Iterator[dict]] = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.infinite:
            if self._finite is None:
                self._finite = self.iter_epoch(self.max_batches)
                for _ in range(self.batches_done):        # resume: replay the deterministic pass
                    next(self._finite)
            batch = next(self._finite)
        else:
            batch = self._next_train_batch()
        self.batches_done += 1
        return batch

    def _next_train_batch(self) -> dict:
        rows: list[Row] = []
        while len(rows) < self.batch_size:
            if self._cursor is None:
                docs_done, offset = self._resume_at
                self._cursor = _DocCursor(self.open_docs(self.epoch, docs_done), docs_done, offset)
            fresh = self._cursor.docs_done == 0 and self._cursor.offset == 0
            row = self._cursor.next_row(self.seq_len, self.cross_doc)
            if row is not None:
                rows.append(row)
            elif rows:
                break                     # an epoch's last batch is padded, so no batch spans two epochs
            elif fresh:
                raise ValueError(f"data stream of dp rank {self.dp_rank}/{self.dp_size} has no documents "
                                 f"(epoch {self.epoch}): dataset empty or smaller than the number of ranks")
            else:
                self.epoch, self._cursor, self._resume_at = self.epoch + 1, None, (0, 0)
        rows += [EMPTY_ROW] * (self.batch_size - len(rows))
        return collate(rows, self.seq_len, self.pad_id)

    def iter_epoch(self, max_batches: Optional[int] = None, epoch: int = 0) -> Iterator[dict]:
        """One pass over the whole stream, rows dealt round-robin to ranks (see the class docstring)."""
        cursor, seen, mine, yielded = _DocCursor(self.open_docs(epoch, 0)), 0, [], 0
        while max_batches is None or yielded < max_batches:
            row = cursor.next_row(self.seq_len, self.cross_doc)
            if row is None:
                break
            if seen % self.dp_size == self.dp_rank:
                mine.append(row)
            seen += 1
            if len(mine) == self.batch_size:
                yield collate(mine, self.seq_len, self.pad_id)
                mine, yielded = [], yielded + 1
        total = -(-seen // (self.dp_size * self.batch_size))
        total = total if max_batches is None else min(total, max_batches)
        while yielded < total:                                   # even out the ranks with padding rows
            rows = mine + [EMPTY_ROW] * (self.batch_size - len(mine))
            yield collate(rows, self.seq_len, self.pad_id)
            mine, yielded = [], yielded + 1

    def state_dict(self) -> dict:
        pos = (self._cursor.docs_done, self._cursor.offset) if self._cursor is not None else self._resume_at
        return {"kind": "streaming", "epoch": self.epoch, "docs_done": pos[0], "offset": pos[1],
                "batches_done": self.batches_done, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        _check_identity(self._identity(), state, "streaming")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self._resume_at = (int(state["docs_done"]), int(state["offset"]))
        self._cursor, self._finite = None, None

    def _identity(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "infinite": self.infinite}
