"""Low-bit optimizer states through the trainer: a full-rank warm-up with int8 moments, then ReLoRA
with bf16 moments (its restarts prune them through DeepSpeed's state getters and setters), in fp32
and in bf16 without fp32 masters (``engine.master_weights=bf16``), 2 ranks at ZeRO-2, stopped and resumed between two restarts: the same losses and weights, and each stage's
summary holds measured state bytes equal to the formula. (ZeRO 0-3 bytes against the formula, for
every state dtype: tests/zero/test_tracking_memory.py.)"""

from __future__ import annotations

import pytest
import torch
from fixtures import final_weights, losses, run_invocations, spawn

from lowrank_pt.tracking.summary import read_summary


def recipe(run_dir: str, cache: str, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", "engine.zero_stage=2", "train.log_every=1",
            "train.eval_every=0", "train.tensorboard=false", "train.progress=false", "train.micro_batch_size=2",
            "stages.0.steps=3", "stages.0.optimizer.state_dtype=int8", "stages.1.steps=5",
            "stages.1.method=relora", "stages.1.options={rank: 4, restart_every: 2}",
            "stages.1.optimizer.state_dtype=bf16", *extra]


INT8_BASES = ["engine.precision=bf16", "engine.weight_dtype=int8", "stages.0.method=lora",
              "stages.0.options={rank: 4}", "stages.1.optimizer.state_dtype=int8"]
"""int8 frozen bases: LoRA then ReLoRA (int8 needs a frozen base in every stage); the LoRA stage's
merged weights are handed over and quantised again, ReLoRA's restart re-quantises, and prunes its
int8 moments (decoded for the edit)."""


@pytest.mark.parametrize("engine", [[], ["engine.precision=bf16", "engine.master_weights=bf16"], INT8_BASES,
                                    [*INT8_BASES, "engine.zero_stage=3"]],
                         ids=["fp32", "bf16-masters", "int8-bases", "int8-bases-zero3"])
def test_low_bit_states_train_resume_exactly_and_are_counted(tmp_path, data_cache, engine):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    # Global step 5 is the relora stage's step 2, just after its first restart. With bf16 masters
    # every update is stochastically rounded: the draws come from each rank's RNG, which
    # checkpoints carry, so the resumed run draws the same bits.
    spawn(run_invocations, 2, [recipe(straight, data_cache, *engine),
                               recipe(resumed, data_cache, "train.stop_at_step=5", *engine),
                               recipe(resumed, data_cache, *engine)])
    a, b = losses(straight), losses(resumed)
    assert [s for s, _ in a] == list(range(1, 9)) and a == b
    assert a[2][1] < a[0][1]  # the int8 warm-up trains
    wa, wb = final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for run in (straight, resumed):  # resumed: the states a checkpoint gave back, stored as they were
        stages = {s["name"]: s["memory"] for s in read_summary(run)["stages"]}
        for name in ("warmup", "main"):
            measured, formula = stages[name]["measured"], stages[name]["formula"]
            assert measured["optimizer_states"] == formula["optimizer_states"] > 0, (run, name, measured, formula)
