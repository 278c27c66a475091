"""The tests' one shared module: paths, running a function on N gloo ranks, a tiny DeepSpeed
engine, the trainer run in-process, and the builders several tiers use. Pytest fixtures are in
``conftest.py``; test modules import from here, never from each other."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import tempfile
import traceback

import torch

from lowrank_pt.checkpoint import store as checkpoint
from lowrank_pt.config.recipe import load
from lowrank_pt.config.schema import StageConfig
from lowrank_pt.core import dist
from lowrank_pt.methods import parse_options
from lowrank_pt.methods.base import StageContext
from lowrank_pt.methods.relora import ReLoRA
from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
from lowrank_pt.optim.adamw import build_optimizer
from lowrank_pt.tracking import metrics
from lowrank_pt.trainer.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The repository root."""
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
"""The tiny model's recipe, the base of every trainer test."""

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, 2 // WORKERS)
"""Torch threads of a test process (and a 1-rank spawn): the 2 cores shared by the xdist workers."""


def _worker(fn, rank, world_size, port, out_dir, args, env, cwd):
    # A forked child starts with the fork server's environment and directory: take the test's.
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1 if world_size > 1 else THREADS)
    # Everything the fork server imported is permanent: the trainer's gc.collect() between stages
    # then walks only what the test made (measured: 0.32 s -> 0.07 s per collection).
    gc.freeze()
    try:
        dist.init()
        result = fn(rank, world_size, *args)
        payload = ("ok", result)
    except BaseException:  # noqa: BLE001 - the traceback goes back to the test
        payload = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)


PRELOAD = ["torch", "torch._dynamo", "torch._inductor", "torch.distributed.fsdp", "torch.distributed.tensor",
           "torch.utils.tensorboard", "deepspeed", "deepspeed.runtime.zero", "deepspeed.runtime.zero.muon.original_muon",
           "deepspeed.module_inject", "deepspeed.moe", "lowrank_pt.trainer.trainer", "lowrank_pt.checkpoint.export", "lowrank_pt.cli",
           "fixtures"]
"""What the fork server imports once, so that no rank pays for it (about 4 s at import, and 2-4 s
more that DeepSpeed and the trainer import lazily: DeepSpeed's optimizer check imports torch's
compiler). Every rank is a fresh fork of the server: no state passes from one test's ranks to the
next's."""


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def spawn(fn, world_size: int, *args, timeout: float = 300):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes joined in a gloo
    group; return the list of per-rank return values (must be picklable). ``fn`` must be a
    module-level function. Raises with the rank's traceback if any rank failed."""
    ctx = _context()
    port = dist.free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, out_dir, args,
                                                           dict(os.environ), os.getcwd()))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise TimeoutError(f"rank process still running after {timeout}s")
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                raise RuntimeError(f"rank {r} failed:\n{value}")
            results.append(value)
        return results


