"""A run killed with SIGKILL, during training or inside a checkpoint write, resumes from the newest
complete checkpoint, loses nothing before it, and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from fixtures import TINY

from lowrank_pt.checkpoint import store as checkpoint
from lowrank_pt.tracking import metrics

# Runs the real CLI entry point; the patches only slow steps down (so a kill lands mid-run) or
# kill the process from inside DeepSpeed's torch.save of a chosen checkpoint.
RUNNER = textwrap.dedent("""
    import os, signal, sys, time, torch
    from lowrank_pt.methods.base import Method
    delay = float(os.environ.get("STEP_DELAY", "0"))
    if delay:
        step = Method.train_step
        def slow_step(self, *args, **kwargs):
            time.sleep(delay)
            return step(self, *args, **kwargs)
        Method.train_step = slow_step
    kill_in = os.environ.get("KILL_IN_SAVE")
    if kill_in:
        save = torch.save
        def dying_save(obj, f, *args, **kwargs):
            save(obj, f, *args, **kwargs)
            if isinstance(f, str) and kill_in + ".partial" in f:
                os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
    from lowrank_pt.train import main
    sys.exit(main(sys.argv[1:]))
""")


def command(tmp_path, run_dir, cache):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    return [sys.executable, str(runner), TINY, f"run_dir={run_dir}", f"data.cache_dir={cache}",
            "stages.0.steps=12", "stages.1.steps=12", "train.save_every=4", "train.keep_last=3",
            "train.log_every=1", "train.eval_every=0", "train.tensorboard=false"]


def run(cmd, **env):
    return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def assert_same_run(reference: str, resumed: str):
    """Same loss and LR at every step, same final weights, bit for bit."""
    def trace(run_dir):
        return [(r["step"], r["stage"], r["loss"], r["lr"]) for r in metrics.read(run_dir) if "loss" in r]

    assert trace(reference) == trace(resumed)
    assert [r[0] for r in trace(resumed)] == list(range(1, 25))
    a = checkpoint.load_weights(checkpoint.newest(reference))
    b = checkpoint.load_weights(checkpoint.newest(resumed))
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = str(tmp / "run")
    done = run(command(tmp, run_dir, data_cache))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_sigkill_during_training(tmp_path, data_cache, reference_run):
    run_dir = str(tmp_path / "run")
    cmd = command(tmp_path, run_dir, data_cache)
    proc = subprocess.Popen(cmd, env={**os.environ, "STEP_DELAY": "0.1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # Kill a few steps after the second checkpoint, in the middle of stage 1.
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "step 10/12" in line and "[warmup]" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    newest = checkpoint.newest(run_dir)
    assert newest.endswith("step_00000008")
    kept = metrics.read(run_dir)
    assert max(r["step"] for r in kept) >= 8  # nothing before the checkpoint was lost

    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout and "step_00000008" in done.stdout
    assert_same_run(reference_run, run_dir)


def test_sigkill_inside_a_checkpoint_write(tmp_path, data_cache, reference_run):
    run_dir = str(tmp_path / "run")
    cmd = command(tmp_path, run_dir, data_cache)
    killed = run(cmd, KILL_IN_SAVE="step_00000016")
    assert killed.returncode == -signal.SIGKILL
    base = checkpoint.root(run_dir)
    assert os.path.isdir(os.path.join(base, "step_00000016.partial"))
    assert checkpoint.newest(run_dir).endswith("step_00000012")

    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step_00000012" in done.stdout
    assert not any(name.endswith(".partial") for name in os.listdir(base))
    assert_same_run(reference_run, run_dir)
    # Retention: keep_last=3 complete checkpoints remain.
    assert [os.path.basename(p) for p in checkpoint.complete(run_dir)] == [
        "step_00000016", "step_00000020", "step_00000024"]
