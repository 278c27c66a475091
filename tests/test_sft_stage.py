"""An SFT stage in a recipe: trains on the instruction set after pre-training, resumes exactly,
and prints samples with the chat template."""

from __future__ import annotations

import json
import os

import torch

from helpers import spawn
from test_trainer import final_weights, losses, run_invocations

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


def sft_recipe(run_dir, cache, *extra):
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", "engine.zero_stage=3", "train.log_every=1",
            "train.eval_every=0", "train.tensorboard=false", "train.progress=false", "train.micro_batch_size=2",
            "stages.0.steps=3", "stages.1.steps=5", "stages.1.name=sft", "stages.1.method=lora",
            "stages.1.options={rank: 4, alpha: 8}",
            f"stages.1.sft={{train: shakespeare, max_examples: 400, cache_dir: {cache}}}",
            "train.sample_prompts=[\"Who says this line: 'Good night, sweet prince'\"]", "train.sample_tokens=4",
            "train.eval_questions=2", *extra]


def test_sft_stage_after_pretraining_resumes_exactly(tmp_path, data_cache):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    spawn(run_invocations, 2, [
        sft_recipe(straight, data_cache),
        sft_recipe(resumed, data_cache, "train.stop_at_step=5"),
        sft_recipe(resumed, data_cache),
    ])
    a, b = losses(straight), losses(resumed)
    assert [s for s, _ in a] == list(range(1, 9)) and a == b
    wa, wb = final_weights(straight), final_weights(resumed)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    with open(os.path.join(straight, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert [s["stage"] for s in samples] == ["warmup", "sft"]
