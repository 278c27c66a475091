"""Benchmark: full, LoRA, ReLoRA and GaLore (and installed peers) on one model and one data stream.

Every contender trains the same initial weights on the same batches of the embedded corpus
through a DeepSpeed engine (ZeRO 0, one rank), in round-robin steps so that load from other
processes hits all of them alike, for the same number of tokens; then each is evaluated on the
same validation sequences. Reported per contender: seconds per step and its ratio to full-rank
AdamW, tokens/s, MFU, a phase breakdown, state bytes by category, validation perplexity.

Then, for every method at ZeRO stages 0-3 on 1 and 2 ranks (``--worlds``), the state bytes each
rank holds, measured and from the planner's formula.

The tracking overhead is measured twice: "full (untracked)" is full-rank AdamW run with no
tracker at all, interleaved with the tracked one; and the cost of the spans and of one
``metrics()`` call is timed directly and set against the step time.

Peers (plain PyTorch optimizers, ZeRO 0 only): galore-torch ``GaLoreAdamW``, apollo-torch
``APOLLOAdamW``, fira ``FiraAdamW``, each where importable.

    python tools/bench_methods.py                    # demo model (7M), 60 steps each, ~10 min on 2 cores
    python tools/bench_methods.py --quick --out DIR  # seconds: a smoke test (tests/e2e/test_tracking_bench.py)

Writes ``DIR/results.json`` and ``DIR/bench.md`` (the tables for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("full", "lora", "relora", "galore")
PEERS = {  # name: (module, class, extra keys of the projected param group)
    "galore-torch": ("galore_torch", "GaLoreAdamW", lambda a: {"rank": a.rank, "update_proj_gap": a.gap,
                                                               "scale": 0.25, "proj_type": "std"}),
    "apollo-torch": ("apollo_torch", "APOLLOAdamW", lambda a: {"rank": a.rank, "update_proj_gap": a.gap, "scale": 1.0,
                                                               "proj": "random", "proj_type": "std",
                                                               "scale_type": "channel"}),
    "fira": ("fira", "FiraAdamW", lambda a: {"rank": a.rank, "update_proj_gap": a.gap, "alpha": 0.25,
                                             "proj_type": "std"}),
}
FULL_HIGH_LR = "full (lr 1e-2)"
"""Full-rank AdamW at GaLore's learning rate: separates the effect of the LR from the method's."""
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, a few steps, 1 rank: a smoke test")
    p.add_argument("--size", default="demo", help="model size (lowrank_pt.model.llama.MODEL_SIZES)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per contender (equal token budget)")
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the timing (warm-up)")
    p.add_argument("--rank", type=int, default=64, help="rank of lora/relora/galore and the peers")
    p.add_argument("--gap", type=int, default=50, help="GaLore subspace refresh gap (steps)")
    p.add_argument("--vocab", type=int, default=8000, help="tokenizer vocabulary (embedded corpus)")
    p.add_argument("--max-documents", type=int, default=None, help="limit the corpus (faster tokenizer)")
    p.add_argument("--eval-sequences", type=int, default=64)
    p.add_argument("--worlds", default="1,2", help="rank counts for the ZeRO memory sweep")
    p.add_argument("--zero-stages", default="0,1,2,3", help="ZeRO stages of the memory sweep")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--no-peers", action="store_true", help="skip galore-torch / apollo-torch / fira")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cache-dir", default=".cache/lowrank_pt", help="data and device-peak cache")
    p.add_argument("--out", default="bench_out", help="output directory")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.seq_len, args.micro_batch, args.steps, args.skip = "tiny", 64, 4, 3, 1
        args.rank, args.gap, args.vocab, args.eval_sequences, args.worlds = 8, 100, 512, 4, "1"
        args.zero_stages = "0,2"
        args.threads = args.threads or 1  # tiny tensors: more threads only add OpenMP waits
        args.max_documents = args.max_documents or 200
        args.no_peers = True
    return args


def embedded_corpus(args):
    """``(model_cfg, train shard, validation batches, vocabulary size)`` of the embedded corpus for
    ``args`` (vocab, max_documents, cache_dir, size, seq_len, micro_batch, eval_sequences)."""
    from lowrank_pt.data import DataConfig, Tokenizer, TokenShard, prepare_data, validation_batches
    from lowrank_pt.model.llama import ModelConfig, resolve

    data = DataConfig(source="embedded", vocab_size=args.vocab, max_documents=args.max_documents,
                      cache_dir=args.cache_dir)
    prepared = prepare_data(data, progress=False)
    vocab = Tokenizer(prepared.tokenizer_path).vocab_size
    model_cfg = resolve(ModelConfig(size=args.size, seq_len=args.seq_len), vocab_size=vocab)
    val = validation_batches(TokenShard(prepared.val_shard), args.seq_len, args.micro_batch, args.eval_sequences, 0, 1)
    return model_cfg, TokenShard(prepared.train_shard), val, vocab


def model_description(args, model_cfg, vocab: int) -> str:
    from lowrank_pt.model.llama import count_parameters

    return (f"LLaMA {args.size} (d {model_cfg.hidden_size}, {model_cfg.num_layers} layers, vocab {vocab}, "
            f"{count_parameters(model_cfg):,} params), seq {args.seq_len}, micro-batch {args.micro_batch}")


def init_single_process():
    from lowrank_pt.core import dist

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(dist.free_port()))
    dist.init()


def begin(args) -> float:
    """The start of a benchmark's main: ``--threads`` torch threads (when given), the ``--out``
    directory, the one-rank process group; returns the start time (``time.perf_counter``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    init_single_process()
    return time.perf_counter()


def stage_for(name: str, args):
    """The StageConfig each contender trains with: LR 2e-3 for full, LoRA and ReLoRA (the demo
    recipe's); 1e-2, the GaLore paper's, for GaLore and the optimizer-side peers."""
    from lowrank_pt.config.recipe import OptimizerConfig, ScheduleConfig, StageConfig

    method, options, lr = "full", {}, 2e-3
    if name == FULL_HIGH_LR:
        lr = 1e-2
    elif name in ("lora", "relora"):
        method, options = name, {"rank": args.rank, "alpha": 32.0}
        if name == "relora":
            options.update(restart_every=max(2, args.steps // 4), reset_mode="magnitude", reset_fraction=0.99)
    elif name == "galore":
        method, options, lr = "galore", {"rank": args.rank, "update_proj_gap": args.gap, "scale": 0.25}, 1e-2
    elif name in PEERS:
        lr = 1e-2
    warmup = max(1, args.steps // 10)
    return StageConfig(name=name, method=method, steps=args.steps, options=options,
                       optimizer=OptimizerConfig(lr=lr), schedule=ScheduleConfig(kind="cosine", warmup_steps=warmup))


class Contender:
    """One method (or peer optimizer) with its engine, data stream and tracker."""

    def __init__(self, name, args, model_cfg, shard, tracked=True, precision="fp32", stage=None):
        from lowrank_pt import methods
        from lowrank_pt.config.recipe import EngineConfig
        from lowrank_pt.core.timer import NULL_TIMER
        from lowrank_pt.data import PackedLoader
        from lowrank_pt.methods.base import StageContext
        from lowrank_pt.model.llama import LlamaModel
        from lowrank_pt.tracking.stage import StageTracker
        from lowrank_pt.zero import engine as E

        self.name = name
        self.stage = stage or stage_for("full" if name == "full (untracked)" else name, args)
        torch.manual_seed(0)  # the same initial weights for everyone
        model = LlamaModel(model_cfg)
        self.method = methods.build(self.stage, None)
        self.method.prepare_model(model)
        if name in PEERS and stage is None:  # a given stage is a method's, whatever its name
            module, cls, extra = PEERS[name]
            projected = [m.weight for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]
            ids = {id(p) for p in projected}
            groups = [{"params": [p for p in model.parameters() if id(p) not in ids]},
                      {"params": projected, **extra(args)}]
            optimizer = getattr(importlib.import_module(module), cls)(groups, lr=self.stage.optimizer.lr)
        else:
            engine_cfg = EngineConfig(zero_stage=0, precision=precision)
            optimizer = self.method.build_optimizer(self.method.param_groups(model), self.stage, engine_cfg)
        ds = E.deepspeed_config(EngineConfig(zero_stage=0, precision=precision), args.micro_batch, 1,
                                self.method.grad_clip(), 1)
        self.engine = E.initialize(model, optimizer, self.method.lr_lambda(args.steps), ds)
        self.loader = PackedLoader(shard, model_cfg.seq_len, args.micro_batch, 0, 1, seed=0)
        self.tokens_per_step = args.micro_batch * model_cfg.seq_len
        self.tracker = None
        if tracked:
            self.tracker = StageTracker(engine=self.engine, stage=self.stage, index=0, model_cfg=model_cfg,
                                        tokens_per_step=self.tokens_per_step, precision=precision, zero_stage=0,
                                        cache_dir=args.cache_dir)
        timer = self.tracker.timer if tracked else NULL_TIMER
        self.method.on_engine_ready(StageContext(engine=self.engine, total_steps=args.steps, timer=timer))
        self.step_times: list[float] = []
        self.losses: list[float] = []

    def step(self, step: int) -> None:
        t = self.tracker
        if t is None:  # no tracking at all: the baseline of the overhead measurement
            start = time.perf_counter()
            batch = self.loader.next_batch()
            loss = self.method.train_step(self.engine, [batch], step)
            self.method.after_step(self.engine, step)
            self.step_times.append(time.perf_counter() - start)
        else:
            t.start_step()
            with t.timer.phase("data"):
                batch = self.loader.next_batch()
            loss = self.method.train_step(self.engine, [batch], step)
            with t.timer.phase("method"):
                self.method.after_step(self.engine, step)
            self.step_times.append(t.end_step()["step"])
        self.losses.append(loss)

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        self.engine.eval()
        total = sum(float(self.engine(b["input_ids"], b["labels"])) for b in batches)
        self.engine.train()
        return total / len(batches)


def span_overhead(n: int = 20000) -> float:
    """Seconds one PhaseTimer span costs (open + close, no device sync)."""
    from lowrank_pt.core.timer import PhaseTimer

    timer = PhaseTimer(sync=False)
    start = time.perf_counter()
    for _ in range(n):
        with timer.phase("x"):
            pass
    return (time.perf_counter() - start) / n


def train_and_compare(args, model_cfg, shard, val_batches) -> dict:
    names = list(METHODS) + ["full (untracked)"] + ([] if args.quick else [FULL_HIGH_LR])
    if not args.no_peers:
        for peer, (module, _, _) in PEERS.items():
            try:
                importlib.import_module(module)
                names.append(peer)
            except Exception as e:  # noqa: BLE001 - a peer that cannot import is skipped, and said so
                print(f"skipping {peer}: {type(e).__name__}: {e}", flush=True)
    contenders = [Contender(n, args, model_cfg, shard, tracked=n != "full (untracked)", precision=args.precision)
                  for n in names]
    for step in range(args.steps):
        order = contenders[step % len(contenders):] + contenders[:step % len(contenders)]
        for c in order:
            c.step(step)
        if step % 10 == 9 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}: " + ", ".join(f"{c.name} {c.losses[-1]:.3f}" for c in contenders),
                  flush=True)
    # The metrics() cost: one call per log line in the trainer.
    t0 = time.perf_counter()
    metrics = contenders[0].tracker.metrics()
    metrics_s = time.perf_counter() - t0
    results = {}
    for c in contenders:
        times = c.step_times[args.skip:]
        if c.name == "galore":  # refresh steps are timed apart: they come once per gap
            refresh = [t for i, t in enumerate(c.step_times) if i >= args.skip and i % args.gap == 0]
            times = [t for i, t in enumerate(c.step_times) if i >= args.skip and i % args.gap != 0]
        else:
            refresh = []
        mean = statistics.mean(times)
        val = c.evaluate(val_batches)
        entry = {"step_s": mean, "step_s_median": statistics.median(times), "steps_timed": len(times),
                 "tokens_per_s": c.tokens_per_step / mean, "eval_loss": val, "eval_ppl": math.exp(min(val, 50)),
                 "final_train_loss": statistics.mean(c.losses[-3:])}
        if refresh:
            entry["refresh_step_s"] = statistics.mean(refresh)
        if c.tracker is not None:
            done = c.tracker.finish(end_step=args.steps, total_steps=args.steps)
            peak = done["peak_flops_per_device"]
            entry["mfu"] = (c.tokens_per_step / mean) * done["flops_per_token"] / peak if peak else None
            entry["peak_source"] = done["peak_source"]
            steps = done["timed_steps"]
            entry["phase_s"] = {k: v / steps for k, v in done["phase_s"].items()}
            entry["memory"] = done["memory"]["measured"]
            entry["formula"] = done["memory"]["formula"]
        else:
            from lowrank_pt.zero.held import state_bytes

            entry["memory"] = state_bytes(c.engine)
        results[c.name] = entry
    base = results["full"]["step_s"]
    for entry in results.values():
        entry["ratio_to_full"] = entry["step_s"] / base
    span = span_overhead()
    spans_per_step = 7  # step bracket, data, forward, backward, optimizer, method, (refresh)
    overhead = {
        "span_s": span, "spans_per_step": spans_per_step, "metrics_call_s": metrics_s,
        "span_share_of_step": span * spans_per_step / base,
        "metrics_share_at_log_every_10": metrics_s / (10 * base),
        "tracked_vs_untracked": results["full"]["step_s"] / results["full (untracked)"]["step_s"] - 1,
        "metric_keys": sorted(metrics),
    }
    return {"contenders": results, "overhead": overhead}


# --- ZeRO memory sweep -------------------------------------------------------------------------


def memory_worker(rank, world, port, args, model_kwargs, out_path):
    """At every ZeRO stage, each method: one step, then measured and planned bytes on this rank."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from lowrank_pt.core import dist

    dist.init()
    rows = sweep(rank, world, args, model_kwargs)
    with open(f"{out_path}.rank{rank}", "w") as f:
        json.dump(rows, f)


def sweep(rank, world, args, model_kwargs) -> list[dict]:
    from lowrank_pt import methods
    from lowrank_pt.config.recipe import EngineConfig
    from lowrank_pt.core.timer import PhaseTimer
    from lowrank_pt.methods.base import StageContext
    from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
    from lowrank_pt.tracking import planner
    from lowrank_pt.tracking.memory import MemoryTracker
    from lowrank_pt.zero import engine as E

    cfg = resolve(ModelConfig(**model_kwargs["cfg"]), vocab_size=model_kwargs["vocab"])
    rows = []
    g = torch.Generator().manual_seed(rank)
    for zero_stage in [int(z) for z in args.zero_stages.split(",")]:
        for name in METHODS:
            stage = stage_for(name, args)
            torch.manual_seed(0)
            model = LlamaModel(cfg)
            method = methods.build(stage, None)
            method.prepare_model(model)
            engine_cfg = EngineConfig(zero_stage=zero_stage, precision=args.precision)
            opt = method.build_optimizer(method.param_groups(model), stage, engine_cfg)
            ds = E.deepspeed_config(engine_cfg, 2, 1, method.grad_clip(), world)
            engine = E.initialize(model, opt, method.lr_lambda(args.steps), ds)
            method.on_engine_ready(StageContext(engine=engine, total_steps=args.steps))
            timer = PhaseTimer(sync=False)
            tracker = MemoryTracker(engine, timer)
            # One step on the engine directly: the layout does not depend on refreshes or merges,
            # and the moments exist from the first step on.
            ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1), generator=g)
            loss = engine(ids[:, :-1], ids[:, 1:])
            engine.backward(loss)
            with timer.phase("optimizer"):
                engine.step()
            measured = tracker.measure()
            lay = planner.layout(cfg, stage.method, dict(stage.options))
            planned = planner.state_bytes(lay, zero_stage, world, args.precision, rank)
            rows.append({"zero_stage": zero_stage, "world": world, "rank": rank, "method": name,
                         "measured": measured, "formula": planned})
            del engine, method, model, opt
    return rows


def memory_sweep(args, model_kwargs, worlds, out_dir) -> list[dict]:
    import multiprocessing as mp

    from lowrank_pt.core import dist

    rows = []
    for world in worlds:
        if world == 1:
            rows += sweep(0, 1, args, model_kwargs)
            continue
        out_path = os.path.join(out_dir, f"memory_w{world}.json")
        ctx = mp.get_context("spawn")
        port = dist.free_port()
        procs = [ctx.Process(target=memory_worker, args=(r, world, port, args, model_kwargs, out_path))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        for r in range(world):
            with open(f"{out_path}.rank{r}") as f:
                rows += json.load(f)
            os.remove(f"{out_path}.rank{r}")
    return rows


# --- report ------------------------------------------------------------------------------------


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:.2f}"


def markdown(results: dict, args, command: str) -> str:
    c = results["contenders"]
    lines = [f"Command: `{command}`", "",
             f"Machine: {results['machine']}", "",
             f"Model: {results['model']}; {args.steps} steps × {results['tokens_per_step']} tokens "
             f"(equal budget), ZeRO 0, {args.precision}, 1 rank; rank {args.rank}, GaLore gap {args.gap}.", "",
             "| contender | s/step | × full | tokens/s | MFU | opt. states (MiB) | state total (MiB) | "
             "val loss | val ppl |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in c.items():
        mem = e.get("memory") or {}
        lines.append(f"| {name} | {e['step_s']:.4f} | {e['ratio_to_full']:.3f} | {e['tokens_per_s']:,.0f} | "
                     f"{pct(e.get('mfu'))} | "
                     f"{mib(mem.get('optimizer_states'))} | {mib(mem.get('total'))} | {e['eval_loss']:.4f} | "
                     f"{e['eval_ppl']:.2f} |")
    g = c.get("galore", {})
    if "refresh_step_s" in g:
        lines += ["", f"GaLore refresh steps (every {args.gap}, excluded above): {g['refresh_step_s']:.4f} s."]
    phases = sorted({k for e in c.values() for k in (e.get("phase_s") or {})})
    if phases:
        lines += ["", "Seconds per step by phase (tracked contenders):", "",
                  "| contender | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
        for name, e in c.items():
            if e.get("phase_s"):
                lines.append(f"| {name} | " + " | ".join(f"{e['phase_s'].get(p, 0.0):.4f}" for p in phases) + " |")
    o = results["overhead"]
    lines += ["", "Tracking overhead: one span (open + close) costs "
              f"{o['span_s'] * 1e6:.1f} µs, {o['spans_per_step']} per step = {100 * o['span_share_of_step']:.3f}% "
              f"of a full-rank step; one `metrics()` call (memory scan included) {o['metrics_call_s'] * 1e3:.2f} ms "
              f"= {100 * o['metrics_share_at_log_every_10']:.3f}% of the steps at log_every=10. "
              f"Tracked vs untracked full-rank step, interleaved: {100 * o['tracked_vs_untracked']:+.2f}% "
              "(noise of a shared CPU included)."]
    rows = results["memory"]
    if rows:
        lines += ["", "State bytes per rank (MiB, rank 0), measured; the formula agrees exactly where no ≠ is shown:",
                  "", "| ranks | ZeRO | method | params | masters | opt. states | grads | method buffers | "
                  "ZeRO buckets | total |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["rank"] != 0:
                continue
            m, f = r["measured"], r["formula"]
            cells = []
            for k in ("params", "master_params", "optimizer_states", "grads", "method_buffers", "zero_buffers"):
                cell = mib(m[k])
                if k in f and f[k] != m[k]:
                    cell += f" ≠ {mib(f[k])}"
                cells.append(cell)
            lines.append(f"| {r['world']} | {r['zero_stage']} | {r['method']} | " + " | ".join(cells) +
                         f" | {mib(m['total'])} |")
        bad = [r for r in rows if any(r["measured"][k] != v for k, v in r["formula"].items())]
        lines += ["", f"Formula vs measured, all ranks: {len(rows) - len(bad)}/{len(rows)} rows agree to the byte."]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {cpu}"
    return (f"{dev}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"deepspeed {importlib.import_module('deepspeed').__version__}, Python {platform.python_version()}")


def command_line(script: str, argv=None) -> str:
    """How a benchmark was run (``tools/<script>`` and its arguments), for its tables."""
    return f"python tools/{script} {' '.join(sys.argv[1:] if argv is None else argv)}".strip()


def save(out_dir: str, results: dict, text: str) -> None:
    """A benchmark's ``results.json`` and ``bench.md`` (its tables, ``text``) in ``out_dir``; the
    tables printed, and where the results say how long it took, that too."""
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(text)
    print(text)
    if "seconds" in results:
        print(f"done in {results['seconds']:.0f} s; {out_dir}/results.json, {out_dir}/bench.md")


def main(argv=None) -> int:
    args = parse_args(argv)
    started = begin(args)
    model_cfg, shard, val, vocab = embedded_corpus(args)
    results = train_and_compare(args, model_cfg, shard, val)
    results["model"] = model_description(args, model_cfg, vocab)
    results["tokens_per_step"] = args.micro_batch * args.seq_len
    results["machine"] = machine()
    worlds = [int(w) for w in args.worlds.split(",") if w]
    kwargs = {"cfg": {"size": args.size, "seq_len": min(args.seq_len, 64)}, "vocab": vocab}
    results["memory"] = memory_sweep(args, kwargs, worlds, args.out)
    results["seconds"] = time.perf_counter() - started
    save(args.out, results, markdown(results, args, command_line("bench_methods.py", argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
