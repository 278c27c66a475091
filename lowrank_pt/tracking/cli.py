"""``lowrank-pt report`` and ``lowrank-pt plan``: ``register(subparsers)`` adds both."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import yaml

from lowrank_pt.config.schema import EngineConfig
from lowrank_pt.model.llama import MODEL_SIZES, ModelConfig, resolve
from lowrank_pt.optim.lowbit import STATE_DTYPES
from lowrank_pt.tracking.report import build_report

GIB = 1024.0**3

PLAN_ROWS = (
    ("params", "parameters (module copy, frozen bases included)"),
    ("master_params", "master params (fp32, or bf16 with --master-weights bf16)"),
    ("grads", "gradients"),
    ("optimizer_states", "optimizer states (Adam moments)"),
    ("method_buffers", "method buffers (projectors, scales)"),
    ("zero_buffers", "ZeRO reduce bucket (resident, stage 3)"),
    ("resident", "resident state, total"),
    ("activations", "activations (estimate, one micro-batch)"),
    ("method_transient", "method transient (GaLore refresh at the step: owned gradients or sketches)"),
    ("refresh_working", "a refresh's working set, one matrix (GaLore in backward; an SVD refresh of fira, "
                        "galore_weights)"),
    ("refresh_kept_on_host", "GaLore refresh in backward or by sketch: new bases kept in host memory until the step"),
    ("zero_transient", "gradient reduce bucket (stages 1-2 during backward; stage 0's flattened all-reduce bucket)"),
    ("step_cache", "kept through every step: GaLore W_eff (forward path step), SLTrain supports"),
    ("int8_step", "an int8 weight's step: the matrix dequantised in fp32 (the largest)"),
    ("total", "peak estimate"),
)

# The GaLore paper's memory table (weights + optimizer states, BF16), the entries compared here.
PAPER_TABLE = (
    ("60m", 128, 0.36e9, 0.24e9),
    ("1b", 512, 7.80e9, 4.38e9),
)


def _report(args) -> int:
    try:
        files = build_report(args.run_dirs, args.out, html=args.html)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


def _parse_options(method: str, rank: int | None, pairs: list[str]) -> dict:
    options: dict = {}
    if rank is not None and method != "full":
        options["rank"] = rank
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--option {pair!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    if method == "relora":
        options.setdefault("restart_every", 1000)  # required by relora; no effect on memory
    return options


def plan_markdown(p) -> str:
    i = p.inputs
    lines = [f"Plan: {i['size']} ({p.layout['total_params']:,} params, {p.layout['trainable_params']:,} trainable), "
             f"method {i['method']} {i['options'] or ''}, ZeRO {i['zero_stage']}, {i['world']} GPU(s), "
             f"{i['precision']}, micro-batch {i['micro_batch']} × {i['seq_len']} tokens"
             f"{', activation checkpointing' if i['activation_checkpointing'] else ''}, optimizer states "
             f"{i.get('state_dtype', 'fp32')}, masters {i.get('master_weights', 'fp32')}, frozen bases "
             f"{i.get('weight_dtype', 'bf16')}, update {i.get('update', 'step')}; per GPU (rank {i['rank']}):",
             *([f"GaLore {i['refresh_auto']}."] if i.get("refresh_auto") else []),
             "", "| | GiB | bytes |", "|---|---:|---:|"]
    for key, label in PLAN_ROWS:
        value = p.bytes.get(key, 0)
        bold = "**" if key in ("resident", "total") else ""
        lines.append(f"| {bold}{label}{bold} | {value / GIB:.2f} | {value:,} |")
    lines += ["", "peak estimate = resident + activations + the larger of the step's transients (a refresh "
              "and an int8 weight's step together) and the gradient bucket."]
    return "\n".join(lines)


def paper_markdown() -> str:
    """Our planner beside the GaLore paper's memory estimates (see the README snippet)."""
    # The planner builds methods, which import DeepSpeed (seconds): only plan pays for it.
    from lowrank_pt.tracking import planner

    lines = ["| model | rank | paper full | ours (paper's accounting) full | paper GaLore | "
             "ours (paper's accounting) GaLore | ours, DeepSpeed bf16 ZeRO-0, 1 GPU: full / GaLore |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for size, rank, paper_full, paper_galore in PAPER_TABLE:
        cfg = resolve(ModelConfig(size=size), vocab_size=32000)
        ours_full = planner.paper_accounting(cfg, "full")
        ours_galore = planner.paper_accounting(cfg, "galore", {"rank": rank})
        real = []
        for method, options in (("full", {}), ("galore", {"rank": rank})):
            b = planner.plan(cfg, method, options, zero_stage=0, world=1, precision="bf16").bytes
            real.append(b["params"] + b["master_params"] + b["optimizer_states"] + b["method_buffers"])
        lines.append(f"| {size} | {rank} | {paper_full / 1e9:.2f}G | {ours_full / 1e9:.2f} GB "
                     f"({ours_full / GIB:.2f} GiB) | {paper_galore / 1e9:.2f}G | {ours_galore / 1e9:.2f} GB "
                     f"({ours_galore / GIB:.2f} GiB) | {real[0] / 1e9:.2f} / {real[1] / 1e9:.2f} GB |")
    return "\n".join(lines)


def recipe_plans(path: str, overrides: list[str], gpus: int, rank: int = 0, device_bytes: int | None = None):
    """``[(stage name, Plan)]`` of every stage of a recipe (``path`` with ``train``'s overrides) on
    ``gpus`` ranks: its model, engine, batch and each stage's method, options, optimizer states and
    update, as the run would hold them. The recipe is validated first (without its data)."""
    from lowrank_pt.config.recipe import expected_vocab_size, load
    from lowrank_pt.tracking import planner
    from lowrank_pt.zero.engine import reduce_bucket_elements

    run = load(path, overrides, environment=False)
    cfg = resolve(run.model, vocab_size=expected_vocab_size(run, environment=False))
    e, t = run.engine, run.train
    plans = []
    for stage in run.stages:
        plans.append((stage.name, planner.plan(
            cfg, stage.method, dict(stage.options), zero_stage=e.zero_stage, world=gpus,
            micro_batch=stage.micro_batch_size or t.micro_batch_size, grad_accum=stage.grad_accum or t.grad_accum,
            seq_len=cfg.seq_len, precision=e.precision, activation_checkpointing=cfg.activation_checkpointing,
            rank=rank, weight_decay=stage.optimizer.weight_decay, state_dtype=stage.optimizer.state_dtype,
            master_weights=e.master_weights, weight_dtype=e.weight_dtype, grad_accum_dtype=e.grad_accum_dtype,
            update=stage.update or t.update, device_bytes=device_bytes or planner.DEFAULT_DEVICE_BYTES,
            reduce_bucket_size=reduce_bucket_elements(e, cfg.hidden_size))))
    return plans


def _plan_recipe(args) -> int:
    """``plan CONFIG [key=value ...]``: every stage of a recipe."""
    device_bytes = int(args.device_memory * GIB) if args.device_memory else None
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's import prints
        try:
            plans = recipe_plans(args.config, args.overrides, args.gpus, args.rank_index, device_bytes)
        except (ValueError, FileNotFoundError) as e:  # ConfigError included
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps([{"stage": name, "inputs": p.inputs, "layout": p.layout, "bytes": p.bytes}
                          for name, p in plans], indent=1))
        return 0
    for name, p in plans:
        print(f"## stage {name}\n\n{plan_markdown(p)}\n")
    peak = max(plans, key=lambda item: item[1].total)
    print(f"The recipe peaks at {peak[1].total / GIB:.2f} GiB per GPU (stage {peak[0]}) on {args.gpus} GPU(s).")
    if args.device_memory and peak[1].total > args.device_memory * GIB:
        print(f"error: over --device-memory {args.device_memory:g} GiB", file=sys.stderr)
        return 1
    return 0


