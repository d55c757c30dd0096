"""Tokenizers for the trainer: a download-free byte tokenizer (default) and a wrapper for local/cached HF ones.

    tok = build_tokenizer(cfg)                 # cfg.tokenizer "byte" | "hf" (+ cfg.tokenizer_path)
    ids = tok.encode("def f(): pass"); text = tok.decode(ids)
    docs = encode_documents(tok, ["a", "b"])   # list of np arrays, each ending with tok.eos_id (bos first if
                                               # the HF tokenizer adds one)

Byte tokenizer ids: 0..255 are the UTF-8 bytes, 256 = bos, 257 = eos; vocab_size = 258 (exact: the model
may pad its embedding table for speed, the tokenizer does not). Padding uses `pad_id` (= eos_id); padded
positions always carry label -100, so the pad id never enters the loss.

`check_model_vocab(tok, n)` checks that a model with n embeddings takes every id the tokenizer emits; an HF
tokenizer may carry added tokens past n that no text is expected to spell (Qwen2's tokenizer class adds its
default pad token <|endoftext|> to a vocabulary without one): those are let through, and a text that spells
one raises a ValueError when it is encoded.

Chat data (trainer/data/sft.py) reads `chat_template` (None for the byte tokenizer and for HF tokenizers
without one), `render_chat(messages, add_generation_prompt)` and `encode_with_offsets(texts)`.
"""

from __future__ import annotations

import logging
from typing import Optional, Protocol

import numpy as np

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype for token storage (uint16 halves memory for vocabularies up to 65536)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus bos (256) and eos (257). No vocabulary file, no download."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257
    pad_id = 257
    chat_template = None   # no chat template: conversations need an HF tokenizer

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))   # lone surrogates (seen in web text) -> '?' 

    def decode(self, ids) -> str:
        # Specials carry no bytes; invalid UTF-8 (e.g. a sequence cut mid-character) decodes to U+FFFD.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # frombuffer over the encoded bytes: no per-byte Python work, so the 30 MB stdlib encodes in ~0.2 s.
        return [np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.uint16) for t in texts]


class HFTokenizer:
    """A transformers tokenizer loaded from a local dir or the local HF cache, with the ids the packer needs."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - any loader failure is a user-config problem here
            raise ValueError(f"data.tokenizer_path={path!r} could not be loaded by transformers.AutoTokenizer "
                             f"(give a local tokenizer dir or a hub name already in the HF cache): {exc}") from exc
        # Documents are tokenised whole and cut by the packer, so the model_max_length warning is noise.
        tok.model_max_length = 1 << 62
        eos = _first_id(tok, "eos_token_id", "sep_token_id", "pad_token_id")
        if eos is None:
            raise ValueError(f"data.tokenizer_path={path!r}: tokenizer has no eos/sep/pad token to end documents")
        self._tok = tok
        self.path = path
        self.vocab_size = len(tok)
        self.eos_id = eos
        self.bos_id = _first_id(tok, "bos_token_id", "cls_token_id", "eos_token_id")
        self.pad_id = eos
        # Documents start with bos when the tokenizer's own encoding adds one (Llama, Mistral; not Qwen), as the
        # checkpoint saw them in pretraining.
        bos = getattr(tok, "bos_token_id", None)
        self.add_bos = bos is not None and tok("a")["input_ids"][:1] == [bos]
        self.id_limit: Optional[int] = None  # set by check_model_vocab: ids from here on have no embedding

    def fit_model_vocab(self, model_vocab: int) -> None:
        """Let through added tokens at ids >= model_vocab, other than bos / eos, and refuse them in texts from here
        on; ValueError when the base vocabulary, bos or eos do not fit."""
        beyond = sorted(i for i in self._tok.added_tokens_decoder if i >= model_vocab)
        if (self._tok.vocab_size > model_vocab or max(self.bos_id, self.eos_id) >= model_vocab
                or len(beyond) != self.vocab_size - model_vocab):
            raise ValueError(f"data.tokenizer has {self.vocab_size} tokens, more than model.vocab_size "
                             f"({model_vocab})")
        self.id_limit = model_vocab
        names = self._tok.convert_ids_to_tokens(beyond)
        log.warning("data.tokenizer: added token(s) %s (ids %s) lie past model.vocab_size (%d): no text may spell "
                    "them", names, beyond, model_vocab)

    def _check_ids(self, ids) -> None:
        if self.id_limit is not None and len(ids) and int(np.max(ids)) >= self.id_limit:
            bad = int(np.max(ids))
            raise ValueError(f"data: a text spells the added token {self._tok.convert_ids_to_tokens(bad)!r} (id "
                             f"{bad}), which has no embedding in the model (model.vocab_size {self.id_limit})")

    def encode(self, text: str) -> list[int]:
        ids = list(self._tok(text, add_special_tokens=False)["input_ids"])
        self._check_ids(ids)
        return ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        ids = self._tok(list(texts), add_special_tokens=False)["input_ids"]
        dtype = token_dtype(self.vocab_size)
        out = [np.asarray(x, dtype=dtype) for x in ids]
        for x in out:
            self._check_ids(x)
        return out

    @property
    def chat_template(self):
        return getattr(self._tok, "chat_template", None)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The conversation as text through the tokenizer's own chat template (special tokens included)."""
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, character start of each token) per text; special tokens written in the text are parsed as such."""
        if not getattr(self._tok, "is_fast", False):
            raise ValueError(f"data.tokenizer_path={self.path!r}: {type(self._tok).__name__} is a slow tokenizer "
                             f"without character offsets; chat data needs a fast one (a tokenizer.json)")
        enc = self._tok(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        dtype = token_dtype(self.vocab_size)
        for ids in enc["input_ids"]:
            self._check_ids(ids)
        return [(np.asarray(ids, dtype=dtype), np.asarray([o[0] for o in offs], dtype=np.int64).reshape(-1))
                for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]


def _first_id(tok, *names):
    for name in names:
        value = getattr(tok, name, None)
        if value is not None:
            return int(value)
    return None


def build_tokenizer(cfg) -> ByteTokenizer | HFTokenizer:
    """cfg: a DataConfig (reads `tokenizer` and `tokenizer_path`)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "hf":
        if not cfg.tokenizer_path:
            raise ValueError("data.tokenizer=hf needs data.tokenizer_path (a local tokenizer dir or cached hub name) "
                             "or model=hf model.path=DIR (its tokenizer)")
        return HFTokenizer(cfg.tokenizer_path)
    raise ValueError(f"data.tokenizer must be 'byte' or 'hf', got {cfg.tokenizer!r}")


def check_model_vocab(tokenizer, model_vocab: int) -> None:
    """ValueError unless a model with `model_vocab` embeddings takes the ids `tokenizer` emits (see the module
    docstring for the added tokens of an HF tokenizer past it)."""
    if tokenizer.vocab_size <= model_vocab:
        return
    if not isinstance(tokenizer, HFTokenizer):
        raise ValueError(f"data.tokenizer has {tokenizer.vocab_size} tokens, more than model.vocab_size "
                         f"({model_vocab})")
    tokenizer.fit_model_vocab(model_vocab)


def encode_documents(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token arrays, one per text, each with eos appended (the packer's document boundary marker)."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    bos = np.array([tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) else [], dtype=dtype)
    return [np.concatenate([bos, ids.astype(dtype, copy=False), eos]) for ids in tokenizer.encode_batch(texts)]
