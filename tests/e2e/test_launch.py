"""The user-facing launch paths: launch/ scripts with torchrun and DeepSpeed's launcher (with
output a user can read), both training the same model to the same losses. Optimizer offload is
checked on a GPU (tests/gpu), where it changes the optimizer (DeepSpeedCPUAdam); on a CPU machine
it builds the same torch AdamW as no offload, so comparing the two here would compare a thing with
itself."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter

import pytest
from fixtures import ROOT, TINY, stderr_blocks

from lowrank_pt.tracking import metrics


def trace(run_dir):
    return [(r["step"], r["loss"]) for r in metrics.read(run_dir) if "loss" in r]


def common(run_dir, cache):
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", "engine.zero_stage=3", "stages.0.steps=3",
            "stages.1.steps=2", "train.log_every=1", "train.tensorboard=false"]


@pytest.mark.slow
def test_torchrun_and_deepspeed_launchers_agree(tmp_path, data_cache):
    """Both launchers, 2 ranks at ZeRO-3: the same losses, and readable output: each stderr line
    at most once per rank (before: a reduce_scatter_tensor FutureWarning per reduce-scatter),
    with Python's default warning filters (PYTHONWARNINGS unset)."""
    runs = {}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    for launcher in ("torchrun", "deepspeed"):
        run_dir = str(tmp_path / launcher)
        done = subprocess.run([os.path.join(ROOT, "launch", "single_node.sh"), TINY, "2", *common(run_dir, data_cache)],
                              env={**env, "LAUNCHER": launcher}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "2 rank(s)" in done.stdout
        runs[launcher] = trace(run_dir)
        repeated = {b: n for b, n in Counter(stderr_blocks(done.stderr)).items() if n > 2}
        assert not repeated, f"{launcher}: stderr lines printed more than once per rank:\n" + "\n".join(
            f"{n}x {b}" for b, n in repeated.items())
        assert "reduce_scatter_tensor" not in done.stderr and "all_gather_into_tensor" not in done.stderr
    assert len(runs["torchrun"]) == 5
    assert runs["torchrun"] == runs["deepspeed"]
    # The console script itself under both launchers (deepspeed passes --local_rank before the command).
    cli = shutil.which("lowrank-pt")
    for launcher, argv in (("torchrun", ["torchrun", "--standalone", "--nproc_per_node", "2"]),
                           ("deepspeed", ["deepspeed", "--num_gpus", "2"])):
        run_dir = str(tmp_path / f"{launcher}_cli")
        done = subprocess.run([*argv, cli, "train", TINY, *common(run_dir, data_cache)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert trace(run_dir) == runs["torchrun"], launcher


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(run_dir: str, cache: str, *extra: str) -> None:
    """One run as two "nodes" of one CPU rank each on loopback: a torchrun per node, as a multi-node
    job (SLURM's srun, a hostfile) starts one per machine."""
    port = _free_port()
    procs = [subprocess.Popen(["torchrun", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "lowrank_pt.train",
                               TINY, *common(run_dir, cache), *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)


@pytest.mark.slow
def test_two_nodes_on_loopback_resume_and_finish_like_one_node(tmp_path, data_cache):
    """Two "nodes" (torchrun --nnodes 2 on 127.0.0.1, one rank each), stopped after step 2 and
    resumed, end with the losses of one node of two ranks: the same global batch and ZeRO-3
    partitions, whatever the node boundary."""
    one, two = str(tmp_path / "one_node"), str(tmp_path / "two_nodes")
    done = subprocess.run([os.path.join(ROOT, "launch", "single_node.sh"), TINY, "2", *common(one, data_cache)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    two_nodes(two, data_cache, "train.stop_at_step=2")
    assert len(trace(two)) == 2
    two_nodes(two, data_cache)
    assert trace(two) == trace(one) and len(trace(one)) == 5
