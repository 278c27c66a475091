"""Benchmark: GaLore's step time against full-rank AdamW over tokens per micro-batch × rank, with
the forward path the cost model chose (``lowrank_pt.methods.galore.cost``) and each path forced.

A d = 1024 LLaMA (350m's block: intermediate 2736, 16 heads; ``--layers`` blocks, a small
vocabulary so that the blocks dominate), ZeRO 0 on one process, random tokens. For each
T ∈ ``--tokens`` (sequences of ``--seq-len``; T / seq-len of them per micro-batch) every
contender (full-rank AdamW; GaLore at each r ∈ {d/8, d/4, d/2} with ``forward: auto`` and, with
``--all-paths``, each path forced) trains the same initial weights, round-robin, one step each
in turn, so that load from other processes hits all of them alike. The first step (GaLore's
first refresh) is left out of the timing. Reported: seconds per step, the ratio to full rank
measured in the same round, the cost model's FLOP ratio on the targeted linears, the path.

    python tools/bench_galore_forward.py --threads 2                # ~10 min on 2 cores
    python tools/bench_galore_forward.py --quick                    # seconds: a smoke test

Writes ``DIR/results.json`` and ``DIR/bench.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_methods import begin, command_line, machine, save  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="d 64, two points, 2 timed steps: a smoke test")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2736)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokens", default="512,2048,8192", help="tokens per micro-batch (multiples of --seq-len)")
    p.add_argument("--ranks", default="8,4,2", help="r as d divided by each of these")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=4, help="steps per contender at each T (the first is not timed)")
    p.add_argument("--all-paths", action="store_true", help="also time call, step and factored forced")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench_out/galore_forward")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.heads, args.layers, args.vocab = 64, 172, 4, 1, 64
        args.seq_len, args.tokens, args.ranks, args.steps = 16, "16,64", "8,2", 3
        args.threads = args.threads or 1
    return args


def run_config(args, micro: int, method: str, options: dict):
    from lowrank_pt.config.recipe import (
        EngineConfig,
        ModelConfig,
        OptimizerConfig,
        RunConfig,
        ScheduleConfig,
        StageConfig,
        TrainConfig,
    )

    model = ModelConfig(size="350m", hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_heads=args.heads, num_layers=args.layers, seq_len=args.seq_len, vocab_size=args.vocab)
    stage = StageConfig(name=method, method=method, steps=args.steps, options=options,
                        optimizer=OptimizerConfig(lr=1e-3), schedule=ScheduleConfig(kind="constant"))
    return RunConfig(model=model, engine=EngineConfig(zero_stage=0, precision="fp32"),
                     train=TrainConfig(micro_batch_size=micro, grad_accum=args.accum), stages=[stage])


class Contender:
    """One configuration's engine, method and step times."""

    def __init__(self, label: str, args, micro: int, method: str, options: dict):
        from lowrank_pt import methods
        from lowrank_pt.methods.base import StageContext
        from lowrank_pt.model.llama import LlamaModel, resolve
        from lowrank_pt.zero import engine as E

        self.label = label
        run = run_config(args, micro, method, options)
        stage = run.stages[0]
        torch.manual_seed(0)
        model = LlamaModel(resolve(run.model))
        self.method = methods.build(stage, run)
        self.method.prepare_model(model)
        optimizer = self.method.build_optimizer(self.method.param_groups(model), stage, run.engine)
        ds = E.deepspeed_config(run.engine, micro, args.accum, self.method.grad_clip(), 1)
        self.engine = E.initialize(model, optimizer, self.method.lr_lambda(args.steps), ds)
        self.method.on_engine_ready(StageContext(engine=self.engine, total_steps=args.steps))
        g = torch.Generator().manual_seed(1)
        self.batches = []
        for _ in range(args.accum):
            ids = torch.randint(0, args.vocab, (micro, args.seq_len + 1), generator=g)
            self.batches.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        self.times: list[float] = []
        self.paths = sorted({getattr(a, "forward_path", "") for a in getattr(self.method, "adapters", {}).values()})

    def step(self, step: int) -> None:
        start = time.perf_counter()
        self.method.train_step(self.engine, self.batches, step)
        self.method.after_step(self.engine, step)
        self.times.append(time.perf_counter() - start)

    def flop_ratio(self) -> float | None:
        """The cost model's FLOPs over full rank's on the targeted linears, at the paths in use."""
        from lowrank_pt.methods.galore import cost

        adapters = list(getattr(self.method, "adapters", {}).values())
        if not adapters:
            return None
        tokens, accum = self.method.workload
        ours = sum(cost.flops(a.forward_path, a.shape, a.rank, a.side, tokens, accum) for a in adapters)
        return ours / sum(cost.full_rank_flops(a.shape, tokens, accum) for a in adapters)


def point(args, tokens: int) -> list[dict]:
    micro = tokens // args.seq_len
    ranks = [args.hidden // int(k) for k in args.ranks.split(",")]
    specs = [("full", "full", {}, None)]
    for r in ranks:
        base = {"rank": r, "update_proj_gap": 10_000, "scale": 0.25}
        specs.append((f"galore r={r} auto", "galore", {**base, "forward": "auto"}, r))
        if args.all_paths:
            specs += [(f"galore r={r} {p}", "galore", {**base, "forward": p}, r) for p in ("call", "step", "factored")]
    contenders = [Contender(label, args, micro, method, options) for label, method, options, _ in specs]
    for step in range(args.steps):
        order = contenders[step % len(contenders):] + contenders[:step % len(contenders)]
        for c in order:
            c.step(step)
        print(f"T {tokens} step {step + 1}/{args.steps}: " + ", ".join(f"{c.label} {c.times[-1]:.2f}s"
                                                                      for c in contenders), flush=True)
    full = contenders[0]
    rows = []
    for c, (_, _, _, r) in zip(contenders, specs):
        timed = c.times[1:]
        # the ratio to full rank, step by step (the same round of the round-robin), then the median
        ratios = [t / f for t, f in zip(timed, full.times[1:])]
        rows.append({"tokens": tokens, "label": c.label, "rank": r, "paths": c.paths,
                     "step_s": statistics.median(timed), "ratio_to_full": statistics.median(ratios),
                     "flop_ratio_linears": c.flop_ratio()})
    del contenders
    return rows


def markdown(results: dict, command: str) -> str:
    lines = [f"`{command}` on {results['machine']}; {results['model']}.", "",
             "| T (tokens / micro-batch) | contender | forward path | s / step | × full AdamW (measured) "
             "| × full (cost model, targeted linears) |", "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        flop = row["flop_ratio_linears"]
        lines.append(f"| {row['tokens']} | {row['label']} | {', '.join(row['paths']) or '-'} | {row['step_s']:.3f} | "
                     f"{row['ratio_to_full']:.3f} | {'-' if flop is None else f'{flop:.3f}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    started = begin(args)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        rows += point(args, tokens)
    results = {"rows": rows, "machine": machine(), "seconds": time.perf_counter() - started,
               "model": (f"LLaMA block d {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
                         f"vocab {args.vocab}, seq {args.seq_len}, accum {args.accum}, fp32, ZeRO 0, 1 process; "
                         f"median of {args.steps - 1} timed steps")}
    save(args.out, results, markdown(results, command_line("bench_galore_forward.py", argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
