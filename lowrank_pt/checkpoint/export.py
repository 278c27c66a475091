"""Export to, and import from, the Hugging Face Llama layout.

``export_hf(run_dir_or_checkpoint, out_dir)`` writes a directory that
``transformers.AutoModelForCausalLM`` and ``AutoTokenizer`` load offline:

    config.json         LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases): our shape,
                        rms_norm_eps, rope_theta and scaling, num_key_value_heads, head_dim,
                        max_position_embeddings = seq_len,
                        tie_word_embeddings, bos/eos/pad ids; plus a "lowrank_pt" entry (our
                        ModelConfig and where the weights came from) that transformers ignores
    model.safetensors   model.embed_tokens.weight, model.layers.N.*, model.norm.weight,
                        lm_head.weight (absent when tied); float32 unless asked otherwise
    tokenizer.model     our sentencepiece model, as trained
    tokenizer_config.json  LlamaTokenizer with add_prefix_space=false (our models add no dummy
                        prefix: without it transformers would insert a leading space), no BOS/EOS
                        added on encode, and a chat_template equal to lowrank_pt.data.sft's template
    tokenizer.json      the same tokenizer converted by transformers (written when transformers is
                        importable), so loading needs neither sentencepiece nor a conversion

Our module names are Hugging Face's (see model.py), so the mapping is the ``model.`` prefix; the
RoPE (rotate-half, ``cat(freqs, freqs)``), RMSNorm (fp32 normalisation, weight applied after the
cast back) and SwiGLU match ``LlamaForCausalLM`` exactly, and logits agree to float rounding.

The weights are ``checkpoint.load_plain_weights``: any ZeRO stage and rank count, the saving stage's
low-rank adapters merged. ``import_hf`` reads such a directory, or an open model of the Llama,
Mistral or Qwen2 families (``hf_import``), back into our ModelConfig and state dict; a run's
``stages.N.init_from`` streams it (``init_weights_streamed``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Iterator, Optional

import torch
import yaml
from omegaconf import OmegaConf

from lowrank_pt.checkpoint import store as checkpoint
from lowrank_pt.checkpoint.files import DTYPES, write_shards, write_tokenizer
from lowrank_pt.checkpoint.hf_import import (FAMILIES, WEIGHTS, config_from_hf, is_hf_dir, read_config, stored_shapes,
                                             stream_weights)
from lowrank_pt.checkpoint.own_format import OWN_FORMAT, is_own_format_dir, load_own_format, save_own_format
from lowrank_pt.data import load_tokenizer
from lowrank_pt.data.hf_tokenizer import is_hf_tokenizer
from lowrank_pt.data.config import DataConfig
from lowrank_pt.data.prepare import tokenizer_for
from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve

logger = logging.getLogger(__name__)




# --- finding what a checkpoint was made with ----------------------------------------------------


def checkpoint_config(ckpt: str) -> ModelConfig:
    """The resolved ModelConfig a checkpoint recorded (one saved before a field existed takes
    that field's default: no GQA, no biases)."""
    saved = checkpoint.read_meta(ckpt)["model"]
    return resolve(ModelConfig(**{f.name: saved[f.name] for f in fields(ModelConfig) if f.name in saved}))


def find_tokenizer(ckpt: str) -> str:
    """The tokenizer a checkpoint was trained with: ``meta.json``'s "tokenizer" when the trainer
    recorded it and the file is still there, else the run's data section (RUN_DIR/config.yaml)
    through the data cache, whose tokenizer is reused (never retrained when present)."""
    recorded = checkpoint.read_meta(ckpt).get("tokenizer")
    if recorded and Path(recorded).is_file():
        return recorded
    run_dir = Path(ckpt).resolve().parent.parent  # RUN_DIR/checkpoints/step_N
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"no run config at {config_path} to find the tokenizer from; pass a tokenizer path")
    data = run_data_config(config_path)
    if data.tokenizer is None and not (Path(data.cache_dir).expanduser() / "tokenizers").is_dir():
        # A relative cache_dir is relative to where the run was started: do not train a new one here.
        raise FileNotFoundError(f"the run's data cache {data.cache_dir!r} (data.cache_dir in {config_path}) is not "
                                f"found from {os.getcwd()}; run from the run's working directory or pass a "
                                "tokenizer path")
    return tokenizer_for(data)


def run_data_config(config_path: str | os.PathLike):
    """The data section of a run's resolved config.yaml (the schema's DataConfig), read alone."""
    raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    data = raw.get("data") if isinstance(raw, dict) else None
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), data or {}))


