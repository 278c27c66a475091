"""The one config schema: dataclasses with a docstring under every field, and the config
reference made from those docstrings (``lowrank-pt config-reference``, docs/config.md).

Loading and checking a run is :mod:`lowrank_pt.config.recipe`'s job; this module only says what a run
is made of, so that anything can import it without importing the checks.
"""

from __future__ import annotations

import ast
import inspect
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from lowrank_pt.data.config import DataConfig
from lowrank_pt.data.preference import DPODataConfig
from lowrank_pt.data.sft import SFTDataConfig
from lowrank_pt.model.llama import ModelConfig

BACKENDS = ("gloo", "nccl", "mpi", "ucc")
"""torch.distributed backends engine.backend may name (each only where this machine has it)."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    """Peak learning rate of the stage."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (not on norms)."""
    grad_clip: Optional[float] = None
    """Clip the global norm of the trained params' gradients to this; 0 disables clipping; null
    takes the method's default: 1.0 for full, lora and relora, 0 (off) for galore, whose clipping
    would see the norm of the projected gradient alpha·G·Qᵀ, not of G."""
    state_dtype: str = "fp32"
    """How AdamW stores its two moments: fp32 (8 bytes per trained element), bf16 (4), or int8
    (8-bit blockwise, as 8-bit Adam: about 2.03 bytes); the update is computed in fp32 either way.
    The projected optimizers of apollo, apollo_mini, fira and galore_weights store their Adam
    moments (by channel and projection) the same way, muon and dion their momentum buffers (dion's
    r-wide factor stays fp32), each step working on them decoded; a method
    that edits moments (relora's pruning, galore's moments_on_refresh=reproject) edits them decoded
    too."""


@dataclass
class ScheduleConfig:
    kind: str = "cosine"
    """cosine | linear | constant | jagged_cosine (cosine envelope re-warmed at every restart)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to the peak LR at the start of the stage."""
    min_lr_ratio: float = 0.1
    """Floor of the decay, as a fraction of the peak LR."""
    restart_every: int = 0
    """jagged_cosine: steps between restarts (set from the method, e.g. relora's restart_every)."""
    restart_warmup_steps: int = 0
    """jagged_cosine: steps to re-warm the LR from 0 after each restart."""


@dataclass
class StageConfig:
    name: str = "main"
    """Name of the stage in logs, metrics and checkpoints."""
    method: str = "full"
    """Training method: one of lowrank_pt.methods.METHODS (full, ...)."""
    steps: Optional[int] = None
    """Length in optimizer steps. Give exactly one of steps and tokens."""
    tokens: Optional[int] = None
    """Length in training tokens (all ranks), rounded up to whole steps."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer settings of this stage."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule of this stage."""
    micro_batch_size: Optional[int] = None
    """Sequences per rank per micro-batch; null takes train.micro_batch_size."""
    grad_accum: Optional[int] = None
    """Micro-batches per optimizer step; null takes train.grad_accum."""
    eval_sequences: Optional[int] = None
    """Validation sequences per evaluation of this stage (SFT: conversations, each batch only as
    wide as its longest; DPO: pairs); null takes train.eval_sequences."""
    options: Dict[str, Any] = field(default_factory=dict)
    """The method's own options (e.g. rank, restart_every); checked against its schema."""
    data: Optional[DataConfig] = None
    """Data of this stage; null uses the run's data (continuing its stream)."""
    sft: Optional[SFTDataConfig] = None
    """Instruction data: makes this an SFT stage (chat template, loss on assistant tokens only)."""
    dpo: Optional[DPODataConfig] = None
    """Preference pairs: makes this a DPO stage (the DPO loss with dpo.beta against the stage's
    starting model: the adapters switched off for lora with init kaiming, else precomputed)."""
    init_from: Optional[str] = None
    """Start this stage from the weights of a checkpoint dir (a run dir or one checkpoint), or of a
    Hugging Face model dir (Llama, Mistral, Qwen2 families; model.size init_from takes its shape)."""
    init_from_tokenizer: str = "same"
    """same: the run's tokenizer must be the one init_from's weights were trained with (a
    checkpoint's recorded sha256; a Hugging Face dir's own tokenizer files), else the run stops
    before any write; any: accept another (a deliberate change of tokenizer over the same ids)."""
    update: Optional[str] = None
    """How this stage's optimizer steps: step or per_layer (see train.update); null takes train.update."""

    def micro_and_accum(self, train: "TrainConfig") -> tuple[int, int]:
        """This stage's micro-batch size and gradient accumulation: its own, else ``train``'s."""
        return self.micro_batch_size or train.micro_batch_size, self.grad_accum or train.grad_accum


