"""Shared test utilities: run a function on N gloo ranks, build a tiny DeepSpeed engine."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import tempfile
import traceback

import torch

from lowrank_pt import dist

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
           "deepspeed.module_inject", "deepspeed.moe", "lowrank_pt.trainer", "lowrank_pt.export", "lowrank_pt.cli",
           "helpers"]
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
                grad_clip: float = 1.0):
    """A DeepSpeed engine over the tiny LLaMA (or ``model``) with ``method`` (default full-rank).

    Call inside a process where ``dist.init()`` ran (e.g. under ``spawn``)."""
    from lowrank_pt import engine as E
    from lowrank_pt.config import EngineConfig, OptimizerConfig, ScheduleConfig, StageConfig
    from lowrank_pt.methods import Method
    from lowrank_pt.methods.base import StageContext
    from lowrank_pt.model import LlamaModel, ModelConfig, resolve

    torch.manual_seed(seed)
    if model is None:
        model = LlamaModel(resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=vocab_size))
    stage = StageConfig(steps=100, optimizer=OptimizerConfig(lr=lr), schedule=ScheduleConfig(kind="constant"))
    method = method or Method(None, stage, None)
    method.prepare_model(model)
    optimizer = E.build_optimizer(method.param_groups(model), stage.optimizer)
    ds = E.deepspeed_config(EngineConfig(zero_stage=zero_stage, precision=precision),
                            micro_batch_size, grad_accum, grad_clip, dist.world_size())
    engine = E.initialize(model, optimizer, method.lr_lambda(100), ds)
    method.on_engine_ready(StageContext(engine=engine, total_steps=100))
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
