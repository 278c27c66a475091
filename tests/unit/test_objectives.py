"""The stage kind has one owner: the objective decides rows per example, token weights and the
chat template; config validation and the trainer count a stage's steps the same way."""

from __future__ import annotations

import math

import pytest

from lowrank_pt.config.recipe import stage_length, tokens_per_step
from lowrank_pt.config.schema import RunConfig, StageConfig
from lowrank_pt.data.preference import DPODataConfig
from lowrank_pt.data.sft import SFTDataConfig
from lowrank_pt.objectives import DPOObjective, LMObjective, SFTObjective, objective_class, stage_kind


def run_with(stage: StageConfig) -> RunConfig:
    run = RunConfig(stages=[stage])
    run.model.seq_len = 32
    run.train.micro_batch_size = 2
    run.train.grad_accum = 3
    return run


@pytest.mark.parametrize("section, rows", [({}, 1), ({"sft": SFTDataConfig()}, 1), ({"dpo": DPODataConfig()}, 2)])
def test_a_stage_sized_in_tokens_trains_the_steps_it_is_validated_against(section, rows):
    # A micro-batch of n DPO pairs trains 2n rows (chosen, rejected): a DPO stage of T tokens is
    # half as many steps as a pre-training stage of T tokens. Config validation (stage_length,
    # what check_stage sees) and the trainer (tokens_per_step) must agree on it.
    world, steps = 2, 5
    per_step = rows * 2 * 3 * world * 32
    stage = StageConfig(tokens=steps * per_step, **section)
    run = run_with(stage)
    assert tokens_per_step(stage, run, world) == per_step
    assert stage_length(stage, run, world) == steps
    assert stage_length(StageConfig(tokens=steps * per_step + 1, **section), run, world) == steps + 1


def test_the_stage_kind_is_read_in_one_place():
    assert stage_kind(StageConfig()) == "lm" and objective_class(StageConfig()) is LMObjective
    assert objective_class(StageConfig(sft=SFTDataConfig())) is SFTObjective
    assert objective_class(StageConfig(dpo=DPODataConfig())) is DPOObjective
    assert [c.rows_per_example for c in (LMObjective, SFTObjective, DPOObjective)] == [1, 1, 2]
    assert [c.chat for c in (LMObjective, SFTObjective, DPOObjective)] == [False, True, True]


def test_pre_training_weights_micro_batches_equally():
    import torch

    batches = [{"labels": torch.tensor([[1, -100, 2]])}, {"labels": torch.tensor([[-100, -100, 3]])}]
    assert LMObjective().token_weights(batches) == [1.0, 1.0]
    # SFT weights by answer tokens (3 in all, 2 micro-batches, 1 rank): 2·2/3 and 1·2/3.
    weights = SFTObjective(StageConfig(sft=SFTDataConfig())).token_weights(batches)
    assert [round(w, 6) for w in weights] == [round(4 / 3, 6), round(2 / 3, 6)]
    assert math.isclose(sum(weights), len(batches))