@dataclass
class EngineConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    precision: str = "fp32"
    """fp32 | bf16 | fp16 (fp16 only where the device supports it, i.e. on GPUs)."""
    offload_optimizer: bool = False
    """Keep optimizer states on the CPU (ZeRO stages 1-3)."""
    master_weights: str = "fp32"
    """The copy of the trained weights the optimizer updates: fp32 (DeepSpeed's fp32 masters beside
    the bf16 params), or bf16 with precision bf16 (no fp32 copy: at ZeRO 0 the module's bf16 params
    themselves, at ZeRO 1-3 DeepSpeed's bf16_master_weights_and_grads partitions); each update is
    computed in fp32 and applied with stochastic rounding, so updates below half a bf16 step are
    kept in expectation. Every method: AdamW's and the projected optimizers of apollo,
    apollo_mini, fira and galore_weights alike."""
    weight_dtype: str = "bf16"
    """How the blocks' weights are stored: bf16 (the training dtype), or int8 (blockwise absmax
    codes, 256 per fp32 scale along each row, dequantised in forward and backward), with precision
    bf16. For the methods with a frozen base (lora, relora, galore) int8 holds the base, at every
    ZeRO stage (ZeRO-3 partitions the codes and scales like the weights); a merge into it,
    ReLoRA's restart or GaLore's subspace install, re-quantises with stochastic rounding. For the
    others (full, apollo, apollo_mini, fira, galore_weights, muon, dion) it holds the weights the optimizer
    updates, at ZeRO 0 with master_weights bf16: each step dequantises one matrix, updates it in
    fp32 and re-quantises it with stochastic rounding. Exports are dequantised."""
    grad_accum_dtype: Optional[str] = None
    """DeepSpeed's ``data_types.grad_accum_dtype``: the dtype gradients are accumulated in over the
    micro-batches of a step. null keeps DeepSpeed's default (the training dtype); fp32 with
    precision bf16 at ZeRO 1 runs DeepSpeed's BF16_Optimizer, which accumulates the whole padded
    group in fp32 on every rank (the planner counts it); bf16 is the default spelled out."""
    reduce_bucket_size: Optional[int] = None
    """Elements of ZeRO's gradient reduce bucket (DeepSpeed's zero_optimization.reduce_bucket_size,
    stages 1-3: ZeRO-3 holds one for the whole run, stages 1-2 one during each backward). null:
    hidden_size² of the model, at least 5e6 (DeepSpeed's own default, 5e8, is 1 GB per GPU in
    bf16 at ZeRO-3); a value under engine.deepspeed.zero_optimization wins over both."""
    deepspeed: Dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config keys, deep-merged over the generated config."""
    backend: Optional[str] = None
    """torch.distributed backend; null picks nccl on GPUs, gloo on CPU."""
    collective_timeout_s: float = 300.0
    """Seconds a rank waits in one collective (and at start-up for the others to join) before the
    run stops with exit code 3: a dead or hung rank ends the run within this (DeepSpeed's own
    default is 10 minutes), and resume=auto continues from the last checkpoint. Raise it when
    one rank may legitimately work alone for longer while the others wait: rank 0 preparing the
    data of a large corpus on the first run, a slow checkpoint save."""
    stage3_param_persistence_threshold: Optional[int] = None
    """ZeRO-3: params of fewer elements stay whole on every rank (no gather per use). null keeps
    DeepSpeed's default (1e5) for any model with a param that large, and uses 0 (partition every
    param) for a model with none (the tiny test sizes, which the default would leave entirely
    unpartitioned)."""


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    """Sequences per rank per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    log_every: int = 10
    """Optimizer steps between metric lines."""
    eval_every: int = 100
    """Optimizer steps between validation passes (and at the end of each stage); 0 = stage ends only."""
    eval_sequences: int = 64
    """Validation sequences per evaluation: the first N of the held-out split, fixed across runs."""
    eval_questions: int = 32
    """Held-out questions a post-training stage answers greedily at its start and at every
    evaluation, scored by exact match: on the shakespeare set (DPO, or SFT with who among its
    tasks) "who says this line";
    on SFT data files the held-out conversations whose final reply takes at most 12 tokens
    (short answers). 0 = off."""
    save_every: int = 0
    """Optimizer steps between checkpoints; 0 = only at the end of each stage."""
    keep_last: int = 2
    """Complete checkpoints to keep; older ones are deleted after a successful save."""
    stop_at_step: Optional[int] = None
    """Save a checkpoint and exit once the global step reaches this (for time-sliced jobs:
    the next launch with resume=auto continues exactly there)."""
    sample_prompts: List[str] = field(default_factory=list)
    """Prompts to sample from at the end of every stage (SFT stages apply the chat template);
    printed and logged to samples.jsonl."""
    sample_tokens: int = 48
    """Tokens to generate per sample prompt."""
    sample_temperature: float = 0.7
    """Sampling temperature of the end-of-stage samples (0 = greedy)."""
    progress: bool = True
    """Print a progress line (loss, lr, tokens/s) at every log step on rank 0."""
    tensorboard: bool = True
    """Write TensorBoard scalars under RUN_DIR/tb."""
    wandb_project: Optional[str] = None
    """Also log every record to Weights & Biases under this project (needs the wandb package: pip
    install wandb). Offline unless WANDB_MODE says otherwise: files under RUN_DIR/wandb, which
    ``wandb sync`` uploads; null: off."""
    report: bool = True
    """Write RUN_DIR/report (report.md with loss, learning-rate, throughput and memory plots, the
    post-training scores and the samples) when the run ends or stops; lowrank-pt report RUN_DIR
    writes it again, or for several runs side by side."""
    update: str = "step"
    """step: one optimizer step after the step's last backward, every gradient held until then.
    per_layer: each trained tensor is updated as soon as its gradient is final in the last
    micro-batch's backward, and its gradient freed, so at grad_accum 1 the step holds one
    tensor's gradient at a time; the same result as step (bit for bit, in fp32 and in bf16 with
    bf16 masters: stochastic rounding is keyed by step and tensor). ZeRO 0 only; fp32,
    or bf16 with engine.master_weights bf16; no optimizer.grad_clip (a global norm needs every
    gradient first; null means off here). With grad_accum > 1 the micro-batches before the last
    hold their gradients as step does, so only methods that train small tensors (lora, relora,
    galore's B) save there. A step that needs every gradient at once (a galore refresh that
    captured full gradients, lora_ga's initialisation) runs as an ordinary step. A gradient that
    is not finite while the loss is stops the run (tensors before it were already updated);
    a non-finite loss skips the step as with step."""
    max_nonfinite_steps: int = 5
    """A step whose loss or gradient is not finite on any rank is skipped on every rank (no
    weight or optimizer-state change; the LR schedule moves on) and logged as
    guard/skipped_steps; this many skipped steps in a row stop the run with exit code 3 before
    any further save. 0 never stops."""


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    """Directory of the run: resolved config, metrics.jsonl, TensorBoard logs, checkpoints."""
    seed: int = 0
    """Seed of model init and data order."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in run_dir if any; never: refuse a run_dir
    that has checkpoints; or a path to a checkpoint dir to start from."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """DeepSpeed engine settings."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, logging and checkpoint settings."""
    stages: List[StageConfig] = field(default_factory=lambda: [StageConfig(steps=100)])
    """The recipe: stages run in order, each starting from the previous stage's weights."""


