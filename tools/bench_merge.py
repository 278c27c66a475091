"""Benchmark: ReLoRA's restart (merge, re-init, moment reset) and GaLore's refresh at ZeRO-3, this
tree against an older commit, side by side in one run.

The older commit (``--base``, default ``HEAD~1``) is checked out in a temporary git worktree;
each tree runs the same worker on 2 gloo ranks (``torchrun``, one torch thread per rank) on the
same model, and the two are run alternately ``--rounds`` times so load on a shared machine hits
both alike. ReLoRA: the worker builds an engine at ZeRO-3, takes one step (so B is not zero) and
times ``--restarts`` restarts. GaLore: it times steps 0-3 with a refresh at steps 0 and 2, and a
refresh's cost is its step's time minus the plain step after it. The table reports each tree's
median and the ratio.

    python tools/bench_merge.py --size 130m --rank 128 --base 0f61e8e~1
    python tools/bench_merge.py --worker --size tiny     # one tree's numbers (under torchrun)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="130m", help="model size (lowrank_pt.model.llama.MODEL_SIZES)")
    p.add_argument("--rank", type=int, default=128, help="ReLoRA rank r")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--restarts", type=int, default=3, help="timed restarts per worker run")
    p.add_argument("--rounds", type=int, default=1, help="alternating runs of each tree")
    p.add_argument("--base", default="HEAD~1", help="commit to compare against")
    p.add_argument("--method", default="relora", choices=("relora", "galore"))
    p.add_argument("--galore-options", default="{}", help="JSON: extra GaLore options (this tree only)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args()


def worker(args) -> None:
    """One tree: build, one step, time restarts; rank 0 prints a JSON line."""
    import torch

    from lowrank_pt.config.recipe import OptimizerConfig, ScheduleConfig, StageConfig
    from lowrank_pt.core import dist
    from lowrank_pt.methods import parse_options
    from lowrank_pt.methods.relora import ReLoRA

    torch.set_num_threads(1)
    dist.init()
    torch.manual_seed(0)
    if args.method == "galore":
        return galore_worker(args)
    stage = StageConfig(steps=10**6, optimizer=OptimizerConfig(lr=1e-3),
                        schedule=ScheduleConfig(kind="cosine", warmup_steps=0))
    options = parse_options("relora", {"rank": args.rank, "alpha": 2.0 * args.rank, "restart_every": 10**5,
                                       "reset_mode": "zero"})
    method = ReLoRA(options, stage, None)
    engine = build_engine(args, method, stage, clip=1.0)
    g = torch.Generator().manual_seed(dist.rank())
    ids = torch.randint(0, args.vocab, (1, args.seq_len + 1), generator=g)
    method.train_step(engine, [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}], 0)
    times = []
    for _ in range(args.restarts):
        dist.barrier()
        t0 = time.perf_counter()
        method.restart(engine)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if dist.rank() == 0:
        print("RESULT " + json.dumps({"restart_s": times}), flush=True)


def build_engine(args, method, stage, clip: float):
    """The method's ZeRO-3 fp32 engine on the model of ``args``, built partitioned."""
    from lowrank_pt.config.recipe import EngineConfig
    from lowrank_pt.core import dist
    from lowrank_pt.methods.base import StageContext
    from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
    from lowrank_pt.optim.adamw import build_optimizer
    from lowrank_pt.zero import engine as E

    ds = E.deepspeed_config(EngineConfig(zero_stage=3, precision="fp32"), 1, 1, clip, dist.world_size())
    with E.partitioned_build(ds):
        model = LlamaModel(resolve(ModelConfig(size=args.size, seq_len=args.seq_len), vocab_size=args.vocab))
    method.prepare_model(model)
    optimizer = build_optimizer(method.param_groups(model), stage.optimizer)
    engine = E.initialize(model, optimizer, method.lr_lambda(10**6), ds)
    method.on_engine_ready(StageContext(engine=engine, total_steps=10**6))
    return engine


def galore_worker(args) -> None:
    """Steps 0-3 of GaLore at ZeRO-3 (refreshes at 0 and 2): each refresh's extra seconds."""
    import torch

    from lowrank_pt.config.recipe import OptimizerConfig, ScheduleConfig, StageConfig
    from lowrank_pt.core import dist
    from lowrank_pt.methods import parse_options
    from lowrank_pt.methods.galore.method import GaLore

    stage = StageConfig(steps=10**6, optimizer=OptimizerConfig(lr=1e-3), schedule=ScheduleConfig(kind="constant"))
    options = parse_options("galore", {"rank": args.rank, "update_proj_gap": 2, **json.loads(args.galore_options)})
    method = GaLore(options, stage, None)
    engine = build_engine(args, method, stage, clip=0.0)
    g = torch.Generator().manual_seed(dist.rank())
    times = []
    for step in range(4):
        ids = torch.randint(0, args.vocab, (1, args.seq_len + 1), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        method.train_step(engine, [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}], step)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if dist.rank() == 0:
        print("RESULT " + json.dumps({"restart_s": [times[0] - times[1], times[2] - times[3]]}), flush=True)


def run_tree(tree: str, args, extra=()) -> list[float]:
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), os.path.join(tree, "tools", "bench_merge.py"), "--worker",
           "--size", args.size, "--rank", str(args.rank), "--vocab", str(args.vocab),
           "--seq-len", str(args.seq_len), "--restarts", str(args.restarts), "--method", args.method, *extra]
    if not os.path.exists(cmd[7]):  # the older tree has no copy of this script: run ours there
        cmd[7] = os.path.abspath(__file__)
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        first = out.stderr.find("Traceback")  # the first rank's own error, not the launcher's
        raise SystemExit(f"worker in {tree} failed:\n{out.stderr[first:first + 4000]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])["restart_s"]


def main():
    args = parse_args()
    if args.worker:
        sys.path.insert(0, os.environ.get("PYTHONPATH", ROOT))
        return worker(args)
    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = os.path.join(tmp, "base")
        subprocess.run(["git", "worktree", "add", "--detach", old_tree, base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            times = {f"before ({base})": [], "after (this tree)": []}
            for _ in range(args.rounds):
                times[f"before ({base})"] += run_tree(old_tree, args)
                times["after (this tree)"] += run_tree(ROOT, args, ("--galore-options", args.galore_options))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", old_tree], cwd=ROOT, check=False)
    med = {k: statistics.median(v) for k, v in times.items()}
    before, after = med.values()
    what = "ReLoRA restart" if args.method == "relora" else f"GaLore refresh (this tree: {args.galore_options})"
    print(f"{what} at ZeRO-3, 2 ranks x 1 thread, {args.size}, r={args.rank} "
          f"(median of {len(next(iter(times.values())))} each)")
    print("| tree | seconds (median) | min |")
    print("|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.3f} | {min(v):.3f} |")
    print(f"ratio after / before: {after / before:.3f}")


if __name__ == "__main__":
    main()
