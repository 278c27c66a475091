"""GPU checks (skipped without CUDA): the same recipes on a real accelerator, bf16 and fp16,
and offload through DeepSpeedCPUAdam."""

from __future__ import annotations

import os

import pytest
from fixtures import TINY, spawn

from lowrank_pt.optim.adamw import build_optimizer
from lowrank_pt.tracking import metrics

pytestmark = pytest.mark.gpu


def _train(rank, world_size, overrides):
    from lowrank_pt.config.recipe import load
    from lowrank_pt.trainer.trainer import Trainer

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
    """On a GPU, offload changes the optimizer (DeepSpeed's CPU Adam instead of torch's AdamW on
    the device): the same AdamW formula, so the losses follow the run without offload to float
    rounding, and fall."""
    runs = {}
    for name, extra in (("offload", ["engine.offload_optimizer=true"]), ("plain", [])):
        run_dir = str(tmp_path / name)
        spawn(_train, 1, [f"run_dir={run_dir}", f"data.cache_dir={data_cache}", "engine.zero_stage=2",
                          "train.log_every=1", "stages.0.steps=5", "stages.1.steps=5", *extra])
        runs[name] = [r["loss"] for r in metrics.read(run_dir) if "loss" in r]
    offload, plain = runs["offload"], runs["plain"]
    assert len(offload) == len(plain) == 10 and offload[-1] < offload[0]
    assert max(abs(a - b) / abs(b) for a, b in zip(offload, plain)) < 1e-3, (offload, plain)


# --- NCCL: every collective helper with tensors of either device ----------------------------------


def _nccl_helpers(rank, world_size):
    import torch

    from lowrank_pt.core import dist

    out = {"backend": dist.backend(), "device": str(dist.device())}
    for where in ("cpu", "cuda"):
        t = torch.arange(4, dtype=torch.float32, device=where)
        dist.all_reduce_sum_(t)
        dist.reduce_sum_(t, dst=0)
        dist.broadcast_(t, src=0)
        view = torch.arange(6, dtype=torch.float32, device=where).reshape(2, 3).t()
        dist.all_reduce_sum_(view)
        out[where] = (t.device.type, t.tolist(), view.tolist())
    out["mean"] = dist.all_reduce_mean(2.5)
    out["min"] = dist.min_over_ranks(7)
    out["objects"] = dist.all_gather_object({"r": rank})
    out["object"] = dist.broadcast_object("x")
    dist.barrier()
    dist.barrier(timeout=60)
    return out


def test_collective_helpers_under_nccl():
    """A one-rank NCCL group rejects a CPU tensor in any collective, as 8 GPUs would: the
    helpers must place every tensor on the GPU and hand results back on the caller's device."""
    (out,) = spawn(_nccl_helpers, 1)
    assert out["backend"] == "nccl" and out["device"] == "cuda:0"
    for where in ("cpu", "cuda"):
        assert out[where] == (where, [0.0, 1.0, 2.0, 3.0], [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]])
    assert out["mean"] == 2.5 and out["min"] == 7 and out["objects"] == [{"r": 0}] and out["object"] == "x"


# --- checkpoints hold the CUDA RNG ------------------------------------------------------------------


def _cuda_rng_resume(rank, world_size, run_dir):
    import torch
    from fixtures import tiny_engine

    from lowrank_pt.checkpoint import store as checkpoint

    engine, _ = tiny_engine(2, "bf16")
    torch.manual_seed(11)
    torch.rand(3, device="cuda")  # move the CUDA generator off its seed
    path = checkpoint.save(engine, run_dir, 1, {"stage_index": 0}, {"trainer": {}}, keep_last=1)
    expected = (torch.rand(5, device="cuda").tolist(), torch.nn.functional.dropout(
        torch.ones(16, device="cuda"), 0.5).tolist())
    torch.manual_seed(999)  # what a resumed stage does before loading
    engine2, _ = tiny_engine(2, "bf16")
    checkpoint.load(engine2, path)
    got = (torch.rand(5, device="cuda").tolist(), torch.nn.functional.dropout(
        torch.ones(16, device="cuda"), 0.5).tolist())
    return expected, got, sorted(os.listdir(os.path.join(path, "rng")))


def test_cuda_rng_resumes(tmp_path):
    (result,) = spawn(_cuda_rng_resume, 1, str(tmp_path / "run"))
    expected, got, files = result
    assert files == ["cuda_rank_0.pt", "rank_0.pt"]
    assert got == expected, "the CUDA generator did not resume where the checkpoint left it"


# --- the fused AdamW of ZeRO stage 0 --------------------------------------------------------------


def _fused_stage0(rank, world_size):
    import torch
    from fixtures import random_batches

    from lowrank_pt.config.recipe import EngineConfig, OptimizerConfig
    from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
    from lowrank_pt.zero import engine as E

    out = {}
    for fused_stage in (0, None):  # fused (stage 0 on CUDA) vs the exact single-tensor path
        torch.manual_seed(0)
        model = LlamaModel(resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=64))
        opt = build_optimizer([{"params": list(model.parameters())}], OptimizerConfig(lr=1e-2),
                                zero_stage=fused_stage)
        ds = E.deepspeed_config(EngineConfig(zero_stage=0, precision="fp32"), 2, 1, 1.0, 1)
        engine = E.initialize(model, opt, lambda step: 1.0, ds)
        losses = []
        for batch in random_batches(10):
            loss = engine(batch["input_ids"].cuda(), batch["labels"].cuda())
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        out[fused_stage] = (bool(opt.defaults["fused"]), losses,
                            torch.cat([p.detach().flatten().cpu() for p in model.parameters()]))
    return {"fused": out[0][0], "unfused": out[None][0], "losses": (out[0][1], out[None][1]),
            "max_diff": float((out[0][2] - out[None][2]).abs().max())}


def test_stage0_adamw_is_fused_on_cuda_and_agrees():
    (r,) = spawn(_fused_stage0, 1)
    assert r["fused"] and not r["unfused"]
    fused, exact = r["losses"]
    assert fused[-1] < fused[0]
    assert r["max_diff"] < 1e-3, r  # rounding-order differences only (weights move by ~1e-1)
