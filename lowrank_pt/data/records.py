"""Instruction and preference records in .jsonl files: reading them line by line with errors that
name the file and line, the conversation a record stands for, and the hash split that holds
records out for validation (SFT and DPO read their files through these)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

from lowrank_pt.core.errors import DataError

ROLES = ("system", "user", "assistant")


def record_messages(record: dict, where: str) -> list[dict]:
    """The conversation of one record as ``[{role, content}]``; DataError naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be {{role: one of {list(ROLES)}, content: text}}, "
                                f"got {m!r:.80}")
            out.append({"role": m["role"], "content": m["content"]})
    elif "prompt" in record and "response" in record:
        for key in ("prompt", "response", "system"):
            if key in record and not isinstance(record[key], str):
                raise DataError(f"{where}: '{key}' must be text, got {type(record[key]).__name__}")
        out = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        out += [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise DataError(f"{where}: a record needs 'prompt' and 'response', or 'messages' "
                        f"(found keys {sorted(record)})")
    if not any(m["role"] == "assistant" and m["content"] for m in out):
        raise DataError(f"{where}: no non-empty assistant message to train on")
    return out


def read_records(path: str | Path) -> Iterator[tuple[int, str, list[dict]]]:
    """``(line number, raw line, messages)`` of every record of a jsonl file; blank lines skipped."""
    for number, line, record, where in read_jsonl(path, "SFT data file"):
        yield number, line, record_messages(record, where)


def read_jsonl(path: str | Path, kind: str) -> Iterator[tuple[int, str, object, str]]:
    """``(line number, raw line, parsed value, "path:line")`` of every non-blank line of a jsonl
    file; a missing file or a line that is not JSON is a DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{kind} not found: {path}")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            yield number, line, record, where


def held_out(text: str, fraction: float) -> bool:
    """Whether a record goes to validation: its hash, read as a number in [0, 1), is below fraction."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16) / 16**15 < fraction
