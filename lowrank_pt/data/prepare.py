"""prepare_data: from a DataConfig to a tokenizer and train/validation shards, cached on disk.

Cache entries are keyed by hashes of everything their content depends on, so a re-run on
unchanged input finds them and does no work, and any change (a file's size or mtime, the package
version of the embedded corpus, the hub name/subset/split, max_documents, the split rule, the
tokenizer, a cleaning or format version) leads to a new entry. Nothing is ever overwritten in
place, which makes it safe for rank 0 to prepare while other ranks wait at a barrier and then
call prepare_data themselves.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DataConfig, validate
from .shards import FORMAT_VERSION, SPLITS, TokenShard, write_shards
from .sources import SkipCounter, describe, iter_split_documents, split_identity
from .tokenizer import TOKENIZER_RECIPE_VERSION, atomic_write_bytes, load_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    tokenizer_path: str
    """The sentencepiece model the shards were made with."""
    train_shard: str
    """Manifest path of the training shard (open with TokenShard)."""
    val_shard: str
    """Manifest path of the validation shard."""


def cache_key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def _cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser().resolve()


def tokenizer_for(cfg: DataConfig, identity: dict[str, Any] | None = None) -> str:
    """Path of the tokenizer for ``cfg``: the given one, or a cached one trained on its train split."""
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    identity = identity if identity is not None else split_identity(cfg)
    recipe = {
        "data": identity,
        "recipe": TOKENIZER_RECIPE_VERSION,
        "type": cfg.tokenizer_type,
        "vocab_size": cfg.vocab_size,
        "max_chars": cfg.tokenizer_train_chars,
    }
    entry = _cache_root(cfg) / "tokenizers" / cache_key(recipe)
    model = entry / "tokenizer.model"
    if model.is_file():
        logger.info("reusing tokenizer %s", model)
        return str(model)
    logger.info("training a %d-piece %s tokenizer on %s",
                cfg.vocab_size, cfg.tokenizer_type, describe(cfg.source))
    train_texts = (text for split, text in iter_split_documents(cfg) if split == "train")
    path = train_tokenizer(
        train_texts, str(entry / "tokenizer"), cfg.vocab_size, cfg.tokenizer_type, cfg.tokenizer_train_chars
    )
    atomic_write_bytes(entry / "recipe.json", (json.dumps(recipe, indent=2) + "\n").encode())
    return path


def prepare_data(cfg: DataConfig, progress: bool = True) -> PreparedData:
    """Tokenizer and train/val shards for ``cfg``, reusing cached ones; idempotent."""
    validate(cfg)
    identity = split_identity(cfg)
    tokenizer = load_tokenizer(tokenizer_for(cfg, identity))
    key = cache_key({"data": identity, "tokenizer_sha256": tokenizer.sha256, "format": FORMAT_VERSION})
    entry = _cache_root(cfg) / "shards" / key
    paths = {split: str(entry / f"{split}.json") for split in SPLITS}
    if all(Path(p).is_file() for p in paths.values()):
        for p in paths.values():
            TokenShard(p)  # checks the array against its manifest
        logger.info("reusing shards in %s", entry)
    else:
        skips = SkipCounter()
        extra = {
            "source_description": describe(cfg.source)
            + ("" if cfg.val_source is None else f" (validation: {describe(cfg.val_source)})"),
            "source": identity,
            "cache_key": key,
        }
        docs = iter_split_documents(cfg, skips)
        paths = write_shards(docs, tokenizer, entry, extra, cfg.num_workers, progress, skips.counts)
    return PreparedData(tokenizer.path, paths["train"], paths["val"])
