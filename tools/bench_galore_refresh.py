"""Benchmark: GaLore's streaming (sketch) refresh against the exact-SVD refresh, side by side.

Two parts, each in this one process, alone:

- ``train``: GaLore refreshed exactly, from sketches, by randomized subspace iteration at the
  step and inside the backward (``TRAIN_MODES``), from the same
  initial weights on the same batches of the embedded corpus (``tools/bench_methods.py``'s
  contenders: ZeRO 0, one rank, steps in turns), with at least 4 refreshes; validation loss at
  the end, and the refresh phase's seconds per refresh from each StageTracker.
- ``memory``: on ``--memory-size`` (350m), fp32, ZeRO 0, one micro-batch per step, each refresh
  mode in a fresh process of its own: the process's peak resident bytes of a refresh step
  against the plain step after it (refreshes at steps 0, 2, 4; steps 2 and 3 compared, so the
  optimizer's lazily built state is already there).
- ``solve``: on the full gradients of one model's projected matrices (captured at a refresh of
  ``--solve-size``), the seconds of the exact SVD against the sketch's solve for the same rank,
  with the sketches formed from the same gradients, and the captured gradient energy
  ``‖project(G, basis)‖²`` of each basis relative to the exact one.

    python tools/bench_galore_refresh.py --threads 2 --out bench_refresh       # demo: ~8 min
    python tools/bench_galore_refresh.py --quick --out DIR                      # smoke test

Writes ``DIR/results.json`` and ``DIR/bench.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_methods import (  # noqa: E402
    Contender,
    begin,
    command_line,
    embedded_corpus,
    init_single_process,
    machine,
    model_description,
    save,
)

TRAIN_MODES = {  # label: GaLore options (one micro-batch per step, so refresh: backward applies)
    "step, exact": {"svd": "exact"},
    "step, sketch": {"svd": "sketch"},
    "step, randomized": {"svd": "randomized"},
    "backward, randomized": {"svd": "randomized", "refresh": "backward"},
}
BASE = "step, exact"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, a few steps: a smoke test")
    p.add_argument("--size", default="demo")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--gap", type=int, default=20, help="refresh gap: steps // gap refreshes (>= 4)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--eval-sequences", type=int, default=64)
    p.add_argument("--solve-size", default="350m", help="model whose matrices the solve part uses")
    p.add_argument("--solve-rank", type=int, default=256)
    p.add_argument("--solve-tokens", type=int, default=512, help="tokens of the gradient of each matrix")
    p.add_argument("--memory-size", default="350m", help="model of the memory part")
    p.add_argument("--memory-rank", type=int, default=256)
    p.add_argument("--memory-seq-len", type=int, default=256)
    p.add_argument("--parts", default="memory,solve,train", help="comma-separated parts to run")
    p.add_argument("--train-modes", default=None,
                   help="semicolon-separated TRAIN_MODES labels (default all); 'step, exact' always runs")
    p.add_argument("--sketch-oversample", type=int, default=None,
                   help="also train 'step, sketch p=N': svd_oversample N for the one-pass sketch")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=".cache/lowrank_pt")
    p.add_argument("--out", default="bench_refresh")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.seq_len, args.micro_batch, args.steps, args.gap = "tiny", 64, 4, 8, 2
        args.rank, args.vocab, args.eval_sequences, args.max_documents = 8, 512, 4, 200
        args.solve_size, args.solve_rank, args.solve_tokens = "small", 16, 64
        args.memory_size, args.memory_rank, args.memory_seq_len = "small", 16, 64
        args.threads = args.threads or 1
    return args


def train(args, model_cfg, shard, val_batches) -> dict:
    from lowrank_pt.config.recipe import OptimizerConfig, ScheduleConfig, StageConfig

    def stage(label):
        options = {"rank": args.rank, "update_proj_gap": args.gap, "scale": 0.25, **TRAIN_MODES[label]}
        return StageConfig(name=f"galore {label}", method="galore", steps=args.steps, options=options,
                           optimizer=OptimizerConfig(lr=args.lr),
                           schedule=ScheduleConfig(kind="cosine", warmup_steps=max(1, args.steps // 10)))

    modes = dict(TRAIN_MODES)
    if args.sketch_oversample:
        modes[f"step, sketch p={args.sketch_oversample}"] = {"svd": "sketch", "svd_oversample": args.sketch_oversample}
    if args.train_modes:
        wanted = {BASE, *(m.strip() for m in args.train_modes.split(";"))}
        modes = {k: v for k, v in modes.items() if k in wanted or k.startswith("step, sketch p=")}
    TRAIN_MODES.update(modes)
    contenders = [Contender(label, args, model_cfg, shard, stage=stage(label)) for label in modes]
    for step in range(args.steps):
        order = contenders[step % len(contenders):] + contenders[:step % len(contenders)]
        for c in order:
            c.step(step)
        if step % 20 == 19 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}: " + ", ".join(f"{c.name} {c.losses[-1]:.3f}" for c in contenders),
                  flush=True)
    out = {}
    for c in contenders:
        done = c.tracker.finish(end_step=args.steps, total_steps=args.steps)
        refreshes = c.method.refreshes
        times = c.step_times
        at = [s for s in range(args.gap, args.steps - 1, args.gap)]  # refresh steps after the first
        extra = statistics.mean(times[s] - times[s + 1] for s in at) if at else float("nan")
        out[c.name] = {"eval_loss": c.evaluate(val_batches), "refreshes": refreshes,
                       "refresh_s": done["phase_s"].get("refresh", 0.0) / max(1, refreshes),
                       "refresh_step_extra_s": extra, "step_s": statistics.mean(times[1:] or times)}
    exact = out[BASE]
    for e in out.values():
        e["eval_loss_vs_exact"] = e["eval_loss"] / exact["eval_loss"] - 1
        e["refresh_s_vs_exact"] = e["refresh_s"] / exact["refresh_s"] if exact["refresh_s"] else float("nan")
        e["refresh_extra_vs_exact"] = e["refresh_step_extra_s"] / exact["refresh_step_extra_s"]
    return out


MEMORY_MODES = {  # label: GaLore options
    "step, exact (full gradients)": {"refresh": "step", "svd": "exact"},
    "step, sketch": {"refresh": "step", "svd": "sketch"},
    "backward, exact": {"refresh": "backward", "svd": "exact"},
    "backward, randomized": {"refresh": "backward", "svd": "randomized"},
}


def memory_worker(args, label: str) -> dict:
    """One refresh mode in this fresh process: peak RSS of steps 0-3 (refreshes at 0 and 2)."""
    from lowrank_pt.config.recipe import EngineConfig, OptimizerConfig, StageConfig
    from lowrank_pt.core.host import release_host_heap
    from lowrank_pt.methods.base import StageContext
    from lowrank_pt.methods.galore.method import GaLore, GaLoreOptions
    from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
    from lowrank_pt.optim.adamw import build_optimizer
    from lowrank_pt.tracking import memory
    from lowrank_pt.zero import engine as E

    init_single_process()
    cfg = resolve(ModelConfig(size=args.memory_size, seq_len=args.memory_seq_len), vocab_size=32000)
    torch.manual_seed(0)
    model = LlamaModel(cfg)
    stage = StageConfig(method="galore", steps=8, optimizer=OptimizerConfig(lr=1e-3))
    method = GaLore(GaLoreOptions(rank=args.memory_rank, update_proj_gap=2, **MEMORY_MODES[label]), stage, None)
    method.prepare_model(model)
    optimizer = build_optimizer(method.param_groups(model), stage.optimizer)
    engine = E.initialize(model, optimizer, lambda step: 1.0,
                          E.deepspeed_config(EngineConfig(zero_stage=0, precision="fp32"), 1, 1, 0.0, 1))
    method.on_engine_ready(StageContext(engine=engine, total_steps=8))
    gen = torch.Generator().manual_seed(0)
    peaks, seconds = [], []
    for step in range(4):
        ids = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len), generator=gen)
        release_host_heap()
        memory.reset_peaks()
        start = time.perf_counter()
        method.train_step(engine, [{"input_ids": ids, "labels": ids}], step)
        seconds.append(time.perf_counter() - start)
        peaks.append(memory.peaks()["peak_rss_bytes"])
        print(f"{label}: step {step} peak {peaks[-1] / 2**30:.3f} GiB, {seconds[-1]:.1f} s", file=sys.stderr, flush=True)
    return {"peaks": peaks, "seconds": seconds, "refresh_vs_plain": peaks[2] / peaks[3]}


def memory_part(args) -> dict:
    import subprocess

    out = {}
    for label in MEMORY_MODES:
        path = os.path.join(args.out, "memory_worker.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", label, "--out", args.out,
               "--memory-size", args.memory_size, "--memory-rank", str(args.memory_rank),
               "--memory-seq-len", str(args.memory_seq_len)] + (["--threads", str(args.threads)] if args.threads else [])
        env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}  # this process holds its port
        subprocess.run(cmd, check=True, env=env)
        with open(path) as f:
            out[label] = json.load(f)
    return out


def solve(args) -> dict:
    """Exact SVD vs the sketch solve on gradients shaped like ``--solve-size``'s matrices: one of
    each distinct shape of a block, from a random-feature model of dy and x (a decaying spectrum)."""
    from lowrank_pt.methods.galore import sketch
    from lowrank_pt.model.llama import ModelConfig, resolve
    from lowrank_pt.optim import projector

    cfg = resolve(ModelConfig(size=args.solve_size), vocab_size=32000)
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {"attention (d×d)": (d, d), "mlp up/gate (f×d)": (f, d), "mlp down (d×f)": (d, f)}
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in shapes.items():
        m, n = shape
        t = args.solve_tokens
        # Activations with a decaying spectrum, as real layers have: scaled Gaussian features.
        dy = torch.randn(t, m, generator=gen) * torch.logspace(0, -2, m)
        x = torch.randn(t, n, generator=gen) * torch.logspace(0, -1, n)
        grad = dy.t() @ x
        rank = projector.effective_rank(shape, args.solve_rank)
        side = projector.projection_side(shape, "std")
        start = time.perf_counter()
        exact, _ = projector.new_basis(grad, rank, side, "exact")
        exact_s = time.perf_counter() - start
        basis0 = torch.zeros(projector.basis_shape(shape, rank, side))
        omega, psi = sketch.random_matrices(basis0, side, rank, 8, 1, shape)
        start = time.perf_counter()
        y, w = sketch.sketch(*sketch.orient(dy, x, side), omega, psi)
        form_s = time.perf_counter() - start
        start = time.perf_counter()
        basis, _, _ = sketch.basis_from_sketch(y, w, psi, rank, side)
        solve_s = time.perf_counter() - start
        start = time.perf_counter()
        randomized, _ = projector.new_basis(grad, rank, side, "randomized")
        randomized_s = time.perf_counter() - start
        energy = lambda b: float(projector.project(grad, b, side).square().sum())  # noqa: E731
        out[name] = {"shape": shape, "rank": rank, "exact_svd_s": exact_s, "sketch_form_s": form_s,
                     "sketch_solve_s": solve_s, "solve_vs_exact": solve_s / exact_s,
                     "energy_vs_exact": energy(basis) / energy(exact), "randomized_s": randomized_s,
                     "randomized_vs_exact": randomized_s / exact_s,
                     "randomized_energy_vs_exact": energy(randomized) / energy(exact),
                     "sketch_vs_gradient_floats": sketch.sketch_numel(shape, rank, 8, side) / (m * n)}
    return out


def markdown(results: dict, args, command: str) -> str:
    lines = [f"Command: `{command}`", "", f"Machine: {results['machine']}", "",
             f"Training: {results['model']}; {args.steps} steps, refresh every {args.gap} (rank {args.rank}, "
             f"lr {args.lr:g}), ZeRO 0, fp32, 1 rank; wall time {results['seconds']:.0f} s.", "",
             "s in the refresh phase: the work at the step (backward: only the merge and install; its "
             "subspaces are computed in the backward). Refresh step − next step: the whole cost of a refresh.", "",
             "| refresh | refreshes | val loss | vs exact | s in refresh phase | refresh step − next step, s | "
             "vs exact | s/step |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in results["train"].items():
        lines.append(f"| {name} | {e['refreshes']} | {e['eval_loss']:.4f} | {100 * e['eval_loss_vs_exact']:+.2f}% | "
                     f"{e['refresh_s']:.4f} | {e['refresh_step_extra_s']:.4f} | {e['refresh_extra_vs_exact']:.3f} | "
                     f"{e['step_s']:.3f} |")
    lines += ["", f"Memory: LLaMA {args.memory_size}, GaLore rank {args.memory_rank}, one micro-batch of "
              f"{args.memory_seq_len} tokens per step, fp32, ZeRO 0, one process per mode; process peak RSS "
              "(GiB) of each step, refreshes at steps 0 and 2:", "",
              "| refresh | step 0 (refresh) | step 1 | step 2 (refresh) | step 3 | refresh step vs plain |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, e in results["memory"].items():
        cells = " | ".join(f"{p / 2**30:.3f}" for p in e["peaks"])
        lines.append(f"| {name} | {cells} | {e['refresh_vs_plain']:.3f} |")
    lines += ["", f"Solve on {args.solve_size}-shaped gradients ({args.solve_tokens} tokens, rank "
              f"{args.solve_rank}, oversample 8):", "",
              "| matrix | shape | exact SVD s | sketch solve s | vs exact | forming the sketches s | "
              "energy vs exact | sketch floats / m·n | randomized (cold, 2 iterations) s | vs exact | energy vs exact |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in results["solve"].items():
        lines.append(f"| {name} | {e['shape'][0]}×{e['shape'][1]} | {e['exact_svd_s']:.4f} | "
                     f"{e['sketch_solve_s']:.4f} | {e['solve_vs_exact']:.3f} | {e['sketch_form_s']:.4f} | "
                     f"{e['energy_vs_exact']:.3f} | {e['sketch_vs_gradient_floats']:.3f} | {e['randomized_s']:.4f} | "
                     f"{e['randomized_vs_exact']:.3f} | {e['randomized_energy_vs_exact']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        result = memory_worker(args, args.memory_worker)
        with open(os.path.join(args.out, "memory_worker.json"), "w") as f:
            json.dump(result, f)
        return 0
    started = begin(args)
    model_cfg, shard, val, vocab = embedded_corpus(args)
    parts = args.parts.split(",")
    results = {"memory": memory_part(args) if "memory" in parts else {},
               "solve": solve(args) if "solve" in parts else {},
               "train": train(args, model_cfg, shard, val) if "train" in parts else {}}
    results["model"] = model_description(args, model_cfg, vocab)
    results["machine"] = machine()
    results["seconds"] = time.perf_counter() - started
    save(args.out, results, markdown(results, args, command_line("bench_galore_refresh.py", argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
