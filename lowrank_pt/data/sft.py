"""Supervised fine-tuning data: a chat template, response-only loss masks, and resumable batches.

Records (one JSON object per line of a ``.jsonl`` file) take either form::

    {"prompt": "Who says this line?", "response": "HAMLET", "system": "optional"}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

Template, at the token level (the chat pieces are single tokens of our trained tokenizers)::

    [<|system|> system-text <|end|>]  <|user|> text <|end|>  <|assistant|> text <|end|>  ...  EOS

No BOS: pre-training documents are joined by EOS alone, so EOS closes a conversation as it closes
a document. Each message's content is encoded on its own, so a chat piece never merges with text.

Loss: only the tokens of assistant messages are targets, together with the ``<|end|>`` that closes
each of them (so the model learns to stop; ``generate`` stops there). Role tokens, system and user
text, the final EOS and padding carry label -100. Labels are next-token shifted exactly as in
pre-training: ``input_ids[t]`` predicts ``labels[t] = tokens[t + 1]``.

Batching pads instead of packing: one conversation per row, cut to ``seq_len + 1`` tokens
(counted and logged) and padded with the PAD id (labels -100). Packing several conversations into
one row would let later ones attend to earlier ones, as the model's causal attention has no
document mask; padding wastes compute on short examples but trains what generation will see.
A conversation with no target left after the cut is dropped (counted), so no row is all -100.

Bad input is a ``DataError`` naming the file and line: a missing file, a line that is not JSON,
a record of neither form, an unknown role, a conversation without an assistant reply, or a file
without records.

``SFTLoader`` has the interface and the order rule of ``lowrank_pt.data.PackedLoader``: per-epoch
permutations from ``(seed, epoch)``, each ``next_batch`` takes the next ``world_size x
micro_batch_size`` examples of the global order and rank r takes slice r, and the cursor is plain
ints, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

import numpy as np
import torch

from lowrank_pt.core.errors import DataError
from lowrank_pt.data.embedded import CLEANING_VERSION, iter_speeches, package_version

from . import chat_template
from .loader import ShuffledLoader, check_rank
from .records import ROLES, held_out, read_records
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ROLE_PIECES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_PIECE = "<|end|>"
SHAKESPEARE = "shakespeare"
SHAKESPEARE_TASKS = ("continue", "who")
"""The kinds of record of the shakespeare set (``shakespeare_records``)."""
SHAKESPEARE_SET_VERSION = 1
"""Bump when build_shakespeare_sft changes what it writes: part of the cache key of the set."""


@dataclass
class SFTDataConfig:
    train: str = SHAKESPEARE
    """Instruction data: a .jsonl file of {prompt, response} or {messages} records, or "shakespeare"
    for the set derived from the embedded corpus ("continue this speech", "who says this line"),
    built once into cache_dir."""
    validation: Optional[str] = None
    """Held-out .jsonl of the same form. Null: the shakespeare set's held-out scenes, or for a file
    the records whose hash falls below val_fraction."""
    val_fraction: float = 0.05
    """Share of a train file's records held out for validation when validation is null."""
    max_examples: Optional[int] = None
    """Use at most this many training records (the shakespeare set draws them at random with seed)."""
    seed: int = 0
    """Seed of the shakespeare set's choices (which line of a speech, which subset)."""
    cache_dir: str = ".cache/lowrank_pt"
    """Where the shakespeare set is written (under sft/), keyed by its parameters."""
    tasks: List[str] = field(default_factory=lambda: list(SHAKESPEARE_TASKS))
    """The shakespeare set's kinds of record: continue ("continue this speech": a line -> the
    next line) and who ("who says this line": a line -> its speaker). Exact-match questions are
    the held-out "who" questions when who is in, else the held-out records with short replies."""


def validate_config(cfg: SFTDataConfig) -> None:
    """Cheap checks before any work: paths exist, values in range (DataError / ValueError)."""
    check_files_and_split(cfg, "sft")
    tasks = list(cfg.tasks)
    if not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= set(SHAKESPEARE_TASKS):
        raise ValueError(f"sft.tasks={tasks}: one or more of {list(SHAKESPEARE_TASKS)}, each once")
    if cfg.train != SHAKESPEARE and not _all_tasks(tasks):
        raise ValueError(f"sft.tasks={tasks} chooses records of the shakespeare set; sft.train is a file "
                         f"({cfg.train}): leave tasks out")


def _all_tasks(tasks) -> bool:
    return set(tasks) == set(SHAKESPEARE_TASKS)


