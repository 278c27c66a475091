"""Benchmark: the LoRA options side by side on SFT, then DPO, from one pre-trained checkpoint.

Every variant starts from the same weights (``--init-from``: a run dir or checkpoint, e.g. the
demo's ReLoRA stage), trains the same SFT stage on the corpus-derived instruction set (same data
order, same steps, same LR schedule, rank 16, alpha 32), and is scored by the trainer's own
evaluation: exact match on the held-out "who says this line" questions, answer-token accuracy and
validation loss, before (the pre-trained model) and after. Then one DPO stage (lora, kaiming,
adapters-off reference) on the corpus-derived preference set continues from the kaiming SFT
result: preference scores before and after.

    python tools/bench_lora_options.py --init-from runs/demo/checkpoints/step_00000300 --out DIR

Writes ``DIR/results.json`` and ``DIR/bench.md``. One process, ZeRO 0, one rank; ``--threads``
torch threads (1 by default, so that numbers from a shared machine stay comparable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {
    "kaiming": {},
    "pissa": {"init": "pissa"},
    "lora_ga": {"init": "lora_ga"},
    "LoRA+ (lr_ratio 4)": {"lr_ratio": 4.0},
    "preconditioned": {"precondition": "riemannian"},
    "DoRA": {"dora": True},
}


def flow(d: dict) -> str:
    """A dict as an OmegaConf flow mapping (for ``stages=[...]`` overrides)."""
    parts = []
    for k, v in d.items():
        parts.append(f"{k}: {flow(v) if isinstance(v, dict) else json.dumps(v) if isinstance(v, str) else v}")
    return "{" + ", ".join(parts) + "}"


def run(config: str, run_dir: str, stages: list[dict], extra: list[str]) -> dict:
    from lowrank_pt.config.recipe import load
    from lowrank_pt.trainer.trainer import Trainer

    overrides = [f"run_dir={run_dir}", "resume=never", "train.save_every=0", "train.keep_last=1",
                 "train.tensorboard=false", "train.progress=false", "train.sample_prompts=[]",
                 f"stages=[{', '.join(flow(s) for s in stages)}]", *extra]
    started = time.perf_counter()
    Trainer(load(config, overrides)).run_all()
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = {s["name"]: s for s in json.load(f)["stages"]}
    return {"summary": summary, "seconds": time.perf_counter() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-from", required=True, help="pre-trained run dir or checkpoint dir")
    parser.add_argument("--config", default="configs/demo.yaml", help="model, data and train settings")
    parser.add_argument("--out", required=True)
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--dpo-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="a subset of the variants")
    args = parser.parse_args(argv)

    import torch

    from lowrank_pt.core import dist

    torch.set_num_threads(args.threads)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(dist.free_port()))
    dist.init()
    os.makedirs(args.out, exist_ok=True)
    sft_data = {"train": "shakespeare", "max_examples": 5000}
    schedule = {"kind": "cosine", "warmup_steps": 5, "min_lr_ratio": 0.1}
    extra = [f"train.eval_every={args.sft_steps}"]
    results = {}
    for name in args.variants:
        options = {"rank": 16, "alpha": 32, **VARIANTS[name]}
        stage = {"name": "sft", "method": "lora", "steps": args.sft_steps, "init_from": args.init_from,
                 "optimizer": {"lr": 1.0e-3 if "lr_ratio" in options else 2.0e-3}, "schedule": schedule,
                 "options": options, "sft": sft_data}
        stages = [stage]
        if name == "kaiming":
            stages.append({"name": "dpo", "method": "lora", "steps": args.dpo_steps, "optimizer": {"lr": 1.0e-3},
                           "schedule": schedule, "options": {"rank": 16, "alpha": 32},
                           "dpo": {**sft_data, "beta": 0.1}})
        out = run(args.config, os.path.join(args.out, name.split()[0].lower()), stages, extra)
        results[name] = out
        sft = out["summary"]["sft"]
        print(f"{name}: exact match {sft.get('start_eval_exact_match')} -> {sft.get('eval_exact_match')}, "
              f"val loss {sft.get('eval_loss')}, {out['seconds']:.0f} s", flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["| variant | exact match before → after | best constant answer | answer-token accuracy | "
             "val loss (answers) | time (s) |", "|---|---|---|---|---|---|"]
    for name, out in results.items():
        s = out["summary"]["sft"]
        lines.append(f"| {name} | {s['start_eval_exact_match']:.3f} → {s['eval_exact_match']:.3f} | "
                     f"{s['eval_exact_match_constant']:.3f} | {s['start_eval_answer_token_accuracy']:.3f} → "
                     f"{s['eval_answer_token_accuracy']:.3f} | {s['start_eval_loss']:.3f} → {s['eval_loss']:.3f} | "
                     f"{out['seconds']:.0f} |")
    dpo = results.get("kaiming", {}).get("summary", {}).get("dpo")
    if dpo:
        lines += ["", "| DPO after kaiming SFT | before | after |", "|---|---|---|"]
        for key, label in (("eval_policy_preference", "chosen likelier (policy)"),
                           ("eval_dpo_accuracy", "reward accuracy"), ("eval_dpo_margin", "reward margin"),
                           ("eval_exact_match", "exact match")):
            lines.append(f"| {label} | {dpo.get('start_' + key, float('nan')):.3f} | {dpo.get(key, float('nan')):.3f} |")
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