def tiny_engine(zero_stage: int, precision: str, method=None, model=None, micro_batch_size: int = 2,
                grad_accum: int = 1, lr: float = 1e-2, vocab_size: int = 64, seed: int = 0,
                grad_clip: float = 1.0, master_weights: str = "fp32", int8_bases: bool = False):
    """A DeepSpeed engine over the tiny LLaMA (or ``model``) with ``method`` (default full-rank).

    ``int8_bases``: the method's frozen bases stored in int8 (``engine.weight_dtype: int8``).
    Call inside a process where ``dist.init()`` ran (e.g. under ``spawn``)."""
    from lowrank_pt.config.recipe import EngineConfig, OptimizerConfig, ScheduleConfig, StageConfig
    from lowrank_pt.methods import Method
    from lowrank_pt.methods.base import StageContext
    from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
    from lowrank_pt.objectives import LMObjective, build_objective
    from lowrank_pt.zero import engine as E

    torch.manual_seed(seed)
    if model is None:
        model = LlamaModel(resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=vocab_size))
    stage = StageConfig(steps=100, optimizer=OptimizerConfig(lr=lr), schedule=ScheduleConfig(kind="constant"))
    method = method or Method(None, stage, None)
    method.prepare_model(model)
    if int8_bases and method.has_frozen_base:
        from lowrank_pt.model import int8_weights

        int8_weights.store_bases(model)
    elif int8_bases:  # the weights the optimizer updates (ZeRO 0, bf16 masters)
        from lowrank_pt.model import int8_trained

        int8_trained.store(model)
    # The method's own stage says how the moments are stored (optimizer.state_dtype).
    stored = method.stage.optimizer.state_dtype if method.stage is not None else "fp32"
    optimizer = build_optimizer(method.param_groups(model), OptimizerConfig(lr=lr, state_dtype=stored),
                                master_weights=master_weights)
    if int8_bases and not method.has_frozen_base:
        from lowrank_pt.methods.base import int8_weight_draws
        from lowrank_pt.model import int8_trained

        int8_trained.steps_through_codes(optimizer, int8_weight_draws)
    engine_cfg = EngineConfig(zero_stage=zero_stage, precision=precision, master_weights=master_weights)
    ds = E.deepspeed_config(engine_cfg, micro_batch_size, grad_accum, grad_clip, dist.world_size())
    engine = E.initialize(model, optimizer, method.lr_lambda(100), ds,
                          cast_to=torch.bfloat16 if E.bf16_params(engine_cfg) else None)
    # The method's own stage decides the objective (an SFT stage weights its micro-batches).
    objective = build_objective(method.stage, method) if method.stage is not None else LMObjective()
    method.on_engine_ready(StageContext(engine=engine, total_steps=100, objective=objective))
    return engine, method


def random_batches(n: int, micro_batch_size: int = 2, seq_len: int = 16, vocab_size: int = 64, seed: int = 0,
                   rank: int = 0):
    """``n`` micro-batches of random tokens, different per rank, reproducible."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab_size, (micro_batch_size, seq_len + 1), generator=g)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out


def stderr_blocks(stderr: str) -> list[str]:
    """stderr as logical lines: a warning's header joined with its indented source line."""
    import re

    out: list[str] = []
    for line in stderr.splitlines():
        if out and line.startswith((" ", "\t")) and re.search(r"Warning: ", out[-1]):
            out[-1] += "\n" + line
        elif line.strip():
            out.append(line)
    return out


# --- the trainer, in-process (tiers e2e and zero) ---------------------------------------------


def run_invocations(rank, world_size, invocations):
    """Run the trainer once per override list, in order, inside one process group."""
    return [Trainer(load(TINY, overrides)).run_all() for overrides in invocations]


def losses(run_dir: str) -> list[tuple[int, float]]:
    """``(global step, loss)`` of every logged step of a run."""
    return [(r["step"], r["loss"]) for r in metrics.read(run_dir) if "loss" in r]


def final_weights(run_dir: str) -> dict:
    """The full fp32 weights of a run's newest checkpoint."""
    return checkpoint.load_weights(checkpoint.newest(run_dir))


# --- ReLoRA on a model ZeRO pads (tiers zero) -----------------------------------------------------

RELORA_VOCAB = 63
# Logit change across merge + re-init. fp32: absolute; measured <= 2.6e-7 (|logits| ~0.8). bf16:
# relative to max |logit|, as the merge rounds W0 to bf16 (a frozen param has no fp32 master);
# measured <= 3.9e-3 absolute, one bf16 ulp at |logit| 0.5-1, i.e. <= 0.7% relative.
LOGIT_TOL = {"fp32": 1e-5, "bf16": 2e-2}


def odd_model() -> LlamaModel:
    """Tiny LLaMA with odd sizes (intermediate 85, vocab 63, rank 3 in ``make_relora``) so ZeRO pads."""
    torch.manual_seed(0)
    cfg = ModelConfig(size="tiny", hidden_size=32, num_heads=2, intermediate_size=85, seq_len=16)
    return LlamaModel(resolve(cfg, vocab_size=RELORA_VOCAB))


def make_relora(**overrides) -> ReLoRA:
    options = dict(rank=3, alpha=6, restart_every=2, restart_warmup_steps=1, reset_fraction=0.75, seed=5)
    options.update(overrides)
    return ReLoRA(parse_options("relora", options), StageConfig(steps=100), None)


# --- GaLore on the tiny model under DeepSpeed (tiers zero) -------------------------------------
# Tiny LLaMA (hidden 64, 2 layers, vocab 64, seq 16), rank 8, gap 4, 13 steps: refreshes at
# steps 0, 4, 8 and 12; two micro-batches of two sequences per step.