def check_files_and_split(cfg, section: str) -> None:
    """The checks an SFT or DPO data section shares (``train``, ``validation``, ``val_fraction``,
    ``max_examples``), naming keys under ``section``."""
    for key in ("train", "validation"):
        path = getattr(cfg, key)
        if path is None or (key == "train" and path == SHAKESPEARE):
            continue
        if not Path(path).is_file():
            raise DataError(f"{section}.{key}: no such file: {path} (a .jsonl file, or 'shakespeare' for train)")
    if cfg.validation is None and cfg.train != SHAKESPEARE and not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"{section}.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.max_examples is not None and cfg.max_examples < 1:
        raise ValueError(f"{section}.max_examples must be null or >= 1, got {cfg.max_examples}")


def check_records(cfg: SFTDataConfig) -> None:
    """Parse the files of ``cfg`` now (no tokenizer needed), so a malformed or empty file fails
    before any work starts, naming the file and line (DataError): every record must be valid, and
    each split the stage reads must hold at least one. The shakespeare set is built, not read."""
    try:
        _check_records(cfg)
    except UnicodeDecodeError as e:
        raise DataError(f"sft: a file is not UTF-8 text ({e.reason}, byte {e.object[e.start]:#04x}): "
                        f"{cfg.train}" + (f" or {cfg.validation}" if cfg.validation else "")) from None


def _check_records(cfg: SFTDataConfig) -> None:
    if cfg.train != SHAKESPEARE:
        counts = {"train": 0, "val": 0}
        for _, line, _ in read_records(cfg.train):
            split = "val" if cfg.validation is None and held_out(line.strip(), cfg.val_fraction) else "train"
            counts[split] += 1
        if counts["train"] == 0:
            raise DataError(f"sft.train: {cfg.train} holds no records" + (
                f" outside the validation split (val_fraction={cfg.val_fraction})" if counts["val"] else ""))
        if cfg.validation is None and counts["val"] == 0:
            raise DataError(f"sft.train: none of the {counts['train']} records of {cfg.train} falls in the "
                            f"validation split (val_fraction={cfg.val_fraction}); give sft.validation or "
                            "a larger sft.val_fraction")
    if cfg.validation is not None and not any(True for _ in read_records(cfg.validation)):
        raise DataError(f"sft.validation: {cfg.validation} holds no records")


# --- template -----------------------------------------------------------------------------------


def chat_ids(tokenizer: Tokenizer) -> tuple[dict[str, int], int]:
    """``({role: its piece id}, id of the end piece)`` of the chat template in ``tokenizer``."""
    return {role: tokenizer.piece_id(p) for role, p in ROLE_PIECES.items()}, tokenizer.piece_id(END_PIECE)


def encode_conversations(tokenizer: Tokenizer, conversations: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids and target flags (True: trained) of whole conversations, per the module's template
    (a tokenizer with its own chat template: per that template, ``data.chat_template``)."""
    if chat_template.uses_template(tokenizer):
        return [chat_template.encode_conversation(tokenizer, conv) for conv in conversations]
    role_ids, end_id = chat_ids(tokenizer)
    contents = tokenizer.encode_many([m["content"] for conv in conversations for m in conv])
    out, k = [], 0
    for conv in conversations:
        ids: list[int] = []
        trained: list[bool] = []
        for m in conv:
            body = contents[k]
            k += 1
            target = m["role"] == "assistant"
            ids += [role_ids[m["role"]], *body, end_id]
            trained += [False] + [target] * (len(body) + 1)
        ids.append(tokenizer.eos_id)
        trained.append(False)
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool)))
    return out


def encode_prompt(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """Ids that ask the model for the next assistant turn: the template of ``messages`` followed by
    ``<|assistant|>`` (no EOS). What ``generate.chat`` feeds the model. A tokenizer with its own
    chat template: that template with its generation prompt."""
    for m in messages:
        if m.get("role") not in ROLES:
            raise ValueError(f"message role must be one of {list(ROLES)}, got {m.get('role')!r}")
    if chat_template.uses_template(tokenizer):
        return chat_template.encode_prompt(tokenizer, messages)
    role_ids, end_id = chat_ids(tokenizer)
    contents = tokenizer.encode_many([m["content"] for m in messages])
    ids: list[int] = []
    for m, body in zip(messages, contents):
        if m.get("role") not in ROLES:
            raise ValueError(f"message role must be one of {list(ROLES)}, got {m.get('role')!r}")
        ids += [role_ids[m["role"]], *body, end_id]
    return ids + [role_ids["assistant"]]


# --- datasets and batches -----------------------------------------------------------------------


class SFTData:
    """Tokenized conversations (the SFT counterpart of a TokenShard)."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], pad_id: int, path: str = "<memory>"):
        if not examples:
            raise DataError(f"{path}: no SFT records")
        self.examples = examples
        self.pad_id = pad_id
        self.path = path

    def __len__(self) -> int:
        return len(self.examples)

    @classmethod
    def from_conversations(cls, conversations: list[list[dict]], tokenizer: Tokenizer, path: str = "<memory>"):
        return cls(encode_conversations(tokenizer, conversations), tokenizer.pad_id, path)

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer: Tokenizer, max_examples: Optional[int] = None,
                   split: Optional[str] = None, val_fraction: float = 0.05) -> "SFTData":
        """Read and tokenize a jsonl file. ``split`` "train"/"val" keeps the records on that side
        of the hash split (see ``held_out``); None keeps all."""
        conversations = []
        for _, line, messages in read_records(path):
            if split is not None and held_out(line.strip(), val_fraction) != (split == "val"):
                continue
            conversations.append(messages)
            if max_examples is not None and len(conversations) >= max_examples:
                break
        if not conversations:
            raise DataError(f"{path}: no SFT records" + (f" in the {split} split" if split else ""))
        return cls.from_conversations(conversations, tokenizer, str(path))


