"""Export to, and import from, the Hugging Face Llama layout.

``export_hf(run_dir_or_checkpoint, out_dir)`` writes a directory that
``transformers.AutoModelForCausalLM`` and ``AutoTokenizer`` load offline:

    config.json         LlamaForCausalLM: our shape, rms_norm_eps, rope_theta, no biases,
                        num_key_value_heads = num_heads, max_position_embeddings = seq_len,
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
low-rank adapters merged. ``import_hf`` reads such a directory (or any Llama checkpoint of the
same architecture) back into our ModelConfig and state dict, e.g. for ``stages.N.init_from``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import sentencepiece as spm
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from lowrank_pt.checkpoint import store as checkpoint
from lowrank_pt.data import Tokenizer
from lowrank_pt.data.config import DataConfig
from lowrank_pt.data.prepare import tokenizer_for
from lowrank_pt.model.llama import MODEL_SIZES, LlamaModel, ModelConfig, resolve

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The template of lowrank_pt.data.sft in Jinja, for tokenizer.apply_chat_template.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


def is_hf_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face model directory (config.json and safetensors weights)."""
    p = Path(path)
    return (p / "config.json").is_file() and ((p / WEIGHTS).is_file() or (p / f"{WEIGHTS}.index.json").is_file())


# --- finding what a checkpoint was made with ----------------------------------------------------


def checkpoint_config(ckpt: str) -> ModelConfig:
    saved = checkpoint.read_meta(ckpt)["model"]
    return ModelConfig(**{f.name: saved[f.name] for f in fields(ModelConfig) if f.name in saved})


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


def init_source_config(path: str) -> ModelConfig:
    """The ModelConfig of the weights a ``stages.N.init_from`` path names, read without loading
    them: an exported Hugging Face dir's config.json, or the meta.json of a checkpoint (a run
    dir's newest), which must verify. ValueError / OSError say what is wrong."""
    if is_hf_dir(path):
        where = os.path.join(path, "config.json")
        try:
            return config_from_hf(json.loads(Path(where).read_text(encoding="utf-8")), where)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where} is unreadable ({e})") from None
        except KeyError as e:
            raise ValueError(f"{where} lacks {e}") from None
    ckpt = checkpoint.resolve(path)
    problem = checkpoint.verify(ckpt)
    if problem:
        raise ValueError(f"checkpoint {ckpt} is damaged: {problem}; name another checkpoint dir")
    return checkpoint_config(ckpt)


# --- export ------------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int, dtype: str = "float32",
              extra: Optional[dict] = None) -> dict:
    """config.json of LlamaForCausalLM for a resolved ModelConfig."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "head_dim": cfg.hidden_size // cfg.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5
        "rope_scaling": None,
        "attention_bias": False,
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


def write_tokenizer(tokenizer_path: str, out_dir: str | Path, seq_len: int) -> None:
    """tokenizer.model + tokenizer_config.json (+ tokenizer.json when transformers is importable)."""
    out = Path(out_dir)
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


def save_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike,
            tokenizer_path: Optional[str] = None, dtype: str = "float32", extra: Optional[dict] = None) -> str:
    """Write a plain state dict of our model as a Hugging Face Llama directory; returns its path."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed {list(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(state, cfg, dtype)
    if tokenizer_path is not None:
        tok = Tokenizer(tokenizer_path)
        if tok.vocab_size != cfg.vocab_size:
            raise ValueError(f"tokenizer {tokenizer_path} has {tok.vocab_size} pieces, the model {cfg.vocab_size}")
        ids = (tok.bos_id, tok.eos_id, tok.pad_id)
    else:
        ids = (1, 2, 3)  # the fixed ids of our trained tokenizers (lowrank_pt.data.tokenizer)
    tmp = out / f".{WEIGHTS}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, *ids, dtype, extra), indent=2) + "\n")
    if tokenizer_path is not None:
        write_tokenizer(tokenizer_path, out, cfg.seq_len)
    return str(out)


def plain_checkpoint(path: str) -> tuple[str, ModelConfig, dict[str, torch.Tensor]]:
    """``(checkpoint dir, its ModelConfig, its plain weights)`` for a run dir or checkpoint dir:
    ``checkpoint.load_plain_weights`` (any ZeRO stage and rank count, adapters merged), checked."""
    ckpt = checkpoint.resolve(path)
    cfg = checkpoint_config(ckpt)
    state = checkpoint.load_plain_weights(ckpt)
    leftover = sorted(set(state) - set(_expected_shapes(cfg)))
    if leftover:
        method = checkpoint.read_meta(ckpt).get("method")
        raise ValueError(f"{ckpt}: the weights of method {method!r} still hold adapter tensors after "
                         f"checkpoint.load_plain_weights ({leftover[:3]} ...): its Method.to_plain must merge them")
    return ckpt, cfg, state


