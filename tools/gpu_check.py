"""GPU check: one table that says whether lowrank_pt trains correctly on this GPU, and how fast.

Part 1, correctness, for every method (full, lora, relora, galore) x ZeRO 0/2/3 x bf16 on one
device, through the trainer (configs/tiny.yaml's model and data):
- loss falls: the last logged loss of a 6-step stage is below the first;
- resume is exact: a run stopped at step 2 (train.stop_at_step) and resumed equals an
  uninterrupted run bit for bit, in every logged loss and every final weight. The resume
  crosses a ReLoRA restart / a GaLore refresh, and lora/relora use dropout 0.1, so on a GPU it
  also needs the CUDA RNG restored from the checkpoint;
- edits land in the masters (relora, galore): right after a ReLoRA restart / a GaLore refresh,
  the fp32 master copies DeepSpeed steps from hold the edit (B zeroed, A re-initialised, the
  merge in W0), not only the module's bf16 copy; an edit missing a master would be undone at
  the next step.

Part 2, benchmark, for the 130m and 350m sizes (bf16, ZeRO 0, one device, embedded corpus with
an 8000-token vocabulary): tokens/s and MFU from the stage's summary.json entry,
``torch.cuda.max_memory_allocated`` beside the planner's predicted peak for the same run.

Part 3, memory switches: the 1B size trained by GaLore (r512, bf16, ZeRO 0, a few steps) under
each of ``--switches`` (none; int8 optimizer states; bf16 masters; int8 frozen bases; all three;
per-layer updates with int8 states and bf16 masters):
``max_memory_allocated`` beside the planner's peak for the same switches.

Part 4, open models: a random model of Llama 3.2 1B's shape (grouped-query attention, Llama 3
RoPE, tied embeddings; the run's vocabulary) saved as a Hugging Face dir, imported by a LoRA SFT
stage (``model.size: init_from``, bf16, a few steps): tokens/s and ``max_memory_allocated`` beside
the planner's peak.

Also one line on the fused AdamW that ZeRO stage 0 uses on CUDA: its largest difference from the
exact single-tensor AdamW over 100 steps.

    tools/gpu_check.sh                              # pytest -m gpu, then this (< 8 min on one GPU)
    python tools/gpu_check.py --out gpu_check_out   # the table only
    python tools/gpu_check.py --device cpu --tiny   # the same code on CPU in about a minute

Without CUDA (and without ``--device cpu``) it exits at once with status 3 and says so.
Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
NO_CUDA = 3

METHODS = ("full", "lora", "relora", "galore")
STEPS, STOP = 6, 2
"""Matrix stage length and the stop of the interrupted run: the resumed part runs steps 2-5,
across the ReLoRA restart after step 2 and the GaLore refresh at step 3."""
STAGE_EXTRA = {
    "full": "",
    "lora": ", options: {rank: 8, alpha: 16, dropout: 0.1}",
    "relora": (", options: {rank: 8, alpha: 16, dropout: 0.1, restart_every: 3, restart_warmup_steps: 1, "
               "reset_mode: magnitude, reset_fraction: 0.9}, schedule: {kind: jagged_cosine}"),
    "galore": ", options: {rank: 8, update_proj_gap: 3}",
}
SWITCHES = {
    # name: (config overrides, planner keywords, optimizer keys of the stage)
    "none": ([], {}, {}),
    "int8_states": ([], {"state_dtype": "int8"}, {"state_dtype": "int8"}),
    "bf16_masters": (["engine.master_weights=bf16"], {"master_weights": "bf16"}, {}),
    "int8_weights": (["engine.weight_dtype=int8"], {"weight_dtype": "int8"}, {}),
    "all": (["engine.master_weights=bf16", "engine.weight_dtype=int8"],
            {"state_dtype": "int8", "master_weights": "bf16", "weight_dtype": "int8"}, {"state_dtype": "int8"}),
    "per_layer": (["engine.master_weights=bf16", "train.update=per_layer"],
                  {"state_dtype": "int8", "master_weights": "bf16", "update": "per_layer"}, {"state_dtype": "int8"}),
}
"""The bytes-per-parameter switches part 3 runs (``--switches``)."""
SWITCH_OPTIONS = {"galore": {"rank": 512, "update_proj_gap": 200}}
"""Part 3's options where they differ from part 2's: GaLore at the 1B plan's rank."""
BENCH_OPTIONS = {
    "full": {},
    "lora": {"rank": 128, "alpha": 32},
    "relora": {"rank": 128, "alpha": 32, "restart_every": 1000},
    "galore": {"rank": 128, "update_proj_gap": 200},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default; exits with status 3 where there is none) or cpu (a dry run)")
    p.add_argument("--tiny", action="store_true",
                   help="benchmark the tiny model for a few steps instead of 130m/350m (a quick dry run)")
    p.add_argument("--out", default="gpu_check_out", help="output directory (runs, json, md)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--zero-stages", default="0,2,3")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32", "fp16"))
    p.add_argument("--skip-matrix", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--bench-sizes", default="130m,350m")
    p.add_argument("--bench-methods", default="full,galore")
    p.add_argument("--bench-steps", type=int, default=30)
    p.add_argument("--bench-seq-len", type=int, default=512)
    p.add_argument("--bench-micro-batch", type=int, default=8)
    p.add_argument("--bench-zero-stage", type=int, default=0)
    p.add_argument("--bench-vocab", type=int, default=8000)
    p.add_argument("--switches", default=",".join(SWITCHES), help="part 3: memory switches ('' skips it)")
    p.add_argument("--switch-size", default="1b")
    p.add_argument("--switch-method", default="galore")
    p.add_argument("--switch-steps", type=int, default=6)
    p.add_argument("--skip-imported", action="store_true", help="skip part 4 (LoRA SFT of an imported GQA model)")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.zero_stages = [int(z) for z in args.zero_stages.split(",") if z]
    args.bench_methods = [m for m in args.bench_methods.split(",") if m]
    args.bench_sizes = [s for s in args.bench_sizes.split(",") if s]
    args.switches = [s for s in args.switches.split(",") if s]
    unknown_switches = sorted(set(args.switches) - set(SWITCHES))
    if unknown_switches:
        p.error(f"unknown switch(es) {unknown_switches}; allowed {list(SWITCHES)}")
    if args.tiny:
        args.bench_sizes, args.bench_steps, args.bench_seq_len = ["tiny"], 4, 64
        args.bench_micro_batch, args.bench_vocab = 4, 512
        args.switch_size, args.switch_steps = "tiny", 2
    unknown = sorted(set(args.methods + args.bench_methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; allowed {list(METHODS)}")
    return args


# --- pieces -----------------------------------------------------------------------------------------


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train(overrides: list[str]) -> dict:
    from lowrank_pt.config.recipe import load
    from lowrank_pt.trainer.trainer import Trainer

    try:
        return Trainer(load(TINY, overrides)).run_all()
    finally:
        free_memory()


def logged_losses(run_dir: str) -> list[tuple[int, float]]:
    from lowrank_pt.tracking import metrics

    return [(r["step"], r["loss"]) for r in metrics.read(run_dir) if "loss" in r]


def final_weights(run_dir: str) -> dict:
    from lowrank_pt.checkpoint import store as checkpoint

    return checkpoint.load_weights(checkpoint.newest(run_dir))


def ready(method, engine, total_steps: int = 100) -> None:
    """``method.on_engine_ready`` with what this version of the Method API takes."""
    try:
        from lowrank_pt.methods.base import StageContext
    except ImportError:
        method.on_engine_ready(engine)
        return
    method.on_engine_ready(StageContext(engine=engine, total_steps=total_steps))


def tiny_engine(method, zero_stage: int, precision: str, lr: float = 1e-2):
    import torch

    from lowrank_pt.config.recipe import EngineConfig
    from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
    from lowrank_pt.optim.adamw import build_optimizer
    from lowrank_pt.zero import engine as E

    torch.manual_seed(0)
    model = LlamaModel(resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=64))
    method.prepare_model(model)
    optimizer = build_optimizer(method.param_groups(model), method.stage.optimizer, zero_stage=zero_stage)
    ds = E.deepspeed_config(EngineConfig(zero_stage=zero_stage, precision=precision), 2, 1, 0.0, 1)
    engine = E.initialize(model, optimizer, method.lr_lambda(100), ds)
    ready(method, engine)
    return engine


def batches(n: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 17), generator=g)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out


def _close(a, b, rel: float) -> bool:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) <= rel * scale