STEPS, GAP, RANK, LR = 13, 4, 8, 3e-3
KW = dict(lr=LR, betas=(0.9, 0.95), eps=1e-12)
# Why eps 1e-12 and how the tolerances were set: see tests/reference/test_galore_unit.py. Every run here
# differs from galore-torch only by float rounding: measured max |dW| 1.2e-7 (stage 0), 1.6e-7
# (stage 3), with weights moving by 3.5e-2. TOL = 2e-6 is ~10x that.
TOL = 2e-6


def galore_tiny_model():
    from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve

    torch.manual_seed(0)
    return LlamaModel(resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=64))


def step_batches(step: int, rank: int = 0, world: int = 1) -> list[dict]:
    """The step's two micro-batches of two sequences; with 2 ranks, rank r takes sequence r."""
    batches = random_batches(2, micro_batch_size=2, seed=step)
    if world == 1:
        return batches
    return [{k: v[rank:rank + 1] for k, v in b.items()} for b in batches]


def stage_config(weight_decay=0.0):
    from lowrank_pt.config.recipe import OptimizerConfig, ScheduleConfig, StageConfig

    return StageConfig(steps=100, optimizer=OptimizerConfig(lr=LR, betas=list(KW["betas"]), eps=KW["eps"],
                                                            weight_decay=weight_decay, grad_clip=0.0),
                       schedule=ScheduleConfig(kind="constant"))


def build_galore(zero_stage, precision="fp32", weight_decay=0.0, optimizer=None, world=1, offload=False, deepspeed=None,
          accum=2, **options):
    """(engine, method) for the galore method (or a bare client ``optimizer`` on the plain model)."""
    from lowrank_pt.config.recipe import EngineConfig
    from lowrank_pt.methods.galore.method import GaLore, GaLoreOptions
    from lowrank_pt.zero import engine as E

    model = galore_tiny_model()
    stage = stage_config(weight_decay)
    method = None
    if optimizer is None:
        method = GaLore(GaLoreOptions(**{"rank": RANK, "update_proj_gap": GAP, **options}), stage, None)
        method.prepare_model(model)
        optimizer = build_optimizer(method.param_groups(model), stage.optimizer, offload=offload)
    else:
        optimizer = optimizer(model)
    micro = (2 if world == 1 else 1) * (2 // accum)
    engine_cfg = EngineConfig(zero_stage=zero_stage, precision=precision, offload_optimizer=offload,
                              deepspeed=deepspeed or {})
    ds = E.deepspeed_config(engine_cfg, micro, accum, 0.0, world)
    engine = E.initialize(model, optimizer, lambda step: 1.0, ds)
    if method is not None:
        method.on_engine_ready(StageContext(engine=engine, total_steps=100))
    return engine, method


def one_micro_batch(step: int, rank: int = 0, world: int = 1) -> list[dict]:
    """The step's four sequences as one micro-batch (two per rank on 2 ranks): the same mean
    gradient as ``step_batches``' two micro-batches."""
    batches = random_batches(2, micro_batch_size=2, seed=step)
    whole = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    per = 4 // world
    return [{k: v[rank * per:(rank + 1) * per] for k, v in whole.items()}]


def run_galore(engine, method, steps, rank=0, world=1, start=0):
    """Train steps ``start..steps-1``; returns {step: {"loss": ..., **after_step events}}."""
    log = {}
    batches_of = one_micro_batch if engine.gradient_accumulation_steps() == 1 else step_batches
    for step in range(start, steps):
        if method is None:
            for b in step_batches(step, rank, world):
                engine.backward(engine(b["input_ids"], b["labels"]))
                engine.step()
        else:
            loss = method.train_step(engine, batches_of(step, rank, world), step)
            log[step] = {"loss": loss, **method.after_step(engine, step)}
    return log


# --- activation memory (tiers unit) ----------------------------------------------------------------


def saved_bytes(model, ids):
    """(bytes of the tensors autograd keeps for backward of ``model(ids, ids)``, params excluded;
    the loss; the gradients by name)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, ids)
    loss.backward()
    return sum(seen.values()), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
