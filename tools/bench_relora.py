"""Benchmark: ReLoRA vs full-rank AdamW on the same model, side by side in one run.

Measures the optimizer step time (forward, backward, step) and the bytes of optimizer state each
rank holds, for two DeepSpeed engines built from the same initial weights. Passes alternate
(full, relora, full, relora, ...) so load on a shared machine hits both alike; the table reports
medians over all timed steps and the ratio relora / full. One restart (merge, re-init, prune) is
timed separately: it happens once every restart_every steps.

    python tools/bench_relora.py --size demo --seq-len 256 --rank 64
    torchrun --nproc_per_node 2 tools/bench_relora.py --zero-stage 2    # per-rank numbers
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from lowrank_pt.config.recipe import EngineConfig, OptimizerConfig, ScheduleConfig, StageConfig
from lowrank_pt.core import dist
from lowrank_pt.methods import Method, parse_options
from lowrank_pt.methods.base import StageContext
from lowrank_pt.methods.relora import ReLoRA
from lowrank_pt.model.llama import LlamaModel, ModelConfig, count_parameters, resolve
from lowrank_pt.model.lowrank_linear import lowrank_modules
from lowrank_pt.optim.adamw import build_optimizer
from lowrank_pt.zero import engine as E
from lowrank_pt.zero.params import full_numel


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="demo", help="model size (tiny, small, demo, 60m, ...)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--rank", type=int, default=64, help="ReLoRA rank r")
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--steps", type=int, default=5, help="timed steps per engine per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per engine first")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args()


def build(method: Method, model: LlamaModel, args):
    stage = method.stage
    method.prepare_model(model)
    optimizer = build_optimizer(method.param_groups(model), stage.optimizer)
    ds = E.deepspeed_config(EngineConfig(zero_stage=args.zero_stage, precision=args.precision),
                            args.micro_batch, 1, method.grad_clip(), dist.world_size())
    engine = E.initialize(model, optimizer, method.lr_lambda(10**6), ds)
    method.on_engine_ready(StageContext(engine=engine, total_steps=10**6))
    return engine


def state_bytes(engine) -> int:
    """Bytes of the moment tensors this rank's torch optimizer holds (step counters excluded)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sum(t.numel() * t.element_size() for s in inner.state.values()
               for k, t in s.items() if torch.is_tensor(t) and k != "step")


def trainable(engine, skip: tuple[str, ...] = ()) -> int:
    return sum(full_numel(p) for n, p in engine.module.named_parameters()
               if p.requires_grad and not n.startswith(skip))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(engine, method, batches, start: int, n: int) -> list[float]:
    times = []
    for step in range(start, start + n):
        sync()
        t0 = time.perf_counter()
        method.train_step(engine, [batches[step % len(batches)]], step)
        method.after_step(engine, step)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main():
    args = parse_args()
    dist.init()
    torch.manual_seed(0)
    cfg = resolve(ModelConfig(size=args.size, seq_len=args.seq_len), vocab_size=args.vocab)
    base_model = LlamaModel(cfg)
    stage = StageConfig(steps=10**6, optimizer=OptimizerConfig(lr=1e-3), schedule=ScheduleConfig(kind="cosine"))
    options = parse_options("relora", {"rank": args.rank, "alpha": args.alpha, "restart_every": 10**5,
                                       "reset_mode": "magnitude", "reset_fraction": 0.999})
    methods = {"full AdamW": Method(None, stage, None), f"relora r={args.rank}": ReLoRA(options, stage, None)}
    engines = {name: build(m, copy.deepcopy(base_model), args) for name, m in methods.items()}
    del base_model

    g = torch.Generator().manual_seed(1000 + dist.rank())
    device = dist.device()
    batches = []
    for _ in range(8):
        ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), generator=g).to(device)
        batches.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})

    times = {name: [] for name in engines}
    step = {name: 0 for name in engines}
    for name in engines:  # warm-up: first steps build optimizer state and caches
        timed_steps(engines[name], methods[name], batches, 0, args.warmup)
        step[name] = args.warmup
    for _ in range(args.rounds):
        for name in engines:
            times[name] += timed_steps(engines[name], methods[name], batches, step[name], args.steps)
            step[name] += args.steps

    relora_name = list(engines)[1]
    sync()
    t0 = time.perf_counter()
    methods[relora_name].restart(engines[relora_name])
    sync()
    restart_s = time.perf_counter() - t0

    tokens = args.micro_batch * args.seq_len * dist.world_size()
    rows = []
    for name, engine in engines.items():
        med = statistics.median(times[name])
        rows.append({"step time (s, median)": med, "step time (s, min)": min(times[name]),
                     "tokens/s (all ranks)": tokens / med, "trainable params": trainable(engine),
                     "  of which not embed/head": trainable(engine, ("embed_tokens", "lm_head")),
                     "optimizer state MB/rank": state_bytes(engine) / 2**20})
    if dist.rank() == 0:
        wrapped = lowrank_modules(engines[relora_name].module)
        print(f"model {args.size}: {count_parameters(cfg) / 1e6:.2f}M params, d={cfg.hidden_size}, "
              f"layers={cfg.num_layers}, vocab={args.vocab}, seq {args.seq_len} x micro-batch {args.micro_batch}, "
              f"ZeRO {args.zero_stage}, {args.precision}, {dist.world_size()} rank(s), "
              f"{torch.get_num_threads()} threads; relora wraps {len(wrapped)} linears")
        print(f"{args.rounds} alternating rounds x {args.steps} timed steps per engine "
              f"after {args.warmup} warm-up steps")
        names = list(engines)
        print(f"| {'metric':28} | {names[0]:>14} | {names[1]:>14} | {'relora/full':>11} |")
        print(f"|{'-' * 30}|{'-' * 16}|{'-' * 16}|{'-' * 13}|")
        for key in rows[0]:
            a, b = rows[0][key], rows[1][key]
            fmt = "{:14,.0f}" if "params" in key or "embed" in key else "{:14.3f}"
            print(f"| {key:28} | {fmt.format(a)} | {fmt.format(b)} | {b / a:11.3f} |")
        print(f"| {'restart (merge+reinit+prune)':28} | {'-':>14} | {restart_s:14.3f} | {'':11} |")


if __name__ == "__main__":
    main()