# --- part 1: correctness ---------------------------------------------------------------------------


def masters_relora(zero_stage: int, precision: str) -> str:
    """After a restart: A re-initialised and B zeroed in masters and module, W0 merged."""
    import torch

    from lowrank_pt.config.recipe import OptimizerConfig, StageConfig
    from lowrank_pt.methods import parse_options
    from lowrank_pt.methods.relora import ReLoRA
    from lowrank_pt.model.lowrank_linear import lowrank_modules, merged_weight
    from lowrank_pt.zero import state as zero_io

    options = parse_options("relora", dict(rank=4, alpha=8, restart_every=2, restart_warmup_steps=1,
                                           reset_mode="zero", seed=5))
    method = ReLoRA(options, StageConfig(steps=100, optimizer=OptimizerConfig(lr=1e-2)), None)
    engine = tiny_engine(method, zero_stage, precision)
    data = batches(3)
    problems = []
    for step in range(3):
        method.train_step(engine, [data[step]], step)
        if step == 1:  # the restart runs in after_step of step 1
            mods = lowrank_modules(engine.module)
            before = {n: [zero_io.full_param(engine, getattr(m, leaf)) for leaf in ("weight", "lora_A", "lora_B")]
                      for n, m in mods}
        method.after_step(engine, step)
        if step == 1:
            for name, m in mods:
                W0, A0, B0 = before[name]
                W1, A1, B1 = (zero_io.full_param(engine, getattr(m, leaf)) for leaf in ("weight", "lora_A", "lora_B"))
                with zero_io.gathered([m.lora_A, m.lora_B]):
                    module_A, module_B = (m.lora_A.detach().float().cpu().clone(),
                                          m.lora_B.detach().float().cpu().clone())
                if not B0.abs().max() > 0:
                    problems.append(f"{name}: B did not train before the restart")
                if B1.abs().max() > 0 or module_B.abs().max() > 0:
                    problems.append(f"{name}: B not zero after the restart (master {float(B1.abs().max()):.2e}, "
                                    f"module {float(module_B.abs().max()):.2e})")
                if torch.equal(A1, A0) or not torch.equal(module_A, A1.to(m.lora_A.dtype).float()):
                    problems.append(f"{name}: A's master and module disagree or were not re-initialised")
                merged = merged_weight(W0.to(m.weight.dtype), A0, B0, m.scale).float()
                if not _close(W1, merged, 1e-2) or torch.equal(W1, W0):
                    problems.append(f"{name}: W0 does not hold the merge")
    del engine
    free_memory()
    return "ok" if not problems else "FAIL: " + "; ".join(problems[:3])


