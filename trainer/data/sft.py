"""Supervised fine-tuning data: jsonl conversations, loss only on the responses, packed whole.

    python -m trainer.train data=sft data.path=chats.jsonl data.tokenizer_path=/models/my-instruct-tokenizer
    loader = build_sft_loader(cfg, tokenizer, "train", dp_rank, dp_size, seed)   # a PackedLoader

One json object per line, either of
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}]}
    {"prompt": "...", "response": "..."}
- messages: rendered by the tokenizer's chat template (data.tokenizer=hf; the byte tokenizer has none), which
  owns bos and every special token. Assistant spans are found in text, never by parsing the template: for
  assistant message i, render(messages[:i], add_generation_prompt=True) must be a prefix of
  render(messages[:i+1]), and the characters between the two renders (the reply and whatever the template
  writes after it, e.g. its end-of-turn token) carry loss. The whole conversation is tokenised once with
  character offsets; a token carries loss when its first character lies in such a span. A template whose
  renders are not prefixes of each other (one that rewrites earlier turns) fails with a ValueError.
- prompt / response: [bos] prompt response [eos], prompt and response tokenised separately; the response
  tokens and eos carry loss. Works with the byte tokenizer too.
Labels are -100 on every token that carries no loss (packing.TokenStore.loss_mask), so num_valid counts only
response targets. A document longer than data.seq_len is truncated to its first seq_len tokens (a warning
gives the count); one left without any loss token is dropped. Documents are never split across rows
(PackedLoader whole_docs): positions restart at 0 per document and cu_seqlens keeps them apart.
Train / validation: rows go to validation by a hash of their line (data.val_fraction); data.max_files caps
the rows read (the first N lines).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import numpy as np

from .corpus import held_out
from .packing import PackedLoader, TokenStore
from .tokenizer import token_dtype

log = logging.getLogger(__name__)

__all__ = ["build_sft_loader", "read_rows", "encode_rows", "sft_store"]


def read_rows(path: str, split: str, val_fraction: float, max_rows: Optional[int] = None) -> list[tuple[int, dict]]:
    """(line number, row) of `split`; every row of the file (up to max_rows) is checked, whatever its split."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"data.path={path!r}: no such file (data.source=sft reads a .jsonl file)")
    rows, keys = [], []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if max_rows is not None and len(rows) >= max_rows:
                break
            where = f"{path}, line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not a JSON object ({exc})") from None
            _check_row(row, where)
            rows.append((line_no, row))
            keys.append(line.strip())
    val = held_out(keys, val_fraction)  # by a hash of the line, as stdlib files are split by their path
    return [r for i, r in enumerate(rows) if (i in val) == (split == "validation")]


