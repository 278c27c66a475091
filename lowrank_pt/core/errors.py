"""The project's expected-failure types, importable from anywhere without an import circle.

``ConfigError`` is raised for a config problem found before any work starts. Data problems have
their own type, ``DataError`` (below; ``lowrank_pt.data`` re-exports it). ``CheckpointError`` is a
checkpoint that cannot be written or read once the run has started (a full disk during a save, a
file that fails to load).
``TrainingError`` is a run that cannot go on (too many non-finite steps in a row).

The CLI (``lowrank_pt.cli.main``) turns every expected failure into one line ``error: ...`` and
an exit code: ``EXIT_CONFIG`` (2) for config and data problems, found before any work starts;
``EXIT_RUNTIME`` (3) for what goes wrong while the run works (checkpoints, I/O, a full disk, out
of memory, non-finite steps, a collective that failed because a rank died or hung). Anything
else is a bug and keeps its traceback.
"""

EXIT_CONFIG = 2
"""Exit code of a config or data problem (nothing was written)."""
EXIT_RUNTIME = 3
"""Exit code of a failure while the run worked (checkpoint, I/O, disk full, out of memory)."""


class ConfigError(ValueError):
    """A config problem, reported before any work starts."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or loaded once the run works; the message names it."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. ``train.max_nonfinite_steps`` non-finite steps in a row);
    the message says what happened and what to do."""


class DataError(ValueError):
    """A data source, tokenizer or shard cannot be used; the message names the file or field.

    A subclass of ValueError so that callers validating a config catch it alongside the
    config's own ValueErrors.
    """