def init_source_config(path: str, seq_len: int | None = None) -> ModelConfig:
    """The ModelConfig of the weights a ``stages.N.init_from`` path names, read without loading
    them: an exported Hugging Face dir's config.json, or the meta.json of a checkpoint (a run
    dir's newest), which must verify. ValueError / OSError say what is wrong."""
    if is_hf_dir(path):
        return hf_source_config(path, seq_len)
    ckpt = checkpoint.resolve(path)
    problem = checkpoint.verify(ckpt)
    if problem:
        raise ValueError(f"checkpoint {ckpt} is damaged: {problem}; name another checkpoint dir")
    return checkpoint_config(ckpt)


# --- export ------------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int, dtype: str = "float32",
              extra: Optional[dict] = None) -> dict:
    """config.json of a resolved ModelConfig: LlamaForCausalLM, or Qwen2ForCausalLM where the
    model has q/k/v biases (Llama's attention_bias would bias o_proj too)."""
    family = "qwen2" if cfg.attention_bias else "llama"
    rope = {"rope_type": cfg.rope_scaling or "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    if cfg.rope_scaling in ("llama3", "dynamic"):
        rope["original_max_position_embeddings"] = cfg.rope_original_max_positions
    return {
        "architectures": [FAMILIES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        # dynamic NTK scaling raises the base against it: the original context, not ours
        "max_position_embeddings": cfg.rope_original_max_positions if cfg.rope_scaling == "dynamic" else cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": rope,  # transformers 5
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_scaling else None,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
        "lowrank_pt": {"model": asdict(cfg), **(extra or {})},
    }


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """Our plain state dict under Hugging Face names (contiguous copies, ``dtype``)."""
    expected = _expected_shapes(cfg)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the plain model: missing {missing[:5]}, unexpected {unexpected[:5]}"
                         " (adapters must be merged first: checkpoint.load_plain_weights)")
    out = {}
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, the config says {expected[name]}")
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: transformers re-ties it to model.embed_tokens.weight
        hf_name = name if name == "lm_head.weight" else f"model.{name}"
        out[hf_name] = tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
    return out


def save_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike,
            tokenizer_path: Optional[str] = None, dtype: str = "float32", extra: Optional[dict] = None,
            max_shard_bytes: int = 5 * 10**9) -> str:
    """Write a plain state dict of our model as a Hugging Face Llama directory; returns its path.
    Weights beyond ``max_shard_bytes`` go to shards ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``, as transformers writes them."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed {list(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(state, cfg, dtype)
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer {tokenizer_path} has {tok.vocab_size} pieces, the model only {cfg.vocab_size}")
        ids = (tok.bos_id, tok.eos_id, tok.pad_id)
    else:
        ids = (1, 2, 3)  # the fixed ids of our trained tokenizers (lowrank_pt.data.tokenizer)
    write_shards(tensors, out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, *ids, dtype, extra), indent=2) + "\n")
    if tokenizer_path is not None:
        write_tokenizer(tokenizer_path, out, cfg.seq_len)
    return str(out)


def plain_checkpoint(path: str) -> tuple[str, ModelConfig, dict[str, torch.Tensor]]:
    """``(checkpoint dir, its ModelConfig, its plain weights)`` for a run dir or checkpoint dir:
    ``checkpoint.load_plain_weights`` (any ZeRO stage and rank count, adapters merged), checked
    against the plain model of its method (the dense Llama, or a method's own architecture)."""
    ckpt = checkpoint.resolve(path)
    cfg = checkpoint_config(ckpt)
    state = checkpoint.load_plain_weights(ckpt)
    leftover = sorted(set(state) - set(_expected_shapes(cfg, *saved_method(ckpt))))
    if leftover:
        method = checkpoint.read_meta(ckpt).get("method")
        raise ValueError(f"{ckpt}: the weights of method {method!r} still hold adapter tensors after "
                         f"checkpoint.load_plain_weights ({leftover[:3]} ...): its Method.to_plain must merge them")
    return ckpt, cfg, state


def saved_method(ckpt: str) -> tuple[type, object]:
    """(the Method class, its parsed options) that trained a checkpoint."""
    from lowrank_pt import methods  # imports DeepSpeed: only commands that read weights pay

    meta = checkpoint.read_meta(ckpt)
    name = meta.get("method", "full")
    return methods.METHODS[name], methods.parse_options(name, meta.get("method_options", {}))


def export_hf(checkpoint_path_or_run_dir: str, out_dir: str, tokenizer_path: Optional[str] = None,
              dtype: Optional[str] = None, max_shard_bytes: int = 5 * 10**9) -> str:
    """Consolidate a checkpoint (a run dir's newest, or one checkpoint dir; any ZeRO stage and rank
    count) into a Hugging Face Llama directory, adapters merged; returns ``out_dir``.

    ``tokenizer_path`` defaults to the run's own tokenizer (see find_tokenizer).
    """
    ckpt, cfg, state = plain_checkpoint(checkpoint_path_or_run_dir)
    meta = checkpoint.read_meta(ckpt)
    dtype = dtype or ("bfloat16" if meta.get("precision") == "bf16" else "float32")
    tokenizer_path = tokenizer_path or find_tokenizer(ckpt)
    extra = {"source": os.path.abspath(ckpt), "method": meta.get("method"),
             "stage": meta.get("stage_name"), "global_step": meta.get("global_step")}
    method, _ = saved_method(ckpt)
    if not method.has_dense_form:
        logger.warning("method %s has no dense Llama form: writing lowrank_pt's own format to %s (see %s)",
                       method.name, out_dir, OWN_FORMAT)
        return save_own_format(state, cfg, method.name, meta.get("method_options", {}), out_dir, tokenizer_path,
                               dtype, extra, max_shard_bytes)
    return save_hf(state, cfg, out_dir, tokenizer_path, dtype, extra, max_shard_bytes)


def parse_size(text: str) -> int:
    """Bytes of a size written as 500MB, 5GB, 2GiB or a plain number."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise ValueError(f"--max-shard-size {text!r}: give a size such as 500MB or 5GB")


# --- import ------------------------------------------------------------------------------------


def _expected_shapes(cfg: ModelConfig, method=None, options=None) -> dict[str, tuple]:
    """Names and shapes of the plain model's state dict (``method``'s own where it has no dense form)."""
    with torch.device("meta"):
        model = LlamaModel(cfg) if method is None else method.plain_model(cfg, options)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def hf_source_config(directory: str | os.PathLike, seq_len: int | None = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face directory (``hf_import.config_from_hf``), its tensors'
    names and shapes checked against it from the file headers (no tensor is read)."""
    directory = Path(directory)
    if not is_hf_dir(directory):
        raise FileNotFoundError(f"{directory} is not a Hugging Face model dir (config.json + {WEIGHTS})")
    cfg = config_from_hf(read_config(directory), str(directory / "config.json"), seq_len)
    expected, stored = _expected_shapes(cfg), stored_shapes(directory)
    if cfg.tie_embeddings:
        stored.setdefault("lm_head.weight", stored.get("embed_tokens.weight"))
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not fit the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, shape in stored.items():
        if shape != expected[name]:
            raise ValueError(f"{directory}: {name} has shape {shape}, the config says {expected[name]}")
    return cfg