def _plan(args) -> int:
    # The planner builds methods, which import DeepSpeed (seconds): only plan pays for it.
    from lowrank_pt.tracking import planner
    from lowrank_pt.tracking.fit import check_setting

    if args.rank_index >= args.gpus:
        print(f"error: plan --rank-index {args.rank_index} must be below --gpus {args.gpus}", file=sys.stderr)
        return 2
    if args.config is not None:
        return _plan_recipe(args)
    if args.overrides:
        print(f"error: plan: overrides {args.overrides[:2]} need a recipe (plan CONFIG key=value ...)", file=sys.stderr)
        return 2
    # DeepSpeed prints to stdout when the methods import it: keep stdout for the plan (--json).
    with contextlib.redirect_stdout(sys.stderr):
        if args.paper:
            text = paper_markdown()
        try:
            engine = EngineConfig(zero_stage=args.zero_stage, precision=args.precision,
                                  master_weights=args.master_weights, weight_dtype=args.weight_dtype,
                                  grad_accum_dtype=args.grad_accum_dtype)
            options = _parse_options(args.method, args.rank, args.option)
            check_setting(args.method, options, engine, args.update)
            cfg = resolve(ModelConfig(size=args.size, seq_len=args.seq_len,
                                      activation_checkpointing=args.activation_checkpointing),
                          vocab_size=args.vocab_size)
            device_bytes = int(args.device_memory * GIB) if args.device_memory else planner.DEFAULT_DEVICE_BYTES
            if args.fit is not None:
                found = _fit(args, cfg, options)
            else:
                p = planner.plan(cfg, args.method, options, zero_stage=args.zero_stage, world=args.gpus,
                                 micro_batch=args.micro_batch, seq_len=args.seq_len, precision=args.precision,
                                 activation_checkpointing=args.activation_checkpointing, rank=args.rank_index,
                                 reduce_bucket_size=args.reduce_bucket_size, grad_accum=args.grad_accum,
                                 state_dtype=args.state_dtype, master_weights=args.master_weights,
                                 weight_dtype=args.weight_dtype, grad_accum_dtype=args.grad_accum_dtype,
                                 update=args.update, device_bytes=device_bytes)
        except ValueError as e:  # ConfigError included
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.paper:
        print(text)
        return 0
    if args.fit is not None:
        return _fit_report(args, *found)
    if args.json:
        print(json.dumps({"inputs": p.inputs, "layout": p.layout, "bytes": p.bytes}, indent=1))
    else:
        print(plan_markdown(p))
    return 0


