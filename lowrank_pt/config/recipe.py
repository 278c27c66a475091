"""Loading and checking a run's config (the schema itself is :mod:`lowrank_pt.config.schema`).

A run is loaded from a YAML file plus ``key=value`` overrides (``stages.1.steps=500``,
``engine.zero_stage=2``) through OmegaConf, checked completely, and only then allowed to touch
the disk. The field docstrings are the config reference (``lowrank-pt config-reference``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import replace
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lowrank_pt.checkpoint.export import init_source_config
from lowrank_pt.config.checks import choice, number, world_size  # noqa: F401 - world_size importable from here
from lowrank_pt.config.engine_keys import check_engine, validate_engine  # noqa: F401 - check_engine too
from lowrank_pt.config.schema import (  # noqa: F401 - the schema's names, importable from here as before
    BACKENDS,
    EngineConfig,
    OptimizerConfig,
    RunConfig,
    ScheduleConfig,
    StageConfig,
    TrainConfig,
    field_docs,
    reference,
)
from lowrank_pt.core import dist
from lowrank_pt.core.errors import ConfigError
from lowrank_pt.data.config import validate as validate_data
from lowrank_pt.data.preference import check_records as check_dpo_records
from lowrank_pt.data.preference import validate_config as validate_dpo
from lowrank_pt.data.sft import check_records as check_sft_records
from lowrank_pt.data.sft import validate_config as validate_sft
from lowrank_pt.data.tokenizer import load_tokenizer
from lowrank_pt.methods import METHODS, parse_options
from lowrank_pt.model.llama import MODEL_SIZES, ModelConfig, resolve, shape_difference
from lowrank_pt.objectives import objective_class
from lowrank_pt.optim.lowbit import STATE_DTYPES


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. engine.zero_stage=2)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _om_error(e: OmegaConfBaseException, where: str) -> ConfigError:
    msg = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    return ConfigError(f"{where}: {msg}" + (f" (key: {key})" if key else ""))


def _read_yaml(path: str) -> dict:
    """The top-level mapping of a YAML recipe; ConfigError for every way the file can be wrong."""
    if os.path.isdir(path):
        raise ConfigError(f"config path {path} is a directory; give a YAML file (e.g. configs/tiny.yaml)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "save the file as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{at}: {problem}") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def _check_shapes(raw: dict, where: str) -> None:
    """Containers of the wrong kind, named before OmegaConf's merge fails on them."""
    stages = raw.get("stages")
    if stages is not None and not isinstance(stages, list):
        raise ConfigError(f"{where}: stages must be a list of stages (\"- name: ...\" items, or [{{...}}, ...]), "
                          f"got a {type(stages).__name__}")
    for key in ("model", "data", "engine", "train"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"{where}: {key} must be a mapping of keys, got {type(raw[key]).__name__}")


