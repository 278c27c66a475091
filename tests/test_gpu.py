"""GPU checks (skipped without CUDA): the same recipes on a real accelerator, bf16 and fp16,
and offload through DeepSpeedCPUAdam."""

from __future__ import annotations

import os

import pytest

from helpers import spawn
from lowrank_pt import metrics

pytestmark = pytest.mark.gpu
TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


def _train(rank, world_size, overrides):
    from lowrank_pt.config import load
    from lowrank_pt.trainer import Trainer

    return Trainer(load(TINY, overrides)).run_all()


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trains_on_gpu(tmp_path, data_cache, zero_stage, precision):
    run_dir = str(tmp_path / "run")
    spawn(_train, 1, [f"run_dir={run_dir}", f"data.cache_dir={data_cache}", f"engine.zero_stage={zero_stage}",
                      f"engine.precision={precision}", "train.log_every=1", "stages.0.steps=10", "stages.1.steps=5"])
    losses = [r["loss"] for r in metrics.read(run_dir) if "loss" in r]
    assert len(losses) == 15 and losses[-1] < losses[0]


def test_offload_uses_cpu_adam(tmp_path, data_cache):
    run_dir = str(tmp_path / "run")
    spawn(_train, 1, [f"run_dir={run_dir}", f"data.cache_dir={data_cache}", "engine.zero_stage=2",
                      "engine.offload_optimizer=true", "train.log_every=1", "stages.0.steps=5", "stages.1.steps=5"])
    losses = [r["loss"] for r in metrics.read(run_dir) if "loss" in r]
    assert losses[-1] < losses[0]
