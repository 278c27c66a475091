"""When the training loop logs, evaluates, saves and stops: one owner of every cadence decision.

The loop asks (``cadence.should_log(step, events)``); the rules live here. ``step`` is the 0-based
optimizer step of the stage that just finished, ``global_step`` the run's count after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Cadence:
    total_steps: int
    """Steps of the stage: its last step always logs, evaluates and saves."""
    log_every: int
    eval_every: int
    """0: evaluate at the end of the stage only."""
    save_every: int
    """0: save at the end of the stage only."""
    stop_at_step: Optional[int] = None
    """Global step at which the run saves and exits (time-sliced jobs); None: never."""

    @classmethod
    def of(cls, train, total_steps: int) -> "Cadence":
        """The cadence of a stage from the run's ``train`` section."""
        return cls(total_steps, train.log_every, train.eval_every, train.save_every, train.stop_at_step)

    def is_last(self, step: int) -> bool:
        return step + 1 == self.total_steps

    def should_stop(self, global_step: int) -> bool:
        """Whether the run stops before taking another step."""
        return self.stop_at_step is not None and global_step >= self.stop_at_step

    def should_log(self, step: int, events: dict) -> bool:
        """Every ``log_every`` steps, at the stage's end, and at steps where the method did
        something worth a line (a restart, a refresh)."""
        return (step + 1) % self.log_every == 0 or self.is_last(step) or bool(events)

    def should_eval(self, step: int) -> bool:
        return bool(self.eval_every) and (step + 1) % self.eval_every == 0 or self.is_last(step)

    def should_save(self, step: int, global_step: int) -> bool:
        """Every ``save_every`` steps, at the stage's end, and before a stop (so that resume=auto
        continues exactly there)."""
        periodic = bool(self.save_every) and (step + 1) % self.save_every == 0
        return periodic or self.is_last(step) or self.should_stop(global_step)