def masters_galore(zero_stage: int, precision: str) -> str:
    """At the refresh of step 2: B zeroed in master and module, B·Q merged into W0."""
    import torch

    from lowrank_pt.config.recipe import OptimizerConfig, StageConfig
    from lowrank_pt.methods.galore.method import GaLore, GaLoreOptions
    from lowrank_pt.zero import state as zero_io

    method = GaLore(GaLoreOptions(rank=4, update_proj_gap=2),
                    StageConfig(steps=100, optimizer=OptimizerConfig(lr=1e-2)), None)
    engine = tiny_engine(method, zero_stage, precision)
    problems = []
    original = method.before_optimizer_step

    def checked(engine_, step):
        if step != 2:
            return original(engine_, step)
        before = {}
        for name, a in method.adapters.items():
            before[name] = (base_weight(engine_, a), zero_io.full_param(engine_, a.galore_b),
                            zero_io.full_param(engine_, a.galore_basis), a.galore_decay.detach().float().cpu().clone())
        original(engine_, step)
        for name, a in method.adapters.items():
            w0, b0, q0, d0 = before[name]
            b1 = zero_io.full_param(engine_, a.galore_b)
            with zero_io.gathered([a.galore_b]):
                module_b = a.galore_b.detach().float().cpu().clone()
            w1 = base_weight(engine_, a)
            if not b0.abs().max() > 0:
                problems.append(f"{name}: B did not train before the refresh")
            if b1.abs().max() > 0 or module_b.abs().max() > 0:
                problems.append(f"{name}: B not zero after the refresh (master {float(b1.abs().max()):.2e})")
            if not _close(w1, a.merged(w0, b0, q0, d0), 1e-2) or torch.equal(w1, w0):
                problems.append(f"{name}: W0 does not hold the merge")
        return None

    def base_weight(engine_, adapter):  # W0: a frozen param, or an fp32 buffer (base_in_fp32)
        return zero_io.full_param(engine_, adapter.weight)

    method.before_optimizer_step = checked
    for step, batch in enumerate(batches(3)):
        method.train_step(engine, [batch], step)
        method.after_step(engine, step)
    if method.refreshes != 2:
        problems.append(f"{method.refreshes} refreshes, expected 2")
    del engine
    free_memory()
    return "ok" if not problems else "FAIL: " + "; ".join(problems[:3])