def _fit(args, cfg, options):
    """``plan --fit GIB``: (the cheapest setting that fits, or None; the smallest plan), by ``tracking.fit``."""
    from lowrank_pt.tracking.fit import fit

    return fit(cfg, args.method, options, int(args.fit * GIB), world=args.gpus, precision=args.precision,
               grad_accum=args.grad_accum, micro_batch=args.micro_batch, seq_len=args.seq_len, rank=args.rank_index,
               reduce_bucket_size=args.reduce_bucket_size)


def _fit_report(args, best, smallest) -> int:
    if best is None:
        print(f"error: no setting fits {args.fit:g} GiB per GPU for {args.size} {args.method} on {args.gpus} GPU(s) "
              f"at micro-batch {args.micro_batch} x {args.seq_len}; the smallest plan needs "
              f"{smallest.plan.total / GIB:.2f} GiB: {smallest.flags()}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"setting": best.setting, "price": best.price, "flags": best.flags(),
                          "inputs": best.plan.inputs, "layout": best.plan.layout, "bytes": best.plan.bytes}, indent=1))
    else:
        print(f"fits {args.fit:g} GiB: {best.flags()} (price {best.price:g}; tracking/fit.py says what each "
              f"switch costs), peak {best.plan.total / GIB:.2f} GiB\n")
        print(plan_markdown(best.plan))
    return 0


