"""Edits of int8 Adam moments under DeepSpeed, ZeRO 0-3 on 2 ranks: ReLoRA's restart prunes them
and GaLore's refresh re-projects them (``moments_on_refresh: reproject``) through DeepSpeed's state
getters and setters, on moments decoded for the edit's length (``zero.state.moments_as_tensors``)
and encoded back: what the method wrote is what the codes hold, within the 8-bit quantisation."""

from __future__ import annotations

import contextlib

import torch
from fixtures import RELORA_VOCAB, odd_model, random_batches, spawn, tiny_engine

from lowrank_pt.zero import state as zero_io


def factor_moments(engine, method) -> dict:
    from lowrank_pt.model.lowrank_linear import lowrank_modules

    out = {}
    with zero_io.moments_as_tensors(engine):
        for name, m in lowrank_modules(engine.module):
            for factor in ("lora_A", "lora_B"):
                p = getattr(m, factor)
                out[f"{name}.{factor}"] = tuple(zero_io.optimizer_state(engine, p, k) for k in ("exp_avg", "exp_avg_sq"))
    return out


def relora_prunes(rank, stage: int) -> dict:
    from lowrank_pt.config.recipe import OptimizerConfig, StageConfig
    from lowrank_pt.methods import parse_options
    from lowrank_pt.methods.relora import ReLoRA

    options = parse_options("relora", dict(rank=3, alpha=6, restart_every=2, restart_warmup_steps=1,
                                           reset_mode="magnitude", reset_fraction=0.75, seed=5))
    method = ReLoRA(options, StageConfig(steps=100, optimizer=OptimizerConfig(state_dtype="int8")), None)
    engine, method = tiny_engine(stage, "fp32", method=method, model=odd_model(), vocab_size=RELORA_VOCAB)
    batches = random_batches(2, vocab_size=RELORA_VOCAB, rank=rank)
    for step in range(2):
        method.train_step(engine, [batches[step]], step)
    before = factor_moments(engine, method)
    assert method.after_step(engine, 1) == {"relora/restart": 1}
    return {"before": before, "after": factor_moments(engine, method)}


def galore_reprojects(rank, stage: int, monkeypatch_log: list) -> dict:
    from lowrank_pt import methods
    from lowrank_pt.config.recipe import OptimizerConfig, ScheduleConfig, StageConfig

    cfg = StageConfig(name="g", method="galore", steps=6,
                      options={"rank": 3, "update_proj_gap": 2, "moments_on_refresh": "reproject"},
                      optimizer=OptimizerConfig(lr=1e-2, state_dtype="int8"), schedule=ScheduleConfig(kind="constant"))
    engine, method = tiny_engine(stage, "fp32", method=methods.build(cfg, None), model=odd_model(),
                                 vocab_size=RELORA_VOCAB)
    batches = random_batches(3, vocab_size=RELORA_VOCAB, rank=rank)
    stored = []
    editable = method._moments_editable

    @contextlib.contextmanager
    def then_read(engine_):  # the refresh's edits encoded, before the optimizer steps: read them back
        with editable(engine_):
            yield
        with zero_io.moments_as_tensors(engine_):
            stored[:] = [tuple(zero_io.optimizer_state(engine_, a.galore_b, k) for k in ("exp_avg", "exp_avg_sq"))
                         for a in method.adapters.values()]

    method._moments_editable = then_read
    monkeypatch_log.clear()
    for step in range(3):  # refreshes at steps 0 and 2; the second re-projects the moments
        if step == 2:
            monkeypatch_log.append([])
        method.train_step(engine, [batches[step]], step)
        method.after_step(engine, step)
    return {"written": list(monkeypatch_log[0]), "stored": stored}


def run(rank, world):
    from lowrank_pt.optim import projector

    log: list = []
    original = projector.reproject_with

    def recorded(m, v, change, side):  # what the refresh writes into B's moments
        out = original(m, v, change, side)
        if log:
            log[-1].append((*(t.clone() for t in out), m.clone(), v.clone()))
        return out

    projector.reproject_with = recorded
    try:
        return {"relora": {s: relora_prunes(rank, s) for s in (0, 1, 2, 3)},
                "galore": {s: galore_reprojects(rank, s, log) for s in (0, 2, 3)}}
    finally:
        projector.reproject_with = original


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within the 8-bit dynamic map's step near the block maximum (~1%) plus a floor."""
    return bool(torch.allclose(a, b, rtol=0.05, atol=0.02 * float(b.abs().max()) + 1e-12))


def test_int8_moments_are_pruned_and_reprojected_through_deepspeed():
    results = spawn(run, 2)
    for stage, r in results[0]["relora"].items():
        for name, (m, v) in r["after"].items():
            m0, v0 = r["before"][name]
            if m0.abs().max() == 0:
                continue  # B's moments before its first nonzero gradient
            kept = v != 0
            # magnitude pruning of 75%: a quarter of the second moment is left, no more; where it
            # is left, the values are the old ones re-encoded
            assert kept.float().mean() <= 0.3, (stage, name, kept.float().mean())
            assert bool((m[~kept] == 0).all()), (stage, name)  # m never outlives v
            assert close(v[kept], v0[kept]) and close(m[m != 0], m0[m != 0]), (stage, name)
        assert r["after"].keys() == results[1]["relora"][stage]["after"].keys()
    for stage, g in results[0]["galore"].items():
        assert len(g["written"]) == len(g["stored"]) > 0, stage
        for (m_w, v_w, m_old, v_old), (m_s, v_s) in zip(g["written"], g["stored"]):
            for stored, written, old in ((m_s, m_w, m_old), (v_s, v_w, v_old)):
                # the codes hold the re-projected moment, not the moment in the old basis (2-12x
                # further off), within the 8-bit error: measured 0.6-1.3% of its norm at ZeRO 0; up
                # to 23% at ZeRO 2-3, where B's few small moments share blocks of the flat
                # partition with larger ones, whose maximum sets the block's step
                error = (stored.view_as(written) - written).norm() / written.norm()
                print(f"ZeRO {stage}: stored vs written {error:.3f}, old vs written "
                      f"{(old - written).norm() / written.norm():.3f}")
                assert error < 0.35 and (old - written).norm() > 3 * (stored.view_as(written) - written).norm()
