"""The one metrics path: ``metrics.jsonl`` and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import hashlib
import json
import math
import os

from lowrank_pt.core import dist

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


def truncate_after(run_dir: str, global_step: int) -> None:
    """Drop lines logged after ``global_step``: a resumed run logs those steps again."""
    path = os.path.join(run_dir, METRICS_FILE)
    if dist.rank() != 0 or not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if record.get("step", 0) <= global_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def read(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Appends one JSON object per record and mirrors numbers to TensorBoard and, with
    ``wandb_project``, to Weights & Biases: offline (files under RUN_DIR/wandb, ``wandb sync``
    uploads them) unless WANDB_MODE says otherwise, one W&B run per run dir, resumed with it."""

    def __init__(self, run_dir: str, tensorboard: bool, start_step: int, wandb_project: str | None = None,
                 config: dict | None = None):
        self.enabled = dist.rank() == 0
        self.file = None
        self.writer = None
        self.wandb = None
        if not self.enabled:
            return
        self.file = open(os.path.join(run_dir, METRICS_FILE), "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # heavy (seconds): only when asked for

            self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step or None)
        if wandb_project:
            import wandb  # optional: config validation checked it is installed

            run_id = hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:16]
            self.wandb = wandb.init(project=wandb_project, dir=run_dir, id=run_id, resume="allow",
                                    name=os.path.basename(os.path.normpath(run_dir)), config=config or {},
                                    mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        os.fsync(self.file.fileno())
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({key if "/" in key else f"train/{key}": value for key, value in record.items()
                            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)},
                           step=record["step"])

    def log_sample(self, sample: dict) -> None:
        """One generation (step, stage, prompt, text) appended to RUN_DIR/samples.jsonl."""
        if not self.enabled:
            return
        with open(os.path.join(os.path.dirname(self.file.name), SAMPLES_FILE), "a") as f:
            f.write(json.dumps(sample) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
