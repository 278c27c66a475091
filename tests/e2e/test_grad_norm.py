"""The gradient norm each logged step reports: at ZeRO 0 the guard's, from the whole gradients; at
ZeRO 1-3 DeepSpeed's ZeRO optimizer's, from the partitions. The same step's norm is the same
either way (the first step, where the weights are the same), so neither counts a partition twice
nor misses one."""

from __future__ import annotations

from fixtures import run_invocations, spawn

from lowrank_pt.tracking import metrics


def recipe(run_dir: str, cache: str, zero_stage: int) -> list[str]:
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", "train.log_every=1", "train.eval_every=0",
            "train.tensorboard=false", "train.progress=false", f"engine.zero_stage={zero_stage}",
            "stages=[{name: main, method: full, steps: 3, optimizer: {lr: 3.0e-3}}]"]


def test_grad_norm_is_logged_alike_at_every_zero_stage(tmp_path, data_cache):
    runs = {z: str(tmp_path / f"zero{z}") for z in (0, 1, 3)}
    spawn(run_invocations, 2, [recipe(d, data_cache, z) for z, d in runs.items()])
    norms = {z: [r["grad_norm"] for r in metrics.read(d) if "loss" in r] for z, d in runs.items()}
    assert all(len(n) == 3 and all(0 < v < float("inf") for v in n) for n in norms.values()), norms
    for z in (1, 3):
        assert abs(norms[z][0] - norms[0][0]) <= 1e-5 * norms[0][0], norms
