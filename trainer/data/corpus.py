"""Training data: DataConfig, corpus loading (embedded stdlib corpus or any HF dataset) and packed loaders.

    tok = build_tokenizer(cfg)                                           # cfg: DataConfig
    train = build_loader(cfg, tok, "train", dp_rank, dp_size, seed)      # infinite, resumable iterator
    batch = next(train); state = train.state_dict()
    for batch in build_loader(cfg, tok, "validation", dp_rank, dp_size, seed).iter_epoch(): ...

source=stdlib: the running interpreter's own standard-library .py files (~1800 files, ~31 MB: real code,
no network). Files go to train/validation by a hash of their relative path, so the split is the same on
every machine with the same Python. source=hf: a hub name, a local file (.jsonl/.json/.parquet/.arrow/
.txt/.csv), a data directory, or a `save_to_disk` directory; streaming=true reads it as an IterableDataset.
Without a validation split of its own, a dataset's documents are split by a hash of their text.
Tokenisation runs once per process (datasets `map(batched=True)`, cached on disk for loaded HF datasets)
into one flat token array (TokenStore), which packing.py slices for every epoch.
source=sft: a jsonl file of conversations or prompt/response pairs for supervised fine-tuning (sft.py).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sysconfig
from dataclasses import dataclass
from typing import Optional


from . import passkey
from .packing import PackedLoader, StreamingPackedLoader, TokenStore
from .token_cache import append_documents, arrow_chunks, build_token_cache, open_token_store
from .tokenizer import Tokenizer, build_tokenizer, encode_documents, token_dtype

__all__ = ["DataConfig", "build_loader", "build_tokenizer", "validate_data_config", "load_corpus",
           "stdlib_files", "PackedLoader", "StreamingPackedLoader", "TokenStore"]

SOURCES = ("stdlib", "hf", "sft")
TOKENIZERS = ("byte", "hf")
SPLITS = ("train", "validation")
_VAL_SPLIT_NAMES = ("validation", "valid", "val")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow",
                  ".txt": "text", ".csv": "csv"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class DataConfig:
    source: str = "stdlib"          # "stdlib" (no network) | "hf" | "sft" (jsonl chats, loss on responses)
    path: Optional[str] = None      # source=hf: dataset name or local path; source=sft: a .jsonl file
    name: Optional[str] = None      # source=hf: dataset config name
    text_column: str = "text"
    streaming: bool = False         # source=hf: stream (IterableDataset) instead of loading
    seq_len: int = 512              # tokens per packed sequence (full, unsharded length)
    batch_size: int = 4             # sequences per micro-batch per data-parallel rank
    tokenizer: str = "byte"         # "byte" (vocab 258, no download) | "hf"
    tokenizer_path: Optional[str] = None   # tokenizer=hf: local dir or cached hub name; None: model.path
    cross_doc_attention: bool = False      # True: documents packed without boundaries
    val_fraction: float = 0.05      # fraction of files (stdlib) / documents (hf without a val split) held out
    max_files: Optional[int] = None # cap: stdlib files (hash-sampled) / first hf documents
    num_workers: int = 0            # processes for tokenisation (datasets map num_proc); 0 = in-process
    shuffle_buffer: int = 10000     # streaming train: documents in the shuffle buffer
    cache_dir: Optional[str] = None # source=hf: datasets cache dir (downloads + tokenised map cache)
    token_cache: Optional[str] = None  # dir for memory-mapped token stores (loaded data): the corpus stays on disk
    passkey_ratio: float = 0.0      # train split: this fraction of documents are synthetic passkey documents
    passkey_min_len: int = 0        # their length in tokens, in [min, max]; 0: the shortest prompt
    passkey_max_len: int = 0        # 0: data.seq_len
    passkey_log_lengths: bool = False  # lengths log-uniform in [min, max] (mostly short, some long) instead of uniform


def validate_data_config(cfg) -> None:
    """Raise ValueError naming the first bad field of a DataConfig."""
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {cfg.source!r}")
    if cfg.source == "hf" and not cfg.path:
        raise ValueError("data.source=hf needs data.path (a hub dataset name or a local file/directory)")
    if cfg.source == "sft":
        _validate_sft(cfg)
    if cfg.streaming and cfg.source != "hf":
        raise ValueError(f"data.streaming=true needs data.source=hf (got data.source={cfg.source!r})")
    if not isinstance(cfg.seq_len, int) or cfg.seq_len < 2:
        raise ValueError(f"data.seq_len must be an int >= 2 (a token and its target), got {cfg.seq_len!r}")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ValueError(f"data.batch_size must be an int >= 1, got {cfg.batch_size!r}")
    if cfg.tokenizer not in TOKENIZERS:
        raise ValueError(f"data.tokenizer must be one of {TOKENIZERS}, got {cfg.tokenizer!r}")
    if cfg.tokenizer == "hf" and not cfg.tokenizer_path:
        raise ValueError("data.tokenizer=hf needs data.tokenizer_path (a local tokenizer dir or cached hub name) "
                         "or model=hf model.path=DIR (its tokenizer)")
    if not 0.0 <= float(cfg.val_fraction) < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction!r}")
    if cfg.max_files is not None and cfg.max_files < 1:
        raise ValueError(f"data.max_files must be None or >= 1, got {cfg.max_files!r}")
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers!r}")
    if cfg.shuffle_buffer < 1:
        raise ValueError(f"data.shuffle_buffer must be >= 1, got {cfg.shuffle_buffer!r}")
    if not cfg.text_column:
        raise ValueError("data.text_column must be a non-empty column name")
    if not 0.0 <= float(cfg.passkey_ratio) < 1.0:
        raise ValueError(f"data.passkey_ratio must be in [0, 1), got {cfg.passkey_ratio!r}")
    if cfg.passkey_min_len < 0 or cfg.passkey_max_len < 0:
        raise ValueError(f"data.passkey_min_len / passkey_max_len must be >= 0 (0: default), got "
                         f"{cfg.passkey_min_len} / {cfg.passkey_max_len}")


def _validate_sft(cfg) -> None:
    if not cfg.path:
        raise ValueError("data.source=sft needs data.path (a .jsonl file of messages or prompt/response rows)")
    if cfg.cross_doc_attention:
        raise ValueError("data.source=sft keeps documents apart: data.cross_doc_attention must be false")
    for key in ("passkey_ratio", "token_cache"):
        if getattr(cfg, key):
            raise ValueError(f"data.{key}={getattr(cfg, key)!r} is not supported with data.source=sft")


def _unit_hash(key: str, salt: str) -> float:
    """Uniform in [0, 1), stable across runs and machines (unlike hash())."""
    digest = hashlib.blake2b(f"{salt}:{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / float(1 << 64)


# ---- the embedded corpus: the interpreter's own standard library -------------------------------------

def stdlib_files(root: Optional[str] = None) -> list[str]:
    """Relative paths of every .py file under the stdlib (site-packages and caches skipped), sorted."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    return sorted(found)


