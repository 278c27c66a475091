"""Reading documents from a source: the embedded corpus, local files and folders, hub datasets.

Every reader yields plain-text documents. Bad input is either an error naming the file and the
problem (missing path, missing text field) or skipped and counted (empty or binary file,
non-UTF-8 or malformed line), and the counts are logged; a source that yields no document at all
is always an error, never a silently empty dataset.

Local .txt and .jsonl are read here line by line rather than through ``datasets``: its text and
json builders fail a whole file on one bad line without saying which, and we want to skip that
line and count it. Parquet files and hub datasets go through ``datasets.load_dataset``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import datasets

from lowrank_pt.core.errors import DataError

from . import embedded
from .config import HUB_PREFIX, SOURCE_SUFFIXES, DataConfig, is_hub_source

logger = logging.getLogger(__name__)

READER_VERSION = 1
"""Bump when a reader changes what text it yields: part of every cache key."""

_BINARY_SNIFF_BYTES = 8192


class SkipCounter:
    """Counts what was skipped, by reason, keeping the first few places for the warning."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._logged: Counter[str] = Counter()

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < 3:
            examples.append(where)

    def summary(self) -> str:
        return "; ".join(
            f"{n} {reason} (e.g. {', '.join(self.examples[reason])})"
            for reason, n in sorted(self.counts.items())
        )

    def log(self, source: str) -> None:
        """Warn about what was skipped since the last call (one counter may serve two sources)."""
        for reason, n in sorted((self.counts - self._logged).items()):
            logger.warning(
                "skipped %d %s in %s (e.g. %s)", n, reason, source, ", ".join(self.examples[reason])
            )
        self._logged = self.counts.copy()


def describe(source: str) -> str:
    if source == "embedded":
        return f"embedded: Shakespeare plays from {embedded.PACKAGE} {embedded.package_version()}"
    return source


def local_files(root: Path) -> list[Path]:
    """Supported files under ``root`` (or ``root`` itself), sorted; hidden entries ignored."""
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    if root.is_file():
        if root.suffix not in SOURCE_SUFFIXES:
            raise DataError(f"unsupported file type {root.suffix!r}: {root} (allowed: {SOURCE_SUFFIXES})")
        return [root]
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix in SOURCE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"no {'/'.join(SOURCE_SUFFIXES)} files under {root}")
    return files


def source_identity(cfg: DataConfig, source: str) -> dict[str, Any]:
    """What the documents read from ``source`` depend on; cheap (stats files, reads none)."""
    ident: dict[str, Any] = {"reader": READER_VERSION, "max_documents": cfg.max_documents}
    if source == "embedded":
        ident.update(kind="embedded", package=embedded.PACKAGE,
                     version=embedded.package_version(), cleaning=embedded.CLEANING_VERSION)
    elif is_hub_source(source):
        ident.update(kind="hub", name=source[len(HUB_PREFIX):], subset=cfg.hub_subset,
                     split=cfg.hub_split, text_field=cfg.text_field)
    else:
        files = []
        for path in local_files(Path(source)):
            stat = path.stat()
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        ident.update(kind="local", files=files, text_field=cfg.text_field,
                     sample_by=cfg.txt_sample_by)
    return ident


def _sniff(path: Path, skips: SkipCounter) -> bool:
    """False (and counted) for an empty or binary file."""
    with open(path, "rb") as f:
        head = f.read(_BINARY_SNIFF_BYTES)
    if not head:
        skips.skip("empty file(s)", str(path))
        return False
    if b"\0" in head:
        skips.skip("binary file(s)", str(path))
        return False
    return True


def _decoded_lines(path: Path, skips: SkipCounter) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                skips.skip("non-UTF-8 line(s)", f"{path}:{lineno}")
                continue
            yield lineno, line.rstrip("\r\n")


def _text_of(record: Any, field: str, where: str, skips: SkipCounter) -> str | None:
    if not isinstance(record, dict):
        skips.skip("non-object record(s)", where)
        return None
    if field not in record:
        raise DataError(
            f"{where}: missing text field {field!r} (record has: {sorted(record)}); "
            "set text_field to the field holding the text"
        )
    value = record[field]
    if value is None or (isinstance(value, str) and not value.strip()):
        skips.skip("empty text record(s)", where)
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: text field {field!r} holds {type(value).__name__}, not text")
    return value


def _read_txt(path: Path, sample_by: str, skips: SkipCounter) -> Iterator[str]:
    paragraph: list[str] = []
    for _, line in _decoded_lines(path, skips):
        if sample_by == "line":
            if line.strip():
                yield line
        elif sample_by == "paragraph" and not line.strip():
            if paragraph:
                yield "\n".join(paragraph)
            paragraph = []
        else:
            paragraph.append(line)
    text = "\n".join(paragraph)
    if text.strip():
        yield text.strip("\n")