def import_hf(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our ModelConfig and plain state dict from a Hugging Face directory (Llama, Mistral, Qwen2
    families: ``hf_import``), whole, for export round trips and ``generate``. Tensors keep the
    stored dtype (an exact round trip); ``LlamaModel.load_state_dict`` casts into its params. A
    run's ``init_from`` streams them instead (``hf_import.stream_weights``)."""
    cfg = hf_source_config(directory)
    return cfg, dict(stream_weights(directory, cfg.tie_embeddings))


def load_init_weights(path: str) -> dict[str, torch.Tensor]:
    """Plain weights for ``stages.N.init_from``: an exported Hugging Face dir, or a run dir /
    checkpoint dir (adapters merged)."""
    if is_hf_dir(path):
        return {k: v.float() for k, v in import_hf(path)[1].items()}
    return plain_checkpoint(path)[2]


def init_weights_streamed(path: str) -> Iterator[tuple[str, torch.Tensor]] | None:
    """``stages.N.init_from``'s weights one tensor at a time, for a Hugging Face dir (every rank
    reads the files itself; a ZeRO-3 rank keeps its partition of each); None for a run's checkpoint,
    which ``load_init_weights`` reads whole."""
    if not is_hf_dir(path):
        return None
    return ((name, t.float()) for name, t in stream_weights(path))


# --- command line ------------------------------------------------------------------------------


def load_model(source: str, tokenizer_path: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a run dir, a checkpoint dir (adapters merged) or an exported
    Hugging Face dir or an export in lowrank_pt's own format; the model in eval mode on the CPU."""
    if is_own_format_dir(source):
        model, own_tokenizer = load_own_format(source)
        return model.to(dtype).eval(), load_tokenizer(tokenizer_path or own_tokenizer)
    if is_hf_dir(source):
        cfg, state = import_hf(source)
        # Our exports ship the sentencepiece model (the original) beside a converted tokenizer.json;
        # an open model's tokenizer.json (with its chat template) is the one to use
        ours = "lowrank_pt" in read_config(source)
        spm_model = Path(source) / "tokenizer.model"
        tokenizer_path = tokenizer_path or (source if is_hf_tokenizer(source) and not (ours and spm_model.is_file())
                                            else str(spm_model))
    else:
        ckpt, cfg, state = plain_checkpoint(source)
        tokenizer_path = tokenizer_path or find_tokenizer(ckpt)
        method, options = saved_method(ckpt)
        model = method.plain_model(resolve(cfg), options)
        model.load_state_dict(state)
        return model.to(dtype).eval(), load_tokenizer(tokenizer_path)
    model = LlamaModel(resolve(cfg))
    model.load_state_dict(state)
    return model.to(dtype).eval(), load_tokenizer(tokenizer_path)
