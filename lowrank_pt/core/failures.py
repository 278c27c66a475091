"""The one error handler of every command (``lowrank-pt ...`` and ``python -m lowrank_pt.train``).

An expected failure is one line on stderr, ``error: <what, naming the file or key, and what to
do>``, and an exit code: 2 for a config or data problem (``ConfigError``, ``DataError``: found
before any work starts, nothing written), 3 for what fails while the run works
(``CheckpointError``, ``TrainingError``, an ``OSError`` such as a full disk, out of memory, a
collective that failed because another rank died or hung). ``--debug`` (or
``LOWRANK_PT_DEBUG=1``) prints the traceback too. Any other exception is a bug: it propagates
with its traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import traceback

import torch
import torch.distributed as td

from lowrank_pt.core import dist
from lowrank_pt.core.errors import EXIT_CONFIG, EXIT_RUNTIME, CheckpointError, ConfigError, DataError, TrainingError

_WRITER_FAILURES = ("inline_container.cc", "PytorchStreamWriter failed", "file write failed")
"""How torch.save reports a write that did not complete (no errno): on a full disk it says
``[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598``."""


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a file write that ran out of space (ENOSPC / EDQUOT) or torch's writer
    failing the way it does on a full disk."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _WRITER_FAILURES)


def free_space(path: str) -> str:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent), for messages."""
    path = os.path.abspath(path or ".")
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown space"
    return f"{free / 2**20:.1f} MiB free"


def disk_full_message(exc: BaseException, where: str | None) -> str:
    where = where or getattr(exc, "filename", None) or "a file"
    return (f"the disk is full: writing {where} failed ({str(exc).splitlines()[0] if str(exc) else exc!r}; "
            f"{free_space(str(where))} there). Free space (or lower train.keep_last) and run the same "
            f"command again: resume=auto continues from the last complete checkpoint")


_COLLECTIVE_FAILURES = ("gloo/transport", "Connection reset by peer", "Connection closed by peer",
                        "Timed out waiting", "Application timeout caused pair closure",
                        "Watchdog caught collective operation timeout", "NCCL communicator was aborted")
"""How torch reports a collective that a dead or hung peer broke: gloo raises a plain RuntimeError
(``[.../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:18351: Connection reset by peer``
at once when the peer's process is gone, ``Timed out waiting 20000ms for recv operation to
complete`` at the group's timeout when it hangs); the store and NCCL raise ``DistError`` kinds."""


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective (or the rendezvous store) failing because of another rank."""
    if isinstance(exc, getattr(td, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _COLLECTIVE_FAILURES)


def collective_failure_message(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if text.startswith("[") and "] " in text:  # gloo's source location
        text = text.split("] ", 1)[1]
    text = text.split(". This is typically", 1)[0]
    return (f"a collective operation failed ({text}): another rank died, hung or lost its connection, "
            "so every rank stops (the other ranks' logs say why the first one went). Once every rank can "
            "run again, run the same command: resume=auto continues from the last complete checkpoint. "
            "If a rank was only busy alone for longer than engine.collective_timeout_s (preparing data, "
            "a slow save), raise it")


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def describe(exc: BaseException) -> tuple[str, int] | None:
    """``(message, exit code)`` of an expected failure; None for a bug (keep the traceback)."""
    first = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (ConfigError, DataError)):
        return first, EXIT_CONFIG
    if isinstance(exc, (CheckpointError, TrainingError)):
        return first, EXIT_RUNTIME
    if is_collective_failure(exc):
        return collective_failure_message(exc), EXIT_RUNTIME
    if is_write_failure(exc):
        return disk_full_message(exc, getattr(exc, "filename", None)), EXIT_RUNTIME
    if _is_out_of_memory(exc):
        return (f"out of memory ({first.splitlines()[0]}): lower train.micro_batch_size (raise "
                "train.grad_accum to keep the batch), use a higher engine.zero_stage, "
                "model.activation_checkpointing=true, or engine.offload_optimizer=true"), EXIT_RUNTIME
    if isinstance(exc, OSError):
        name = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return (f"{exc.strerror or first}{name} (check the path, its permissions and free space)",
                EXIT_RUNTIME)
    return None


def report(exc: BaseException, debug: bool = False) -> int:
    """Print an expected failure as one line (and its traceback with ``debug``); returns its exit
    code. Re-raises a bug."""
    described = describe(exc)
    if described is None:
        raise exc
    message, code = described
    if debug:
        traceback.print_exception(exc)
    prefix = "error"
    try:
        if dist.is_initialized() and dist.world_size() > 1:
            prefix = f"error (rank {dist.rank()})"
    except Exception:  # noqa: BLE001 - the message matters more than the rank
        pass
    print(f"{prefix}: {' '.join(message.split())}", file=sys.stderr, flush=True)
    if is_collective_failure(exc):
        # The group is broken: the interpreter's cleanup (DeepSpeed's and torch's process-group
        # teardown) could wait for the dead or hung peer.
        sys.stdout.flush()
        os._exit(code)
    return code


def run_guarded(fn, *args, debug: bool = False) -> int:
    """``fn(*args)`` under the one error handler: its return value, or an expected failure's
    exit code after its message."""
    try:
        return int(fn(*args) or 0)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - report() re-raises what is not expected
        return report(exc, debug)


def debug_from_env() -> bool:
    return os.environ.get("LOWRANK_PT_DEBUG", "") not in ("", "0")
