"""Benchmark: what low-bit optimizer states and bf16 masters save in a real process, against what
the planner says they save.

One full-rank AdamW step on one CPU rank (ZeRO 0, bf16, gloo), each setting in a fresh process: the
model is built, the engine made, ``--steps`` optimizer steps taken, and the process's peak resident
set read (``VmHWM``). The planner's figure for the same setting (``lowrank-pt plan``: params,
masters, gradients, optimizer states) is printed beside it. The figure of merit is

    (peak RSS with fp32 states and masters - peak RSS with the switches) / (planned saving)

Each child fixes glibc's mmap threshold at the start, as a run does
(``lowrank_pt.core.host.free_large_blocks_promptly``, called by ``lowrank_pt/train.py``);
``--heap-default`` leaves glibc's rising threshold, whose heap keeps the step's freed transients.

    python tools/bench_bytes.py                                   # 350m, int8 states + bf16 masters
    python tools/bench_bytes.py --size 130m --settings fp32/fp32,bf16/fp32,int8/bf16

Run it alone (two threads).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_methods import command_line, init_single_process, machine, save  # noqa: E402

from lowrank_pt.core.host import free_large_blocks_promptly  # noqa: E402

GIB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="350m")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--settings", default="fp32/fp32,int8/bf16",
                   help="comma-separated STATE_DTYPE/MASTER_WEIGHTS; the first is the baseline")
    p.add_argument("--out", default="bench_out/bytes")
    p.add_argument("--heap-default", action="store_true",
                   help="leave glibc's mmap threshold as it is (a run fixes it: core.host.free_large_blocks_promptly)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(args) -> dict:
    """One setting in this process: build, ``--steps`` steps, the peak RSS and the plan."""
    import torch

    from lowrank_pt.config.schema import EngineConfig, OptimizerConfig, StageConfig
    from lowrank_pt.methods import Method
    from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
    from lowrank_pt.optim.adamw import build_optimizer
    from lowrank_pt.tracking import planner
    from lowrank_pt.zero import engine as E
    from lowrank_pt.zero.held import state_bytes

    state_dtype, masters = args.child.split("/")
    if not args.heap_default:
        free_large_blocks_promptly()  # as a run does (lowrank_pt/train.py)
    init_single_process()
    torch.manual_seed(0)
    cfg = resolve(ModelConfig(size=args.size, seq_len=args.seq_len), vocab_size=args.vocab_size)
    stage = StageConfig(steps=args.steps, optimizer=OptimizerConfig(lr=1e-4, state_dtype=state_dtype))
    method = Method(None, stage, None)
    model = LlamaModel(cfg)
    engine_cfg = EngineConfig(zero_stage=0, precision="bf16", master_weights=masters)
    optimizer = build_optimizer(method.param_groups(model), stage.optimizer, master_weights=masters)
    ds = E.deepspeed_config(engine_cfg, 1, 1, 1.0, 1)
    engine = E.initialize(model, optimizer, lambda step: 1.0, ds,
                          cast_to=torch.bfloat16 if E.bf16_params(engine_cfg) else None)
    g = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab_size, (1, args.seq_len + 1), generator=g)
        engine.backward(engine(ids[:, :-1], ids[:, 1:]))
        engine.step()
    held = state_bytes(engine)
    lay = planner.layout(cfg, "full", {}, 0.0, state_dtype)
    plan = planner.state_bytes(lay, 0, 1, "bf16", master_weights=masters)
    keys = ("params", "master_params", "grads", "optimizer_states")
    return {"setting": args.child, "peak_rss": peak_rss(), "held": {k: held[k] for k in keys},
            "planned": {k: plan[k] for k in keys}}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for setting in args.settings.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", setting, "--size", args.size,
               "--seq-len", str(args.seq_len), "--vocab-size", str(args.vocab_size), "--steps", str(args.steps),
               *(["--heap-default"] if args.heap_default else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{setting}: peak RSS {runs[-1]['peak_rss'] / GIB:.2f} GiB", flush=True)
    base = runs[0]
    lines = [f"# Bytes per parameter: {args.size}, one CPU rank, ZeRO 0, bf16, {args.steps} full-rank AdamW steps",
             "", f"`{command_line('bench_bytes.py', argv)}` on {machine()}", "",
             "| state_dtype / master_weights | peak RSS GiB | planned state GiB | held state GiB | "
             "RSS saved GiB | planner's saving GiB | saved / planned |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        planned, held = sum(r["planned"].values()), sum(r["held"].values())
        saved = (base["peak_rss"] - r["peak_rss"]) / GIB
        plan_saving = (sum(base["planned"].values()) - planned) / GIB
        ratio = f"{saved / plan_saving:.2f}" if plan_saving else "–"
        lines.append(f"| {r['setting']} | {r['peak_rss'] / GIB:.2f} | {planned / GIB:.2f} | {held / GIB:.2f} | "
                     f"{saved:.2f} | {plan_saving:.2f} | {ratio} |")
    text = "\n".join(lines) + "\n"
    save(args.out, {"runs": runs, "command": command_line("bench_bytes.py", argv)}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