MASTERS = {"relora": masters_relora, "galore": masters_galore}


def check_cell(method: str, zero_stage: int, precision: str, args, data_cache: str) -> dict:
    import torch

    row = {"method": method, "zero_stage": zero_stage, "precision": precision}
    start = time.perf_counter()
    base = os.path.join(args.out, "matrix", f"{method}_zero{zero_stage}_{precision}")
    shutil.rmtree(base, ignore_errors=True)
    straight, resumed = os.path.join(base, "straight"), os.path.join(base, "resumed")
    common = [f"data.cache_dir={data_cache}", f"engine.zero_stage={zero_stage}", f"engine.precision={precision}",
              "train.log_every=1", "train.eval_every=0", "train.tensorboard=false", "train.progress=false",
              "train.micro_batch_size=4",
              f"stages=[{{name: main, method: {method}, steps: {STEPS}, optimizer: {{lr: 3.0e-3}}"
              f"{STAGE_EXTRA[method]}}}]"]
    try:
        train([f"run_dir={straight}", *common])
        train([f"run_dir={resumed}", *common, f"train.stop_at_step={STOP}"])
        train([f"run_dir={resumed}", *common])
        a, b = logged_losses(straight), logged_losses(resumed)
        row["loss_first"], row["loss_last"] = (a[0][1], a[-1][1]) if a else (None, None)
        row["loss_falls"] = bool(a) and a[-1][1] < a[0][1]
        row["steps"] = len(a)
        wa, wb = final_weights(straight), final_weights(resumed)
        same_weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        row["resume_exact"] = len(a) == STEPS and a == b and same_weights
        if not row["resume_exact"]:
            diff = max(((wa[k] - wb[k]).abs().max().item() for k in wa if k in wb), default=float("nan"))
            row["resume_detail"] = f"losses equal: {a == b}, weights max diff {diff:.3e}"
    except Exception as e:  # noqa: BLE001 - one broken cell must not hide the others
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()
        free_memory()
    if method in MASTERS:
        try:
            row["masters"] = MASTERS[method](zero_stage, precision)
        except Exception as e:  # noqa: BLE001
            row["masters"] = f"FAIL: {type(e).__name__}: {e}"
            row.setdefault("traceback", traceback.format_exc())
            free_memory()
    row["seconds"] = time.perf_counter() - start
    row["ok"] = bool("error" not in row and row.get("loss_falls") and row.get("resume_exact")
                     and row.get("masters", "ok") == "ok")
    return row


# --- part 2: benchmark ----------------------------------------------------------------------------