def select_stdlib_files(files: list[str], split: str, val_fraction: float, max_files: Optional[int]) -> list[str]:
    """The files of `split`: a hash-sample of max_files files, then held out by path hash < val_fraction.

    The sample is spread over the whole stdlib (not the alphabetically first files), and a non-empty
    validation share is guaranteed when val_fraction > 0 (the lowest-hash file is moved there if needed).
    """
    if max_files is not None:
        files = sorted(files, key=lambda f: _unit_hash(f, "sample"))[:max_files]
    val = held_out(files, val_fraction)
    chosen = [f for i, f in enumerate(files) if (i in val) == (split == "validation")]
    return sorted(chosen)


def held_out(keys: list[str], val_fraction: float) -> set[int]:
    """Indices of the validation items: key hash < val_fraction, and never empty when val_fraction > 0 and there
    are two items or more (the lowest-hash one is moved there if needed)."""
    score = [_unit_hash(k, "split") for k in keys]
    val = {i for i, s in enumerate(score) if s < val_fraction}
    if not val and val_fraction > 0 and len(keys) > 1:
        val = {min(range(len(keys)), key=score.__getitem__)}
    return val


def load_stdlib(cfg, split: str, root: Optional[str] = None):
    """datasets.Dataset with columns path, text for the stdlib files of `split` (empty files skipped)."""
    import datasets

    root = root or sysconfig.get_paths()["stdlib"]
    paths, texts = [], []
    for rel in select_stdlib_files(stdlib_files(root), split, cfg.val_fraction, cfg.max_files):
        with open(os.path.join(root, rel), "rb") as fh:
            text = fh.read().decode("utf-8", errors="replace")   # a few test files are deliberately not UTF-8
        if text.strip():
            paths.append(rel)
            texts.append(text)
    return datasets.Dataset.from_dict({"path": paths, cfg.text_column: texts})


# ---- any HF dataset -------------------------------------------------------------------------------------