def at_least(low: int):
    """An argparse type: an int >= ``low`` (argparse then names the flag in its one-line error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def register(subparsers) -> None:
    """Add the ``report`` and ``plan`` subcommands to the main CLI's subparsers."""
    # DeepSpeed (imported with the methods) may print to stdout: plan --json redirects it to stderr.
    rep = subparsers.add_parser("report", help="markdown/HTML report with plots of one or more run dirs")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (side by side)")
    rep.add_argument("--out", required=True, help="output directory for report.md and the PNGs")
    rep.add_argument("--html", action="store_true", help="also write report.html")
    rep.set_defaults(func=_report)

    pl = subparsers.add_parser("plan", help="per-GPU memory by category of a recipe (plan CONFIG [key=value ...]) "
                                            "or of a configuration given by flags, before running it")
    pl.add_argument("config", nargs="?", default=None, metavar="CONFIG",
                    help="a recipe (YAML) to plan stage by stage, with the same key=value overrides as train; "
                         "--gpus, --rank-index, --device-memory and --json apply, the other flags are the recipe's")
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the recipe, as for train")
    pl.add_argument("--size", default="7b", choices=sorted(MODEL_SIZES), help="named model size")
    pl.add_argument("--method", default="full", help="training method (full, lora, relora, galore, ...)")
    pl.add_argument("--rank", type=at_least(1), default=None, help="rank r of lora/relora/galore (their default if omitted)")
    pl.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="another method option, e.g. proj_type=left or target_modules=[q_proj,v_proj]")
    pl.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage")
    pl.add_argument("--gpus", "--num-gpus", "--nproc-per-node", type=at_least(1), default=1, help="data-parallel ranks (ZeRO partitions over them)")
    pl.add_argument("--micro-batch", "--micro-batch-size", type=at_least(1), default=1, help="sequences per GPU per micro-batch")
    pl.add_argument("--grad-accum", type=at_least(1), default=1, help="micro-batches per optimizer step")
    pl.add_argument("--seq-len", type=at_least(1), default=2048, help="tokens per sequence")
    pl.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"), help="training dtype")
    pl.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    pl.add_argument("--state-dtype", default="fp32", choices=STATE_DTYPES,
                    help="how AdamW stores its moments (optimizer.state_dtype)")
    pl.add_argument("--master-weights", default="fp32", choices=("fp32", "bf16"),
                    help="the weights the optimizer updates (engine.master_weights; bf16 with --precision bf16)")
    pl.add_argument("--weight-dtype", default="bf16", choices=("bf16", "int8"),
                    help="how weights are stored (engine.weight_dtype): int8 frozen bases (lora, relora, "
                         "galore) or int8 updated weights (other methods, ZeRO 0, --master-weights bf16)")
    pl.add_argument("--grad-accum-dtype", default=None, choices=("fp32", "bf16"),
                    help="DeepSpeed's gradient accumulation dtype (engine.grad_accum_dtype; fp32 counts at ZeRO 1)")
    pl.add_argument("--update", default="step", choices=("step", "per_layer"),
                    help="optimizer steps after the backward, or per tensor inside it (train.update; ZeRO 0)")
    pl.add_argument("--device-memory", type=float, default=None, metavar="GIB",
                    help="memory per GPU that GaLore's refresh: auto is decided against (default: an 80 GB GPU's)")
    pl.add_argument("--fit", type=float, default=None, metavar="GIB",
                    help="find the cheapest setting (state/master/weight dtypes, update, checkpointing, GaLore's "
                         "refresh, ZeRO stage) whose peak fits GIB per GPU; the other flags fix the rest")
    pl.add_argument("--vocab-size", type=at_least(1), default=32000, help="vocabulary size")
    pl.add_argument("--reduce-bucket-size", type=at_least(1), default=None,
                    help="ZeRO's gradient reduce bucket in elements (engine.reduce_bucket_size; default: the "
                         "model's hidden_size², at least 5e6)")
    pl.add_argument("--rank-index", "--process-rank", type=at_least(0), default=0, help="which rank to report (partitions differ by padding)")
    pl.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    pl.add_argument("--paper", action="store_true", help="print the comparison with the GaLore paper's estimates")
    pl.set_defaults(func=_plan)
