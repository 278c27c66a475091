"""A model whose method has no dense Llama form (CoLA) exported in this project's own format: its
own tensors as safetensors, ``lowrank_pt_model.json`` (the model config, the method and its
options, what loads it) and the tokenizer. transformers cannot load it; ``export.load_model`` and
``lowrank-pt generate`` can."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import torch

from lowrank_pt.checkpoint.files import DTYPES, write_shards, write_tokenizer
from lowrank_pt.checkpoint.hf_import import WEIGHTS
from lowrank_pt.model.llama import ModelConfig, resolve

OWN_FORMAT = "lowrank_pt_model.json"
"""The file that marks an export in lowrank_pt's own format: the model config, the method and its
options, what loads it."""


def is_own_format_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / OWN_FORMAT).is_file()


def save_own_format(state: dict[str, torch.Tensor], cfg: ModelConfig, method: str, options: dict,
                    out_dir: str | os.PathLike, tokenizer_path: Optional[str], dtype: str, extra: dict,
                    max_shard_bytes: int) -> str:
    """Write a model whose method has no dense Llama form (CoLA): its own tensors as safetensors,
    ``lowrank_pt_model.json`` and the tokenizer. transformers cannot load it; ``load_model`` (and
    ``lowrank-pt generate``) can."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed {list(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # an earlier Hugging Face export's: not this model's
    write_shards({k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}, out, max_shard_bytes)
    info = {"format": "lowrank_pt", "method": method, "method_options": options, "model": asdict(cfg),
            "dtype": dtype, "loads_with": f"lowrank-pt generate {out} --prompt ..., or in Python "
                                           f"lowrank_pt.checkpoint.export.load_model('{out}')",
            "why": f"method {method} trains a model with no dense Llama form (e.g. CoLA's B·silu(A·x) linears), "
                   "so transformers' LlamaForCausalLM cannot represent it", **extra}
    (out / OWN_FORMAT).write_text(json.dumps(info, indent=2) + "\n")
    if tokenizer_path is not None:
        write_tokenizer(tokenizer_path, out, cfg.seq_len)
    return str(out)


def load_own_format(directory: str | os.PathLike) -> tuple[torch.nn.Module, str]:
    """(the model of an own-format export, its tokenizer's path)."""
    from safetensors.torch import load_file

    from lowrank_pt import methods

    d = Path(directory)
    info = json.loads((d / OWN_FORMAT).read_text())
    cfg = resolve(ModelConfig(**{f.name: info["model"][f.name] for f in fields(ModelConfig) if f.name in info["model"]}))
    options = methods.parse_options(info["method"], info["method_options"])
    model = methods.METHODS[info["method"]].plain_model(cfg, options)
    files = sorted(d.glob("model-*-of-*.safetensors")) or [d / WEIGHTS]
    state = {k: v.float() for f in files for k, v in load_file(str(f)).items()}
    model.load_state_dict(state)
    return model, str(d / "tokenizer.model") if (d / "tokenizer.model").is_file() else str(d)


