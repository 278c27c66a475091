"""Tracking through the trainer (needs the trainer integration described in
``lowrank_pt/tracking/__init__.py``): summary.json has one entry per stage and survives a resume,
metrics.jsonl carries the namespaced keys, and the report renders the run."""

from __future__ import annotations

from fixtures import TINY, spawn

from lowrank_pt.tracking import metrics
from lowrank_pt.tracking.summary import read_summary

STATE = ("params", "master_params", "optimizer_states", "grads", "method_buffers")


def overrides(run_dir, cache, *extra):
    # Stage 2 is ReLoRA so that the method phases (merge) show up too.
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", "train.tensorboard=false", "train.progress=false",
            "train.log_every=2", "train.micro_batch_size=2", "stages.0.steps=6", "stages.1.steps=6",
            "stages.1.method=relora", "stages.1.options.rank=4", "stages.1.options.restart_every=3", *extra]


def run_invocations(rank, world_size, invocations):
    import torch

    from lowrank_pt.config.recipe import load
    from lowrank_pt.trainer.trainer import Trainer

    torch.set_num_threads(1)  # the tiny model gains nothing from threads on a busy machine

    return [Trainer(load(TINY, o)).run_all() for o in invocations]


def test_summary_per_stage_survives_resume_and_reports(tmp_path, data_cache):
    run_dir = str(tmp_path / "run")
    spawn(run_invocations, 1, [overrides(run_dir, data_cache, "train.stop_at_step=9"),
                               overrides(run_dir, data_cache)])

    stages = read_summary(run_dir)["stages"]
    assert [s["name"] for s in stages] == ["warmup", "main"]
    warmup, main = stages
    assert warmup["method"] == "full" and main["method"] == "relora"
    for s in stages:
        assert s["complete"] and s["steps"] == 6 and s["tokens"] == 6 * 2 * 64
        assert s["tokens_per_s"] > 0 and s["mfu"] > 0 and s["eval_loss"] > 0
        for category in STATE:
            assert s["memory"]["measured"][category] == s["memory"]["formula"][category], (s["name"], category)
        for phase in ("data", "forward", "backward", "optimizer", "eval", "checkpoint"):
            assert s["phase_s"].get(phase, 0) > 0, (s["name"], phase)
    # main stopped after 3 of its steps and was continued by the second process: both timed halves add up
    assert main["segments"] == 2 and main["timed_steps"] == 6
    assert "merge" in main["phase_s"]  # ReLoRA's merge-and-restart, timed inside after_step
    assert main["memory"]["measured"]["optimizer_states"] < warmup["memory"]["measured"]["optimizer_states"]

    records = [r for r in metrics.read(run_dir) if "loss" in r]
    for key in ("time/forward_s", "time/step_s", "throughput/tokens_per_s", "throughput/mfu",
                "memory/optimizer_states_bytes", "memory/params_bytes", "memory/peak_rss_bytes"):
        assert all(key in r for r in records), key

    from lowrank_pt.tracking.report import build_report

    files = build_report([run_dir], str(tmp_path / "report"))
    text = open(files["markdown"]).read()
    assert "| run | warmup | full |" in text and "| run | main | relora |" in text
