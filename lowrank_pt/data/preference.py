"""Preference pairs for DPO stages: ``{"prompt", "chosen", "rejected"}`` jsonl, chat-templated.

Each pair becomes two rows of the SFT template (``lowrank_pt.data.sft``): the user's ``prompt``
followed by the assistant's ``chosen`` (row 1) or ``rejected`` (row 2) reply with its closing
``<|end|>``; labels mark the reply's tokens only, so a row's summed log-probability over its
labels is the log-likelihood of that reply given the prompt. A micro-batch of ``B`` pairs is
``input_ids``/``labels`` of ``2B`` rows (the chosen ones first) and ``pair_index`` (``B`` indices
into the dataset: where a precomputed reference log-probability is looked up).

``dpo: {train: shakespeare}`` builds a corpus-derived set from the "who says this line" records
of the SFT set (same scenes held out): chosen is the line's speaker, rejected another speaker of
the same play, drawn with the seed. Files are parsed before any work starts (``check_records``):
bad input is a DataError naming the file and line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from lowrank_pt.core.errors import DataError

from . import chat_template
from .loader import ShuffledLoader, check_rank
from .records import held_out, read_jsonl
from .sft import (
    SHAKESPEARE,
    _write_jsonl,
    build_shakespeare_sft,
    chat_ids,
    check_files_and_split,
    shakespeare_key,
    spread,
)
from .tokenizer import Tokenizer

PAIR_KEYS = ("prompt", "chosen", "rejected")
SHAKESPEARE_PREFERENCE_VERSION = 1
"""Bump when build_shakespeare_preferences changes what it writes (part of its cache key)."""


@dataclass
class DPODataConfig:
    train: str = SHAKESPEARE
    """Preference pairs: a .jsonl file of {prompt, chosen, rejected} records, or "shakespeare" for
    the set derived from the embedded corpus (who says this line: the speaker against another
    speaker of the play), built once into cache_dir."""
    validation: Optional[str] = None
    """Held-out .jsonl of the same form. Null: the shakespeare set's held-out scenes, or for a file
    the records whose hash falls below val_fraction."""
    val_fraction: float = 0.05
    """Share of a train file's records held out for validation when validation is null."""
    max_examples: Optional[int] = None
    """Use at most this many training pairs (the shakespeare set: built from the SFT set of the
    same max_examples and seed, so its held-out questions are the SFT stage's)."""
    seed: int = 0
    """Seed of the shakespeare set's choices (which line, which wrong speaker)."""
    beta: float = 0.1
    """DPO's β: the loss is -log σ(β·((π_c - ref_c) - (π_r - ref_r))) over summed reply log-probs;
    a larger β keeps the policy closer to the reference."""
    cache_dir: str = ".cache/lowrank_pt"
    """Where the shakespeare set is written (under dpo/), keyed by its parameters."""


def validate_config(cfg: DPODataConfig) -> None:
    """Cheap checks before any work (DataError / ValueError)."""
    check_files_and_split(cfg, "dpo")
    if not (cfg.beta > 0 and np.isfinite(cfg.beta)):
        raise ValueError(f"dpo.beta must be a finite number > 0, got {cfg.beta}")