def bench(size: str, method: str, args, data_cache: str, switch: str = "none") -> dict:
    import torch

    from lowrank_pt.model.llama import ModelConfig, resolve
    from lowrank_pt.tracking import planner
    from lowrank_pt.tracking.summary import read_summary

    options = dict(SWITCH_OPTIONS.get(method, BENCH_OPTIONS[method]) if switch != "none" else BENCH_OPTIONS[method])
    if size == "tiny":
        options = {k: (min(v, 8) if k == "rank" else v) for k, v in options.items()}
    run_dir = os.path.join(args.out, "bench", f"{size}_{method}_{switch}")
    overrides, plan_keys, optimizer_keys = SWITCHES[switch]
    steps = args.bench_steps if switch == "none" else args.switch_steps
    optimizer = json.dumps({"lr": 1.0e-3, **optimizer_keys})
    shutil.rmtree(run_dir, ignore_errors=True)
    extra = ""
    if method == "relora":
        extra = ", schedule: {kind: jagged_cosine}"
    opts = json.dumps(options)
    row = {"size": size, "method": method, "zero_stage": args.bench_zero_stage, "precision": args.precision,
           "micro_batch": args.bench_micro_batch, "seq_len": args.bench_seq_len, "steps": steps, "switch": switch}
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        train([f"run_dir={run_dir}", f"data.cache_dir={data_cache}", f"data.vocab_size={args.bench_vocab}",
               "data.max_documents=null" if not args.tiny else "data.max_documents=200",
               f"model.size={size}", f"model.seq_len={args.bench_seq_len}",
               f"engine.zero_stage={args.bench_zero_stage}", f"engine.precision={args.precision}",
               f"train.micro_batch_size={args.bench_micro_batch}", "train.log_every=10", "train.eval_every=0",
               "train.eval_sequences=8", "train.tensorboard=false", "train.progress=false",
               f"stages=[{{name: bench, method: {method}, steps: {steps}, optimizer: {optimizer}, "
               f"options: {opts}{extra}}}]", *overrides])
        entry = read_summary(run_dir)["stages"][0]
        row["max_memory_allocated"] = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
        mem = entry.get("memory", {})
        row["summary_peak_allocated"] = mem.get("peak_allocated_bytes")
        row["summary_resident"] = sum((mem.get("measured") or {}).values()) or None
        row["tokens_per_s"] = entry.get("tokens_per_s")
        row["mfu"] = entry.get("mfu")
        row["peak_source"] = entry.get("peak_source")
        cfg = resolve(ModelConfig(size=size, seq_len=args.bench_seq_len), vocab_size=_vocab(run_dir, args))
        device_bytes = (torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available()
                        else planner.DEFAULT_DEVICE_BYTES)  # what the run decided GaLore's refresh: auto by
        plan = planner.plan(cfg, method, options, zero_stage=args.bench_zero_stage, world=1,
                            micro_batch=args.bench_micro_batch, seq_len=args.bench_seq_len,
                            precision=args.precision, device_bytes=device_bytes, **plan_keys)
        row["planned_peak"] = plan.total
        row["planned_resident"] = plan.bytes["resident"]
        measured = row["max_memory_allocated"]
        row["measured_over_planned"] = measured / plan.total if measured else None
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()
        free_memory()
    return row


IMPORTED = dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                rope_theta=500000.0, rope_scaling="llama3", rope_factor=32.0, rope_original_max_positions=8192,
                tie_embeddings=True)
"""Part 4's open model: Llama 3.2 1B's shape (grouped-query attention, Llama 3 RoPE, tied
embeddings), random weights, the run's vocabulary (no hub here)."""