def _check_row(row, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    has_messages, has_pair = "messages" in row, "prompt" in row or "response" in row
    if has_messages == has_pair:
        what = "both" if has_messages else "neither"
        raise ValueError(f"{where}: a row needs either 'messages' or 'prompt' and 'response'; it has {what} "
                         f"(keys: {sorted(row)})")
    if has_pair:
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{where}: '{key}' must be a string, got {type(row.get(key)).__name__}")
        return
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: messages[{i}] must be an object with string 'role' and 'content', got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: 'messages' has no assistant message, so nothing would carry loss")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.render_chat(messages, add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - a template error (jinja's raise_exception, ...) is a data problem
        raise ValueError(f"{where}: the chat template of data.tokenizer_path failed on this conversation: "
                         f"{exc}") from None


def assistant_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, character spans that carry loss): one span per assistant message."""
    full = _render(tokenizer, messages, False, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[:i + 1], False, where)
        try:
            before = _render(tokenizer, messages[:i], True, where)
        except ValueError:
            if i:
                raise
            # a template may refuse an empty conversation: the first reply starts where its content does
            start = upto.find(m["content"]) if m["content"] else -1
            before = upto[:start] if start >= 0 else None
        if before is None or not upto.startswith(before) or not full.startswith(upto):
            raise ValueError(f"{where}: the chat template of data.tokenizer_path does not render conversations "
                             f"prefix by prefix (messages[{i}]), so assistant tokens cannot be located")
        spans.append((len(before), len(upto)))
    return full, spans


def _pair_document(tokenizer, prompt_ids: np.ndarray, response_ids: np.ndarray, dtype):
    bos = [tokenizer.bos_id] if tokenizer.bos_id != tokenizer.eos_id else []   # none of its own: no bos
    head = np.concatenate([np.asarray(bos, dtype=dtype), prompt_ids.astype(dtype)])
    tail = np.concatenate([response_ids.astype(dtype), np.asarray([tokenizer.eos_id], dtype=dtype)])
    return np.concatenate([head, tail]), np.concatenate([np.zeros(len(head), bool), np.ones(len(tail), bool)])


def encode_rows(tokenizer, rows: list[tuple[int, dict]], path: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token arrays and loss masks (True: the token is a target), one per row, in row order."""
    dtype = token_dtype(tokenizer.vocab_size)
    pairs = [i for i, (_, r) in enumerate(rows) if "messages" not in r]
    chats = [i for i, (_, r) in enumerate(rows) if "messages" in r]
    docs: list = [None] * len(rows)
    masks: list = [None] * len(rows)
    if pairs:
        prompts = tokenizer.encode_batch([rows[i][1]["prompt"] for i in pairs])
        responses = tokenizer.encode_batch([rows[i][1]["response"] for i in pairs])
        for i, p, r in zip(pairs, prompts, responses):
            docs[i], masks[i] = _pair_document(tokenizer, p, r, dtype)
    if chats:
        if getattr(tokenizer, "chat_template", None) is None:
            line = rows[chats[0]][0]
            raise ValueError(f"{path}, line {line}: a 'messages' row needs a chat template, and data.tokenizer "
                             f"has none: data=sft with messages needs data.tokenizer=hf with a tokenizer that "
                             f"defines chat_template (or use prompt/response rows)")
        rendered = [assistant_spans(tokenizer, rows[i][1]["messages"], f"{path}, line {rows[i][0]}") for i in chats]
        encoded = tokenizer.encode_with_offsets([text for text, _ in rendered])
        for i, (_, spans), (ids, starts) in zip(chats, rendered, encoded):
            mask = np.zeros(len(ids), dtype=bool)
            for a, b in spans:
                mask |= (starts >= a) & (starts < b)
            docs[i], masks[i] = ids.astype(dtype, copy=False), mask
    return docs, masks


def sft_store(cfg, tokenizer, split: str) -> TokenStore:
    """The split's documents, truncated to data.seq_len, with their loss masks."""
    rows = read_rows(cfg.path, split, float(cfg.val_fraction), cfg.max_files)
    docs, masks = encode_rows(tokenizer, rows, cfg.path)
    kept_docs, kept_masks, truncated, dropped = [], [], 0, 0
    for doc, mask in zip(docs, masks):
        if len(doc) > cfg.seq_len:
            truncated += 1
            doc, mask = doc[:cfg.seq_len], mask[:cfg.seq_len]
        if not mask[1:].any():      # the first token is nobody's target
            dropped += 1
            continue
        kept_docs.append(doc)
        kept_masks.append(mask)
    if truncated or dropped:
        log.warning("data.path=%s (%s): %d of %d documents are longer than data.seq_len=%d and were truncated "
                    "to their first %d tokens; %d were left without a loss-carrying token and dropped", cfg.path,
                    split, truncated, len(docs), cfg.seq_len, cfg.seq_len, dropped)
    return TokenStore.from_arrays(kept_docs, kept_masks)


def build_sft_loader(cfg, tokenizer, split: str, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                     max_batches: Optional[int] = None) -> PackedLoader:
    """PackedLoader over the split's documents: whole documents per row, loss on the responses only."""
    store = sft_store(cfg, tokenizer, split)
    if store.num_docs == 0:
        raise ValueError(f"the {split!r} split of data.path={cfg.path!r} is empty (data.val_fraction="
                         f"{cfg.val_fraction}, data.max_files={cfg.max_files})")
    return PackedLoader(store, seq_len=cfg.seq_len, batch_size=cfg.batch_size, dp_rank=dp_rank, dp_size=dp_size,
                        seed=seed, shuffle=split == "train", infinite=split == "train", cross_doc=False,
                        pad_id=tokenizer.pad_id, max_batches=max_batches, whole_docs=True)