def read_pairs(path: str | Path) -> Iterator[tuple[int, str, dict]]:
    """``(line number, raw line, {prompt, chosen, rejected})`` of every record; blank lines skipped."""
    for number, line, record, where in read_jsonl(path, "preference file"):
        if not isinstance(record, dict) or any(k not in record for k in PAIR_KEYS):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: a preference record needs {list(PAIR_KEYS)} (found {found})")
        for key in PAIR_KEYS:
            if not isinstance(record[key], str) or (key != "prompt" and not record[key].strip()):
                raise DataError(f"{where}: '{key}' must be " + ("text" if key == "prompt" else "non-empty text"))
        if record["chosen"] == record["rejected"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are the same text: no preference to learn")
        yield number, line, {k: record[k] for k in PAIR_KEYS}


def _split_pairs(path: str, split: Optional[str], val_fraction: float, limit: Optional[int] = None) -> list[dict]:
    pairs = []
    for _, line, pair in read_pairs(path):
        if split is not None and held_out(line.strip(), val_fraction) != (split == "val"):
            continue
        pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def check_records(cfg: DPODataConfig) -> None:
    """Parse the files of ``cfg`` now, before any work (DataError naming file and line); each
    split the stage reads must hold a pair. The shakespeare set is built, not read."""
    try:
        if cfg.train != SHAKESPEARE:
            split = "train" if cfg.validation is None else None
            if not _split_pairs(cfg.train, split, cfg.val_fraction):
                raise DataError(f"dpo.train: {cfg.train} holds no preference pairs"
                                + (f" outside the validation split (val_fraction={cfg.val_fraction})" if split else ""))
            if cfg.validation is None and not _split_pairs(cfg.train, "val", cfg.val_fraction):
                raise DataError(f"dpo.train: no pair of {cfg.train} falls in the validation split "
                                f"(val_fraction={cfg.val_fraction}); give dpo.validation or a larger dpo.val_fraction")
        if cfg.validation is not None and not _split_pairs(cfg.validation, None, cfg.val_fraction):
            raise DataError(f"dpo.validation: {cfg.validation} holds no preference pairs")
    except UnicodeDecodeError as e:
        raise DataError(f"dpo: a file is not UTF-8 text ({e.reason}): {cfg.train}"
                        + (f" or {cfg.validation}" if cfg.validation else "")) from None


# --- tokenized pairs and batches ----------------------------------------------------------------


class PreferenceData:
    """Tokenized pairs: per pair the prompt's template ids and the two replies' ids (+ <|end|>)."""

    def __init__(self, pairs: list[dict], tokenizer: Tokenizer, path: str = "<memory>"):
        if not pairs:
            raise DataError(f"{path}: no preference pairs")
        self.pad_id = tokenizer.pad_id
        self.path = path
        self.pairs = pairs
        if chat_template.uses_template(tokenizer):  # the tokenizer's own template around each turn
            self.prompts, self.chosen, self.rejected = [], [], []
            for p in pairs:
                asked = [{"role": "user", "content": p["prompt"]}]
                self.prompts.append(chat_template.encode_prompt(tokenizer, asked))
                self.chosen.append(chat_template.encode_reply(tokenizer, asked, p["chosen"]))
                self.rejected.append(chat_template.encode_reply(tokenizer, asked, p["rejected"]))
            return
        role_ids, end_id = chat_ids(tokenizer)
        texts = [t for p in pairs for t in (p["prompt"], p["chosen"], p["rejected"])]
        ids = tokenizer.encode_many(texts)
        self.prompts, self.chosen, self.rejected = [], [], []
        for k in range(len(pairs)):
            prompt, chosen, rejected = ids[3 * k:3 * k + 3]
            self.prompts.append([role_ids["user"], *prompt, end_id, role_ids["assistant"]])
            self.chosen.append([*chosen, end_id])
            self.rejected.append([*rejected, end_id])

    def __len__(self) -> int:
        return len(self.prompts)

    def fits(self, seq_len: int) -> np.ndarray:
        """Indices of the pairs whose both rows fit ``seq_len + 1`` tokens whole (a cut reply would
        compare two truncated log-likelihoods)."""
        n = [len(p) + max(len(c), len(r)) for p, c, r in zip(self.prompts, self.chosen, self.rejected)]
        kept = np.asarray([i for i, length in enumerate(n) if length <= seq_len + 1], dtype=np.int64)
        if len(kept) == 0:
            raise DataError(f"{self.path}: no preference pair fits seq_len={seq_len}")
        return kept


def preference_batch(data: PreferenceData, seq_len: int, indices) -> dict[str, torch.Tensor]:
    """Rows ``[chosen of each pair..., rejected of each pair...]``, next-token shifted as in
    pre-training, labels on the reply (and its ``<|end|>``) only; ``pair_index`` the pairs."""
    indices = [int(i) for i in indices]
    rows = [(data.prompts[i], data.chosen[i]) for i in indices] + [(data.prompts[i], data.rejected[i]) for i in indices]
    inputs = np.full((len(rows), seq_len), data.pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_len), -100, dtype=np.int64)
    for row, (prompt, reply) in enumerate(rows):
        ids = np.asarray(prompt + reply, dtype=np.int64)
        n = len(ids) - 1
        inputs[row, :n] = ids[:-1]
        labels[row, len(prompt) - 1:n] = ids[len(prompt):]
    return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
            "pair_index": torch.as_tensor(indices, dtype=torch.long)}


