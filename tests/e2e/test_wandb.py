"""Weights & Biases as an optional logger: off by default; with train.wandb_project a run logs every
record to an offline W&B run under RUN_DIR/wandb (no network), one W&B run id per run dir."""

from __future__ import annotations

import glob
import os

import pytest
from fixtures import run_invocations, spawn

pytest.importorskip("wandb")


def test_a_run_logs_offline_to_weights_and_biases(tmp_path, data_cache, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    run_dir, off = str(tmp_path / "run"), str(tmp_path / "off")
    common = [f"data.cache_dir={data_cache}", "train.log_every=1", "train.eval_every=0", "train.tensorboard=false",
              "train.progress=false", "stages=[{name: main, method: full, steps: 2}]"]
    spawn(run_invocations, 1, [[f"run_dir={run_dir}", "train.wandb_project=lowrank_pt_tests", *common],
                               [f"run_dir={off}", *common]])
    files = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1
    data = open(files[0], "rb").read()
    assert b"train/loss" in data and b"throughput/tokens_per_s" in data and b"lowrank_pt_tests" in data
    assert not os.path.exists(os.path.join(off, "wandb"))  # off by default