def _load_hf_splits(cfg):
    """dict-like split name -> Dataset / IterableDataset for data.path (+ data.name)."""
    import datasets

    path = cfg.path
    try:
        if os.path.isfile(path):
            if os.path.getsize(path) == 0:
                raise ValueError(f"data.path={path!r} is empty (0 bytes): it holds no documents")
            ext = os.path.splitext(path)[1].lower()
            if ext not in _FILE_BUILDERS:
                raise ValueError(f"data.path={path!r}: unknown file type {ext!r}, expected one of "
                                 f"{sorted(_FILE_BUILDERS)}")
            return datasets.load_dataset(_FILE_BUILDERS[ext], data_files=path, streaming=cfg.streaming,
                                         cache_dir=cfg.cache_dir)
        if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                       for f in ("state.json", "dataset_dict.json")):
            saved = datasets.load_from_disk(path)
            saved = {"train": saved} if isinstance(saved, datasets.Dataset) else dict(saved)
            return {k: v.to_iterable_dataset() for k, v in saved.items()} if cfg.streaming else saved
        return datasets.load_dataset(path, cfg.name, streaming=cfg.streaming, cache_dir=cfg.cache_dir)
    except ValueError as exc:
        if str(exc).startswith("data."):
            raise
        raise ValueError(f"data.path={path!r} (data.name={cfg.name!r}) could not be loaded: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - FileNotFoundError, offline ConnectionError, ...
        raise ValueError(f"data.path={path!r} (data.name={cfg.name!r}) could not be loaded: "
                         f"{str(exc).strip() or type(exc).__name__}") from exc


def _pick_split(splits, split: str, cfg):
    """(dataset, carve): the split to read, and whether validation must be carved out of it by hash."""
    names = list(splits.keys())
    has_val = [n for n in _VAL_SPLIT_NAMES if n in splits]
    if split == "validation" and has_val:
        return splits[has_val[0]], False
    if "train" in splits:
        return splits["train"], not has_val
    if len(names) == 1:
        return splits[names[0]], not has_val
    raise ValueError(f"data.path={cfg.path!r} has splits {names}; expected a 'train' split (or exactly one)")


def _keep_document(batch, column: str, val_fraction: float, carve: bool, want_val: bool) -> list[bool]:
    """Batched filter: drop empty texts; when carving, keep the documents of the wanted split."""
    keep = []
    for text in batch[column]:
        ok = bool(text and text.strip())
        if ok and carve:
            ok = (_unit_hash(text, "split") < val_fraction) == want_val
        keep.append(ok)
    return keep


def load_hf(cfg, split: str):
    """The documents of `split` from data.path as a Dataset (or IterableDataset when streaming)."""
    ds, carve = _pick_split(_load_hf_splits(cfg), split, cfg)
    columns = ds.column_names
    if columns is not None and not columns:
        raise ValueError(f"data.path={cfg.path!r} holds no records (no columns)")
    if columns is not None and cfg.text_column not in columns:
        raise ValueError(f"data.text_column={cfg.text_column!r} is not a column of data.path={cfg.path!r} "
                         f"(columns: {columns})")
    if cfg.max_files is not None:
        ds = ds.take(cfg.max_files) if cfg.streaming else ds.select(range(min(cfg.max_files, len(ds))))
    kwargs = dict(column=cfg.text_column, val_fraction=float(cfg.val_fraction), carve=carve,
                  want_val=split == "validation")
    if cfg.streaming:
        return ds.filter(_keep_document, batched=True, fn_kwargs=kwargs)
    return ds.filter(_keep_document, batched=True, fn_kwargs=kwargs, num_proc=cfg.num_workers or None,
                     desc=f"select {split} documents")


def load_corpus(cfg, split: str):
    """Untokenised documents of `split` (Dataset; IterableDataset for streaming hf)."""
    return load_stdlib(cfg, split) if cfg.source == "stdlib" else load_hf(cfg, split)


# ---- tokenisation and loaders ---------------------------------------------------------------------------

def _tokenize_batch(batch, tokenizer: Tokenizer, column: str) -> dict:
    return {"input_ids": encode_documents(tokenizer, batch[column])}


def tokenize_to_store(ds, tokenizer: Tokenizer, column: str, num_proc: Optional[int] = None,
                      token_cache: Optional[str] = None) -> TokenStore:
    """Tokenise a Dataset once (map(batched=True); disk-cached for loaded datasets) into a TokenStore: in
    memory, or with token_cache a memory-mapped file keyed by the dataset and tokenizer (written slice by
    slice from the map's arrow cache, so the corpus is never in memory at once)."""
    path = None
    if token_cache:
        key = f"{ds._fingerprint}:{type(tokenizer).__name__}:{tokenizer.vocab_size}:" \
              f"{getattr(tokenizer, 'name', '')}:{column}"
        path = os.path.join(token_cache, hashlib.blake2b(key.encode(), digest_size=10).hexdigest())
        if os.path.isfile(os.path.join(path, "meta.json")):
            return open_token_store(path)
    tokenized = ds.map(_tokenize_batch, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                       fn_kwargs={"tokenizer": tokenizer, "column": column}, desc="tokenize")
    column_data = tokenized.data.column("input_ids")
    if path is None:
        return TokenStore.from_arrow(column_data)
    from tqdm import tqdm  # a bar when writing the cache takes more than 2 s, and only on a terminal

    chunks = tqdm(arrow_chunks(column_data), desc="token cache", unit="chunk", delay=2, disable=None, leave=False)
    return build_token_cache(path, chunks, token_dtype(tokenizer.vocab_size))


def _tokenize_stream(examples, tokenizer: Tokenizer, column: str, chunk: int = 256):
    """Documents of an example iterator, tokenised `chunk` texts at a time (a batched map we can islice)."""
    while True:
        batch = list(itertools.islice(examples, chunk))
        if not batch:
            return
        if column not in batch[0]:
            raise ValueError(f"data.text_column={column!r} is not a field of the streamed examples "
                             f"(fields: {sorted(batch[0])})")
        yield from encode_documents(tokenizer, [ex[column] for ex in batch])


def _stream_opener(cfg, tokenizer: Tokenizer, docs, split: str, dp_rank: int, dp_size: int, seed: int):
    """open_docs(epoch, skip) for StreamingPackedLoader: shuffle + node split for train, whole stream else."""
    from datasets.distributed import split_dataset_by_node

    def open_docs(epoch: int, skip: int):
        ds = docs
        if split == "train":
            ds = split_dataset_by_node(ds.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer),
                                       rank=dp_rank, world_size=dp_size)
            ds.set_epoch(epoch)        # after the split (its copy drops the epoch); effective seed = seed + epoch
        # Skip and tokenise here rather than with ds.skip/ds.map: datasets applies the node split on top
        # of every later op, so ds.skip(n) would skip n examples of the *global* stream, not of this rank's.
        return _tokenize_stream(itertools.islice(iter(ds), skip, None), tokenizer, cfg.text_column)

    return open_docs


