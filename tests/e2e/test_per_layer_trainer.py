"""Per-layer updates through the trainer, 2 ranks at ZeRO 0, fp32: a full-rank warm-up with ordinary
steps, then GaLore (refresh in backward, every 2 steps) and ReLoRA (restart every 2 steps, 2
micro-batches per step) with ``update: per_layer``. The run equals the same recipe with ordinary
steps bit for bit (losses and weights); stopped inside the GaLore stage and resumed, across a
refresh and a restart, it equals the straight run; each stage's summary holds the gradient bytes
measured (the most held at once) equal to the formula."""

from __future__ import annotations

import torch
from fixtures import final_weights, losses, run_invocations, spawn

from lowrank_pt.tracking.summary import read_summary


def recipe(run_dir: str, cache: str, update: str, *extra: str) -> list[str]:
    stages = ("[{name: warmup, method: full, steps: 3, optimizer: {lr: 3.0e-3, grad_clip: 0}},"
              " {name: main, method: galore, steps: 4, optimizer: {lr: 1.0e-3},"
              f"  options: {{rank: 4, update_proj_gap: 2, refresh: backward}}, update: {update}}},"
              " {name: relora, method: relora, steps: 4, grad_accum: 2, optimizer: {lr: 1.0e-3, grad_clip: 0},"
              f"  options: {{rank: 4, restart_every: 2}}, update: {update}}}]")
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", "train.log_every=1", "train.eval_every=0",
            "train.tensorboard=false", "train.progress=false", "train.micro_batch_size=2", f"stages={stages}",
            *extra]


def test_per_layer_equals_step_through_the_trainer_and_resumes_exactly(tmp_path, data_cache):
    step, straight, resumed = (str(tmp_path / n) for n in ("step", "straight", "resumed"))
    # Global step 5 is GaLore's stage step 2: its second refresh and the restart come after the resume.
    spawn(run_invocations, 2, [recipe(step, data_cache, "step"),
                               recipe(straight, data_cache, "per_layer"),
                               recipe(resumed, data_cache, "per_layer", "train.stop_at_step=5"),
                               recipe(resumed, data_cache, "per_layer")])
    a, b, c = losses(step), losses(straight), losses(resumed)
    assert [s for s, _ in a] == list(range(1, 12)) and a == b == c
    wa, wb, wc = final_weights(step), final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys() == wc.keys()
    assert all(torch.equal(wa[k], wb[k]) and torch.equal(wb[k], wc[k]) for k in wa)
    for run in (straight, resumed):
        stages = {s["name"]: s["memory"] for s in read_summary(run)["stages"]}
        for name in ("main", "relora"):
            measured, formula = stages[name]["measured"], stages[name]["formula"]
            assert measured["grads"] == formula["grads"] > 0, (run, name, measured, formula)
        # At accumulation 1 the GaLore stage held one tensor's gradient at a time, not all of them.
        assert stages["main"]["measured"]["grads"] < stages["warmup"]["measured"]["grads"] / 4
