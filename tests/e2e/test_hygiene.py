"""What a real-scale run needs beyond correct numbers, checked on CPU: readable output (no
warning printed twice per process), the DeepSpeed version it was tested with, ZeRO-3's
persistence threshold, the optimizer's fast path on GPUs, and the RNG of every device in
checkpoints (the CUDA half runs in tests/gpu/test_gpu.py). The launchers' 2-rank output is checked in
tests/e2e/test_launch.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from fixtures import ROOT, stderr_blocks

# --- warnings ---------------------------------------------------------------------------------------


def test_each_warning_prints_once_per_process():
    code = textwrap.dedent("""
        import warnings
        from lowrank_pt.core import dist
        dist.quiet_warnings()
        for step in range(5):
            warnings.warn("same every step", UserWarning)
            warnings.warn(f"step {step}", UserWarning)
            warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated.", FutureWarning)
            warnings.filterwarnings("ignore", message="unrelated")  # resets the per-module registries
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=env)
    assert done.returncode == 0, done.stderr
    lines = [b.split("\n")[0] for b in stderr_blocks(done.stderr)]
    assert sum("same every step" in b for b in lines) == 1, done.stderr
    assert sum(re.search(r"step \d", b) is not None for b in lines) == 5, done.stderr  # first occurrences all show
    assert "reduce_scatter_tensor" not in done.stderr


# --- DeepSpeed version -------------------------------------------------------------------------------


def test_deepspeed_version_check(monkeypatch):
    from lowrank_pt.core import dist

    monkeypatch.delenv(dist.ALLOW_UNTESTED_ENV, raising=False)
    assert dist.check_deepspeed() == __import__("deepspeed").__version__  # the installed one passes
    for ok in ("0.19.8", "0.19.9", "0.19.12+cu121"):
        assert dist.check_deepspeed(ok) == ok
    for bad in ("0.16.4", "0.19.7", "0.20.0", "1.0.0", "garbage"):
        with pytest.raises(RuntimeError) as e:
            dist.check_deepspeed(bad)
        assert f"deepspeed {bad} is installed" in str(e.value) and ">=0.19.8,<0.20" in str(e.value)
        assert dist.ALLOW_UNTESTED_ENV in str(e.value)
    monkeypatch.setenv(dist.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="0.16.4"):
        assert dist.check_deepspeed("0.16.4") == "0.16.4"


def test_init_refuses_an_untested_deepspeed(monkeypatch):
    from lowrank_pt.core import dist

    monkeypatch.delenv(dist.ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.setattr(dist, "_installed_deepspeed", lambda: "0.18.0")
    with pytest.raises(RuntimeError, match="deepspeed 0.18.0 is installed"):
        dist.init()  # refused before any process group exists
    assert not dist.is_initialized()


def test_pyproject_pins_the_tested_range():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert '"deepspeed>=0.19.8,<0.20"' in f.read()


# --- engine config ---------------------------------------------------------------------------------


def _zero3(**engine):
    from lowrank_pt.config.recipe import EngineConfig
    from lowrank_pt.zero import engine as E

    return E.deepspeed_config(EngineConfig(zero_stage=3, **engine), 1, 1, 1.0, 1)


def test_persistence_threshold_is_deepspeeds_default_for_real_models():
    from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
    from lowrank_pt.zero import engine as E

    assert "stage3_param_persistence_threshold" not in _zero3()["zero_optimization"]
    with torch.device("meta"):
        tiny = LlamaModel(resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=64))
        real = LlamaModel(resolve(ModelConfig(size="130m", seq_len=16), vocab_size=8000))
    zero = lambda cfg: cfg["zero_optimization"]  # noqa: E731
    # A model with no param of DeepSpeed's default threshold would stay unpartitioned: 0.
    assert zero(E.with_persistence_threshold(tiny, _zero3()))["stage3_param_persistence_threshold"] == 0
    assert "stage3_param_persistence_threshold" not in zero(E.with_persistence_threshold(real, _zero3()))
    # An explicit value wins, from the field or from raw DeepSpeed keys.
    explicit = _zero3(stage3_param_persistence_threshold=4096)
    assert zero(E.with_persistence_threshold(tiny, explicit))["stage3_param_persistence_threshold"] == 4096
    raw = _zero3(deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 7}})
    assert zero(E.with_persistence_threshold(tiny, raw))["stage3_param_persistence_threshold"] == 7
    # Other stages never get the key.
    from lowrank_pt.config.recipe import EngineConfig

    stage2 = E.deepspeed_config(EngineConfig(zero_stage=2), 1, 1, 1.0, 1)
    assert "stage3_param_persistence_threshold" not in zero(E.with_persistence_threshold(tiny, stage2))


def test_optimizer_is_exact_on_cpu_and_fused_on_cuda_at_stage_0(monkeypatch):
    from lowrank_pt.config.recipe import OptimizerConfig
    from lowrank_pt.optim.adamw import build_optimizer

    def build(stage):
        return build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], OptimizerConfig(),
                               zero_stage=stage)

    for stage in (None, 0, 1, 3):
        opt = build(stage)
        assert opt.defaults["foreach"] is False and not opt.defaults["fused"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build(0).defaults["fused"] is True
    assert not build(2).defaults["fused"] and not build(None).defaults["fused"]


# --- RNG in checkpoints --------------------------------------------------------------------------------


def test_rng_round_trip_cpu(tmp_path, monkeypatch):
    from lowrank_pt.checkpoint import store as checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(123)
    checkpoint.save_rng(str(tmp_path), rank=1)
    expected = torch.rand(4)
    torch.manual_seed(999)
    checkpoint.load_rng(str(tmp_path), rank=1)
    assert torch.equal(torch.rand(4), expected)
    assert sorted(os.listdir(tmp_path)) == ["rank_1.pt"]  # the format every older checkpoint has


def test_rng_reads_an_old_checkpoint_and_restores_cuda_states(tmp_path, monkeypatch):
    """The CUDA half with torch.cuda's RNG calls stood in for: what is saved, and what is
    restored per device; a checkpoint without the CUDA file restores the CPU state only."""
    from lowrank_pt.checkpoint import store as checkpoint

    fake = {0: torch.tensor([1, 2], dtype=torch.uint8), 1: torch.tensor([3, 4], dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [fake[0], fake[1]])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))

    old = tmp_path / "old"
    old.mkdir()
    torch.manual_seed(5)
    torch.save(torch.get_rng_state(), old / "rank_0.pt")  # written by the code before CUDA states
    expected = torch.rand(3)
    checkpoint.load_rng(str(old), rank=0)
    assert torch.equal(torch.rand(3), expected) and restored == {}

    new = tmp_path / "new"
    checkpoint.save_rng(str(new), rank=0)
    assert sorted(os.listdir(new)) == ["cuda_rank_0.pt", "rank_0.pt"]
    checkpoint.load_rng(str(new), rank=0)
    assert set(restored) == {0, 1} and all(torch.equal(restored[i], fake[i]) for i in (0, 1))

    restored.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.warns(RuntimeWarning, match="2 device"):
        checkpoint.load_rng(str(new), rank=0)
    assert set(restored) == {0}
