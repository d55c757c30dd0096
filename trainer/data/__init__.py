"""Training data: corpus loading and DataConfig (corpus.py), tokenizers, packing into rows with document
boundaries, on-disk token caches, and the synthetic passkey task.

    from trainer.data import DataConfig, build_tokenizer, build_loader
"""

from .corpus import (DataConfig, build_loader, load_corpus, load_hf, load_stdlib, select_stdlib_files,
                     stdlib_files, validate_data_config)
from .tokenizer import build_tokenizer

__all__ = ["DataConfig", "build_loader", "build_tokenizer", "load_corpus", "load_hf", "load_stdlib",
           "select_stdlib_files", "stdlib_files", "validate_data_config"]
