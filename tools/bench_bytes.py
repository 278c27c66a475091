"""Benchmark: what low-bit optimizer states, bf16 masters and per-layer updates save in a real
process, against what the planner says they save.

Steps of a method (``--methods``: full-rank AdamW, GaLore with its refresh in backward) on one CPU
rank (ZeRO 0, bf16, gloo), each setting in a fresh process: the model is built, the engine made,
``--steps`` optimizer steps taken through the method's ``train_step``, and the process's peak
resident set read (``VmHWM``). The planner's figure for the same setting (``lowrank-pt plan``:
params, masters, gradients, optimizer states) is printed beside it. A setting is
``STATE_DTYPE/MASTER_WEIGHTS[/UPDATE]``; the first of each method is its baseline, and the figure
of merit is

    (peak RSS of the baseline - peak RSS with the switches) / (the planner's saving)

Each child fixes glibc's mmap threshold at the start, as a run does
(``lowrank_pt.core.host.free_large_blocks_promptly``, called by ``lowrank_pt/train.py``);
``--heap-default`` leaves glibc's rising threshold, whose heap keeps the step's freed transients.

    python tools/bench_bytes.py                                   # 350m, int8 states + bf16 masters
    python tools/bench_bytes.py --size 130m --settings fp32/fp32,bf16/fp32,int8/bf16
    python tools/bench_bytes.py --methods full,galore --settings int8/bf16/step,int8/bf16/per_layer

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
                   help="comma-separated STATE_DTYPE/MASTER_WEIGHTS[/UPDATE]; the first is the baseline")
    p.add_argument("--methods", default="full", help="comma-separated: full, galore (each with every setting)")
    p.add_argument("--galore-rank", type=int, default=256)
    p.add_argument("--out", default="bench_out/bytes")
    p.add_argument("--heap-default", action="store_true",
                   help="leave glibc's mmap threshold as it is (a run fixes it: core.host.free_large_blocks_promptly)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-method", default="full", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(args) -> dict:
    """One setting in this process: build, ``--steps`` steps, the peak RSS and the plan."""
    import torch

    from lowrank_pt import methods
    from lowrank_pt.config.schema import EngineConfig, OptimizerConfig, StageConfig
    from lowrank_pt.methods.base import StageContext
    from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
    from lowrank_pt.tracking import planner
    from lowrank_pt.zero.partition import allreduce_bucket_numel
    from lowrank_pt.zero import engine as E
    from lowrank_pt.zero.held import state_bytes
    from lowrank_pt.zero.per_layer import PerLayerUpdates

    state_dtype, masters, update = (args.child.split("/") + ["step"])[:3]
    if not args.heap_default:
        free_large_blocks_promptly()  # as a run does (lowrank_pt/train.py)
    init_single_process()
    torch.manual_seed(0)
    cfg = resolve(ModelConfig(size=args.size, seq_len=args.seq_len), vocab_size=args.vocab_size)
    options = {"rank": args.galore_rank, "refresh": "backward", "update_proj_gap": 200} \
        if args.child_method == "galore" else {}
    stage = StageConfig(steps=args.steps, method=args.child_method, options=options, update=update,
                        optimizer=OptimizerConfig(lr=1e-4, state_dtype=state_dtype, grad_clip=0.0))
    method = methods.build(stage, None)
    model = LlamaModel(cfg)
    method.prepare_model(model)
    engine_cfg = EngineConfig(zero_stage=0, precision="bf16", master_weights=masters)
    optimizer = method.build_optimizer(method.param_groups(model), stage, engine_cfg)
    ds = E.deepspeed_config(engine_cfg, 1, 1, 0.0, 1)
    engine = E.initialize(model, optimizer, lambda step: 1.0, ds,
                          cast_to=torch.bfloat16 if E.bf16_params(engine_cfg) else None)
    per_layer = PerLayerUpdates(engine) if update == "per_layer" else None
    method.on_engine_ready(StageContext(engine=engine, total_steps=args.steps, per_layer=per_layer))
    g = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        ids = torch.randint(0, args.vocab_size, (1, args.seq_len + 1), generator=g)
        method.train_step(engine, [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}], step)
        method.after_step(engine, step)
    held = state_bytes(engine)
    if per_layer is not None:  # freed in the backward: the most held at once
        held["grads"] = per_layer.peak_grad_bytes
    else:  # freed by the step: an ordinary step holds all of them until then
        held["grads"] = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
    lay = planner.layout(cfg, args.child_method, options, 0.0, state_dtype)
    plan = planner.state_bytes(lay, 0, 1, "bf16", master_weights=masters, update=update)
    keys = ("params", "master_params", "grads", "optimizer_states")
    bucket = allreduce_bucket_numel([n for g in lay.groups for n in g]) * 2 if update == "step" else 0
    return {"setting": args.child, "method": args.child_method, "peak_rss": peak_rss(),
            "held": {k: held[k] for k in keys}, "planned": {k: plan[k] for k in keys}, "allreduce_bucket": bucket}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for method in args.methods.split(","):
        for setting in args.settings.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", setting, "--child-method", method,
                   "--size", args.size, "--seq-len", str(args.seq_len), "--vocab-size", str(args.vocab_size),
                   "--steps", str(args.steps), "--galore-rank", str(args.galore_rank),
                   *(["--heap-default"] if args.heap_default else [])]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{method} {setting}: peak RSS {runs[-1]['peak_rss'] / GIB:.2f} GiB", flush=True)
    lines = [f"# Bytes per parameter: {args.size}, one CPU rank, ZeRO 0, bf16, {args.steps} steps of each method",
             "", f"`{command_line('bench_bytes.py', argv)}` on {machine()}", "",
             "| method | state_dtype / master_weights / update | peak RSS GiB | planned state GiB | held state GiB | "
             "RSS saved GiB | planner's saving GiB | saved / planned | + all-reduce bucket GiB | saved / both |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        base = next(b for b in runs if b["method"] == r["method"])
        planned, held = sum(r["planned"].values()), sum(r["held"].values())
        saved = (base["peak_rss"] - r["peak_rss"]) / GIB
        plan_saving = (sum(base["planned"].values()) - planned) / GIB
        bucket_saving = (base.get("allreduce_bucket", 0) - r.get("allreduce_bucket", 0)) / GIB
        ratio = f"{saved / plan_saving:.2f}" if plan_saving else "–"
        both = f"{saved / (plan_saving + bucket_saving):.2f}" if plan_saving + bucket_saving else "–"
        lines.append(f"| {r['method']} | {r['setting']} | {r['peak_rss'] / GIB:.2f} | {planned / GIB:.2f} | "
                     f"{held / GIB:.2f} | {saved:.2f} | {plan_saving:.2f} | {ratio} | {bucket_saving:.2f} | {both} |")
    lines += ["", "planner's saving: the held state (params, masters, gradients, optimizer states) the planner "
              "counts; + all-reduce bucket: also the flattened copy of a gradient bucket that DeepSpeed's ZeRO-0 "
              "all-reduce makes in an ordinary step (``zero.partition.allreduce_bucket_numel``), which per-layer "
              "updates do not make."]
    text = "\n".join(lines) + "\n"
    save(args.out, {"runs": runs, "command": command_line("bench_bytes.py", argv)}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