class PreferenceLoader(ShuffledLoader):
    """Deterministic, resumable pair batches for one rank (PackedLoader's interface and order
    rule): ``micro_batch_size`` pairs per batch, i.e. twice as many rows."""

    count_key = "num_pairs"
    label = "preference data"

    def __init__(self, data: PreferenceData, seq_len: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.data = data
        self.kept = data.fits(seq_len)
        super().__init__(len(self.kept), seq_len, micro_batch_size, rank, world_size, seed, index_map=self.kept)

    @property
    def num_pairs(self) -> int:
        return self.num_items

    def make_batch(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        return preference_batch(self.data, self.seq_len, ids)


def preference_validation_batches(data: PreferenceData, seq_len: int, micro_batch_size: int, num_pairs: int,
                                  rank: int = 0, world_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """The first ``num_pairs`` pairs that fit, unshuffled, dealt round-robin, the count rounded
    down to a multiple of the world size (every rank runs as many forwards)."""
    check_rank(rank, world_size)
    kept = data.fits(seq_len)
    count = min(num_pairs, len(kept))
    count -= count % world_size
    if count == 0:
        raise DataError(f"{data.path}: fewer preference pairs that fit ({len(kept)}) than ranks ({world_size})")
    mine = kept[np.arange(rank, count, world_size)]
    return [preference_batch(data, seq_len, mine[i:i + micro_batch_size]) for i in range(0, len(mine), micro_batch_size)]


def prepare_preferences(cfg: DPODataConfig, tokenizer: Tokenizer) -> tuple[PreferenceData, PreferenceData]:
    """Training and validation pairs of a config (building the shakespeare set if asked)."""
    validate_config(cfg)
    train, val = cfg.train, cfg.validation
    if train == SHAKESPEARE:
        train, shakespeare_val = build_shakespeare_preferences(cfg.cache_dir, cfg.max_examples, cfg.seed)
        val = val or shakespeare_val
    if val is None:
        return (PreferenceData(_split_pairs(train, "train", cfg.val_fraction, cfg.max_examples), tokenizer, train),
                PreferenceData(_split_pairs(train, "val", cfg.val_fraction), tokenizer, train))
    return (PreferenceData(_split_pairs(train, None, cfg.val_fraction, cfg.max_examples), tokenizer, train),
            PreferenceData(_split_pairs(val, None, cfg.val_fraction), tokenizer, val))


# --- the preference set derived from the embedded corpus -----------------------------------------


def shakespeare_sft_paths(cache_dir: str, max_examples: Optional[int], seed: int) -> tuple[str, str]:
    """The SFT set's train.jsonl and val.jsonl (built if missing: cached)."""
    out = Path(cache_dir).expanduser() / "sft" / shakespeare_key(max_examples, seed)
    return build_shakespeare_sft(out, max_examples, seed)


def build_shakespeare_preferences(cache_dir: str, max_examples: Optional[int] = None, seed: int = 0) -> tuple[str, str]:
    """Write train.jsonl and val.jsonl of pairs built from the SFT set's "who" records: chosen the
    speaker, rejected another speaker of the same play (uniformly, with ``seed``). Returns their
    paths; cached by parameters (params.json written last, atomically)."""
    sft_train, sft_val = shakespeare_sft_paths(cache_dir, max_examples, seed)
    key = shakespeare_key(max_examples, seed).replace("shakespeare-", f"preferences-v{SHAKESPEARE_PREFERENCE_VERSION}-")
    out = Path(cache_dir).expanduser() / "dpo" / key
    paths = out / "train.jsonl", out / "val.jsonl"
    params_path = out / "params.json"
    params = {"key": key, "max_examples": max_examples, "seed": seed}
    if params_path.is_file() and all(p.is_file() for p in paths) and json.loads(params_path.read_text()) == params:
        return str(paths[0]), str(paths[1])
    records = {}
    speakers: dict[str, set] = {}
    for name, path in (("train", sft_train), ("val", sft_val)):
        with open(path, encoding="utf-8") as f:
            records[name] = [r for r in map(json.loads, f) if r.get("task") == "who"]
        for r in records[name]:
            speakers.setdefault(r["play"], set()).add(r["response"])
    rng = np.random.Generator(np.random.PCG64([seed, 2]))
    out.mkdir(parents=True, exist_ok=True)
    for name, path in zip(("train", "val"), paths):
        pairs = []
        for r in records[name]:
            others = sorted(speakers[r["play"]] - {r["response"]})
            if others:
                pairs.append({"play": r["play"], "act": r["act"], "scene": r["scene"], "prompt": r["prompt"],
                              "chosen": r["response"], "rejected": others[int(rng.integers(len(others)))]})
        _write_jsonl(path, pairs)
    tmp = params_path.with_name(f".params.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(params, indent=2) + "\n")
    tmp.replace(params_path)
    return str(paths[0]), str(paths[1])


def speaker_questions(cache_dir: str, max_examples: Optional[int], seed: int, count: int) -> list[tuple[str, str]]:
    """``count`` held-out "who says this line" questions ``(prompt, speaker)`` of the shakespeare
    SFT set of these parameters, spread evenly over its validation records (so over many scenes)."""
    if count < 1:
        return []
    _, val = shakespeare_sft_paths(cache_dir, max_examples, seed)
    with open(val, encoding="utf-8") as f:
        who = [(r["prompt"], r["response"]) for r in map(json.loads, f) if r.get("task") == "who"]
    return spread(who, count)