def imported_sft(args, data_cache: str) -> dict:
    """Part 4: a LoRA SFT stage on an imported GQA model (saved as a Hugging Face dir, taken by
    ``model.size: init_from``), bf16: tokens/s and max_memory_allocated beside the planner."""
    import torch

    from lowrank_pt.checkpoint.export import save_hf
    from lowrank_pt.data import DataConfig, prepare_data
    from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
    from lowrank_pt.tracking import planner
    from lowrank_pt.tracking.summary import read_summary

    shape = dict(size="tiny", num_kv_heads=2) if args.tiny else dict(size="1b", **IMPORTED)
    options = {"rank": 16, "alpha": 32, "train_full_rank": False}
    row = {"size": "imported " + ("tiny" if args.tiny else "1b (Llama 3.2 shape)"), "method": "lora sft",
           "zero_stage": args.bench_zero_stage, "precision": args.precision, "micro_batch": args.bench_micro_batch,
           "seq_len": args.bench_seq_len, "steps": args.switch_steps, "switch": "init_from"}
    try:
        tokenizer = prepare_data(DataConfig(source="embedded", vocab_size=args.bench_vocab, cache_dir=data_cache,
                                            max_documents=200 if args.tiny else None), progress=False).tokenizer_path
        from lowrank_pt.data import load_tokenizer

        cfg = resolve(ModelConfig(seq_len=args.bench_seq_len, **shape), vocab_size=load_tokenizer(tokenizer).vocab_size)
        model_dir = os.path.join(args.out, "imported_model")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            save_hf(LlamaModel(cfg).state_dict(), cfg, model_dir, tokenizer, "bfloat16")
        free_memory()
        run_dir = os.path.join(args.out, "bench", "imported_sft")
        shutil.rmtree(run_dir, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        train([f"run_dir={run_dir}", f"data.cache_dir={data_cache}", f"data.vocab_size={args.bench_vocab}",
               f"data.tokenizer={tokenizer}", "model.size=init_from", f"model.seq_len={args.bench_seq_len}",
               f"engine.zero_stage={args.bench_zero_stage}", f"engine.precision={args.precision}",
               f"train.micro_batch_size={args.bench_micro_batch}", "train.log_every=10", "train.eval_every=0",
               "train.eval_sequences=8", "train.eval_questions=0", "train.tensorboard=false", "train.progress=false",
               f"stages=[{{name: sft, method: lora, steps: {args.switch_steps}, init_from: {model_dir}, "
               f"options: {json.dumps(options)}, optimizer: {{lr: 2.0e-4}}, sft: {{train: shakespeare, "
               "max_examples: 2000}}]"])
        entry = read_summary(run_dir)["stages"][0]
        row["max_memory_allocated"] = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
        row["tokens_per_s"], row["mfu"] = entry.get("tokens_per_s"), entry.get("mfu")
        plan = planner.plan(cfg, "lora", options, zero_stage=args.bench_zero_stage, world=1,
                            micro_batch=args.bench_micro_batch, seq_len=args.bench_seq_len, precision=args.precision)
        row["planned_peak"] = plan.total
        row["measured_over_planned"] = row["max_memory_allocated"] / plan.total if row["max_memory_allocated"] else None
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()
        free_memory()
    return row


def _vocab(run_dir: str, args) -> int:
    """The vocabulary the run trained with (its resolved config), else the one asked for."""
    try:
        import yaml

        with open(os.path.join(run_dir, "config.yaml")) as f:
            return int(yaml.safe_load(f)["model"].get("vocab_size") or args.bench_vocab)
    except Exception:  # noqa: BLE001
        return args.bench_vocab


def fused_adamw_difference(device: str) -> dict:
    """Largest |fused - single-tensor| AdamW weight difference after 100 steps on the same
    gradients (fp32, 4 tensors of 256x256, lr 1e-3, weight decay 0.1)."""
    import torch

    g = torch.Generator().manual_seed(0)
    init = [torch.randn(256, 256, generator=g) * 0.02 for _ in range(4)]
    grads = [[torch.randn(256, 256, generator=g) * 1e-2 for _ in range(4)] for _ in range(100)]
    out = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=False, fused=fused or None)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.to(device)
            opt.step()
        out[fused] = torch.cat([p.detach().flatten().cpu() for p in params])
    moved = float((out[False] - torch.cat([t.flatten() for t in init])).abs().max())
    return {"device": device, "max_abs_diff": float((out[True] - out[False]).abs().max()), "max_update": moved}


# --- report ----------------------------------------------------------------------------------------


def _gib(n) -> str:
    return "-" if not n else f"{n / 2**30:.2f} GiB"


