"""What a progress line says about time: how long the stage has run, and when the stage and the
whole run should end at the pace the stage has kept so far (wall clock, evaluations and
checkpoints included, so the estimate covers them too)."""

from __future__ import annotations


def clock(seconds: float) -> str:
    """``1h02m``, ``3m10s`` or ``12s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def estimates(elapsed: float, steps_done: int, steps_left: int, tokens_per_step: int,
              later_tokens: int) -> tuple[float, float]:
    """``(seconds left in the stage, seconds left in the run)`` after ``steps_done`` steps in
    ``elapsed`` seconds: the stage's remaining steps at its pace so far, and the later stages'
    ``later_tokens`` at the same tokens per second."""
    per_step = elapsed / max(1, steps_done)
    stage_left = steps_left * per_step
    return stage_left, stage_left + later_tokens / max(1, tokens_per_step) * per_step


def line(elapsed: float, steps_done: int, steps_left: int, tokens_per_step: int, later_tokens: int) -> str:
    """``elapsed 1m02s, ETA stage 3m10s, run 10m05s``."""
    stage_left, run_left = estimates(elapsed, steps_done, steps_left, tokens_per_step, later_tokens)
    run = f", run {clock(run_left)}" if later_tokens else ""
    return f"elapsed {clock(elapsed)}, ETA stage {clock(stage_left)}{run}"


def step_line(record: dict, total: int, elapsed: float, steps_done: int, tokens_per_step: int,
              later_tokens: int) -> str:
    """The progress line of a logged step's metrics ``record`` (stage step ``stage_step`` of ``total``)."""
    norm = f"grad norm {record['grad_norm']:.3g} " if "grad_norm" in record else ""
    when = line(elapsed, steps_done, total - record["stage_step"], tokens_per_step, later_tokens)
    return (f"[{record['stage']}] step {record['stage_step']}/{total} loss {record['loss']:.4f} {norm}"
            f"lr {record['lr']:.2e} {record['throughput/tokens_per_s']:.0f} tok/s, {when}")
