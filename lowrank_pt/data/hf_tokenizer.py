"""Tokenizers of open models: a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library) with
its ``tokenizer_config.json`` (special tokens, chat template), behind the interface of our
sentencepiece ``Tokenizer`` (ids of unk/bos/eos/pad, ``encode_many``, ``decode``, ``piece_id``,
``sha256``).

``data.tokenizer`` names the directory (or its ``tokenizer.json``). Text is encoded without the
special tokens a post-processor would add (``add_special_tokens=False``: the data pipeline adds
EOS between documents itself, as with ours), so special tokens written in text (a chat
template's ``<|im_start|>``) are parsed as the single tokens they are. ``sha256`` covers both files:
a template change is a different tokenizer for SFT.

The chat template is rendered as transformers renders it (a sandboxed Jinja environment with
``trim_blocks`` and ``lstrip_blocks``, ``raise_exception``, the special tokens as variables);
``tests/e2e/test_hf_tokenizer.py`` compares encodings and renderings with transformers'.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from lowrank_pt.core.errors import DataError

TOKENIZER_JSON = "tokenizer.json"
CONFIG_JSON = "tokenizer_config.json"


def is_hf_tokenizer(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding ``tokenizer.json``, or that file."""
    p = Path(path)
    return (p / TOKENIZER_JSON).is_file() or (p.name == TOKENIZER_JSON and p.is_file())


def _token_text(value) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict's ``content``."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer:
    """A ``tokenizer.json`` with the ids the trainer and the data pipeline need."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as Backend

        p = Path(path)
        directory = p if p.is_dir() else p.parent
        self.path = str(directory)
        try:
            self._tok = Backend.from_file(str(directory / TOKENIZER_JSON))
        except Exception as err:  # noqa: BLE001 - the library raises its own exception type
            raise DataError(f"{directory / TOKENIZER_JSON} is not a tokenizers file: {err}") from err
        config_path = directory / CONFIG_JSON
        self.config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        digest = hashlib.sha256((directory / TOKENIZER_JSON).read_bytes())
        if config_path.is_file():
            digest.update(config_path.read_bytes())
        self.sha256 = digest.hexdigest()
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.special = {k: _token_text(self.config.get(f"{k}_token")) for k in ("bos", "eos", "pad", "unk")}
        ids = {k: (self._tok.token_to_id(t) if t else None) for k, t in self.special.items()}
        if ids["eos"] is None:
            raise DataError(f"tokenizer {self.path} names no EOS token ({CONFIG_JSON}'s eos_token): documents are "
                            "joined with EOS")
        self.eos_id: int = ids["eos"]
        self.bos_id: int = ids["bos"] if ids["bos"] is not None else -1
        self.unk_id: int = ids["unk"] if ids["unk"] is not None else -1
        self.pad_id: int = ids["pad"] if ids["pad"] is not None else self.eos_id
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    def special_ids(self) -> set[int]:
        """Ids of the added tokens marked special (turn markers, EOS)."""
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def piece_id(self, piece: str) -> int:
        """Id of a token such as ``"<|im_end|>"``; DataError if the vocabulary lacks it."""
        pid = self._tok.token_to_id(piece)
        if pid is None:
            raise DataError(f"tokenizer {self.path} has no token {piece!r}")
        return pid

    def encode_many(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        out = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        for ids in out:
            if bos and self.bos_id >= 0:
                ids.insert(0, self.bos_id)
            if eos:
                ids.append(self.eos_id)
        return out

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.encode_many([text], bos=bos, eos=eos)[0]

    def decode(self, ids: Iterable[int]) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat template applied to ``messages``, as text (transformers' rendering)."""
        if not self.chat_template:
            raise DataError(f"tokenizer {self.path} has no chat_template in {CONFIG_JSON}")
        return _compiled(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    **{f"{k}_token": v for k, v in self.special.items() if v})


_TEMPLATES: dict = {}


def _compiled(source: str):
    if source not in _TEMPLATES:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise DataError(f"the chat template refused the conversation: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
