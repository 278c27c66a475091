"""One recipe stage's tracking: phase times, throughput, MFU, memory, and its summary entry.

The trainer builds a ``StageTracker`` once the engine exists, gives ``tracker.timer`` to the
method, brackets each optimizer step with ``start_step``/``end_step``, merges ``metrics()``
into the records it logs, and calls ``finish`` on every rank at the stage's end (see
``lowrank_pt/tracking/__init__.py`` for the calls in order).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch

from lowrank_pt.core import dist
from lowrank_pt.core.timer import PhaseTimer
from lowrank_pt.model import int8_weights
from lowrank_pt.tracking import flops, memory, planner
from lowrank_pt.tracking.summary import derive_rates
from lowrank_pt.zero.held import built_reduce_bucket

log = logging.getLogger(__name__)

_PEAK_KEYS = ("peak_rss_bytes", "peak_allocated_bytes", "peak_reserved_bytes")


class StageTracker:
    """Tracks one stage on one rank. Construction and ``finish()`` are collective on CPU ranks
    (every rank calls them at the same point); ``metrics()`` is local. ``finish()`` returns the
    stage's summary entry on every rank."""

    def __init__(self, *, engine, stage, index: int, model_cfg, tokens_per_step: int, precision: str,
                 zero_stage: int, micro_tokens: int = 0, accum: int = 1, start_step: int = 0, cache_dir: str = ".cache/lowrank_pt",
                 sync: bool | None = None, timer: PhaseTimer | None = None, flops_per_token: int | None = None,
                 master_weights: str = "fp32", update: str = "step", method=None):
        # A stage's method gives its FLOPs, its update and its options as decided at its start
        # (GaLore's refresh: auto); without one, the dense Llama's and the stage's own.
        self.options = dict(stage.options)
        if method is not None:
            flops_per_token = flops_per_token or method.flops_per_token(model_cfg, micro_tokens or None)
            update, self.options = method.update, method.decided_options()
        self.rank = dist.rank()
        self.world = dist.world_size()
        self.engine, self.stage, self.index = engine, stage, index
        self.precision, self.zero_stage = precision, zero_stage
        self.tokens_per_step = tokens_per_step
        self.first_step = start_step
        self.timer = timer or PhaseTimer(sync)
        self.memory = memory.MemoryTracker(engine, self.timer)
        self.host_peak_resettable = memory.reset_peaks()
        self.flops_per_token = flops_per_token or flops.flops_per_token(model_cfg)
        self.peak_flops, self.peak_source = self._device_peak(precision, cache_dir)
        # Tracking must never stop a run: a method the planner cannot lay out gets no formula.
        try:
            module = getattr(engine, "module", None)  # engine.weight_dtype, as the engine holds it
            int8 = module is not None and any(int8_weights.is_int8(m) for m in module.modules())
            lay = planner.layout(model_cfg, stage.method, self.options, stage.optimizer.weight_decay,
                                 stage.optimizer.state_dtype, weight_dtype="int8" if int8 else "bf16")
            self.formula = planner.state_bytes(lay, zero_stage, self.world, precision, self.rank,
                                               built_reduce_bucket(engine),
                                               fp32_grad_accumulation=_accumulates_in_fp32(engine),
                                               master_weights=master_weights, update=update, grad_accum=accum)
            self.formula["method_transient"] = planner.capture_bytes(lay, self.world, self.rank, zero_stage)
            cache = lay.step_cache(micro_tokens, accum, zero_stage, precision)
            if cache:
                self.formula["step_cache"] = cache
            self.params = {"total": lay.total_params, "trainable": lay.trainable, "frozen": sum(lay.frozen)}
        except Exception as e:  # noqa: BLE001
            log.warning("tracking: no memory formula for method %s: %s", stage.method, e)
            self.formula, self.params = {}, {}
        self.created = time.perf_counter()
        self.steps = 0
        self.tokens = 0
        self._window = self._new_window()
        self.last: dict = {}

    def describe(self) -> str:
        """What this rank holds, planned, by category, and per trained parameter: the stage's
        bytes per parameter in one line (empty without a formula)."""
        if not self.formula or not self.params.get("trainable"):
            return ""
        keys = (("params", "params"), ("master_params", "masters"), ("grads", "gradients"),
                ("optimizer_states", "optimizer states"), ("method_buffers", "method buffers"))
        parts = [f"{label} {self.formula[key] / 2**20:.1f} MiB" for key, label in keys if self.formula.get(key)]
        trained = sum(self.formula.get(k, 0) for k in ("master_params", "grads", "optimizer_states"))
        per = trained / (self.params["trainable"] / (self.world if self.zero_stage else 1))
        return (f"this rank holds (planned): {', '.join(parts)}; masters + gradients + states "
                f"{per:.2f} bytes per trained parameter it steps")

    def _device_peak(self, precision: str, cache_dir: str):
        """The device's peak FLOP/s. On CPUs rank 0 measures it (ranks measuring at once would
        slow each other down) and the others take its number."""
        shared = self.world > 1 and not torch.cuda.is_available()
        peak = None
        if self.rank == 0 or not shared:
            try:
                peak = flops.device_peak(precision, cache_dir)
            except Exception as e:  # noqa: BLE001 - no MFU rather than no run
                peak = (None, f"unavailable: {e}")
        return dist.broadcast_object(peak, src=0) if shared else peak

    @staticmethod
    def _new_window() -> dict:
        return {"steps": 0, "tokens": 0, "step_s": 0.0, "loss": 0.0, "losses": 0,
                "phases": defaultdict(float), "totals": None}

    # --- per step ---------------------------------------------------------------------------
    def start_step(self) -> None:
        self.timer.start_step()

    def end_step(self, tokens: int | None = None, loss: float | None = None) -> dict[str, float]:
        """Close the step; ``tokens`` (all ranks) defaults to the stage's tokens per step;
        ``loss`` (this rank's) joins the window's mean loss."""
        phases = self.timer.end_step()
        tokens = self.tokens_per_step if tokens is None else tokens
        self.steps += 1
        self.tokens += tokens
        w = self._window
        w["steps"] += 1
        w["tokens"] += tokens
        w["step_s"] += phases["step"]
        if loss is not None:
            w["loss"] += loss
            w["losses"] += 1
        for name, seconds in phases.items():
            if name != "step":
                w["phases"][name] += seconds
        return phases

    def observe(self, record: dict) -> None:
        """Remember the latest train/eval numbers of a logged record for the summary (an
        evaluation before the stage's first step, ``stage_step`` 0, under ``start/``)."""
        prefix = "start/" if record.get("stage_step") == 0 else ""
        for key, value in record.items():
            if key == "loss" or key.startswith(("eval/", "dpo/")):
                self.last[prefix + key] = value

    def metrics(self) -> dict:
        """Metrics of the steps since the last call, then reset the window: ``loss`` (the mean
        over the window's steps and all ranks, when steps gave one: then collective), phase
        times in seconds per step (eval and checkpoint: seconds spent since the last call),
        throughput from the summed step times (``throughput/tokens_per_s``: time inside steps,
        not evaluation or checkpoints), and this rank's memory."""
        w = self._window
        out: dict = {}
        if w["losses"]:
            out["loss"] = dist.all_reduce_mean(w["loss"] / w["losses"])
        steps = max(w["steps"], 1)
        for name, seconds in sorted(w["phases"].items()):
            out[f"time/{name}_s"] = seconds / steps
        out["time/step_s"] = w["step_s"] / steps
        totals = dict(self.timer.totals)
        previous = w["totals"] or {}
        for name in ("eval", "checkpoint"):
            spent = totals.get(name, 0.0) - previous.get(name, 0.0)
            if spent:
                out[f"time/{name}_s"] = spent
        out.update(self._rates(w["tokens"], w["step_s"]))
        out.update({f"memory/{k}_bytes": v for k, v in self.memory.measure().items()})
        out.update({f"memory/{k}": v for k, v in memory.peaks().items()})
        self._window = self._new_window()
        self._window["totals"] = totals
        return out

    def _rates(self, tokens: int, seconds: float) -> dict:
        rate = tokens / seconds if seconds > 0 else 0.0
        per_rank = rate / self.world
        achieved = per_rank * self.flops_per_token
        out = {"throughput/tokens_per_s": rate, "throughput/tokens_per_s_per_rank": per_rank,
               "throughput/tflops_per_device": achieved / 1e12}
        mfu = flops.mfu(rate, self.flops_per_token, self.peak_flops, self.world)
        if mfu is not None:
            out["throughput/mfu"] = mfu
        return out

    # --- stage end --------------------------------------------------------------------------
    def finish(self, end_step: int, total_steps: int) -> dict:
        """The stage's summary entry (collective: gathers every rank's memory).

        ``end_step``: the stage step reached (``total_steps`` when the stage completed)."""
        measured = self.memory.measure()
        local = {"measured": measured, **memory.peaks()}
        by_rank = dist.all_gather_object(local) if self.world > 1 else [local]
        train_time = self.timer.step_seconds
        mem = {"measured": by_rank[0]["measured"], "formula": self.formula,
               "measured_by_rank": [r["measured"] for r in by_rank],
               "host_peak_is_per_stage": self.host_peak_resettable}
        for key in _PEAK_KEYS:
            values = [r[key] for r in by_rank if key in r]
            if values:
                mem[key] = max(values)
        entry = {
            "name": self.stage.name, "index": self.index, "method": self.stage.method,
            "options": self.options, "zero_stage": self.zero_stage, "precision": self.precision,
            "world_size": self.world, "device": _device_name(),
            "start_step": self.first_step, "end_step": end_step, "total_steps": total_steps,
            "complete": end_step >= total_steps,
            "steps": end_step, "tokens": end_step * self.tokens_per_step,
            "timed_steps": self.steps, "timed_tokens": self.tokens,
            "train_time_s": train_time, "time_s": time.perf_counter() - self.created,
            "phase_s": dict(self.timer.totals),
            "flops_per_token": self.flops_per_token, "peak_flops_per_device": self.peak_flops,
            "peak_source": self.peak_source, "params": self.params, "memory": mem,
            **{k.replace("/", "_"): v for k, v in self.last.items()},
        }
        return derive_rates(entry)


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def _accumulates_in_fp32(engine) -> bool:
    """Whether DeepSpeed accumulates gradients in fp32 (``data_types.grad_accum_dtype``)."""
    data_types = getattr(engine, "get_data_types", None)
    return data_types is not None and data_types()[1] == torch.float32
