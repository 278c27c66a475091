"""The training loop: a recipe of stages, each composed from its parts.

Reads top to bottom: ``Trainer.run_all`` finds the checkpoint to resume (``checkpoint.resume``),
prepares data and the run dir, then runs each stage in three pieces: ``build_stage`` composes the
method, the ready engine (``zero.materialise``), the objective, the data streams, the tracker and
the checkpoint's owners; ``train_loop`` takes the optimizer steps (``Cadence`` says when to log,
evaluate, save and stop; the ``StageTracker`` keeps the loss and throughput window; the
``CheckpointManager`` saves); ``finish_stage`` writes the summary and samples. The next stage
takes the finished stage's weights straight from its engine, one module at a time
(``Method.plain_weights``), into a model partitioned as it is built at ZeRO-3: no rank holds it all.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from lowrank_pt import methods
from lowrank_pt.checkpoint import resume
from lowrank_pt.checkpoint import store as checkpoint
from lowrank_pt.checkpoint.export import init_weights_streamed, load_init_weights
from lowrank_pt.checkpoint.manager import CheckpointManager
from lowrank_pt.config.recipe import RunConfig, StageConfig, stage_steps, tokens_after, tokens_per_step, write_run_config
from lowrank_pt.core import dist
from lowrank_pt.core.cadence import Cadence
from lowrank_pt.data import load_tokenizer, prepare_data
from lowrank_pt.eval.scores import describe, evaluate
from lowrank_pt.methods.base import Method, StageContext
from lowrank_pt.model.llama import LlamaModel, resolve
from lowrank_pt.objectives import LMObjective, build_objective, objective_class
from lowrank_pt.tracking import planner, progress
from lowrank_pt.tracking.metrics import MetricsLogger, truncate_after
from lowrank_pt.tracking.report import build_report
from lowrank_pt.tracking.stage import StageTracker
from lowrank_pt.tracking.summary import write_stage_summary
from lowrank_pt.trainer.streams import DataStreams, on_local_rank0_first
from lowrank_pt.zero import engine as E
from lowrank_pt.zero import state as zero_io
from lowrank_pt.zero.guard import NonFiniteGuard
from lowrank_pt.zero.materialise import materialise, weights_from_rank0
from lowrank_pt.zero.per_layer import PerLayerUpdates


@dataclass
class StageRun:
    """One stage while it runs: what ``build_stage`` made and the loop and hand-over use."""

    index: int
    stage: StageConfig
    engine: Any
    method: Method
    tracker: StageTracker
    cadence: Cadence
    loader: Any
    val_batches: list
    accum: int
    tokens_per_step: int
    total: int
    start: int
    """Stage step this run starts at (a resumed stage's saved step; else 0)."""
    reached: int
    """Stage step reached so far."""
    objective: LMObjective = None
    """The stage's objective: its loss, token weights, evaluation and sampler."""
    owners: dict = None
    """What a checkpoint of the stage holds beside the engine: key -> owner (``state_dict``)."""
    questions: list = None
    """Held-out exact-match questions of a post-training stage (``DataStreams.questions``)."""
    later_tokens: int = 0
    """Tokens the stages after this one train: what the run's ETA adds at this stage's pace."""


class Trainer:
    def __init__(self, run: RunConfig):
        self.run = run
        self.world_size = dist.world_size()
        self.rank = dist.rank()
        self.guard = NonFiniteGuard(run.train.max_nonfinite_steps)  # one per run: its count spans stages

    # --- the run ----------------------------------------------------------------------------
    def run_all(self) -> dict:
        run = self.run
        E.check_precision(run.engine.precision)
        # Fails fast on a mismatched checkpoint, before any write.
        resume_path = resume.find(run, self.world_size, self.warn)
        prepared = on_local_rank0_first(lambda: prepare_data(run.data, progress=dist.rank() == 0))
        self.tokenizer = load_tokenizer(prepared.tokenizer_path)
        self.model_cfg = resolve(run.model, vocab_size=self.tokenizer.vocab_size)
        resume.check_tokenizer_fits(run, self.model_cfg, self.tokenizer)
        meta = checkpoint.read_meta(resume_path) if resume_path else None
        if meta:
            resume.check_model(meta, resume_path, self.model_cfg, self.tokenizer)
        for stage in run.stages:
            objective_class(stage).check_tokenizer(self.tokenizer)
        self.streams = DataStreams(run, self.model_cfg.seq_len, self.tokenizer)
        self.checkpoints = CheckpointManager(run, self.world_size, self.model_cfg, self.tokenizer)
        write_run_config(run)  # every check has passed: the first write into the run dir

        self.global_step = meta["global_step"] if meta else 0
        self.tokens = meta["tokens"] if meta else 0
        first_stage = meta["stage_index"] if meta else 0
        if meta:
            truncate_after(run.run_dir, self.global_step)
        self.metrics = MetricsLogger(run.run_dir, run.train.tensorboard, self.global_step, run.train.wandb_project,
                                     config=OmegaConf.to_container(OmegaConf.structured(run)))
        if meta:
            self.say(f"resuming from {resume_path} (stage {meta['stage_name']}, step {meta['stage_step']})")
        self.finished: StageRun | None = None  # the stage whose weights the next one takes
        self.stopped = False
        try:
            for index in range(first_stage, len(run.stages)):
                if self.stop_requested():
                    break
                resume_here = resume_path if meta and index == first_stage else None
                sr = self.build_stage(index, resume_here)
                self.train_loop(sr)
                self.finish_stage(sr)
                self.finished, sr = sr, None
        finally:
            self.metrics.close()
            # Engines hold reference cycles (ZeRO hooks): free the last one while the process
            # group lives, not in the garbage collector's pass at interpreter exit.
            self.finished = sr = None
            gc.collect()
        if run.train.report and self.rank == 0:
            self.say(f"report: {build_report([run.run_dir], os.path.join(run.run_dir, 'report'))['markdown']}")
        return {"global_step": self.global_step, "tokens": self.tokens, "finished": not self.stopped}

    def stop_requested(self) -> bool:
        """Whether ``train.stop_at_step`` is reached (said once)."""
        if not self.stopped and Cadence.of(self.run.train, 0).should_stop(self.global_step):
            self.stopped = True
            self.say(f"stopped at step {self.global_step} (train.stop_at_step); resume=auto continues")
        return self.stopped

    def warn(self, text: str) -> None:
        if self.rank == 0:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    # --- one stage --------------------------------------------------------------------------
    def build_stage(self, index: int, resume_path: str | None) -> StageRun:
        """Method, engine (``zero.materialise``), objective, data and tracker of stage ``index``.
        Its weights: a resumed checkpoint, else the stage's ``init_from``, else the finished
        previous stage's final weights (whose engine is released as they are taken), else a
        fresh init."""
        run, stage = self.run, self.run.stages[index]
        micro, accum = stage.micro_and_accum(run.train)
        step_tokens = tokens_per_step(stage, run, self.world_size)
        total = stage_steps(stage, step_tokens)
        method = methods.build(stage, run, plan_refresh=planner.resolve_refresh)
        ds_config = E.deepspeed_config(run.engine, micro, accum, method.grad_clip(), self.world_size,
                                       self.model_cfg.hidden_size)
        if self.finished is not None:  # its moments are not carried: free them before anything is built
            zero_io.release_optimizer_state(self.finished.engine)
        # Same seed on every rank: the ranks must build identical models before ZeRO partitions.
        torch.manual_seed(run.seed + 1000 * index)
        engine = materialise(lambda: LlamaModel(self.model_cfg), method, ds_config, total,
                             self.starting_weights(stage, resume_path), fresh=resume_path is None)
        # Dropout and other training randomness differ by rank, reproducibly.
        torch.manual_seed(run.seed + 1000 * index + 1 + self.rank)

        objective = build_objective(stage, method)
        owners = {"method": method, "data": self.streams, "objective": objective}
        start = 0
        if resume_path:  # on another layout: converted
            start = self.checkpoints.load(engine, resume_path, method, owners, self.say)["stage_step"]
        else:  # a frozen reference that no switch gives: computed once, now
            objective.precompute(engine, self.streams, micro)
        self.say(f"stage {index + 1}/{len(run.stages)} {stage.name!r}: method {stage.method}, {total} steps, "
                 f"{step_tokens} tokens/step, ZeRO {run.engine.zero_stage}, {run.engine.precision}, "
                 f"{self.world_size} rank(s)")
        # The data is ready before the tracker starts its clock and resets the memory peaks.
        loader, val_batches = self.streams.train(stage, micro), self.streams.validation(stage, micro)
        tracker = StageTracker(engine=engine, stage=stage, index=index, model_cfg=self.model_cfg,
                               tokens_per_step=step_tokens, precision=run.engine.precision, method=method,
                               master_weights=run.engine.master_weights, zero_stage=run.engine.zero_stage,
                               micro_tokens=micro * run.model.seq_len, accum=accum, start_step=start,
                               cache_dir=run.data.cache_dir)
        for decided in filter(None, (method.describe(), tracker.describe())):  # what the stage chose and holds
            self.say(f"  {decided}")
        method.on_engine_ready(StageContext(engine=engine, total_steps=total, timer=tracker.timer, guard=self.guard,
                                            objective=objective, per_layer=PerLayerUpdates.of(engine, method.update)))
        return StageRun(index=index, stage=stage, engine=engine, method=method, tracker=tracker,
                        cadence=Cadence.of(run.train, total), loader=loader, val_batches=val_batches, accum=accum,
                        tokens_per_step=step_tokens, total=total, start=start, reached=start, objective=objective,
                        owners=owners, questions=self.streams.questions(stage),
                        later_tokens=tokens_after(run, index, self.world_size))

    def starting_weights(self, stage: StageConfig, resume_path: str | None):
        """What ``materialise`` loads the stage's model from (``(model, plain names) -> weights``),
        or None for a fresh init (or a resume, whose checkpoint is loaded into the engine). The
        finished stage is let go as its weights are taken, so its engine is freed as soon as the
        hand-over has streamed through."""
        if resume_path is not None or stage.init_from:  # a stage's own source wins over the carried weights
            self.finished = None
        if resume_path is None and stage.init_from:
            def from_init(model, plain):  # a Hugging Face dir streams from disk on every rank
                self.say(f"stage {stage.name}: weights from {stage.init_from}")  # they fit the model
                return init_weights_streamed(stage.init_from) or weights_from_rank0(
                    lambda: load_init_weights(stage.init_from), model, plain, self.run.engine.zero_stage,
                    f"init_from={stage.init_from}")

            return from_init
        if self.finished is None:
            return None

        def handed_over(model, plain):
            previous, self.finished = self.finished, None
            return previous.method.plain_weights(previous.engine)

        return handed_over

    def train_loop(self, sr: StageRun) -> None:
        engine, method, tracker, cadence, timer = sr.engine, sr.method, sr.tracker, sr.cadence, sr.tracker.timer
        if sr.start == 0 and sr.objective.chat:  # the score a post-training stage starts from
            with timer.phase("eval"):
                tracker.observe(self.evaluate(sr, at_start=True))
        for step in range(sr.start, sr.total):
            if self.stop_requested():
                break
            tracker.start_step()
            with timer.phase("data"):
                micro_batches = [sr.loader.next_batch() for _ in range(sr.accum)]
            lr = engine.get_lr()[0]
            loss = method.train_step(engine, micro_batches, step)
            with timer.phase("method"):
                events = {**method.after_step(engine, step), **self.guard.events()}  # a skip logs its step
            tracker.end_step(loss=loss)
            sr.reached = step + 1
            self.global_step += 1
            self.tokens += sr.tokens_per_step
            if cadence.should_log(step, events):
                self.log_step(sr, step, lr, events)
            if cadence.should_eval(step):
                with timer.phase("eval"):
                    tracker.observe(self.evaluate(sr))
            if cadence.should_save(step, self.global_step):
                with timer.phase("checkpoint"):
                    self.save(sr, step + 1)

    def finish_stage(self, sr: StageRun) -> None:
        """Write the stage's summary and print its samples."""
        entry = sr.tracker.finish(end_step=sr.reached, total_steps=sr.total)  # collective
        if self.rank == 0:
            write_stage_summary(self.run.run_dir, entry)
        if self.run.train.sample_prompts and not self.stopped and sr.start < sr.total:
            self.sample(sr)  # a stage resumed at its end printed its samples before

    # --- pieces ------------------------------------------------------------------------------
    def log_step(self, sr: StageRun, step: int, lr: float, events: dict) -> None:
        """One metrics record: the tracker's window (loss, time/, throughput/, memory/) and the
        method's events. Collective (the window's loss is averaged over ranks)."""
        record = {"step": self.global_step, "stage": sr.stage.name, "stage_step": step + 1, "lr": lr,
                  "tokens": self.tokens, **events, **sr.tracker.metrics(), **sr.objective.window_metrics()}
        record.update(self.guard.grad_norm_record(sr.engine))
        sr.tracker.observe(record)
        self.metrics.log(record)
        self.say(progress.step_line(record, sr.total, time.perf_counter() - sr.tracker.created,
                                    step + 1 - sr.start, sr.tokens_per_step, sr.later_tokens), progress=True)

    def sample(self, sr: StageRun) -> None:
        """Generations from the stage's trained engine (adapters unmerged: the same function), in the
        run's precision, every rank in step with the same seeded draws (ZeRO-3 gathers each layer
        collectively: no rank waits alone, none holds the whole model). Rank 0 prints and logs them."""
        stage, model, train = sr.stage, sr.engine.module, self.run.train
        model.eval()
        for prompt in train.sample_prompts:
            out = sr.objective.sample(model, self.tokenizer, prompt, max_new_tokens=train.sample_tokens,
                                      temperature=train.sample_temperature, seed=self.run.seed)
            self.metrics.log_sample({"step": self.global_step, "stage": stage.name, "prompt": prompt, "text": out.text})
            self.say(f"[{stage.name}] sample: {prompt!r} -> {out.text!r}")
        model.train()

    def evaluate(self, sr: StageRun, at_start: bool = False) -> dict:
        """Validation scores (``lowrank_pt.eval.scores``), logged; ``at_start``: before the stage's
        first step (``stage_step`` 0). Collective."""
        record = {"step": self.global_step, "stage": sr.stage.name, **({"stage_step": 0} if at_start else {}),
                  **evaluate(sr.engine, sr.val_batches, sr.objective, self.tokenizer, sr.questions),
                  "tokens": self.tokens}
        self.metrics.log(record)
        self.say(f"[{sr.stage.name}] eval{' before training' if at_start else ''}: {describe(record)}")
        return record

    def save(self, sr: StageRun, stage_step: int) -> None:
        trainer_state = {"stage_index": sr.index, "stage_step": stage_step, "global_step": self.global_step,
                         "tokens": self.tokens}
        path = self.checkpoints.save(sr.engine, trainer_state, sr.owners)
        self.say(f"[{sr.stage.name}] checkpoint {path}")

    def say(self, text: str, progress: bool = False) -> None:
        if self.rank == 0 and (not progress or self.run.train.progress):
            print(text, flush=True)

