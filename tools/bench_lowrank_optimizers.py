"""Benchmark: full-rank AdamW, GaLore, APOLLO, APOLLO-Mini and Fira side by side, in one run, at
equal tokens.

The contenders are ``tools/bench_methods.py``'s: the same initial weights, the same batches of the
embedded corpus through a DeepSpeed engine (ZeRO 0, one rank), steps taken in turns (round robin,
so load from other processes falls on all of them alike), a StageTracker timing each step's
phases and counting the state each holds, and the same validation sequences at the end. Full-rank
AdamW runs at three learning rates (the demo recipe's 2e-3, 5e-3 and the low-rank methods' 1e-2),
so "beats AdamW" means beats the best of the three. The low-rank methods run at the published
learning rate 1e-2 with their published defaults except rank and gap (same rank for GaLore,
APOLLO and Fira; APOLLO-Mini rank 1), with each method's default gradient clipping.

Reported per contender: seconds per step (all timed steps, refreshes included) and the ratio to
AdamW's, tokens/s, optimizer-state bytes (measured; the planner's formula beside it) and the ratio
to AdamW's, validation loss and perplexity.

    python tools/bench_lowrank_optimizers.py --threads 1 --out bench_lowrank   # demo model, 60 steps (~10 min)
    python tools/bench_lowrank_optimizers.py --quick --out DIR                  # seconds: a smoke test

Writes ``DIR/results.json`` and ``DIR/bench.md`` (the table for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_methods import Contender, begin, command_line, embedded_corpus, machine, mib, model_description, save  # noqa: E402

FULL_LRS = (2e-3, 5e-3, 1e-2)
LOWRANK_LR = 1e-2
BASELINE = "full (lr 2e-3)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, a few steps: a smoke test")
    p.add_argument("--size", default="demo", help="model size (lowrank_pt.model.llama.MODEL_SIZES)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per contender (equal token budget)")
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the timing (warm-up)")
    p.add_argument("--rank", type=int, default=64, help="rank of galore, apollo and fira (apollo_mini: 1)")
    p.add_argument("--gap", type=int, default=50, help="projection refresh gap (steps) of every low-rank method")
    p.add_argument("--vocab", type=int, default=8000, help="tokenizer vocabulary (embedded corpus)")
    p.add_argument("--max-documents", type=int, default=None, help="limit the corpus (faster tokenizer)")
    p.add_argument("--eval-sequences", type=int, default=64)
    p.add_argument("--beta2", type=float, default=0.95,
                   help="Adam's beta2 for every contender (0.95: this framework's default; 0.999: the papers')")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cache-dir", default=".cache/lowrank_pt", help="data and device-peak cache")
    p.add_argument("--out", default="bench_lowrank", help="output directory")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.seq_len, args.micro_batch, args.steps, args.skip = "tiny", 64, 4, 3, 1
        args.rank, args.gap, args.vocab, args.eval_sequences = 8, 2, 512, 4
        args.threads = args.threads or 1
        args.max_documents = args.max_documents or 200
    return args


def stages(args) -> dict:
    """name -> StageConfig of every contender."""
    from lowrank_pt.config.recipe import OptimizerConfig, ScheduleConfig, StageConfig

    warmup = max(1, args.steps // 10)

    def stage(name, method, lr, options=None):
        return StageConfig(name=name, method=method, steps=args.steps, options=dict(options or {}),
                           optimizer=OptimizerConfig(lr=lr, betas=[0.9, args.beta2]),
                           schedule=ScheduleConfig(kind="cosine", warmup_steps=warmup))

    out = {f"full (lr {lr:.0e})".replace("e-0", "e-"): stage("full", "full", lr) for lr in FULL_LRS}
    gap = {"update_proj_gap": args.gap}
    out["galore"] = stage("galore", "galore", LOWRANK_LR, {"rank": args.rank, "scale": 0.25, **gap})
    out["apollo"] = stage("apollo", "apollo", LOWRANK_LR, {"rank": args.rank, **gap})
    out["apollo_mini"] = stage("apollo_mini", "apollo_mini", LOWRANK_LR, gap)
    out["fira"] = stage("fira", "fira", LOWRANK_LR, {"rank": args.rank, **gap})
    return out


def run(args, model_cfg, shard, val_batches) -> dict:
    contenders = [Contender(name, args, model_cfg, shard, tracked=True, precision=args.precision, stage=stage)
                  for name, stage in stages(args).items()]
    for step in range(args.steps):
        order = contenders[step % len(contenders):] + contenders[:step % len(contenders)]
        for c in order:
            c.step(step)
        if step % 10 == 9 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}: " + ", ".join(f"{c.name} {c.losses[-1]:.3f}" for c in contenders),
                  flush=True)
    results = {}
    for c in contenders:
        times = c.step_times[args.skip:]
        val = c.evaluate(val_batches)
        done = c.tracker.finish(end_step=args.steps, total_steps=args.steps)
        results[c.name] = {
            "method": c.stage.method, "lr": c.stage.optimizer.lr, "options": dict(c.stage.options),
            "grad_clip": c.method.grad_clip(), "step_s": statistics.mean(times),
            "step_s_median": statistics.median(times), "steps_timed": len(times),
            "tokens_per_s": c.tokens_per_step / statistics.mean(times), "eval_loss": val,
            "eval_ppl": math.exp(min(val, 50)), "final_train_loss": statistics.mean(c.losses[-3:]),
            "phase_s": {k: v / done["timed_steps"] for k, v in done["phase_s"].items()},
            "memory": done["memory"]["measured"], "formula": done["memory"]["formula"]}
    base = results[BASELINE]
    best_full = min((e for e in results.values() if e["method"] == "full"), key=lambda e: e["eval_ppl"])
    for entry in results.values():
        entry["ratio_to_full"] = entry["step_s"] / base["step_s"]
        entry["state_ratio_to_full"] = entry["memory"]["optimizer_states"] / base["memory"]["optimizer_states"]
        entry["beats_best_full"] = entry["eval_ppl"] < best_full["eval_ppl"]
    return {"contenders": results, "best_full_ppl": best_full["eval_ppl"]}


def markdown(results: dict, args, command: str) -> str:
    c = results["contenders"]
    lines = [f"Command: `{command}`", "", f"Machine: {results['machine']}", "",
             f"Model: {results['model']}; {args.steps} steps × {results['tokens_per_step']} tokens each "
             f"(equal budget), ZeRO 0, {args.precision}, 1 rank, betas (0.9, {args.beta2:g}); rank {args.rank} "
             f"(APOLLO-Mini 1), "
             f"refresh gap {args.gap}; wall time {results['seconds']:.0f} s.", "",
             "| contender | lr | clip | s/step | × AdamW | tokens/s | opt. states (MiB) | × AdamW | "
             "val loss | val ppl | beats best AdamW |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for name, e in c.items():
        states = e["memory"]["optimizer_states"]
        formula = e["formula"].get("optimizer_states")
        cell = mib(states) if formula in (None, states) else f"{mib(states)} (formula {mib(formula)})"
        verdict = "–" if e["method"] == "full" else ("yes" if e["beats_best_full"] else "no")
        lines.append(f"| {name} | {e['lr']:g} | {e['grad_clip']:g} | {e['step_s']:.4f} | {e['ratio_to_full']:.3f} | "
                     f"{e['tokens_per_s']:,.0f} | {cell} | {e['state_ratio_to_full']:.3f} | {e['eval_loss']:.4f} | "
                     f"{e['eval_ppl']:.2f} | {verdict} |")
    phases = sorted({k for e in c.values() for k in e["phase_s"]})
    lines += ["", "Seconds per step by phase:", "", "| contender | " + " | ".join(phases) + " |",
              "|---|" + "---:|" * len(phases)]
    for name, e in c.items():
        lines.append(f"| {name} | " + " | ".join(f"{e['phase_s'].get(p, 0.0):.4f}" for p in phases) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    started = begin(args)
    model_cfg, shard, val, vocab = embedded_corpus(args)
    results = run(args, model_cfg, shard, val)
    results["model"] = model_description(args, model_cfg, vocab)
    results["tokens_per_step"] = args.micro_batch * args.seq_len
    results["machine"] = machine()
    results["seconds"] = time.perf_counter() - started
    save(args.out, results, markdown(results, args, command_line("bench_lowrank_optimizers.py", argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