def export_hf(checkpoint_path_or_run_dir: str, out_dir: str, tokenizer_path: Optional[str] = None,
              dtype: str = "float32") -> str:
    """Consolidate a checkpoint (a run dir's newest, or one checkpoint dir; any ZeRO stage and rank
    count) into a Hugging Face Llama directory, adapters merged; returns ``out_dir``.

    ``tokenizer_path`` defaults to the run's own tokenizer (see find_tokenizer).
    """
    ckpt, cfg, state = plain_checkpoint(checkpoint_path_or_run_dir)
    meta = checkpoint.read_meta(ckpt)
    tokenizer_path = tokenizer_path or find_tokenizer(ckpt)
    extra = {"source": os.path.abspath(ckpt), "method": meta.get("method"),
             "stage": meta.get("stage_name"), "global_step": meta.get("global_step")}
    return save_hf(state, cfg, out_dir, tokenizer_path, dtype, extra)


# --- import ------------------------------------------------------------------------------------


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    with torch.device("meta"):
        model = LlamaModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a Llama config.json; ValueError for what our model cannot represent."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"{where}: model_type={hf.get('model_type')!r}, only 'llama' is supported")
    heads = hf["num_attention_heads"]
    checks = {
        "num_key_value_heads": (hf.get("num_key_value_heads", heads), heads),
        "head_dim": (hf.get("head_dim") or hf["hidden_size"] // heads, hf["hidden_size"] // heads),
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
    }
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    checks["rope_type"] = (rope.get("rope_type", rope.get("type", "default")), "default")
    for key, (value, ours) in checks.items():
        if value != ours:
            raise ValueError(f"{where}: {key}={value!r} is not supported (our model has {ours!r})")
    saved = (hf.get("lowrank_pt") or {}).get("model", {})
    shape = dict(hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                 num_layers=hf["num_hidden_layers"], num_heads=heads)
    size = saved.get("size") or next((name for name, s in MODEL_SIZES.items() if s == shape), "tiny")
    return ModelConfig(
        size=size, **shape, vocab_size=hf["vocab_size"],
        seq_len=hf.get("max_position_embeddings", saved.get("seq_len", 256)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        activation_checkpointing=saved.get("activation_checkpointing", False),
    )


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / f"{WEIGHTS}.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [WEIGHTS]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


def import_hf(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our ModelConfig and plain state dict from a Hugging Face Llama directory. Tensors keep the
    stored dtype (an exact round trip); ``LlamaModel.load_state_dict`` casts into its params."""
    directory = Path(directory)
    if not is_hf_dir(directory):
        raise FileNotFoundError(f"{directory} is not a Hugging Face model dir (config.json + {WEIGHTS})")
    cfg = config_from_hf(json.loads((directory / "config.json").read_text()), str(directory / "config.json"))
    state = {}
    for name, tensor in _read_safetensors(directory).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # derived from the config, as our rope tables
        state[name if name == "lm_head.weight" else name.removeprefix("model.")] = tensor
    if cfg.tie_embeddings and "embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    expected = _expected_shapes(cfg)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not fit the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{directory}: {name} has shape {tuple(tensor.shape)}, the config says {expected[name]}")
    return cfg, state


def load_init_weights(path: str) -> dict[str, torch.Tensor]:
    """Plain weights for ``stages.N.init_from``: an exported Hugging Face dir, or a run dir /
    checkpoint dir (adapters merged)."""
    if is_hf_dir(path):
        return {k: v.float() for k, v in import_hf(path)[1].items()}
    return plain_checkpoint(path)[2]


# --- command line ------------------------------------------------------------------------------


def _export_command(args) -> int:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: export --out {args.out} is a file; give a directory (new, or one to overwrite)",
              file=sys.stderr)
        return 2
    try:
        out = export_hf(args.source, args.out, args.tokenizer, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def load_model(source: str, tokenizer_path: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a run dir, a checkpoint dir (adapters merged) or an exported
    Hugging Face dir; the model in eval mode on the CPU."""
    if is_hf_dir(source):
        cfg, state = import_hf(source)
        tokenizer_path = tokenizer_path or str(Path(source) / "tokenizer.model")
    else:
        ckpt, cfg, state = plain_checkpoint(source)
        tokenizer_path = tokenizer_path or find_tokenizer(ckpt)
    model = LlamaModel(resolve(cfg))
    model.load_state_dict(state)
    return model.to(dtype).eval(), Tokenizer(tokenizer_path)


def register(subparsers) -> None:
    """Add ``export`` to the ``lowrank-pt`` subcommands."""
    p = subparsers.add_parser("export", help="write a checkpoint as a Hugging Face Llama dir (adapters merged)")
    p.add_argument("source", metavar="RUN_DIR", help="run dir (its newest checkpoint) or one checkpoint dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model; default: the run's own")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the saved weights")
    p.set_defaults(func=_export_command)