def load(path: Optional[str], overrides: list[str] = (), environment: bool = True) -> RunConfig:
    """Build a checked RunConfig from a YAML file and ``key=value`` overrides.

    ``environment=False`` skips the checks that look outside the config (device, files named by
    it, the run dir), for reading the config of a finished run."""
    cfg = OmegaConf.structured(RunConfig)
    if path is not None:
        raw = _read_yaml(path)
        _check_shapes(raw, path)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(raw))
        except OmegaConfBaseException as e:
            raise _om_error(e, path) from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    for item in overrides:
        key, value = _parse_override(item)
        if key == "stages" and value is not None and not isinstance(value, list):
            raise ConfigError(f"override {item!r}: stages must be a list of stages ([{{name: a, steps: 10}}, ...]), "
                              f"got a {type(value).__name__}")
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise _om_error(e, f"override {item!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from None
    try:
        run: RunConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _om_error(e, path or "config") from None
    if run.model.size == INIT_FROM:
        run.model = model_of_init_from(run)
    validate(run, environment=environment)
    if environment:  # one cache for every node and working directory, as config.yaml records it
        for data in (run.data, *(s.data for s in run.stages if s.data is not None)):
            data.cache_dir = os.path.abspath(os.path.expanduser(data.cache_dir))
    return run


INIT_FROM = "init_from"
"""``model.size: init_from``: the model of the first stage's ``init_from`` weights."""


def model_of_init_from(run: RunConfig) -> ModelConfig:
    """The model the first stage with an ``init_from`` starts from (a Hugging Face dir's
    config.json, a checkpoint's meta.json): every shape, RoPE and norm field is theirs; seq_len
    and activation checkpointing stay the run's."""
    stage = next((s for s in run.stages if s.init_from), None)
    if stage is None:
        raise ConfigError("model.size=init_from takes the model of a stage's init_from, and no stage has one; "
                          "set stages.N.init_from, or a named size")
    if not os.path.exists(stage.init_from):
        raise ConfigError(f"model.size=init_from: stages ({stage.name}).init_from={stage.init_from}: no such file "
                          "or directory (a Hugging Face dir, a run dir or a checkpoint dir)")
    try:
        source = init_source_config(stage.init_from, run.model.seq_len)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.size=init_from: {stage.name}.init_from={stage.init_from}: {e}") from None
    return replace(source, seq_len=run.model.seq_len, activation_checkpointing=run.model.activation_checkpointing)


def tokens_per_step(stage: StageConfig, run: RunConfig, world: int | None = None) -> int:
    """Tokens one optimizer step of ``stage`` trains on ``world`` ranks (default: this run's): every
    rank's micro-batches, each of ``micro_batch_size`` examples of the objective's rows (a DPO
    pair is two: chosen and rejected), ``seq_len`` tokens a row."""
    micro, accum = stage.micro_and_accum(run.train)
    rows = objective_class(stage).rows_per_example
    return rows * micro * accum * (world or world_size()) * run.model.seq_len


def tokens_after(run: RunConfig, index: int, world: int | None = None) -> int:
    """Tokens the stages after stage ``index`` train (on ``world`` ranks)."""
    return sum(stage_length(s, run, world) * tokens_per_step(s, run, world) for s in run.stages[index + 1:])


def stage_length(stage: StageConfig, run: RunConfig, world: int | None = None) -> int:
    """Optimizer steps of a stage on ``world`` ranks (default: this run's)."""
    return stage_steps(stage, tokens_per_step(stage, run, world))


def expected_vocab_size(run: RunConfig, environment: bool = True) -> int:
    """The vocabulary the model will have: model.vocab_size, else data.tokenizer's, else the
    tokenizer the run trains (data.vocab_size pieces exactly)."""
    if run.model.vocab_size is not None:
        return run.model.vocab_size
    if run.data.tokenizer is not None and environment:
        try:
            return load_tokenizer(run.data.tokenizer).vocab_size
        except Exception as e:  # noqa: BLE001 - sentencepiece raises its own types
            raise ConfigError(f"data.tokenizer={run.data.tokenizer}: not a sentencepiece model nor a Hugging Face "
                              f"tokenizer dir ({e})") from None
    return run.data.vocab_size


def validate(run: RunConfig, environment: bool = True) -> None:
    """Every check that can be made before work starts; raises ConfigError naming the key.

    Values, the recipe, every stage's method against the model (built on the meta device),
    raw DeepSpeed keys against ours; with ``environment`` also what lies outside the config:
    the device (fp16, the backend), the run dir, the files the config names (SFT records are
    parsed, ``init_from`` checkpoints read and compared with the model)."""
    model_cfg = _validate_model(run, environment)
    validate_engine(run, environment)
    _validate_train(run)
    if run.train.wandb_project is not None and not run.train.wandb_project.strip():
        raise ConfigError("train.wandb_project='': give a project name, or null (no Weights & Biases)")
    if environment and run.train.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"train.wandb_project={run.train.wandb_project!r} needs the wandb package: pip install wandb "
                          "(or set it to null)")
    if not run.stages:
        raise ConfigError("stages: the recipe needs at least one stage")
    names = set()
    for i, stage in enumerate(run.stages):
        where = f"stages[{i}] ({stage.name})"
        if stage.name in names:
            raise ConfigError(f"{where}.name: stage names must be unique")
        names.add(stage.name)
        _validate_stage(run, stage, where, model_cfg, environment)
    _validate_hand_overs(run)
    try:
        validate_data(run.data)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    if environment:
        _validate_paths(run)


def _validate_hand_overs(run: RunConfig) -> None:
    """A stage takes the previous stage's weights as a dense Llama (unless it has its own
    ``init_from``): the previous stage's method must have that form. A method that builds its
    model factored from the first step takes no dense weights at all."""
    for i, stage in enumerate(run.stages):
        method = METHODS.get(stage.method)
        if method is not None and method.starts_from_scratch and (i > 0 or stage.init_from is not None):
            source = f"init_from={stage.init_from}" if stage.init_from is not None else f"stages[{i - 1}]'s weights"
            raise ConfigError(f"stages[{i}] ({stage.name}): method={stage.method} builds its model factored from "
                              f"the first step and cannot start from a dense model ({source}); make it the "
                              "recipe's first stage, without init_from")
    for i in range(1, len(run.stages)):
        before, stage = run.stages[i - 1], run.stages[i]
        method = METHODS.get(before.method)
        if method is not None and not method.has_dense_form and stage.init_from is None:
            raise ConfigError(f"stages[{i}] ({stage.name}) would start from stages[{i - 1}].method={before.method}, "
                              "whose trained model is not a dense Llama; give the stage its own init_from, or "
                              "end the recipe with that stage")


