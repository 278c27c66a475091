"""The training loop: a recipe of stages, each with its method, engine, data and schedule.

Reads top to bottom: ``Trainer.run_all`` prepares data and the run dir, then runs each stage in
three pieces: ``build_stage`` (model, method, DeepSpeed engine, a checkpoint that belongs to the
stage, data, tracker), ``train_loop`` (the optimizer steps; it asks ``Cadence`` when to log,
evaluate, save and stop, and the ``StageTracker`` for the loss and throughput window), and
``finish_stage`` (summary, samples); the next ``build_stage`` takes the finished stage's weights
straight from its engine, one module at a time (``Method.plain_weights``), into a model that at
ZeRO-3 is partitioned as it is built, so no rank ever holds the whole model.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lowrank_pt import checkpoint, dist, methods, reshard, zero_io
from lowrank_pt import engine as E
from lowrank_pt.cadence import Cadence
from lowrank_pt.config import RunConfig, StageConfig, stage_steps, to_yaml
from lowrank_pt.data import Tokenizer, prepare_data
from lowrank_pt.dpo import build_objective
from lowrank_pt.evaluation import describe, evaluate
from lowrank_pt.errors import ConfigError
from lowrank_pt.guard import NonFiniteGuard
from lowrank_pt.methods.base import Method, StageContext
from lowrank_pt.metrics import MetricsLogger, truncate_after
from lowrank_pt.model import LlamaModel, resolve
from lowrank_pt.streams import DataStreams, on_local_rank0_first
from lowrank_pt.tracking import StageTracker, write_stage_summary
from lowrank_pt.tracking.memory import release_host_heap

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size", "tie_embeddings")


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
    objective: Any = None
    """The stage's loss when not the LM loss (DPO), else None."""
    questions: list = None
    """Held-out exact-match questions of a post-training stage (``DataStreams.questions``)."""


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
        resume_path = self.find_resume()  # fails fast on a mismatched checkpoint, before any write
        prepared = on_local_rank0_first(lambda: prepare_data(run.data, progress=dist.rank() == 0))
        self.tokenizer = Tokenizer(prepared.tokenizer_path)
        self.model_cfg = resolve(run.model, vocab_size=self.tokenizer.vocab_size)
        if self.model_cfg.vocab_size != self.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={self.model_cfg.vocab_size} differs from the tokenizer's "
                              f"{self.tokenizer.vocab_size}; leave it null to take the tokenizer's")
        if resume_path:
            self.check_shape(checkpoint.read_meta(resume_path))
            self.check_tokenizer(checkpoint.read_meta(resume_path), resume_path)
        self.check_sft_tokenizer()
        self.streams = DataStreams(run, self.model_cfg.seq_len, self.tokenizer)
        self.write_run_dir()  # every check has passed: the first write into the run dir

        meta = checkpoint.read_meta(resume_path) if resume_path else None
        self.global_step = meta["global_step"] if meta else 0
        self.tokens = meta["tokens"] if meta else 0
        first_stage = meta["stage_index"] if meta else 0
        if meta:
            truncate_after(run.run_dir, self.global_step)
        self.metrics = MetricsLogger(run.run_dir, run.train.tensorboard, self.global_step)
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
        return {"global_step": self.global_step, "tokens": self.tokens, "finished": not self.stopped}

    def stop_requested(self) -> bool:
        """Whether ``train.stop_at_step`` is reached (said once)."""
        if not self.stopped and Cadence.of(self.run.train, 0).should_stop(self.global_step):
            self.stopped = True
            self.say(f"stopped at step {self.global_step} (train.stop_at_step); resume=auto continues")
        return self.stopped

    def find_resume(self) -> str | None:
        """The checkpoint this run continues from, verified (``checkpoint.verify``) and compatible
        with this run (``check_resume``), or None. resume=auto (and resume=RUN_DIR) takes the
        newest checkpoint that verifies, warning about each newer damaged one; resume=CHECKPOINT
        must verify. Collective (checksums are shared over the ranks); reads only."""
        run = self.run
        if run.resume == "never":
            if checkpoint.candidates(run.run_dir):
                raise ConfigError(f"resume=never but {run.run_dir} holds checkpoints; use another run_dir")
            return None
        if run.resume != "auto" and not os.path.isdir(checkpoint.root(run.resume)):
            path = os.path.normpath(run.resume)  # one checkpoint dir
            if not checkpoint.is_checkpoint_dir(path):
                raise ConfigError(f"resume={run.resume}: neither a checkpoint dir (checkpoints/step_N) nor a run dir "
                                  "with checkpoints/")
            problem = checkpoint.verify_all_ranks(path)
            if problem:
                raise ConfigError(f"resume={run.resume}: this checkpoint is damaged: {problem}; point resume at "
                                  "another checkpoint dir (or at its run dir: the newest that verifies)")
            self.check_resume(checkpoint.read_meta(path), path)
            return path
        source = run.run_dir if run.resume == "auto" else run.resume
        path, damaged = checkpoint.newest_verified(source)
        if path is None and damaged:
            listed = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in damaged)
            raise ConfigError(f"no checkpoint under {checkpoint.root(source)} verifies ({listed}); move the damaged "
                              "ones away, or start a new run_dir (resume=never)")
        for bad, why in damaged:
            self.warn(f"checkpoint {bad} is damaged ({why}): skipped; resuming from {os.path.basename(path)}")
        if path is None and run.resume != "auto":
            raise ConfigError(f"resume={run.resume}: no complete checkpoint under {checkpoint.root(source)}")
        if path is not None:
            self.check_resume(checkpoint.read_meta(path), path)
        return path

    def check_resume(self, meta: dict, path: str) -> None:
        """A resume must keep what its checkpoint's state depends on: the stage's method and the
        precision (older checkpoints lack some: not checked); another world size or ZeRO stage is
        converted at load where ``reshard.check`` allows it."""
        run, changes = self.run, []
        index = meta["stage_index"]
        if index < len(run.stages) and meta.get("method") not in (None, run.stages[index].method):
            changes.append(f"stages.{index}.method ({meta.get('stage_name')}) is {run.stages[index].method} here "
                           f"but {meta['method']} in the checkpoint")
        if meta.get("precision") not in (None, run.engine.precision):
            changes.append(f"engine.precision is {run.engine.precision} here but {meta['precision']} in the checkpoint")
        if changes:
            raise ConfigError(f"resuming {path} would change what its state was saved with: {'; '.join(changes)}; "
                              "resume with the checkpoint's settings, or start a new run_dir (init_from takes its weights)")
        reshard.check(meta, path, run.engine.zero_stage, self.world_size, run.engine.precision)

    def check_tokenizer(self, meta: dict, path: str) -> None:
        """The checkpoint's token ids mean this run's pieces: same tokenizer file (sha256)."""
        saved = meta.get("tokenizer_sha256")
        if saved is not None and saved != self.tokenizer.sha256:
            raise ConfigError(f"resuming {path} would change the tokenizer: the checkpoint was trained with "
                              f"{meta.get('tokenizer')} (sha256 {saved[:12]}…), this run's data section gives "
                              f"{self.tokenizer.path} (sha256 {self.tokenizer.sha256[:12]}…); resume with the "
                              "checkpoint's data settings (data.tokenizer, data.vocab_size, data.source, ...)")

    def check_sft_tokenizer(self) -> None:
        """SFT and DPO stages need the chat pieces in the tokenizer (a DataError names the missing one)."""
        if any(stage.sft is not None or stage.dpo is not None for stage in self.run.stages):
            from lowrank_pt.data.sft import END_PIECE, ROLE_PIECES

            for piece in (*ROLE_PIECES.values(), END_PIECE):
                self.tokenizer.piece_id(piece)

    def warn(self, text: str) -> None:
        if self.rank == 0:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def check_shape(self, meta: dict) -> None:
        saved = meta.get("model", {})
        for key in SHAPE_KEYS:
            if saved.get(key) != getattr(self.model_cfg, key):
                raise ConfigError(f"checkpoint model shape differs: model.{key} is {getattr(self.model_cfg, key)} "
                                  f"here but {saved.get(key)} in the checkpoint; use another run_dir or the same model")

    def write_run_dir(self) -> None:
        if self.rank == 0:
            os.makedirs(self.run.run_dir, exist_ok=True)
            tmp = os.path.join(self.run.run_dir, "config.yaml.tmp")
            with open(tmp, "w") as f:
                f.write(to_yaml(self.run))
            os.replace(tmp, os.path.join(self.run.run_dir, "config.yaml"))
        dist.barrier()

    # --- one stage --------------------------------------------------------------------------
    def build_stage(self, index: int, resume_path: str | None) -> StageRun:
        """Model, method, engine, data and tracker of stage ``index``. Its weights: a resumed
        checkpoint, else the stage's ``init_from``, else the finished previous stage's final
        weights (whose engine is released before this one is built), else a fresh init."""
        run, stage = self.run, self.run.stages[index]
        micro = stage.micro_batch_size or run.train.micro_batch_size
        accum = stage.grad_accum or run.train.grad_accum
        rows = 2 if stage.dpo is not None else 1  # a DPO micro-batch of n pairs trains 2n rows: chosen, rejected
        tokens_per_step = rows * micro * accum * self.world_size * self.model_cfg.seq_len
        total = stage_steps(stage, tokens_per_step)
        method = methods.build(stage, run)
        ds_config = E.deepspeed_config(run.engine, micro, accum, method.grad_clip(), self.world_size)

        previous, self.finished = self.finished, None
        if previous is not None:  # its moments are not carried: free them before anything is built
            zero_io.release_optimizer_state(previous.engine)
        # Same seed on every rank: the ranks must build identical models before ZeRO partitions.
        torch.manual_seed(run.seed + 1000 * index)
        with E.partitioned_build(ds_config):
            model = LlamaModel(self.model_cfg)
            plain = [name for name, _ in model.named_parameters()]
            method.prepare_model(model)
        source = None
        if resume_path is None and stage.init_from:  # a stage's own source wins over the carried weights
            source = self.init_from_source(stage.init_from, model, plain)
            self.say(f"stage {stage.name}: weights from {stage.init_from}")
        elif resume_path is None and previous is not None:
            source = previous.method.plain_weights(previous.engine)
        held = load_streamed(model, source, plain) if source is not None else {}
        if resume_path is None:  # weight-dependent inits (LoRA's pissa, ...) see the stage's weights
            held.update(method.after_weights_loaded(model))
        del previous, source  # the last references to the previous stage's engine
        gc.collect()
        release_host_heap()
        optimizer = method.build_optimizer(method.param_groups(model), stage, run.engine)
        engine = E.initialize(model, optimizer, method.lr_lambda(total), ds_config)
        release_host_heap()  # the per-param copies DeepSpeed flattened into its buffers
        if run.engine.precision != "fp32":  # masters were made from the rounded params
            for p in engine.module.parameters():
                if id(p) in held:
                    zero_io.restore_master(engine, p, held[id(p)])
        del held
        # Dropout and other training randomness differ by rank, reproducibly.
        torch.manual_seed(run.seed + 1000 * index + 1 + self.rank)

        start = 0
        self.objective = objective = build_objective(stage, method)
        if resume_path:
            client = reshard.load(engine, resume_path, method, self.say)  # on another layout: converted
            method.load_state_dict(client.get("method", {}))
            self.streams.load_state_dict(client.get("data", {}))
            if objective is not None:
                objective.load_state_dict(client.get("objective", {}))
            start = client["trainer"]["stage_step"]
        elif objective is not None:  # a frozen reference that no switch gives: computed once, now
            objective.precompute(engine, self.streams.reference_batches(stage, micro))
        loader = self.streams.train(stage, micro)
        val_batches = self.streams.validation(stage, micro)
        self.say(f"stage {index + 1}/{len(run.stages)} {stage.name!r}: method {stage.method}, {total} steps, "
                 f"{tokens_per_step} tokens/step, ZeRO {run.engine.zero_stage}, {run.engine.precision}, "
                 f"{self.world_size} rank(s)")
        decided = method.describe()
        if decided:
            self.say(f"  {decided}")
        tracker = StageTracker(engine=engine, stage=stage, index=index, model_cfg=self.model_cfg,
                               tokens_per_step=tokens_per_step, precision=run.engine.precision,
                               zero_stage=run.engine.zero_stage, micro_tokens=micro * run.model.seq_len,
                               accum=accum, start_step=start, cache_dir=run.data.cache_dir)
        method.on_engine_ready(StageContext(engine=engine, total_steps=total, timer=tracker.timer,
                                            guard=self.guard, objective=objective))
        return StageRun(index=index, stage=stage, engine=engine, method=method, tracker=tracker,
                        cadence=Cadence.of(run.train, total), loader=loader, val_batches=val_batches,
                        accum=accum, tokens_per_step=tokens_per_step, total=total, start=start, reached=start,
                        objective=objective, questions=self.streams.questions(stage))

    def init_from_source(self, path: str, model, plain: list[str]):
        """``(name, full value)`` of the plain weights at ``path`` (an exported Hugging Face dir,
        or a run or checkpoint dir, adapters merged). Stages 0-2 hold the whole model on every
        rank anyway: each rank reads it. At ZeRO-3 only rank 0 reads it and hands each param
        over in turn by broadcast, so the other ranks hold one param at a time, never the model."""
        from lowrank_pt.export import load_init_weights

        if self.run.engine.zero_stage != 3 or self.world_size == 1:
            return iter(load_init_weights(path).items())
        shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
        weights, problem = {}, None
        if self.rank == 0:
            weights = load_init_weights(path)
            wrong = [f"{n}: {tuple(weights[n].shape)} there, {shapes[n]} here" for n in plain
                     if n in weights and tuple(weights[n].shape) != shapes[n]]
            missing = [n for n in plain if n not in weights]
            if wrong or missing:
                problem = f"init_from={path}: weights do not fit the model ({(wrong + missing)[:3]})"
        problem = dist.broadcast_object(problem, src=0)
        if problem:
            raise ConfigError(problem)

        def stream():
            for name in plain:
                value = weights.pop(name).float().contiguous() if self.rank == 0 else torch.empty(shapes[name])
                dist.broadcast_(value, src=0)
                yield name, value

        return stream()

    def train_loop(self, sr: StageRun) -> None:
        engine, method, tracker, cadence, timer = sr.engine, sr.method, sr.tracker, sr.cadence, sr.tracker.timer
        if sr.start == 0 and (sr.stage.sft is not None or sr.objective is not None):  # the score it starts from
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
                    self.save(engine, method, sr.index, step + 1)

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
                  "tokens": self.tokens, **events, **sr.tracker.metrics(),
                  **(sr.objective.window_metrics() if sr.objective is not None else {})}
        sr.tracker.observe(record)
        self.metrics.log(record)
        self.say(f"[{sr.stage.name}] step {step + 1}/{sr.total} loss {record['loss']:.4f} "
                 f"lr {lr:.2e} {record['throughput/tokens_per_s']:.0f} tok/s", progress=True)

    def sample(self, sr: StageRun) -> None:
        """Generations from the stage's trained model as the engine holds it (adapters unmerged:
        the same function), in the run's precision. Every rank samples in step, with the same
        seeded draws: at ZeRO-3 each layer's forward gathers its params, a collective every rank
        joins, so no rank waits alone while rank 0 works and no rank holds the whole model.
        Rank 0 prints and writes them."""
        from lowrank_pt.generate import chat, generate

        stage, model = sr.stage, sr.engine.module
        model.eval()
        train = self.run.train
        lines = []
        for prompt in train.sample_prompts:
            sampler = chat if stage.sft is not None or stage.dpo is not None else generate
            out = sampler(model, self.tokenizer, prompt, max_new_tokens=train.sample_tokens,
                          temperature=train.sample_temperature, seed=self.run.seed)
            lines.append({"step": self.global_step, "stage": stage.name, "prompt": prompt, "text": out.text})
            self.say(f"[{stage.name}] sample: {prompt!r} -> {out.text!r}")
        model.train()
        if self.rank == 0:
            with open(os.path.join(self.run.run_dir, "samples.jsonl"), "a") as f:
                f.writelines(json.dumps(line) + "\n" for line in lines)

    def evaluate(self, sr: StageRun, at_start: bool = False) -> dict:
        """Validation scores (``lowrank_pt.evaluation``), logged; ``at_start``: before the stage's
        first step (``stage_step`` 0). Collective."""
        record = {"step": self.global_step, "stage": sr.stage.name, **({"stage_step": 0} if at_start else {}),
                  **evaluate(sr.engine, sr.val_batches, sr.stage, sr.objective, self.tokenizer, sr.questions),
                  "tokens": self.tokens}
        self.metrics.log(record)
        self.say(f"[{sr.stage.name}] eval{' before training' if at_start else ''}: {describe(record)}")
        return record

    def save(self, engine, method, index: int, stage_step: int) -> None:
        stage = self.run.stages[index]
        trainer_state = {"stage_index": index, "stage_name": stage.name, "stage_step": stage_step,
                         "global_step": self.global_step, "tokens": self.tokens}
        meta = {**trainer_state, "model": asdict(self.model_cfg), "world_size": self.world_size,
                "zero_stage": self.run.engine.zero_stage, "precision": self.run.engine.precision,
                "method": stage.method, "method_options": dict(stage.options),
                "tokenizer": os.path.abspath(self.tokenizer.path), "tokenizer_sha256": self.tokenizer.sha256}
        client = {"trainer": trainer_state, "method": method.state_dict(), "data": self.streams.state_dict(),
                  **({"objective": self.objective.state_dict()} if self.objective is not None else {})}
        path = checkpoint.save(engine, self.run.run_dir, self.global_step, meta, client, self.run.train.keep_last)
        self.say(f"[{stage.name}] checkpoint {path}")

    def say(self, text: str, progress: bool = False) -> None:
        if self.rank == 0 and (not progress or self.run.train.progress):
            print(text, flush=True)


def load_streamed(model, source, plain: list[str]) -> dict[int, torch.Tensor]:
    """Load ``(name, full value)`` pairs of the plain model into ``model`` (built, and prepared by
    its method, not yet in an engine) as they come: a ZeRO-3 partitioned param takes its shard.
    Every name of ``plain`` (the params of the model before its method prepared it; the
    method's own additions keep their fresh values) must arrive and fit its shape. Returns, by
    param id, the fp32 value each trainable param now holds on this rank, for the masters."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    held, seen = {}, set()
    for name, value in source:
        target = params.get(name, buffers.get(name))
        if target is None:
            if name.endswith("lm_head.weight") and model.cfg.tie_embeddings:
                continue  # tied to embed_tokens.weight, which carries it
            raise ValueError(f"weights to load hold {name!r}, which the model has not")
        shape = tuple(getattr(target, "ds_shape", target.shape))
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}: weights to load have shape {tuple(value.shape)}, the model {shape}")
        local = zero_io.write_before_engine(target, value)
        if name in params and target.requires_grad:
            held[id(target)] = local
        seen.add(name)
    missing = [n for n in plain if n not in seen]
    if missing:
        raise ValueError(f"weights to load lack {missing[:5]}")
    return held
