"""Open models in: a Hugging Face directory of the Llama, Mistral or Qwen2 families as our
ModelConfig and weights (``stages.N.init_from: DIR``, ``model.size: init_from``, ``generate``).

What maps (config.json -> ``ModelConfig``): hidden/intermediate sizes, layers, heads,
``num_key_value_heads`` (grouped-query attention), ``head_dim``, ``rms_norm_eps``, ``rope_theta``
and ``rope_scaling`` of type ``llama3``, ``linear`` or ``dynamic``, ``tie_word_embeddings``, and
the q/k/v biases Qwen2 always has (``attention_bias``). Refused by name before any work: another
architecture, an activation other than SiLU, MLP biases, Llama's ``attention_bias`` (it biases
the output projection too), another RoPE type (YaRN, LongRoPE: their attention scaling is not
built), and a sliding window shorter than the run's sequence (Mistral, Qwen2's
``use_sliding_window``): below it the window never masks anything, so full causal attention is
the same function.

Weights are read one tensor at a time (``safetensors.safe_open``), shard by shard of a sharded
checkpoint (``model.safetensors.index.json``): no whole model is ever held to load one; each
rank reads what it needs itself (a ZeRO-3 rank copies its partition of each tensor and drops it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from lowrank_pt.model.llama import MODEL_SIZES, ModelConfig

WEIGHTS = "model.safetensors"
LOAD_CONTEXT = 4096
"""model.seq_len of an open model loaded whole (``generate``) when its context is longer."""
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""model_type -> the architecture it names."""


def is_hf_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face model directory (config.json and safetensors weights)."""
    p = Path(path)
    return (p / "config.json").is_file() and ((p / WEIGHTS).is_file() or (p / f"{WEIGHTS}.index.json").is_file())


def read_config(directory: str | os.PathLike) -> dict:
    where = Path(directory) / "config.json"
    try:
        return json.loads(where.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is unreadable ({e})") from None


def _rope(hf: dict, where: str) -> dict:
    """Our rope fields from config.json (transformers 4's ``rope_scaling`` + ``rope_theta``, or 5's
    ``rope_parameters``)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    out = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "default":
        return out
    if kind not in ("llama3", "linear", "dynamic"):
        raise ValueError(f"{where}: rope type {kind!r} is not supported (default, llama3, linear, dynamic are)")
    out.update(rope_scaling=kind, rope_factor=float(scaling["factor"]))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(scaling["low_freq_factor"]),
                   rope_high_freq_factor=float(scaling["high_freq_factor"]),
                   rope_original_max_positions=int(scaling["original_max_position_embeddings"]))
    elif kind == "dynamic":  # transformers scales against max_position_embeddings, always
        out["rope_original_max_positions"] = int(hf["max_position_embeddings"])
    return out


def config_from_hf(hf: dict, where: str = "config.json", seq_len: int | None = None) -> ModelConfig:
    """Our ModelConfig for a config.json of the Llama, Mistral or Qwen2 families, trained at
    ``seq_len`` (default: its ``max_position_embeddings``); ValueError for what our model cannot
    represent, naming the key."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{where}: model_type={family!r} is not supported (supported: {', '.join(FAMILIES)}: "
                         f"{', '.join(FAMILIES.values())})")
    try:
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        checks = {"hidden_act": (hf.get("hidden_act", "silu"), "silu"), "mlp_bias": (hf.get("mlp_bias", False), False)}
        if family == "llama":
            checks["attention_bias"] = (hf.get("attention_bias", False), False)  # it biases o_proj too
        for key, (value, ours) in checks.items():
            if value != ours:
                raise ValueError(f"{where}: {key}={value!r} is not supported (our model has {ours!r})")
        saved = (hf.get("lowrank_pt") or {}).get("model", {})
        # A run gives its own; loaded whole (generate, export round trips): ours as recorded, else
        # the model's context, capped: the KV cache and RoPE tables are sized by it.
        length = seq_len or saved.get("seq_len") or min(hf.get("max_position_embeddings", 256), LOAD_CONTEXT)
        window = hf.get("sliding_window") if (family == "mistral" or hf.get("use_sliding_window")) else None
        if window is not None and length > window:
            raise ValueError(f"{where}: sliding_window={window} is shorter than the run's sequence ({length} tokens): "
                             f"sliding-window attention is not built; set model.seq_len <= {window}")
        shape = dict(hidden_size=hidden, intermediate_size=hf["intermediate_size"],
                     num_layers=hf["num_hidden_layers"], num_heads=heads)
        size = saved.get("size") or next((name for name, s in MODEL_SIZES.items() if s == shape), "tiny")
        return ModelConfig(
            size=size, **shape, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads, attention_bias=family == "qwen2",
            vocab_size=hf["vocab_size"], seq_len=length, norm_eps=hf.get("rms_norm_eps", 1e-6),
            init_std=hf.get("initializer_range", 0.02), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            activation_checkpointing=saved.get("activation_checkpointing", False), **_rope(hf, where))
    except KeyError as e:
        raise ValueError(f"{where} lacks {e}") from None


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a Hugging Face directory, shards in order."""
    directory = Path(directory)
    index = directory / f"{WEIGHTS}.index.json"
    if index.is_file():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [directory / WEIGHTS]


def our_name(hf_name: str) -> str | None:
    """Our parameter name for a Hugging Face one; None for what is derived, not learned."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    return hf_name if hf_name == "lm_head.weight" else hf_name.removeprefix("model.")


def stream_weights(directory: str | os.PathLike, tie_embeddings: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(our name, tensor)`` of a Hugging Face directory, one tensor at a time in its stored
    dtype; a tied head comes from the embedding when the file has none."""
    seen_head, embedding = False, None
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = our_name(key)
                if name is None:
                    continue
                tensor = f.get_tensor(key)
                seen_head = seen_head or name == "lm_head.weight"
                if tie_embeddings and name == "embed_tokens.weight":
                    embedding = (path, key)
                yield name, tensor
    if tie_embeddings and not seen_head and embedding is not None:
        with safe_open(str(embedding[0]), framework="pt") as f:
            yield "lm_head.weight", f.get_tensor(embedding[1])


def stored_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Our name -> shape of every tensor a Hugging Face directory holds, from the headers alone."""
    out = {}
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = our_name(key)
                if name is not None:
                    out[name] = tuple(f.get_slice(key).get_shape())
    return out
