"""Benchmark: what the memory-saving switches cost in training quality.

For each method (full, galore, apollo_mini; galore_weights, muon, dion (r = d/4), dion8
(dion at r = d/8), relora, sltrain and cola on request), each setting and each learning rate
(``--lr-factors`` times the method's own; the best one counts)

    baseline      optimizer.state_dtype=fp32, engine.master_weights=fp32, engine.weight_dtype=bf16
    int8_states   optimizer.state_dtype=int8 (the rest as baseline)
    bf16_masters  engine.master_weights=bf16 (the rest as baseline)
    int8_weights  engine.weight_dtype=int8 (the rest as baseline): frozen bases (galore)
    int8_updated  engine.weight_dtype=int8 with engine.master_weights=bf16, compared with
                  bf16_masters: the weights the optimizer updates in int8 (full, apollo_mini,
                  galore_weights; they need bf16 masters)
    step_bf16     engine.master_weights=bf16, optimizer.grad_clip=0: ordinary steps as per-layer
                  updates need them
    per_layer     step_bf16 with train.update=per_layer, compared with step_bf16 (bar: equal)

the project's trainer runs one recipe, as ``lowrank-pt train`` would: the demo model (seq 256)
on the embedded corpus (8000-token tokenizer), one stage of ``--steps`` optimizer steps, one rank,
ZeRO 0, precision bf16, the same seed (so the same initial weights and the same batches) for every
run, and one evaluation on the first ``--eval-sequences`` validation sequences at the end. Each
run is its own process (``--child``: the recipe is loaded and checked by
``lowrank_pt.config.recipe.load``, then trained by ``lowrank_pt.train.run``), so that one failing
cannot take down the others.

Reported per run: the final validation loss and its difference to the same method's baseline
(per_layer: to step_bf16), relative, in percent; the issues' bars: |difference| within 1% for
int8_states and bf16_masters, within 2% for int8_weights and int8_updated, 0 for per_layer (exact by construction). A combination the config checks refuse (a ``ConfigError``, or a
``ValueError`` raised before the first training step: e.g. apollo_mini keeps fp32 states and
masters) is a row "refused: <the message's first line>"; any other failure is "failed: ...", its
traceback in the run's log (``DIR/runs/<method>-<setting>/train.log``, or
``DIR/runs/<method>-<setting>.log`` where no run dir was made). Beside each loss: the state bytes
the run held at its end (``summary.json``, measured), to see that a switch took effect, and a flag
on a row whose loss or bytes equal its baseline's exactly.

    python tools/bench_quality.py --out bench_quality               # 12 runs (9 train) x 300 steps: 1-2 hours on 2 cores
    python tools/bench_quality.py --methods galore --settings baseline,int8_weights --steps 100
    python tools/bench_quality.py --methods full,apollo_mini --settings int8_updated
    python tools/bench_quality.py --steps 4 --threads 1 --out /tmp/bq  # a smoke test (minutes)
    python tools/bench_quality.py --methods galore,apollo_mini --settings per_layer --grad-accum 4
    python tools/bench_quality.py --methods full,galore,relora,sltrain,cola --settings baseline \
        --lr-factors 0.5,1,2 --out bench_factored      # best of three learning rates each

Run it alone: each run uses ``--threads`` torch threads (default 2), one run at a time.
Writes ``DIR/results.json`` and ``DIR/bench.md`` (the table for BENCHMARKS.md); each run's recipe,
``config.yaml``, ``metrics.jsonl``, ``summary.json`` and log stay under ``DIR/runs/`` (its
checkpoints are deleted unless ``--keep-checkpoints``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

METHODS = ("full", "galore", "galore_weights", "apollo_mini", "muon", "dion", "dion8", "relora", "sltrain", "cola")
DEFAULT_METHODS = ("full", "galore", "apollo_mini")
STEP_BF16 = {"engine.master_weights": "bf16", "optimizer.grad_clip": 0.0}
"""Ordinary steps as per-layer updates need them: bf16 weights updated in place, no global clipping."""
SETTINGS = {  # name: overrides of the baseline's keys, the bar (|relative difference|, %), compared with
    "baseline": ({}, None, None),
    "int8_states": ({"optimizer.state_dtype": "int8"}, 1.0, "baseline"),
    "bf16_masters": ({"engine.master_weights": "bf16"}, 1.0, "baseline"),
    "int8_weights": ({"engine.weight_dtype": "int8"}, 2.0, "baseline"),
    "int8_updated": ({"engine.weight_dtype": "int8", "engine.master_weights": "bf16"}, 2.0, "bf16_masters"),
    "step_bf16": (STEP_BF16, None, None),
    "per_layer": ({**STEP_BF16, "train.update": "per_layer"}, 0.0, "step_bf16"),
}
BASELINE = {"optimizer.state_dtype": "fp32", "engine.master_weights": "fp32", "engine.weight_dtype": "bf16",
            "optimizer.grad_clip": None, "train.update": "step"}
LR = {"full": 2e-3, "galore": 1e-2, "galore_weights": 1e-2, "apollo_mini": 1e-2, "muon": 2e-3, "dion": 2e-2,
      "dion8": 2e-2, "relora": 2e-3, "sltrain": 3e-3, "cola": 3e-3}
"""Peak learning rates: the demo recipe's for full-rank AdamW; the published 1e-2 for GaLore and
APOLLO-Mini (tools/bench_methods.py, tools/bench_lowrank_optimizers.py). ``--lr method=value``."""
METHOD_OF = {"dion8": "dion"}
"""Rows that run a method under another name (dion at r = d/8)."""
OPTIONS = {
    "full": {},
    "galore": {"rank": 64, "update_proj_gap": 50, "scale": 0.25},  # tools/bench_methods.py's
    "galore_weights": {"rank": 64, "update_proj_gap": 50, "scale": 0.25},  # the same, on the weights
    "apollo_mini": {"update_proj_gap": 50},  # rank 1, tensor scale, scale 128: APOLLO-Mini's defaults
    "muon": {},  # match_rms_adamw: AdamW's learning rate carries over
    "dion": {"rank_fraction": 0.25},  # r = d/4, the paper's scale √max(1, m/n): Muon-like rates
    "dion8": {"rank_fraction": 0.125},  # r = d/8
    "relora": {"rank": 64, "restart_every": 100},  # r = d/4 of the demo model, 3 cycles in 300 steps
    "sltrain": {"rank": 64, "density": 0.03},  # r = d/4 (the published 128 of 60M's d 512), δ 0.03
    "cola": {},  # r = d/4, silu: the published defaults
}
"""Each method's options (``stages.0.options``)."""
MIB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list of {', '.join(METHODS)} (default {', '.join(DEFAULT_METHODS)})")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma list of {', '.join(SETTINGS)} (the setting each is compared with runs too)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=VALUE",
                   help="peak learning rate of a method (repeatable); default " +
                        ", ".join(f"{m} {v:g}" for m, v in LR.items()))
    p.add_argument("--lr-factors", default="1",
                   help="comma list of factors of each method's LR to run (e.g. 0.5,1,2: the best of three "
                        "learning rates; each (method, setting) is then compared at its best)")
    p.add_argument("--size", default="demo", help="model.size of every run (demo, 60m, ...)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per step (the demo recipe's 8)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step: each holds micro-batch / grad-accum sequences")
    p.add_argument("--eval-sequences", type=int, default=64, help="validation sequences of the final evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and the data order (every run)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each run (OMP_NUM_THREADS)")
    p.add_argument("--timeout", type=float, default=0, help="seconds one run may take (0: no limit)")
    p.add_argument("--cache-dir", default=".cache/lowrank_pt", help="data cache (tokenizer and shards)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    p.add_argument("--out", default="bench_quality", help="output directory")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.settings = [s for s in args.settings.split(",") if s]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; allowed {', '.join(METHODS)}")
    for s in args.settings:
        if s not in SETTINGS:
            p.error(f"--settings: unknown setting {s!r}; allowed {', '.join(SETTINGS)}")
    ordered = []  # each setting after the one it is compared with
    for name in args.settings:
        for needed in (SETTINGS[name][2], name):
            if needed is not None and needed not in ordered:
                ordered.append(needed)
    args.settings = ordered
    args.lrs = dict(LR)
    for item in args.lr:
        method, sep, value = item.partition("=")
        if not sep or method not in METHODS:
            p.error(f"--lr {item!r}: give METHOD=VALUE with METHOD one of {', '.join(METHODS)}")
        try:
            args.lrs[method] = float(value)
        except ValueError:
            p.error(f"--lr {item!r}: {value!r} is not a number")
    try:
        args.lr_factors = [float(f) for f in args.lr_factors.split(",")]
    except ValueError:
        p.error(f"--lr-factors {args.lr_factors!r}: give numbers, e.g. 0.5,1,2")
    if not args.lr_factors or min(args.lr_factors) <= 0:
        p.error("--lr-factors: give one or more factors > 0")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.grad_accum < 1 or args.micro_batch % args.grad_accum:
        p.error(f"--grad-accum {args.grad_accum} must be >= 1 and divide --micro-batch {args.micro_batch}")
    return args


