"""The files an export writes beside its config: the weights as safetensors (sharded past a size)
and the tokenizer as transformers reads it."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from lowrank_pt.checkpoint.hf_import import WEIGHTS
from lowrank_pt.data.hf_tokenizer import is_hf_tokenizer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The template of lowrank_pt.data.sft in Jinja, for tokenizer.apply_chat_template.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


def write_tokenizer(tokenizer_path: str, out_dir: str | Path, seq_len: int) -> None:
    """tokenizer.model + tokenizer_config.json (+ tokenizer.json when transformers is importable);
    a Hugging Face tokenizer (an open model's) is copied as it is."""
    out = Path(out_dir)
    if is_hf_tokenizer(tokenizer_path):
        source = Path(tokenizer_path) if Path(tokenizer_path).is_dir() else Path(tokenizer_path).parent
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (source / name).is_file() and (source / name).resolve() != (out / name).resolve():
                shutil.copyfile(source / name, out / name)
        return
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))

    def piece(i: int) -> Optional[str]:
        return sp.id_to_piece(i) if i >= 0 else None

    eos = piece(sp.eos_id())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_prefix_space": False,
        "legacy": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": piece(sp.bos_id()),
        "eos_token": eos,
        "unk_token": piece(sp.unk_id()),
        "pad_token": piece(sp.pad_id()) or eos,
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    converted = out / "tokenizer.json"
    converted.unlink(missing_ok=True)  # a stale one would be loaded instead of tokenizer.model
    try:
        from transformers import AutoTokenizer  # optional: only to write tokenizer.json
    except ImportError:  # tokenizer.model alone still loads where sentencepiece is installed
        logger.warning("transformers not importable: tokenizer.json not written")
        return
    auto = AutoTokenizer.from_pretrained(str(out))
    samples = ["To be, or not to be:", "  two spaces\nand a new line 123", "<|user|>Hi<|end|><|assistant|>"]
    if [auto.encode(t) for t in samples] != [sp.encode(t) for t in samples]:
        logger.warning("transformers converts %s differently from sentencepiece; tokenizer.json not written",
                       tokenizer_path)
        return
    auto.backend_tokenizer.save(str(converted))


def write_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    """``tensors`` as one safetensors file, or shards of at most ``max_shard_bytes`` (a larger
    tensor alone in its shard) with an index; each file written under a temporary name and
    renamed, and the files of an earlier export of another layout removed."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = [WEIGHTS] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                for i in range(len(shards))]
    for stale in [*out.glob("model-*-of-*.safetensors"), out / WEIGHTS, out / f"{WEIGHTS}.index.json"]:
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    for name, shard in zip(names, shards):
        tmp = out / f".{name}.tmp-{os.getpid()}"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        (out / f"{WEIGHTS}.index.json").write_text(json.dumps(index, indent=2) + "\n")