def build_loader(cfg, tokenizer: Tokenizer, split: str, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 max_batches: Optional[int] = None):
    """PackedLoader (StreamingPackedLoader for data.streaming) over `split` for one data-parallel rank.

    split="train": infinite, reshuffled per epoch by (seed, epoch). split="validation": one finite,
    unshuffled pass (at most max_batches batches); `iter_epoch()` restarts it. Loaded data and every
    validation pass give each rank of a dp group the same number of batches (padding rows: labels -100,
    0 in num_valid); streamed train shares (split_dataset_by_node) may differ per rank but never run dry.
    """
    validate_data_config(cfg)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not (isinstance(dp_size, int) and dp_size >= 1 and isinstance(dp_rank, int) and 0 <= dp_rank < dp_size):
        raise ValueError(f"dp_rank/dp_size must satisfy 0 <= dp_rank < dp_size, got {dp_rank}/{dp_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be None or >= 1, got {max_batches!r}")
    if cfg.source == "sft":
        from .sft import build_sft_loader   # sft.py imports this module

        return build_sft_loader(cfg, tokenizer, split, dp_rank, dp_size, seed, max_batches)
    common = dict(seq_len=cfg.seq_len, batch_size=cfg.batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                  infinite=split == "train", cross_doc=cfg.cross_doc_attention, pad_id=tokenizer.pad_id,
                  max_batches=max_batches)
    docs = load_corpus(cfg, split)
    mix = split == "train" and cfg.passkey_ratio > 0
    if cfg.streaming:
        open_docs = _stream_opener(cfg, tokenizer, docs, split, dp_rank, dp_size, seed)
        if mix:
            open_docs = passkey.mix_into_stream(open_docs, tokenizer, cfg.passkey_ratio, seed,
                                                *_passkey_lengths(cfg, tokenizer), rank=dp_rank,
                                                log_lengths=cfg.passkey_log_lengths)
        return StreamingPackedLoader(open_docs, **common)
    store = None
    if len(docs):
        store = tokenize_to_store(docs, tokenizer, cfg.text_column, cfg.num_workers or None, cfg.token_cache)
    if store is None or store.num_tokens == 0:
        raise ValueError(f"the {split!r} split is empty (data.source={cfg.source!r}, data.path={cfg.path!r}, "
                         f"data.val_fraction={cfg.val_fraction}, data.max_files={cfg.max_files})")
    if mix:  # ratio / (1 - ratio) passkey documents per corpus document, the same on every rank
        count = round(cfg.passkey_ratio / (1 - cfg.passkey_ratio) * store.num_docs)
        store = append_documents(store, passkey.passkey_documents(
            tokenizer, count, seed, *_passkey_lengths(cfg, tokenizer), token_dtype(tokenizer.vocab_size),
            log_lengths=cfg.passkey_log_lengths))
    return PackedLoader(store, shuffle=split == "train", **common)


def _passkey_lengths(cfg, tokenizer) -> tuple[int, int]:
    low = max(cfg.passkey_min_len, passkey.min_length(tokenizer))
    high = cfg.passkey_max_len or cfg.seq_len
    if high < low:
        raise ValueError(f"data.passkey_max_len ({high}; 0 means data.seq_len) is below the shortest passkey "
                         f"document ({low} tokens: data.passkey_min_len or needle + question)")
    return low, high