def prepare_sft(cfg: SFTDataConfig, tokenizer: Tokenizer) -> tuple[SFTData, SFTData]:
    """Training and validation SFTData of a config (building the shakespeare set if asked)."""
    validate_config(cfg)
    train, val = cfg.train, cfg.validation
    if train == SHAKESPEARE:
        out_dir = Path(cfg.cache_dir).expanduser() / "sft" / shakespeare_key(cfg.max_examples, cfg.seed, cfg.tasks)
        train, shakespeare_val = build_shakespeare_sft(out_dir, cfg.max_examples, cfg.seed, tuple(cfg.tasks))
        val = val or shakespeare_val
    if val is None:
        return (SFTData.from_jsonl(train, tokenizer, cfg.max_examples, "train", cfg.val_fraction),
                SFTData.from_jsonl(train, tokenizer, None, "val", cfg.val_fraction))
    return SFTData.from_jsonl(train, tokenizer, cfg.max_examples), SFTData.from_jsonl(val, tokenizer)


def _fit(data: SFTData, seq_len: int) -> tuple[np.ndarray, int]:
    """Indices of the examples that keep a target within ``seq_len + 1`` tokens; number cut."""
    kept, cut = [], 0
    for i, (ids, trained) in enumerate(data.examples):
        cut += len(ids) > seq_len + 1
        if trained[1:seq_len + 1].any():
            kept.append(i)
    dropped = len(data) - len(kept)
    if cut:
        logger.warning("%s: %d of %d conversations are longer than seq_len+1=%d tokens and were cut; "
                       "%d of them kept no response token and were dropped",
                       data.path, cut, len(data), seq_len + 1, dropped)
    if not kept:
        raise DataError(f"{data.path}: no conversation has a response token within seq_len={seq_len}")
    return np.asarray(kept, dtype=np.int64), cut


def _batch(data: SFTData, seq_len: int, indices: Iterable[int], trim: bool = False) -> dict[str, torch.Tensor]:
    """Rows of ``seq_len`` tokens, right-padded; with ``trim``, only as wide as the longest row
    (a causal model's outputs at a row's tokens do not depend on the padding after them)."""
    indices = list(indices)
    rows = [(ids[:seq_len + 1], trained[:seq_len + 1]) for ids, trained in (data.examples[i] for i in indices)]
    width = max(len(ids) - 1 for ids, _ in rows) if trim and rows else seq_len
    inputs = np.full((len(indices), width), data.pad_id, dtype=np.int64)
    labels = np.full((len(indices), width), -100, dtype=np.int64)
    for row, (ids, trained) in enumerate(rows):
        n = len(ids) - 1
        inputs[row, :n] = ids[:-1]
        labels[row, :n] = np.where(trained[1:], ids[1:], -100)
    return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}