# --- one run (in its own process) ----------------------------------------------------------------


def first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0]


def child(args) -> int:
    """Load and check the recipe ``args.child``, then train it with the project's trainer; write
    ``{"status": "ok" | "refused" | "failed", "message"}`` to ``args.child_out``."""
    import traceback

    import torch

    torch.set_num_threads(args.threads)
    from lowrank_pt import train
    from lowrank_pt.config.recipe import load
    from lowrank_pt.core.errors import ConfigError, DataError
    from lowrank_pt.trainer.trainer import Trainer

    def result(status, message=""):
        with open(args.child_out, "w") as f:
            json.dump({"status": status, "message": message}, f)
        return 0 if status == "ok" else 1

    try:  # the config checks, as `lowrank-pt train` makes them before any work
        load(args.child, [])
    except DataError as e:
        traceback.print_exc()
        return result("failed", f"DataError: {first_line(e)}")
    except (ConfigError, ValueError) as e:
        print(f"error: {first_line(e)}", flush=True)  # as `lowrank-pt train` says it
        return result("refused", first_line(e))
    # A ValueError from building the stage (before its first step) is a refusal too; from the
    # training loop on, it is a failure. The wrapper only notes that the loop began.
    started = {"loop": False}
    loop = getattr(Trainer, "train_loop", None)
    if loop is not None:
        def train_loop(self, sr, _loop=loop):
            started["loop"] = True
            return _loop(self, sr)

        Trainer.train_loop = train_loop
    try:
        train.run(args.child, [])
    except ConfigError as e:
        print(f"error: {first_line(e)}", flush=True)
        return result("refused", first_line(e))
    except DataError as e:
        traceback.print_exc()
        return result("failed", f"DataError: {first_line(e)}")
    except ValueError as e:
        traceback.print_exc()
        if loop is not None and not started["loop"]:
            return result("refused", first_line(e))
        return result("failed", f"ValueError: {first_line(e)}")
    except Exception as e:  # noqa: BLE001 - reported in the table, the traceback in the log
        traceback.print_exc()
        return result("failed", f"{type(e).__name__}: {first_line(e)}")
    return result("ok")