# --- loading ------------------------------------------------------------------------------------


# --- reference ----------------------------------------------------------------------------------


def field_docs(cls) -> dict[str, str]:
    """Docstrings written under each field of a dataclass and its dataclass bases (from source)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass).lstrip()).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def reference(cls=RunConfig, prefix: str = "", seen: dict | None = None) -> list[str]:
    """Markdown table rows documenting every key of the schema, nested sections included. A
    section whose schema was documented before (a stage's ``data``) points to it."""
    seen = {} if seen is None else seen
    seen.setdefault(cls, prefix.rstrip("."))
    lines, nested = [], []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        target = _dataclass_of(hints[f.name])
        shown = "(section)" if target else f"`{default!r}`"
        text = docs.get(f.name, "").replace("|", "\\|")
        if target in seen:
            text += f" Same keys as `{seen[target]}`."
        lines.append(f"| `{prefix}{f.name}` | {shown} | {text} |")
        if target is not None and target not in seen:
            seen[target] = f"{prefix}{f.name}" + (".N" if _is_list(hints[f.name]) else "")
            nested.append((seen[target] + ".", target))
    for sub, target in nested:
        lines += reference(target, sub, seen)
    return lines


def _is_list(annotation) -> bool:
    return typing.get_origin(annotation) in (list, List)


def _dataclass_of(annotation) -> Optional[type]:
    """The dataclass a field holds: itself, or inside Optional[...] / List[...]; else None."""
    if is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        found = _dataclass_of(arg)
        if found is not None:
            return found
    return None
