"""Per-stage tracking: phase times, throughput and MFU, memory by category, summary, report, plan.

How the trainer uses it, in one stage::

    tracker = StageTracker(engine=engine, stage=stage, index=index, model_cfg=model_cfg,
                           tokens_per_step=tokens_per_step, precision=..., zero_stage=...,
                           start_step=start, cache_dir=run.data.cache_dir)
    method.on_engine_ready(StageContext(engine, total, tracker.timer))  # the method's spans
    for step in ...:
        tracker.start_step()
        with tracker.timer.phase("data"): batches = ...
        loss = method.train_step(...)
        with tracker.timer.phase("method"): events = method.after_step(...)
        tracker.end_step(loss=loss)
        record = {..., **tracker.metrics()}      # on log steps; loss and time/, throughput/, memory/
        tracker.observe(record)
        with tracker.timer.phase("eval"): ...
        with tracker.timer.phase("checkpoint"): ...
    entry = tracker.finish(end_step, total)      # every rank (gathers memory)
    if rank == 0: write_stage_summary(run_dir, entry)

Methods call ``with self.timer.phase(...)`` around their work; it is ``NULL_TIMER`` until their
stage context brings a real one.
"""

from lowrank_pt.core.timer import NULL_TIMER, PHASES, NullTimer, PhaseTimer
from lowrank_pt.tracking.flops import device_peak, flops_per_token, mfu
from lowrank_pt.tracking.memory import CATEGORIES, MemoryTracker, state_bytes
from lowrank_pt.tracking.planner import plan
from lowrank_pt.tracking.stage import StageTracker
from lowrank_pt.tracking.summary import SUMMARY_FILE, read_summary, write_stage_summary

__all__ = ["CATEGORIES", "NULL_TIMER", "PHASES", "SUMMARY_FILE", "MemoryTracker", "NullTimer", "PhaseTimer",
           "StageTracker", "device_peak", "flops_per_token", "mfu", "plan", "read_summary", "state_bytes",
           "write_stage_summary"]
