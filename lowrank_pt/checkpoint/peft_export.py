"""Adapters out: a LoRA stage's checkpoint as a peft adapter directory (``lowrank-pt export RUN
--adapter``), which ``peft.PeftModel.from_pretrained`` and vLLM's ``LoRARequest`` load over its
base model.

    adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, use_rslora, use_dora,
                               base_model_name_or_path, no modules_to_save
    adapter_model.safetensors  base_model.model.model.<module>.lora_A.weight / lora_B.weight
                               (DoRA: .lora_magnitude_vector), peft's key names
    base/                      the base the adapter was trained against, as a Hugging Face dir,
                               where the stage had no ``init_from`` directory to point to

The adapter must be all the stage changed: a stage that trains other params at full rank
(``options.train_full_rank: true``, the default) is refused (peft's ``modules_to_save`` would carry
them, and vLLM rejects those): export it merged. Inits that move the base (pissa, milora, olora,
lora_ga) leave a residual in the checkpoint's base, not the model the stage started from: their
adapter is the difference between the trained model and the stage's original ``init_from``
weights, of rank at most 2r (``s·B·A − s·B0·A0``), written as a plain LoRA of rank 2r found by an
SVD of that difference, as peft documents for PiSSA and OLoRA; DoRA with such an init is refused.
DoRA adapters are written with peft's magnitude vector; vLLM does not load DoRA (a warning says so).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from lowrank_pt.checkpoint import store as checkpoint
from lowrank_pt.checkpoint.export import DTYPES, checkpoint_config, find_tokenizer, save_hf
from lowrank_pt.checkpoint.hf_import import is_hf_dir, stream_weights
from lowrank_pt.model import int8_weights

logger = logging.getLogger(__name__)

ADAPTER_KEYS = ("lora_A", "lora_B", "lora_scale", "lora_magnitude")
MOVED_BASE_INITS = ("pissa", "milora", "olora", "lora_ga")


def stage_init_from(ckpt: str, stage_name: str | None) -> str | None:
    """The ``init_from`` of the stage that saved ``ckpt``, from its run's config.yaml."""
    config = Path(ckpt).resolve().parent.parent / "config.yaml"
    if not config.is_file():
        return None
    raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    for stage in raw.get("stages") or []:
        if stage.get("name") == stage_name:
            return stage.get("init_from")
    return None


def adapter_factors(state: dict[str, torch.Tensor], prefix: str, original: torch.Tensor | None,
                    rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of peft's ``ΔW = B·A`` (scale 1) for the module at ``prefix``: the difference of
    its trained weight ``W0' + s·B·A`` and ``original``, of rank at most ``rank``, factored by an SVD
    (``B = U·√S``, ``A = √S·Vᵀ``)."""
    s = float(state[f"{prefix}.lora_scale"])
    trained = state[f"{prefix}.weight"].double() + s * state[f"{prefix}.lora_B"].double() @ state[f"{prefix}.lora_A"].double()
    u, sv, vh = torch.linalg.svd(trained - original.double(), full_matrices=False)
    root = sv[:rank].sqrt()
    a, b = (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float()
    if a.shape[0] < rank:  # 2r past the matrix's smaller side: zero factors fill peft's r
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
    return a, b


def export_adapter(source: str, out_dir: str, dtype: str | None = None) -> str:
    """Write the peft adapter of the LoRA stage that saved ``source`` (a run dir's newest
    checkpoint or a checkpoint dir) to ``out_dir``; returns it. ValueError names what stands in
    the way (the method, full-rank training, a moved base without its original)."""
    from lowrank_pt import methods  # imports DeepSpeed: only a command that exports pays for it

    ckpt = checkpoint.resolve(source)
    meta = checkpoint.read_meta(ckpt)
    method, stage = meta.get("method"), meta.get("stage_name")
    if method != "lora":
        raise ValueError(f"{ckpt}: stage {stage!r} trained with method {method!r}; a peft adapter is a LoRA "
                         "stage's (relora merges into its base, galore's B lives in a projected subspace): "
                         "export it merged")
    options = methods.parse_options("lora", meta.get("method_options", {}))
    if options.train_full_rank:
        raise ValueError(f"{ckpt}: stage {stage!r} trains embeddings, norms and the head at full rank "
                         "(options.train_full_rank: true), which an adapter cannot carry (vLLM rejects "
                         "modules_to_save); train with train_full_rank: false for an adapter, or export merged")
    moved = options.init in MOVED_BASE_INITS
    if moved and options.dora:
        raise ValueError(f"{ckpt}: init={options.init} with dora: peft has no conversion for a moved base under "
                         "DoRA; export merged")
    init_from = stage_init_from(ckpt, stage)
    if moved and not (init_from and is_hf_dir(init_from)):
        raise ValueError(f"{ckpt}: init={options.init} left a residual in the base, so the adapter is measured "
                         "against the stage's original weights, a Hugging Face init_from dir, and stage "
                         f"{stage!r} has none; export merged")
    state = int8_weights.dequantised(checkpoint.load_weights(ckpt))
    prefixes = sorted(k[: -len(".lora_A")] for k in state if k.endswith(".lora_A"))
    cfg = checkpoint_config(ckpt)
    dtype = dtype or ("bfloat16" if meta.get("precision") == "bf16" else "float32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, rank, alpha = {}, options.rank, options.alpha
    originals = dict(stream_weights(init_from)) if moved else {}
    for prefix in prefixes:
        key = f"base_model.model.model.{prefix}"
        if moved:
            a, b = adapter_factors(state, prefix, originals[f"{prefix}.weight"], 2 * options.rank)
        else:
            a, b = state[f"{prefix}.lora_A"], state[f"{prefix}.lora_B"]
        tensors[f"{key}.lora_A.weight"] = a.to(DTYPES[dtype]).contiguous()
        tensors[f"{key}.lora_B.weight"] = b.to(DTYPES[dtype]).contiguous()
        if options.dora:
            tensors[f"{key}.lora_magnitude_vector"] = state[f"{prefix}.lora_magnitude"].to(DTYPES[dtype]).contiguous()
    if moved:  # peft's scale lora_alpha / r = 1 on the SVD factors
        rank, alpha = 2 * options.rank, float(2 * options.rank)
    base = os.path.abspath(init_from) if init_from and is_hf_dir(init_from) else None
    if base is None:  # the frozen model the adapters were trained over: the checkpoint without them
        plain = {k: v for k, v in state.items() if k.rpartition(".")[2] not in ADAPTER_KEYS}
        base = save_hf(plain, cfg, out / "base", find_tokenizer(ckpt), dtype)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": target_modules(prefixes), "use_rslora": options.scaling == "alpha/sqrt(r)" and not moved,
              "use_dora": options.dora, "lora_dropout": 0.0, "bias": "none", "modules_to_save": None,
              "fan_in_fan_out": False, "init_lora_weights": True, "base_model_name_or_path": base,
              "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if options.dora:
        logger.warning("%s: a DoRA adapter: peft loads it; vLLM does not serve DoRA adapters", out)
    return str(out)


def target_modules(prefixes: list[str]) -> list[str]:
    """peft's ``target_modules`` for the wrapped modules: their leaf names where every module of
    that name in the blocks is wrapped (what vLLM expects), else the full names, which peft
    matches exactly."""
    leaves = sorted({p.rpartition(".")[2] for p in prefixes})
    layers = {p.split(".")[1] for p in prefixes}
    every = all(f"layers.{i}.{rest}" in prefixes for i in layers
                for rest in {p.split(".", 2)[2] for p in prefixes})
    return leaves if every else [f"model.{p}" for p in prefixes]