def render(result: dict) -> str:
    lines = [f"# GPU check — {result['device_name']}", "",
             f"torch {result['torch']}, deepspeed {result['deepspeed']}, {result['seconds']:.0f} s", ""]
    if result["matrix"]:
        lines += ["## Correctness: 1 device, tiny model, 6 steps (resume: stop at 2, continue)", "",
                  "| method | ZeRO | precision | loss first → last | loss falls | resume exact | edits in masters | s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["matrix"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['zero_stage']} | {r['precision']} | ERROR: {r['error'][:120]} "
                             f"| | | {r.get('masters', '-')} | {r['seconds']:.0f} |")
                continue
            loss = f"{r['loss_first']:.4f} → {r['loss_last']:.4f}" if r.get("loss_first") is not None else "-"
            resume = "yes" if r["resume_exact"] else f"NO ({r.get('resume_detail', '')})"
            lines.append(f"| {r['method']} | {r['zero_stage']} | {r['precision']} | {loss} | "
                         f"{'yes' if r['loss_falls'] else 'NO'} | {resume} | {r.get('masters', '-')} | "
                         f"{r['seconds']:.0f} |")
        lines.append("")
    rows = result["bench"] + result.get("switches", []) + result.get("imported", [])
    if rows:
        lines += ["## Benchmark and memory switches: 1 device (planner figures for the same switches)", "",
                  "| size | method | switch | ZeRO | precision | micro-batch × seq | tokens/s | MFU | "
                  "max_memory_allocated | planner peak | measured / planned |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            head = (f"| {r['size']} | {r['method']} | {r.get('switch', 'none')} | {r['zero_stage']} | {r['precision']} | "
                    f"{r['micro_batch']} × {r['seq_len']} |")
            if "error" in r:
                lines.append(f"{head} ERROR: {r['error'][:120]} | | | | |")
                continue
            mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            ratio = "-" if not r.get("measured_over_planned") else f"{r['measured_over_planned']:.2f}"
            lines.append(f"{head} {r['tokens_per_s']:.0f} | {mfu} | {_gib(r.get('max_memory_allocated'))} | "
                         f"{_gib(r['planned_peak'])} | {ratio} |")
        lines.append("")
    f = result.get("fused_adamw")
    if f:
        lines += [f"Fused AdamW (ZeRO 0 on CUDA) vs single-tensor AdamW on {f['device']}, 100 steps: max |Δw| "
                  f"{f['max_abs_diff']:.2e} (weights moved by up to {f['max_update']:.2e})", ""]
    lines.append("ALL CHECKS PASSED" if result["ok"] else "SOME CHECKS FAILED: " + "; ".join(result["failures"]))
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing was checked.\n"
              "Run it on a GPU machine (tools/gpu_check.sh), or try the same code on CPU with\n"
              "  python tools/gpu_check.py --device cpu --tiny", file=sys.stderr)
        return NO_CUDA
    if args.device == "cpu" and torch.cuda.is_available():
        print("gpu_check: --device cpu on a machine with CUDA: run it with CUDA_VISIBLE_DEVICES= "
              "(the engine follows the accelerator DeepSpeed finds)", file=sys.stderr)
        return 2
    if args.precision == "fp16" and args.device == "cpu":
        print("gpu_check: fp16 needs a GPU", file=sys.stderr)
        return 2

    from lowrank_pt.core import dist

    os.makedirs(args.out, exist_ok=True)
    data_cache = os.path.join(args.out, "data_cache")
    start = time.perf_counter()
    dist.init()
    import deepspeed

    result = {"device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "deepspeed": deepspeed.__version__, "args": vars(args),
              "matrix": [], "bench": [], "switches": [], "imported": []}
    if not args.skip_matrix:
        for method in args.methods:
            for zero_stage in args.zero_stages:
                row = check_cell(method, zero_stage, args.precision, args, data_cache)
                print(f"gpu_check: {method} ZeRO {zero_stage}: {'ok' if row['ok'] else 'FAILED'} "
                      f"({row['seconds']:.0f} s)", flush=True)
                result["matrix"].append(row)
    if not args.skip_bench:
        for size in args.bench_sizes:
            for method in args.bench_methods:
                row = bench(size, method, args, data_cache)
                said = row["error"] if "error" in row else f"{row['tokens_per_s']:.0f} tokens/s"
                print(f"gpu_check: bench {size} {method}: {said}", flush=True)
                result["bench"].append(row)
    for switch in args.switches:
        row = bench(args.switch_size, args.switch_method, args, data_cache, switch)
        said = row["error"] if "error" in row else f"{_gib(row['max_memory_allocated'])} allocated"
        print(f"gpu_check: switch {switch} ({args.switch_size} {args.switch_method}): {said}", flush=True)
        result["switches"].append(row)
    if not args.skip_imported:
        row = imported_sft(args, data_cache)
        said = row["error"] if "error" in row else f"{row['tokens_per_s']:.0f} tokens/s"
        print(f"gpu_check: imported GQA model, LoRA SFT: {said}", flush=True)
        result["imported"].append(row)
    try:
        result["fused_adamw"] = fused_adamw_difference("cuda" if torch.cuda.is_available() else "cpu")
    except Exception as e:  # noqa: BLE001
        result["fused_adamw"] = None
        print(f"gpu_check: fused AdamW comparison failed: {e}", file=sys.stderr)
    failures = [f"{r['method']} ZeRO {r['zero_stage']}" for r in result["matrix"] if not r["ok"]]
    failures += [f"bench {r['size']} {r['method']} {r['switch']}"
                 for r in result["bench"] + result["switches"] + result["imported"] if "error" in r]
    result["failures"], result["ok"] = failures, not failures
    result["seconds"] = time.perf_counter() - start
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    table = render(result)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
    for r in result["matrix"] + result["bench"] + result["switches"]:
        if "traceback" in r:
            print(f"\n--- {r.get('method')} {r.get('zero_stage', '')} {r.get('size', '')}:\n{r['traceback']}",
                  file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
