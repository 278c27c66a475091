"""int8 weights that the optimizer updates (``engine.weight_dtype: int8`` for full, apollo_mini,
galore_weights) through the trainer, 2 ranks at ZeRO 0, bf16 without fp32 masters: a full-rank
warm-up with ordinary steps, then APOLLO-Mini and GaLore's optimizer (2 micro-batches per step, a
refresh every 2 steps) with per-layer updates, each stage handed the previous one's dequantised
weights. Per-layer equals ordinary steps bit for bit; stopped inside the APOLLO-Mini stage and
resumed, the run equals the straight one; each stage's summary holds the measured bytes equal to
the formula; the checkpoint exports as a plain fp32 model."""

from __future__ import annotations

import torch
from fixtures import final_weights, losses, run_invocations, spawn

from lowrank_pt.checkpoint import store as checkpoint
from lowrank_pt.tracking.summary import read_summary


def recipe(run_dir: str, cache: str, update: str, *extra: str) -> list[str]:
    stages = ("[{name: warmup, method: full, steps: 3, optimizer: {lr: 3.0e-3}},"
              f" {{name: mini, method: apollo_mini, steps: 4, optimizer: {{lr: 3.0e-3, grad_clip: 0}}, update: {update}}},"
              " {name: galore, method: galore_weights, steps: 3, grad_accum: 2, optimizer: {lr: 3.0e-3},"
              f"  options: {{rank: 4, update_proj_gap: 2}}, update: {update}}}]")
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", "train.log_every=1", "train.eval_every=0",
            "train.tensorboard=false", "train.progress=false", "train.micro_batch_size=2", f"stages={stages}",
            "engine.precision=bf16", "engine.master_weights=bf16", "engine.weight_dtype=int8", *extra]


def test_int8_updated_weights_train_per_layer_as_stepped_resume_exactly_and_export(tmp_path, data_cache):
    step, straight, resumed = (str(tmp_path / n) for n in ("step", "straight", "resumed"))
    # Global step 5 is APOLLO-Mini's stage step 2.
    spawn(run_invocations, 2, [recipe(step, data_cache, "step"),
                               recipe(straight, data_cache, "per_layer"),
                               recipe(resumed, data_cache, "per_layer", "train.stop_at_step=5"),
                               recipe(resumed, data_cache, "per_layer")])
    a, b, c = losses(step), losses(straight), losses(resumed)
    assert [s for s, _ in a] == list(range(1, 11)) and a == b == c
    assert a[2][1] < a[0][1]  # the int8 warm-up trains
    wa, wb, wc = final_weights(step), final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys() == wc.keys()
    assert all(torch.equal(wa[k], wb[k]) and torch.equal(wb[k], wc[k]) for k in wa)
    codes = [k for k in wb if k.endswith("q_proj.weight")]
    assert codes and all(wb[k].dtype == torch.int8 for k in codes)  # stored as codes, not 16-bit
    assert all(int(wb[k.replace(".weight", ".weight_updates")]) == 3 for k in codes)  # one per step of its stage
    for run in (straight, resumed):
        stages = {s["name"]: s["memory"] for s in read_summary(run)["stages"]}
        for name in ("warmup", "mini", "galore"):
            measured, formula = stages[name]["measured"], stages[name]["formula"]
            for category in ("params", "grads", "optimizer_states", "method_buffers", "master_params"):
                assert measured[category] == formula[category], (run, name, category, measured, formula)
    plain = checkpoint.load_plain_weights(checkpoint.newest(straight))
    q = codes[0]
    assert plain[q].dtype == torch.float32 and not any(k.endswith(("_scale", "_updates")) for k in plain)
    assert plain[q].abs().max() > 0 and plain[q].shape == wb[q].shape