def _validate_model(run: RunConfig, environment: bool) -> ModelConfig:
    m = run.model
    if m.size not in MODEL_SIZES:
        choice("model.size", m.size, [*sorted(MODEL_SIZES), INIT_FROM])
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "vocab_size"):
        value = getattr(m, key)
        if value is not None and value < 1:
            raise ConfigError(f"model.{key}={value} must be >= 1 (or null: the size's value)")
    if m.seq_len < 2:
        raise ConfigError(f"model.seq_len={m.seq_len} must be >= 2")
    number("model.rope_theta", m.rope_theta, 0, above=True)
    number("model.norm_eps", m.norm_eps, 0)
    number("model.init_std", m.init_std, 0)
    try:
        return resolve(m, vocab_size=expected_vocab_size(run, environment))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _validate_train(run: RunConfig) -> None:
    t = run.train
    for key in ("micro_batch_size", "grad_accum", "log_every", "eval_sequences", "keep_last"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 1")
    for key in ("eval_every", "save_every", "sample_tokens", "eval_questions"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 0")
    if t.max_nonfinite_steps < 0:
        raise ConfigError(f"train.max_nonfinite_steps={t.max_nonfinite_steps} must be >= 0 (0: never stop)")
    if t.stop_at_step is not None and t.stop_at_step < 1:
        raise ConfigError(f"train.stop_at_step={t.stop_at_step} must be >= 1 (or null: never stop early)")
    number("train.sample_temperature", t.sample_temperature, 0)
    choice("train.update", t.update, list(UPDATES))


def _validate_stage(run: RunConfig, stage: StageConfig, where: str, model_cfg: ModelConfig,
                    environment: bool) -> None:
    if (stage.steps is None) == (stage.tokens is None):
        raise ConfigError(f"{where}: give exactly one of steps and tokens (its length)")
    length = stage.steps if stage.steps is not None else stage.tokens
    if length < 1:
        raise ConfigError(f"{where}: length must be >= 1, got {length}")
    choice(f"{where}.method", stage.method, sorted(METHODS))
    choice(f"{where}.schedule.kind", stage.schedule.kind, ["cosine", "linear", "constant", "jagged_cosine"])
    opt = stage.optimizer
    number(f"{where}.optimizer.lr", opt.lr, 0, above=True)
    number(f"{where}.optimizer.eps", opt.eps, 0, above=True)
    number(f"{where}.optimizer.weight_decay", opt.weight_decay, 0)
    number(f"{where}.optimizer.grad_clip", opt.grad_clip, 0, optional=True)
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        raise ConfigError(f"{where}.optimizer.betas={opt.betas}: two values in [0, 1)")
    choice(f"{where}.optimizer.state_dtype", opt.state_dtype, list(STATE_DTYPES))
    if opt.state_dtype != "fp32" and run.engine.offload_optimizer:
        raise ConfigError(f"{where}.optimizer.state_dtype={opt.state_dtype} with engine.offload_optimizer=true: the "
                          "offloaded optimizer (DeepSpeed's CPU Adam) keeps fp32 moments; use one or the other")
    sched = stage.schedule
    if not 0 <= sched.min_lr_ratio <= 1:
        raise ConfigError(f"{where}.schedule.min_lr_ratio must be in [0, 1]")
    for key in ("warmup_steps", "restart_every", "restart_warmup_steps"):
        if getattr(sched, key) < 0:
            raise ConfigError(f"{where}.schedule.{key}={getattr(sched, key)} must be >= 0")
    for key in ("micro_batch_size", "grad_accum", "eval_sequences"):
        value = getattr(stage, key)
        if value is not None and value < 1:
            raise ConfigError(f"{where}.{key}={value} must be >= 1")
    steps = stage_length(stage, run)
    if sched.kind != "constant" and sched.warmup_steps > steps:
        raise ConfigError(f"{where}.schedule.warmup_steps={sched.warmup_steps} is longer than the stage ({steps} "
                          "steps): the learning rate would never reach optimizer.lr; give at most the stage's steps")
    _validate_update(run, stage, where)
    try:
        options = parse_options(stage.method, stage.options)
    except ConfigError as e:
        raise ConfigError(f"{where}.options: {e}") from None
    try:
        METHODS[stage.method].check_stage(options, stage, run, model_cfg, stage_length(stage, run))
    except ValueError as e:
        raise ConfigError(f"{where}.{e}") from None
    if sum(x is not None for x in (stage.data, stage.sft, stage.dpo)) > 1:
        raise ConfigError(f"{where}: give one of data (pre-training), sft (instructions) and dpo (preferences)")
    if stage.data is not None:
        try:
            validate_data(stage.data)
        except ValueError as e:
            raise ConfigError(f"{where}.data: {e}") from None
    for key, section, check_values, check_files in (("sft", stage.sft, validate_sft, check_sft_records),
                                                    ("dpo", stage.dpo, validate_dpo, check_dpo_records)):
        try:
            if section is not None:
                check_values(section)
                if environment:
                    check_files(section)
        except ValueError as e:
            raise ConfigError(f"{where}.{key}: {e}") from None
    if stage.init_from is not None and environment:
        _check_init_from(stage.init_from, f"{where}.init_from", model_cfg)


UPDATES = ("step", "per_layer")


def _validate_update(run: RunConfig, stage: StageConfig, where: str) -> None:
    """``update: per_layer`` where per-layer updates are built (``lowrank_pt.zero.per_layer``)."""
    if stage.update is not None:
        choice(f"{where}.update", stage.update, list(UPDATES))
    update = stage.update or run.train.update
    if update != "per_layer":
        return
    key = f"{where}.update=per_layer" if stage.update else "train.update=per_layer"
    e = run.engine
    if e.zero_stage != 0:
        raise ConfigError(f"{key} with engine.zero_stage={e.zero_stage}: per-layer updates are built for ZeRO 0 "
                          "(DeepSpeed's ZeRO 1-3 optimizers reduce gradients into their own partitions and step "
                          "them after the backward); use zero_stage 0 or update step")
    if e.precision == "fp16" or (e.precision == "bf16" and e.master_weights == "fp32"):
        raise ConfigError(f"{key} with engine.precision={e.precision} and engine.master_weights={e.master_weights}: "
                          "DeepSpeed's ZeRO 0 mixed-precision wrapper copies every gradient into its fp32 masters "
                          "at the step; use precision bf16 with master_weights bf16, or fp32")
    clip = stage.optimizer.grad_clip
    if clip is not None and clip > 0:
        raise ConfigError(f"{where}.optimizer.grad_clip={clip} with {key}: clipping the global gradient norm "
                          "needs every gradient before the first update; set grad_clip 0 (or null), or use update step")


def check_update(engine_cfg, update: str) -> None:
    """The checks of ``train.update`` against ``engine`` keys alone (what the planner takes as flags)."""
    choice("train.update", update, list(UPDATES))
    run = RunConfig(engine=engine_cfg, train=TrainConfig(update=update))
    _validate_update(run, run.stages[0], "stages.0")


def _check_init_from(path: str, key: str, model_cfg: ModelConfig) -> None:
    """``init_from`` names weights this model can take: read their config.json / meta.json now."""
    if not os.path.exists(path):
        raise ConfigError(f"{key}={path}: no such file or directory (a run dir, a checkpoint dir or an "
                          "exported Hugging Face dir)")
    try:
        saved = init_source_config(path, model_cfg.seq_len)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={path}: {e}") from None
    differs = shape_difference(saved, model_cfg)
    if differs:
        raise ConfigError(f"{key}={path} holds weights of another model shape: {differs}; start from weights "
                          "of the same model, or change model.* to theirs")


def _validate_paths(run: RunConfig) -> None:
    if os.path.exists(run.run_dir) and not os.path.isdir(run.run_dir):
        raise ConfigError(f"run_dir={run.run_dir} is a file, not a directory; give a directory (new or a "
                          "run's) for the run's config, metrics and checkpoints")
    if run.resume not in ("auto", "never") and not os.path.exists(run.resume):
        raise ConfigError(f"resume={run.resume}: no such checkpoint or run dir (auto, never, or a path)")


def stage_steps(stage: StageConfig, tokens_per_step: int) -> int:
    if stage.steps is not None:
        return stage.steps
    return math.ceil(stage.tokens / tokens_per_step)


def to_yaml(run: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(run))


def write_run_config(run: RunConfig) -> None:
    """The run dir and its ``config.yaml`` (the resolved config, written atomically by rank 0);
    every rank returns once it exists. The first write of a run, after every check."""
    if dist.rank() == 0:
        os.makedirs(run.run_dir, exist_ok=True)
        tmp = os.path.join(run.run_dir, "config.yaml.tmp")
        with open(tmp, "w") as f:
            f.write(to_yaml(run))
        os.replace(tmp, os.path.join(run.run_dir, "config.yaml"))
    dist.barrier()

