"""Synthetic passkey retrieval: a random 5-digit key hidden at a chosen depth of filler text, asked for at the end.

    s = make_sample(tok, length=1024, depth=0.25, rng=np.random.default_rng(0))
    s.prompt                     # (length,) ids: filler, the needle at s.needle_start, filler, the question
    s.answer                     # ids of the key's digits (5 for the byte tokenizer)
    doc = make_document(tok, 700, rng)           # a training document: prompt + answer + eos
    open_docs = mix_into_stream(open_docs, tok, ratio=0.1, seed=0, min_len=64, max_len=4096, rank=dp_rank)

Pieces are tokenised separately and concatenated, so the needle's token position is exact and the prompt has
exactly `length` tokens. The filler is one repeated paragraph (the usual passkey test), started at a random
point of its cycle. Training documents (data.passkey_ratio) use the same format with uniform random length
and depth, so a small model can learn to copy the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "
KEY_DIGITS = 5


@dataclass
class PasskeySample:
    prompt: np.ndarray      # (length,) int64 token ids ending with the question
    answer: np.ndarray      # (a,) int64 ids of the key
    key: str                # the digits
    needle_start: int       # token index of the needle in prompt
    needle_len: int


class _Pieces:
    """Token ids of the fixed texts for one tokenizer (tokenised once)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.filler = np.asarray(tokenizer.encode(FILLER), dtype=np.int64)
        self.question = np.asarray(tokenizer.encode(QUESTION), dtype=np.int64)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text), dtype=np.int64)


_PIECES: dict = {}


def _pieces(tokenizer) -> _Pieces:
    key = id(tokenizer)
    if key not in _PIECES or _PIECES[key].tokenizer is not tokenizer:
        _PIECES[key] = _Pieces(tokenizer)
    return _PIECES[key]


def random_key(rng: np.random.Generator) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, KEY_DIGITS))


def min_length(tokenizer) -> int:
    """Shortest prompt: the needle and the question with no filler."""
    p = _pieces(tokenizer)
    return len(p.encode(NEEDLE.format(key="0" * KEY_DIGITS))) + len(p.question)


def make_sample(tokenizer, length: int, depth: float, rng: np.random.Generator, key: str = None) -> PasskeySample:
    """A prompt of exactly `length` tokens with the needle starting at `depth` (0: first, 1: last) of the
    filler; the question ends the prompt."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be in [0, 1], got {depth}")
    p = _pieces(tokenizer)
    key = key or random_key(rng)
    needle = p.encode(NEEDLE.format(key=key))
    n_filler = length - len(needle) - len(p.question)
    if n_filler < 0:
        raise ValueError(f"passkey length {length} is shorter than needle + question ({min_length(tokenizer)} "
                         f"tokens)")
    start = int(rng.integers(0, len(p.filler)))  # where in the repeated paragraph the filler begins
    reps = -(-(start + n_filler) // len(p.filler))
    filler = np.tile(p.filler, max(reps, 1))[start:start + n_filler]
    at = int(round(depth * n_filler))
    prompt = np.concatenate([filler[:at], needle, filler[at:], p.question])
    assert len(prompt) == length
    return PasskeySample(prompt, p.encode(key), key, at, len(needle))


def make_document(tokenizer, length: int, rng: np.random.Generator) -> np.ndarray:
    """Training document of about `length` tokens (prompt + answer + eos), depth uniform in [0, 1]."""
    sample = make_sample(tokenizer, max(length, min_length(tokenizer)), float(rng.random()), rng)
    return np.concatenate([sample.prompt, sample.answer, [tokenizer.eos_id]])


_STORE = 1 << 40  # the "epoch" of in-memory documents (made once, reshuffled by the packer each epoch)


def _doc_rng(seed, epoch: int, index: int) -> np.random.Generator:
    """seed: an int, or (seed, dp rank) for streams, so ranks do not all see the same passkey documents."""
    seeds = [s % (1 << 63) for s in (seed if isinstance(seed, tuple) else (seed,))]
    return np.random.default_rng([*seeds, epoch, index, 0x9A55])


def _is_passkey(seed, epoch: int, index: int, ratio: float) -> bool:
    return _doc_rng(seed, epoch, index).random() < ratio


def _draw_length(rng: np.random.Generator, low: int, high: int, log_lengths: bool) -> int:
    if not log_lengths:
        return int(rng.integers(low, high + 1))
    # Log-uniform: as many documents in [256, 512) as in [2048, 4096). Each document holds one answer, so the
    # short ones give many answers per token to learn copying from, and the long ones teach the distance.
    return min(high, int(np.exp(rng.uniform(np.log(low), np.log(high + 1)))))


def _document_at(tokenizer, seed, epoch, index, min_len, max_len, log_lengths=False) -> np.ndarray:
    rng = _doc_rng(seed, epoch, index)
    rng.random()  # the draw that decided this is a passkey document
    return make_document(tokenizer, _draw_length(rng, min_len, max_len, log_lengths), rng)


def passkey_documents(tokenizer, count: int, seed: int, min_len: int, max_len: int, dtype,
                      log_lengths: bool = False) -> list[np.ndarray]:
    """`count` training documents for an in-memory corpus (deterministic in seed); lengths uniform in
    [min_len, max_len], or log-uniform with log_lengths."""
    return [_document_at(tokenizer, seed, _STORE, i, min_len, max_len, log_lengths).astype(dtype)
            for i in range(count)]


OpenDocs = Callable[[int, int], Iterator[np.ndarray]]


def mix_into_stream(open_docs: OpenDocs, tokenizer, ratio: float, seed: int, min_len: int, max_len: int,
                    rank: int = 0, log_lengths: bool = False) -> OpenDocs:
    """open_docs(epoch, skip) whose document i is a passkey document with probability `ratio`, decided by
    (seed, rank, epoch, i) alone, so `skip` (a resume position counted in mixed documents) maps to an exact
    number of corpus documents to skip."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"data.passkey_ratio must be in [0, 1), got {ratio}")
    seed = (seed, rank)

    def mixed(epoch: int, skip: int) -> Iterator[np.ndarray]:
        corpus_skip = sum(not _is_passkey(seed, epoch, i, ratio) for i in range(skip))
        corpus = open_docs(epoch, corpus_skip)
        index = skip
        while True:
            if _is_passkey(seed, epoch, index, ratio):
                doc = _document_at(tokenizer, seed, epoch, index, min_len, max_len, log_lengths)
            else:
                doc = next(corpus, None)
                if doc is None:
                    return  # the epoch ends with the corpus
            yield doc
            index += 1

    return mixed
