"""ReLoRA inside a recipe: the paper's warm start (full -> relora), a relora stage started from a
saved full-rank checkpoint, exact resume mid-cycle, and a validation loss that keeps falling
across restarts on the embedded corpus."""

from __future__ import annotations

import pytest
import torch
from fixtures import final_weights, losses, run_invocations, spawn

from lowrank_pt.checkpoint import store as checkpoint
from lowrank_pt.checkpoint.store import load_plain_weights
from lowrank_pt.tracking import metrics

RELORA = "{rank: 4, alpha: 8, restart_every: 3, restart_warmup_steps: 1, reset_mode: magnitude, reset_fraction: 0.9}"


def warm_start(run_dir, cache, *extra):
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", "train.log_every=1", "train.eval_every=0",
            "train.tensorboard=false", "train.progress=false", "train.micro_batch_size=2",
            "stages.0.steps=3", "stages.1.name=relora", "stages.1.method=relora", "stages.1.steps=8",
            "stages.1.schedule.kind=jagged_cosine", f"stages.1.options={RELORA}", *extra]


@pytest.mark.parametrize("zero_stage, precision, world_size", [(0, "fp32", 1), (3, "bf16", 2), (2, "fp32", 2)])
def test_warm_start_relora_resumes_mid_cycle_exactly(tmp_path, data_cache, zero_stage, precision, world_size):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    engine = [f"engine.zero_stage={zero_stage}", f"engine.precision={precision}"]
    # Global step 8 = relora step 5: one restart behind it (after step 3), mid-way to the next.
    spawn(run_invocations, world_size, [
        warm_start(straight, data_cache, *engine),
        warm_start(resumed, data_cache, *engine, "train.stop_at_step=8"),
        warm_start(resumed, data_cache, *engine),
    ])
    a, b = losses(straight), losses(resumed)
    assert [s for s, _ in a] == list(range(1, 12)) and a == b
    restarts = [r["relora/restart"] for r in metrics.read(straight) if "relora/restart" in r]
    assert restarts == [1, 2]  # after relora steps 3 and 6; none at the stage's last step
    wa, wb = final_weights(straight), final_weights(resumed)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_relora_stage_starts_from_a_saved_full_rank_checkpoint(tmp_path, data_cache):
    full, relora = str(tmp_path / "full"), str(tmp_path / "relora")
    common = [f"data.cache_dir={data_cache}", "train.tensorboard=false", "train.progress=false",
              "train.micro_batch_size=2"]
    # The second run is one relora stage with a vanishing LR: its merged weights must be the
    # checkpoint's, which holds only if init_from really loaded them. 4 steps: restart_every=3
    # must be shorter than the stage (validation refuses a relora stage that never restarts).
    spawn(run_invocations, 1, [
        [f"run_dir={full}", *common, "stages.0.steps=4", "stages.1.steps=2"],
        [f"run_dir={relora}", *common, f"stages=[{{name: relora, method: relora, steps: 4, init_from: {full}, "
         f"optimizer: {{lr: 1.0e-12}}, options: {RELORA}}}]"],
    ])
    start = checkpoint.load_weights(checkpoint.newest(full))
    end = load_plain_weights(checkpoint.newest(relora))
    assert start.keys() == end.keys()
    for name in start:
        torch.testing.assert_close(end[name], start[name], atol=1e-6, rtol=0, msg=name)
    different = [n for n in start if not torch.equal(start[n], torch.zeros_like(start[n]))]
    assert different  # the comparison is against real weights


@pytest.mark.slow
def test_validation_loss_keeps_falling_across_restarts(tmp_path, data_cache):
    run_dir = str(tmp_path / "run")
    spawn(run_invocations, 1, [[
        f"run_dir={run_dir}", f"data.cache_dir={data_cache}", "train.tensorboard=false",
        "train.progress=false", "train.micro_batch_size=8", "train.eval_every=20", "train.eval_sequences=32",
        "stages.0.steps=60", "stages.0.optimizer.lr=3.0e-3",
        "stages.1.name=relora", "stages.1.method=relora", "stages.1.steps=100", "stages.1.optimizer.lr=2.0e-3",
        "stages.1.schedule.kind=jagged_cosine",
        "stages.1.options={rank: 16, alpha: 32, restart_every: 20, restart_warmup_steps: 4, reset_fraction: 0.9}",
    ]])
    records = metrics.read(run_dir)
    evals = [r["eval/loss"] for r in records if "eval/loss" in r and r["stage"] == "relora"]
    restarts = [r["relora/restart"] for r in records if "relora/restart" in r]
    assert restarts == [1, 2, 3, 4]
    assert len(evals) == 5  # after each 20-step cycle: evaluations straddle every restart
    assert all(b < a for a, b in zip(evals, evals[1:])), f"validation loss rose across a restart: {evals}"
    warm_end = [r["eval/loss"] for r in records if "eval/loss" in r and r["stage"] == "warmup"][-1]
    assert evals[-1] < warm_end
