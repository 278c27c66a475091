"""Sentencepiece tokenizer: training from documents, and encoding that round-trips text exactly.

Trained models use identity normalization, keep whitespace as written and add no dummy prefix,
so ``decode(encode(text)) == text`` for any text (byte fallback covers unseen characters and the
newline). Text is encoded line by line, the lines joined by the newline byte piece: one huge
string is slow for sentencepiece's BPE, and lines can be batched.

Fixed ids of trained models: unk 0, bos 1, eos 2, pad 3, then the chat pieces that post-training
needs (``CHAT_TOKENS``) as user-defined symbols, so they are never split.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from lowrank_pt.core.errors import DataError

logger = logging.getLogger(__name__)

CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
TOKENIZER_RECIPE_VERSION = 1
"""Bump when the training options below change: part of the cache key of trained tokenizers."""
_NEWLINE_PIECE = "<0x0A>"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Tokenizer:
    """A sentencepiece model with the ids the trainer and the data pipeline need."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if not Path(path).is_file():
            raise DataError(f"tokenizer model not found: {path}")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as err:
            raise DataError(f"{path} is not a sentencepiece model: {err}") from err
        self.sha256 = file_sha256(path)
        self.vocab_size: int = self._sp.get_piece_size()
        self.unk_id: int = self._sp.unk_id()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        if self.eos_id < 0:
            raise DataError(f"tokenizer {path} has no EOS piece: documents are joined with EOS")
        self.pad_id: int = self._sp.pad_id()
        if self.pad_id < 0:
            # e.g. LLaMA's model; packed pre-training never pads, so EOS is a safe stand-in.
            logger.warning("tokenizer %s has no PAD piece; using EOS (%d) as pad_id", path, self.eos_id)
            self.pad_id = self.eos_id
        newline = self._sp.piece_to_id(_NEWLINE_PIECE)
        self._newline_id: int | None = None if newline == self.unk_id else newline

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"

    def piece_id(self, piece: str) -> int:
        """Id of a piece such as ``"<|user|>"``; DataError if the model lacks it."""
        pid = self._sp.piece_to_id(piece)
        if pid == self.unk_id and piece != self._sp.id_to_piece(self.unk_id):
            raise DataError(f"tokenizer {self.path} has no piece {piece!r}")
        return pid

    def encode_many(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Encode several texts with one batched sentencepiece call over all their lines."""
        if self._newline_id is None:  # no newline piece: fall back to whole-text encoding
            ids = self._sp.encode(texts, num_threads=1)
        else:
            per_text = [text.split("\n") for text in texts]
            flat = self._sp.encode([line for lines in per_text for line in lines], num_threads=1)
            ids, start = [], 0
            for lines in per_text:
                out: list[int] = []
                for i, line_ids in enumerate(flat[start:start + len(lines)]):
                    if i:
                        out.append(self._newline_id)
                    out.extend(line_ids)
                start += len(lines)
                ids.append(out)
        for out in ids:
            if bos:
                out.insert(0, self.bos_id)
            if eos:
                out.append(self.eos_id)
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.encode_many([text], bos=bos, eos=eos)[0]

    def decode(self, ids: Iterable[int]) -> str:
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(path: str | Path):
    """The tokenizer at ``path``: our sentencepiece model, or an open model's Hugging Face
    tokenizer (a directory with ``tokenizer.json``, or that file: ``data.hf_tokenizer``)."""
    from lowrank_pt.data.hf_tokenizer import HFTokenizer, is_hf_tokenizer

    return HFTokenizer(path) if is_hf_tokenizer(path) else Tokenizer(path)


def _training_lines(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line
        seen += len(text)
        if max_chars is not None and seen >= max_chars:
            return


def train_tokenizer(
    texts: Iterable[str],
    out_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    max_chars: int | None = None,
) -> str:
    """Train a sentencepiece model on documents; returns the path ``<out_prefix>.model``.

    The model file appears atomically: a crash leaves either no file or a complete one.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    out = Path(f"{out_prefix}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts, max_chars),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            user_defined_symbols=list(CHAT_TOKENS),
            # Exact round trip: no Unicode normalization, whitespace kept, no dummy prefix.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            character_coverage=0.9995,
            split_digits=True,
            max_sentence_length=16384,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:  # e.g. "Vocabulary size too high" for a small corpus
        raise DataError(f"training a {model_type} tokenizer of {vocab_size} pieces failed: {err}") from err
    atomic_write_bytes(out, model.getvalue())
    return str(out)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id of the vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
