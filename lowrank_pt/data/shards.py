"""Token shards: a flat array of token ids on disk (``<split>.bin``) plus a JSON manifest.

Layout of one cache entry, ``<cache_dir>/shards/<key>/``::

    train.bin  train.json  val.bin  val.json

Each ``.bin`` is the documents' tokens back to back, each document followed by EOS (no BOS:
EOS alone marks every boundary, and a window starting mid-document is the common case anyway).
The dtype is uint16 when every id fits, else uint32. The manifest records what is needed to
trust the array: dtype and token count, the tokenizer's sha256, document and character counts,
what was read and what was skipped.

A cache entry is built in a temporary directory next to its final place and renamed into place
in one step, so an interrupted run never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from lowrank_pt.core.errors import DataError

from .tokenizer import Tokenizer, load_tokenizer, token_dtype

FORMAT_VERSION = 1
SPLITS = ("train", "val")
_CHUNK_CHARS = 1 << 18  # ~256 KB of text per task: enough to amortise IPC, small for balance


class TokenShard:
    """A memory-mapped shard. ``path`` is its manifest (``.json``) or its array (``.bin``)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        manifest_path = path.with_suffix(".json") if path.suffix == ".bin" else path
        if not manifest_path.is_file():
            raise DataError(f"no shard manifest at {manifest_path}")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except ValueError as err:
            raise DataError(f"shard manifest {manifest_path} is not valid JSON: {err}") from err
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"shard {manifest_path} has format {self.manifest.get('format_version')}, "
                f"this version reads {FORMAT_VERSION}; re-run prepare"
            )
        self.path = str(manifest_path)
        self.bin_path = manifest_path.parent / self.manifest["bin"]
        dtype = np.dtype(self.manifest["dtype"])
        self.num_tokens: int = int(self.manifest["num_tokens"])
        expected = self.num_tokens * dtype.itemsize
        actual = self.bin_path.stat().st_size if self.bin_path.is_file() else -1
        if actual != expected or self.num_tokens == 0:
            raise DataError(
                f"shard {self.bin_path} holds {actual} bytes, its manifest says "
                f"{self.num_tokens} tokens of {dtype} ({expected} bytes)"
            )
        self.tokens = np.memmap(self.bin_path, dtype=dtype, mode="r", shape=(self.num_tokens,))
        self.tokenizer_sha256: str = self.manifest["tokenizer_sha256"]
        self.num_documents: int = int(self.manifest["num_documents"])

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenShard({self.path!r}, num_tokens={self.num_tokens})"


def check_tokenizer(shard: TokenShard, tokenizer: Tokenizer) -> None:
    """DataError if ``shard`` was not made with ``tokenizer`` (compared by model sha256)."""
    if shard.tokenizer_sha256 != tokenizer.sha256:
        raise DataError(
            f"shard {shard.path} was tokenized with a tokenizer of sha256 "
            f"{shard.tokenizer_sha256[:12]}… (vocab {shard.manifest.get('vocab_size')}), but the run "
            f"uses {tokenizer.path} (sha256 {tokenizer.sha256[:12]}…, vocab {tokenizer.vocab_size})"
        )


# Pre-tokenization workers: each process loads the model itself (sentencepiece objects do not
# pickle) and receives only text.
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def encode_chunk(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """Token ids of ``texts``, each document followed by EOS, as one flat array."""
    ids = tokenizer.encode_many(texts, eos=True)
    flat = np.empty(sum(map(len, ids)), dtype=token_dtype(tokenizer.vocab_size))
    start = 0
    for doc in ids:
        flat[start:start + len(doc)] = doc
        start += len(doc)
    return flat


def _encode_in_worker(task: tuple[str, list[str]]) -> tuple[str, np.ndarray, int, int]:
    split, texts = task
    assert _worker_tokenizer is not None
    return split, encode_chunk(_worker_tokenizer, texts), len(texts), sum(map(len, texts))


def _chunks(docs: Iterable[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """Group (split, text) pairs into per-split lists of about _CHUNK_CHARS characters."""
    pending: dict[str, list[str]] = {split: [] for split in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for split, text in docs:
        pending[split].append(text)
        sizes[split] += len(text)
        if sizes[split] >= _CHUNK_CHARS:
            yield split, pending[split]
            pending[split], sizes[split] = [], 0
    for split in SPLITS:
        if pending[split]:
            yield split, pending[split]


def _encoded(chunks: Iterator[tuple[str, list[str]]], tokenizer: Tokenizer, num_workers: int):
    """Encoded chunks in input order; with workers, at most 2 per worker in flight (bounded
    memory even for an endless streaming source, unlike Pool.imap which drains its input)."""
    if num_workers <= 1:
        for split, texts in chunks:
            yield split, encode_chunk(tokenizer, texts), len(texts), sum(map(len, texts))
        return
    with multiprocessing.get_context().Pool(
        num_workers, initializer=_init_worker, initargs=(tokenizer.path,)
    ) as pool:
        in_flight: deque = deque()
        for task in chunks:
            in_flight.append(pool.apply_async(_encode_in_worker, (task,)))
            if len(in_flight) >= 2 * num_workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def write_shards(
    docs: Iterable[tuple[str, str]],
    tokenizer: Tokenizer,
    out_dir: Path,
    manifest_extra: dict[str, Any],
    num_workers: int = 1,
    progress: bool = True,
    skipped: dict[str, int] | None = None,
) -> dict[str, str]:
    """Tokenize (split, text) pairs into ``out_dir/{train,val}.{bin,json}``; returns manifest paths.

    ``skipped`` (reason -> count) is filled while ``docs`` is read and recorded in the manifests.

    If another process completes ``out_dir`` first, its result is kept and ours discarded.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp_dir.mkdir()
    try:
        dtype = token_dtype(tokenizer.vocab_size)
        counts = {split: {"num_tokens": 0, "num_documents": 0, "num_chars": 0} for split in SPLITS}
        files = {split: open(tmp_dir / f"{split}.bin", "wb") for split in SPLITS}
        try:
            bar = tqdm(desc="pre-tokenizing", unit="char", unit_scale=True, disable=not progress)
            for split, tokens, n_docs, n_chars in _encoded(_chunks(docs), tokenizer, num_workers):
                files[split].write(tokens.tobytes())
                counts[split]["num_tokens"] += len(tokens)
                counts[split]["num_documents"] += n_docs
                counts[split]["num_chars"] += n_chars
                bar.update(n_chars)
            bar.close()
        finally:
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
        for split in SPLITS:
            if counts[split]["num_documents"] == 0:
                raise DataError(
                    f"the {split} split of {manifest_extra.get('source_description')} is empty "
                    f"({counts['train']['num_documents'] + counts['val']['num_documents']} documents "
                    "in all); raise val_fraction, read more documents, or set val_source"
                )
            manifest = {
                "format_version": FORMAT_VERSION,
                "split": split,
                "bin": f"{split}.bin",
                "dtype": dtype.name,
                **counts[split],
                "tokenizer_sha256": tokenizer.sha256,
                "tokenizer_path": tokenizer.path,
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
                "bos_at_document_start": False,
                "document_separator": "EOS after every document",
                "created_unix": int(time.time()),
                "skipped": dict(skipped or {}),
                **manifest_extra,
            }
            (tmp_dir / f"{split}.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.replace(tmp_dir, out_dir)
        except OSError:
            if not (out_dir / "val.json").is_file():  # not a finished rival: a real failure
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {split: str(out_dir / f"{split}.json") for split in SPLITS}