# --- the sweep ----------------------------------------------------------------------------------


def schema_has(key: str) -> bool:
    """Whether ``engine.<key>`` is in the config schema."""
    from dataclasses import fields

    from lowrank_pt.config.schema import EngineConfig

    return key in {f.name for f in fields(EngineConfig)}


def recipe(args, method: str, setting: str, run_dir: str, lr: float) -> dict:
    """The run config of one (method, setting) at peak LR ``lr``, as a YAML recipe's mapping."""
    keys = dict(BASELINE)
    keys.update(SETTINGS[setting][0])
    engine = {"zero_stage": 0, "precision": "bf16", "master_weights": keys["engine.master_weights"]}
    if keys["engine.weight_dtype"] != BASELINE["engine.weight_dtype"] or schema_has("weight_dtype"):
        # Named where it is switched, or where the schema knows it: the other settings also run on
        # a schema without the key (where the switch itself is then refused).
        engine["weight_dtype"] = keys["engine.weight_dtype"]
    return {
        "run_dir": run_dir,
        "seed": args.seed,
        "resume": "never",
        "model": {"size": args.size, "seq_len": 256},
        "data": {"source": "embedded", "vocab_size": 8000, "cache_dir": os.path.abspath(args.cache_dir)},
        "engine": engine,
        "train": {"micro_batch_size": args.micro_batch // args.grad_accum, "grad_accum": args.grad_accum,
                  "update": keys["train.update"], "log_every": min(10, args.steps),
                  "eval_every": args.steps, "eval_sequences": args.eval_sequences, "save_every": 0,
                  "keep_last": 1, "tensorboard": False, "progress": True, "sample_prompts": []},
        "stages": [{
            "name": "main", "method": METHOD_OF.get(method, method), "steps": args.steps,
            "optimizer": {"lr": lr, "state_dtype": keys["optimizer.state_dtype"],
                          **({"grad_clip": keys["optimizer.grad_clip"]} if keys["optimizer.grad_clip"] is not None
                             else {})},
            "schedule": {"kind": "cosine", "warmup_steps": max(1, args.steps // 10), "min_lr_ratio": 0.1},
            "options": dict(OPTIONS[method]),
        }],
    }


def final_numbers(run_dir: str) -> dict:
    """Final validation loss (``summary.json``, else the last ``eval/loss`` of ``metrics.jsonl``),
    final train loss, seconds per step and the state bytes the run held."""
    from lowrank_pt.tracking import metrics
    from lowrank_pt.tracking.summary import read_summary

    stages = read_summary(run_dir)["stages"]
    entry = stages[-1] if stages else {}
    out = {"eval_loss": entry.get("eval_loss"), "eval_perplexity": entry.get("eval_perplexity"),
           "train_loss": entry.get("loss"), "step_time_s": entry.get("step_time_s"),
           "steps": entry.get("steps"), "complete": entry.get("complete")}
    out["held_bytes"] = (entry.get("memory") or {}).get("measured") or {}
    out["params"] = (entry.get("params") or {}).get("total")
    if out["eval_loss"] is None:
        try:
            evals = [r for r in metrics.read(run_dir) if "eval/loss" in r]
        except OSError:
            evals = []
        if evals:
            out["eval_loss"] = evals[-1]["eval/loss"]
            out["eval_perplexity"] = evals[-1].get("eval/perplexity")
    return out


def run_one(args, method: str, setting: str, factor: float = 1.0) -> dict:
    """One (method, setting) at ``factor`` times the method's LR, in a fresh process; its row of the results."""
    import yaml

    from lowrank_pt.checkpoint import store

    lr = args.lrs[method] * factor
    name = f"{method}-{setting}" + (f"-lr{lr:g}" if args.lr_factors != [1.0] else "")
    run_dir = os.path.abspath(os.path.join(args.out, "runs", name))
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run every time (resume: never)
    for sub in ("recipes", "runs"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    path = os.path.abspath(os.path.join(args.out, "recipes", f"{name}.yaml"))
    cfg = recipe(args, method, setting, run_dir, lr)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    log_path = os.path.join(args.out, "runs", f"{name}.log")  # the run dir does not exist until it is checked
    out_path = os.path.join(args.out, "runs", f"{name}.result.json")
    if os.path.exists(out_path):
        os.remove(out_path)
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, "--child-out", out_path,
           "--threads", threads]
    row = {"method": method, "setting": setting, "lr": lr, "options": OPTIONS[method],
           "overrides": SETTINGS[setting][0], "bar_pct": SETTINGS[setting][1], "recipe": path}
    start = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            done = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=args.timeout or None)
        code = done.returncode
    except subprocess.TimeoutExpired:
        code = None
    row["seconds"] = time.perf_counter() - start
    if os.path.isdir(run_dir):
        final_log = os.path.join(run_dir, "train.log")
        shutil.move(log_path, final_log)
        log_path = final_log
    row["log"] = log_path
    try:
        with open(out_path) as f:
            outcome = json.load(f)
        os.remove(out_path)
    except (OSError, ValueError):
        outcome = {"status": "failed",
                   "message": f"timed out after {args.timeout:g} s" if code is None else
                   f"the run's process ended with exit code {code} without a result"}
    row.update(status=outcome["status"], message=outcome["message"])
    if row["status"] == "ok":
        row.update(final_numbers(run_dir))
        if row.get("eval_loss") is None:
            row.update(status="failed", message="the run finished without a validation loss")
    if not args.keep_checkpoints:
        shutil.rmtree(store.root(run_dir), ignore_errors=True)
    return row


def best_rows(rows: list[dict]) -> dict:
    """The row of each (method, setting) with the lowest validation loss over its learning rates."""
    best = {}
    for r in rows:
        key = (r["method"], r["setting"])
        if r["status"] == "ok" and (key not in best or r["eval_loss"] < best[key]["eval_loss"]):
            best[key] = r
    return best


def compare(rows: list[dict]) -> None:
    """Each row's relative difference to its method's baseline at its best learning rate
    (``vs_baseline_pct``) and whether it is within its bar; flags a loss equal to the baseline's;
    marks each (method, setting)'s best learning rate (``best_lr``)."""
    base = best_rows(rows)
    for r in rows:
        r["best_lr"] = base.get((r["method"], r["setting"])) is r
        r["compared_with"] = SETTINGS[r["setting"]][2]
        b = base.get((r["method"], r["compared_with"]))
        r["vs_baseline_pct"] = r["within_bar"] = None
        r["notes"] = []
        if r["compared_with"] is None or r["status"] != "ok" or b is None or b["status"] != "ok":
            continue
        r["vs_baseline_pct"] = 100.0 * (r["eval_loss"] - b["eval_loss"]) / b["eval_loss"]
        if r["bar_pct"] is not None:
            r["within_bar"] = abs(r["vs_baseline_pct"]) <= r["bar_pct"]
        if r["eval_loss"] == b["eval_loss"] and r["bar_pct"] != 0:
            r["notes"].append("loss identical to the baseline's: is the switch in effect?")
        if r.get("held_bytes") and r["held_bytes"] == b.get("held_bytes"):
            r["notes"].append("held state bytes identical to the baseline's")


def git_head() -> str:
    def git(*a):
        return subprocess.run(["git", *a], check=False, cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
               if line.strip()]
    return head + (f" + uncommitted changes in {len(changed)} tracked files" if changed else "")


def cell(x, fmt: str, unit: float = 1) -> str:
    return "–" if x is None else fmt.format(x / unit)


def markdown(results: dict, args) -> str:
    rows = results["rows"]
    lines = [f"# Training quality under the memory switches: {args.steps} steps", "",
             f"Command: `{results['command']}`", "",
             f"Date: {results['date']}; commit {results['commit']}", "",
             f"Machine: {results['machine']}; each run in its own process with {args.threads} threads", "",
             f"Model: {args.size} LLaMA, seq 256, {args.micro_batch} sequences per step in {args.grad_accum} "
             "micro-batch(es) (one rank, ZeRO 0, precision bf16), "
             f"embedded corpus (8000-token tokenizer), seed {args.seed} for every run; cosine schedule, "
             f"{max(1, args.steps // 10)} warm-up steps; validation loss on {args.eval_sequences} sequences "
             "after the last step. Learning rates (times " + ", ".join(f"{f:g}" for f in args.lr_factors) +
             ") and options: " +
             "; ".join(f"{m} lr {args.lrs[m]:g} {OPTIONS[m] or ''}".strip() for m in args.methods) + ".", "",
             "| method | setting | lr | val loss | vs | vs baseline | bar | within bar? | params | held state MiB "
             "| s/step |",
             "|---|---|---:|---:|---|---:|---:|:---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] == "ok":
            loss = f"{r['eval_loss']:.4f}"
        else:
            loss = f"{r['status']}: {r['message']}".replace("|", "\\|")
        diff = cell(r.get("vs_baseline_pct"), "{:+.2f}%")
        bar = cell(r["bar_pct"], "±{:g}%")
        within = "–" if r.get("within_bar") is None else ("yes" if r["within_bar"] else "**no**")
        held_cell = cell((r.get("held_bytes") or {}).get("total"), "{:.2f}", MIB)
        if len(args.lr_factors) > 1 and r.get("best_lr"):
            loss = f"**{loss}**"
        lines.append(f"| {r['method']} | {r['setting']} | {r['lr']:g} | {loss} | {r.get('compared_with') or '–'} | "
                     f"{diff} | {bar} | {within} | {cell(r.get('params'), '{:,.0f}')} | {held_cell} | "
                     f"{cell(r.get('step_time_s'), '{:.3f}')} |")
    notes = [f"- {r['method']} / {r['setting']}: {n}" for r in rows for n in r.get("notes", [])]
    lines += ["", ("vs baseline: (val loss − the val loss of the same method's setting named under vs, at its "
                   "best learning rate) / that loss, in percent (bold: each method and setting's best learning "
                   "rate, where several ran); params: the trained model's parameters; within "
                   "bar: |vs baseline| ≤ bar. Held state: the bytes the run held at its end by category, "
                   "summed (params, masters, gradients, optimizer states, method and ZeRO buffers: "
                   "summary.json, measured).")]
    if notes:
        lines += ["", "Flags:", "", *notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    import torch
    from bench_methods import command_line, machine, save

    torch.set_num_threads(args.threads)  # what machine() reports: the runs' thread count
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    plan = [(m, s, f) for m in args.methods for s in args.settings for f in args.lr_factors]
    rows = []
    for i, (method, setting, factor) in enumerate(plan, 1):
        row = run_one(args, method, setting, factor)
        rows.append(row)
        what = (f"val loss {row['eval_loss']:.4f}" if row["status"] == "ok"
                else f"{row['status']}: {row['message']}")
        print(f"[{i}/{len(plan)}] {method} / {setting} / lr {row['lr']:g}: {what} ({row['seconds']:.0f} s; "
              f"{time.perf_counter() - started:.0f} s in all)", flush=True)
    compare(rows)
    results = {"command": command_line("bench_quality.py", argv), "date": datetime.datetime.now().isoformat(
        timespec="seconds"), "commit": git_head(), "machine": machine(), "steps": args.steps,
        "threads": args.threads, "lrs": {m: args.lrs[m] for m in args.methods}, "options": OPTIONS,
        "rows": rows}
    results["seconds"] = time.perf_counter() - started
    save(args.out, results, markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
