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
stage context brings a real one. The package imports nothing itself: ``stage`` and ``planner``
build methods (and so import DeepSpeed), which the ``report`` and ``plan`` commands' parser must
not pay for.
"""