def _read_jsonl(path: Path, field: str, skips: SkipCounter) -> Iterator[str]:
    for lineno, line in _decoded_lines(path, skips):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except ValueError:
            skips.skip("malformed JSON line(s)", where)
            continue
        text = _text_of(record, field, where, skips)
        if text is not None:
            yield text


def _read_json(path: Path, field: str, skips: SkipCounter) -> Iterator[str]:
    with open(path, "rb") as f:
        first = f.read(_BINARY_SNIFF_BYTES).lstrip()
    if not first.startswith(b"["):  # not an array: JSON lines with a .json name
        yield from _read_jsonl(path, field, skips)
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: not a valid UTF-8 JSON array: {err}") from err
    for i, record in enumerate(records):
        text = _text_of(record, field, f"{path}[{i}]", skips)
        if text is not None:
            yield text


def _read_records(records: Iterable[Any], field: str, where: str, skips: SkipCounter) -> Iterator[str]:
    for i, record in enumerate(records):
        text = _text_of(record, field, f"{where} record {i}", skips)
        if text is not None:
            yield text


def _read_parquet(path: Path, field: str, skips: SkipCounter) -> Iterator[str]:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PAR1":
        skips.skip("empty file(s)" if not magic else "non-parquet file(s)", str(path))
        return
    records = datasets.load_dataset("parquet", data_files=[str(path)], split="train", streaming=True)
    yield from _read_records(records, field, str(path), skips)


def _read_hub(cfg: DataConfig, source: str, skips: SkipCounter) -> Iterator[str]:
    name = source[len(HUB_PREFIX):]
    if cfg.max_documents is None:
        logger.warning("streaming all of %s (split %s): set max_documents to bound it", source, cfg.hub_split)
    try:
        # Looked up at call time so tests can monkeypatch datasets.load_dataset.
        records = datasets.load_dataset(name, cfg.hub_subset, split=cfg.hub_split, streaming=True)
    except Exception as err:  # network, auth, unknown name: all need the same hint
        raise DataError(
            f"cannot open hub dataset {name!r} (subset={cfg.hub_subset!r}, split={cfg.hub_split!r}): "
            f"{err}. Without network access, use a local path as source."
        ) from err
    yield from _read_records(records, cfg.text_field, source, skips)


def _read_any(cfg: DataConfig, source: str, skips: SkipCounter) -> Iterator[str]:
    if source == "embedded":
        for doc in embedded.iter_scene_documents():
            yield doc.text
        return
    if is_hub_source(source):
        yield from _read_hub(cfg, source, skips)
        return
    for path in local_files(Path(source)):
        if path.suffix == ".parquet":
            yield from _read_parquet(path, cfg.text_field, skips)
        elif not _sniff(path, skips):
            continue
        elif path.suffix == ".txt":
            yield from _read_txt(path, cfg.txt_sample_by, skips)
        elif path.suffix == ".jsonl":
            yield from _read_jsonl(path, cfg.text_field, skips)
        else:
            yield from _read_json(path, cfg.text_field, skips)


def iter_documents(cfg: DataConfig, source: str, skips: SkipCounter | None = None) -> Iterator[str]:
    """Documents of ``source``, at most ``cfg.max_documents``; DataError if there are none."""
    skips = skips if skips is not None else SkipCounter()
    count = 0
    for text in itertools.islice(_read_any(cfg, source, skips), cfg.max_documents):
        count += 1
        yield text
    skips.log(source)
    if count == 0:
        detail = f" (skipped: {skips.summary()})" if skips.counts else ""
        raise DataError(f"no documents read from {source}{detail}")


def is_validation(text: str, val_fraction: float) -> bool:
    """Deterministic by-document split: the document's hash, read as a number in [0, 1)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def _val_cfg(cfg: DataConfig) -> DataConfig:
    return dataclasses.replace(cfg, hub_split=cfg.val_hub_split or cfg.hub_split)


def iter_split_documents(cfg: DataConfig, skips: SkipCounter | None = None) -> Iterator[tuple[str, str]]:
    """(split, text) pairs, split in {"train", "val"}, in one pass over the source(s)."""
    skips = skips if skips is not None else SkipCounter()
    if cfg.val_source is not None:
        for text in iter_documents(cfg, cfg.source, skips):
            yield "train", text
        for text in iter_documents(_val_cfg(cfg), cfg.val_source, skips):
            yield "val", text
        return
    for text in iter_documents(cfg, cfg.source, skips):
        yield ("val" if is_validation(text, cfg.val_fraction) else "train"), text


def split_identity(cfg: DataConfig) -> dict[str, Any]:
    """What the (train, val) documents depend on: both sources and the split rule."""
    return {
        "source": source_identity(cfg, cfg.source),
        "val_source": None if cfg.val_source is None else source_identity(_val_cfg(cfg), cfg.val_source),
        "val_fraction": None if cfg.val_source is not None else cfg.val_fraction,
    }
