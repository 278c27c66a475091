"""Small checks shared by the config's validators: each raises ConfigError naming the key."""

from __future__ import annotations

import math
import os

from lowrank_pt.core import dist
from lowrank_pt.core.errors import ConfigError


def choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: allowed {list(allowed)}")


def number(key: str, value, low: float | None = None, above: bool = False, optional: bool = False) -> None:
    """``value`` is a finite number, at least ``low`` (greater than it with ``above``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number")
    if low is not None and (value <= low if above else value < low):
        raise ConfigError(f"{key}={value!r} must be {'>' if above else '>='} {low:g}")


def world_size() -> int:
    """Data-parallel ranks of this run: the process group's, else the launcher's WORLD_SIZE."""
    return dist.world_size() if dist.is_initialized() else max(1, int(os.environ.get("WORLD_SIZE", "1")))