class SFTLoader(ShuffledLoader):
    """Deterministic, resumable SFT batches for one data-parallel rank (PackedLoader's interface):
    items are the conversations that keep a target within seq_len."""

    count_key = "num_examples"
    label = "SFT data"

    def __init__(self, data: SFTData, seq_len: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.data = data
        self.kept, self.truncated = _fit(data, seq_len)
        super().__init__(len(self.kept), seq_len, micro_batch_size, rank, world_size, seed, index_map=self.kept)

    @property
    def num_examples(self) -> int:
        return self.num_items

    def make_batch(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        return _batch(self.data, self.seq_len, ids)


def sft_validation_batches(data: SFTData, seq_len: int, micro_batch_size: int, num_sequences: int,
                           rank: int = 0, world_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """The fixed validation set: the first ``num_sequences`` usable examples, unshuffled, dealt
    round-robin to ranks, the count rounded down to a multiple of the world size (as
    ``validation_batches``: every rank runs the same number of forwards); each batch only as wide
    as its longest example, so scoring many short conversations costs what their tokens do."""
    if micro_batch_size < 1 or num_sequences < 1:
        raise ValueError(f"micro_batch_size and num_sequences must be >= 1, got {micro_batch_size}, {num_sequences}")
    check_rank(rank, world_size)
    kept, _ = _fit(data, seq_len)
    count = min(num_sequences, len(kept))
    count -= count % world_size
    if count == 0:
        raise DataError(f"{data.path}: fewer usable SFT examples ({len(kept)}) than ranks ({world_size})")
    mine = kept[np.arange(rank, count, world_size)]
    return [_batch(data, seq_len, mine[i:i + micro_batch_size], trim=True) for i in range(0, len(mine), micro_batch_size)]


def spread(items: list, count: int) -> list:
    """``count`` of ``items`` spread evenly over them, first and last included (all when no more)."""
    if len(items) <= count:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count).round()]


# --- the instruction set derived from the embedded corpus ---------------------------------------

SHAKESPEARE_VAL_FRACTION = 0.05
"""Share of scenes whose speeches go to the validation file (by a hash of play, act and scene)."""
_MIN_WORDS_WHO = 5  # "who says" lines shorter than this are too often spoken by several people


def shakespeare_key(max_examples: Optional[int], seed: int, tasks=SHAKESPEARE_TASKS) -> str:
    params = {"version": SHAKESPEARE_SET_VERSION, "max_examples": max_examples, "seed": seed,
              "val_fraction": SHAKESPEARE_VAL_FRACTION, "corpus": _corpus_version()}
    if not _all_tasks(tasks):  # the full set keeps the key it always had
        params["tasks"] = sorted(tasks)
    return "shakespeare-" + hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _corpus_version() -> str:
    return f"{package_version()}/{CLEANING_VERSION}"


def shakespeare_records(speeches: Iterable, seed: int = 0) -> Iterator[dict]:
    """Instruction records from speeches: per speech, "continue" (one line of it -> the next line)
    when it has two lines or more, and "who" (one line of five words or more -> its speaker)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    for s in speeches:
        where = {"play": s.play, "act": s.act, "scene": s.scene, "speaker": s.speaker}
        if len(s.lines) >= 2:
            i = int(rng.integers(len(s.lines) - 1))
            yield {"task": "continue", **where,
                   "prompt": f"Continue this speech by {s.speaker} in {s.play}:\n{s.lines[i]}",
                   "response": s.lines[i + 1]}
        long_lines = [line for line in s.lines if len(line.split()) >= _MIN_WORDS_WHO]
        if long_lines:
            line = long_lines[int(rng.integers(len(long_lines)))]
            yield {"task": "who", **where, "prompt": f"Who says this line in {s.play}?\n{line}",
                   "response": s.speaker}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_shakespeare_sft(out_dir: str | Path, max_examples: Optional[int] = None, seed: int = 0,
                          tasks=SHAKESPEARE_TASKS) -> tuple[str, str]:
    """Write ``train.jsonl`` and ``val.jsonl`` of the instruction set derived from the embedded
    corpus into ``out_dir``; returns their paths. Validation holds whole scenes out (a hash of play,
    act and scene below SHAKESPEARE_VAL_FRACTION). Only records of ``tasks`` are kept. With
    ``max_examples``, train keeps a random ``max_examples`` records and validation
    ``max(8, max_examples // 10)``, drawn with ``seed``.

    Cached: if ``out_dir`` already holds the files of the same parameters, nothing is done. Files
    appear atomically (params.json last), so concurrent callers are safe.
    """
    out = Path(out_dir)
    train_path, val_path, params_path = out / "train.jsonl", out / "val.jsonl", out / "params.json"
    params = {"key": shakespeare_key(max_examples, seed, tasks), "max_examples": max_examples, "seed": seed}
    if params_path.is_file() and train_path.is_file() and val_path.is_file():
        if json.loads(params_path.read_text()) == params:
            return str(train_path), str(val_path)
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for record in shakespeare_records(iter_speeches(), seed):
        if record["task"] not in tasks:
            continue
        scene = json.dumps([record["play"], record["act"], record["scene"]])
        splits["val" if held_out(scene, SHAKESPEARE_VAL_FRACTION) else "train"].append(record)
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    caps = {"train": max_examples, "val": None if max_examples is None else max(8, max_examples // 10)}
    out.mkdir(parents=True, exist_ok=True)
    for name, path in (("train", train_path), ("val", val_path)):
        records = splits[name]
        if caps[name] is not None and len(records) > caps[name]:
            chosen = np.sort(rng.choice(len(records), caps[name], replace=False))
            records = [records[i] for i in chosen]
        _write_jsonl(path, records)
    tmp = params_path.with_name(f".params.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp, params_path)
    return str(train_path), str(val_path)
