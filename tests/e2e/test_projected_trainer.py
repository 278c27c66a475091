"""A ``fira`` stage after a full-rank warm-up, through the trainer (its optimizer from
``Method.build_optimizer``, a model that ZeRO-3 partitions as it is built): 2 ranks, ZeRO 3,
stopped and resumed between two refreshes, exactly; the stage's summary holds the measured
optimizer-state bytes, equal to the method's formula."""

from __future__ import annotations

import torch
from fixtures import final_weights, run_invocations, spawn

from lowrank_pt.tracking import metrics

FIRA_GAIN = 0.05
"""How far the fira stage must bring the held-out loss below where the warm-up left it. A
do-nothing update gains exactly 0; measured here: 6.176 -> 6.035 (0.14) in the stage's 6 steps."""


def recipe(run_dir: str, cache: str, *extra: str) -> list[str]:
    """Warm-up 2 steps, then Fira rank 4 refreshing every 3 steps (stage steps 0, 3)."""
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", "engine.zero_stage=3", "train.log_every=1",
            "train.eval_every=0", "train.tensorboard=false", "train.progress=false", "train.micro_batch_size=1",
            "train.grad_accum=2", "stages.0.steps=2", "stages.1.steps=6", "stages.1.method=fira",
            "stages.1.optimizer.weight_decay=0.1", "stages.1.options={rank: 4, update_proj_gap: 3}", *extra]


def test_fira_stage_trains_and_resumes_exactly_through_the_trainer(tmp_path, data_cache):
    from lowrank_pt.tracking.summary import read_summary

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    # Global step 4 is the fira stage's step 1: the resumed run crosses the refresh at its step 3.
    spawn(run_invocations, 2, [recipe(straight, data_cache), recipe(resumed, data_cache, "train.stop_at_step=4"),
                               recipe(resumed, data_cache)])
    a = [r for r in metrics.read(straight) if "loss" in r]
    b = [r for r in metrics.read(resumed) if "loss" in r]
    assert len(a) == 8 and [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]
    # Fira trains: the trainer evaluates the held-out loss at each stage's end, and a do-nothing
    # update would leave the warm-up's weights, and that loss, exactly where the warm-up ended.
    evals = {r["stage"]: r["eval/loss"] for r in metrics.read(straight) if "eval/loss" in r}
    assert evals["main"] < evals["warmup"] - FIRA_GAIN, evals
    wa, wb = final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    stage = {s["name"]: s for s in read_summary(straight)["stages"]}["main"]
    memory = stage["memory"]
    assert memory["measured"]["optimizer_states"] == memory["formula"]["optimizer_states"] > 0
    warmup = {s["name"]: s for s in read_summary(straight)["stages"]}["warmup"]["memory"]
    assert memory["measured"]["optimizer_states"] < 0.6 * warmup["measured"]["optimizer_states"]
