"""Process-group setup, and the one door every collective of lowrank_pt goes through.

Setup: ``init`` joins the group of ``torchrun``, the ``deepspeed`` launcher or a lone process
(a world of one on localhost), checks the DeepSpeed version and keeps repeated warnings quiet.

Collectives: no module of lowrank_pt calls a ``torch.distributed`` collective itself
(tests/zero/test_collectives.py checks the source and intercepts every call at run time); each
calls a helper here, which places its tensors on the process group's device.

Why: **NCCL takes CUDA tensors only.** With the ``nccl`` backend, ``init``'s choice whenever
CUDA is present, a collective on a CPU tensor raises ``No backend type associated with device
type cpu``. A scalar made with ``torch.tensor(x)`` is a CPU tensor, so a loss average that
works on every CPU test kills a multi-GPU run at its first logged step. Under gloo the
opposite holds for several ops (``reduce`` and ``gather`` of CUDA tensors are not implemented).

Design chosen: **device-placed tensors.** ``device()`` is the device the group's backend
takes (``cuda:LOCAL_RANK`` under NCCL, the CPU under gloo); every helper moves the caller's
tensor there when it lives elsewhere, runs the collective, and copies the result back into the
caller's tensor, so each helper works in place on a tensor of any device and a caller never
needs to know the backend.

The alternative, a mixed ``"cpu:gloo,cuda:nccl"`` group that routes each tensor by its device,
was not taken:
- the tensors that matter are already on the GPU (GaLore's captured gradients and bases, the
  ZeRO partitions): through a gloo route they would be copied to the host and sent over TCP
  instead of NVLink/InfiniBand. Here they stay where they are; only host-side scalars (a loss,
  a batch count) take a copy of a few bytes, next to the ``.item()`` sync the caller pays anyway;
- a second backend in every group means a second set of connections that must work between
  every pair of nodes (gloo's TCP sockets, ``GLOO_SOCKET_IFNAME`` on multi-homed cluster nodes),
  a failure mode a NCCL-only job does not have;
- DeepSpeed 0.19.8 creates the group from one backend name (``init_distributed(dist_backend=)``)
  and its sub-groups with the default backend: a mixed string is untested there, and this
  workplace has no two GPUs to test it on. One backend is what DeepSpeed itself runs on.

The ``*_object`` helpers pickle (keep them off hot paths); under NCCL they use the current CUDA
device, which ``init`` sets to ``LOCAL_RANK``.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import os
import re
import socket
import sys
import warnings

import torch
import torch.distributed as _td

SUPPORTED_DEEPSPEED = ((0, 19, 8), (0, 20, 0))
"""DeepSpeed versions lowrank_pt is tested with: at least the first, below the second
(pyproject.toml pins the same range). lowrank_pt/zero reads 0.19.8's ZeRO internals, and older
DeepSpeed casts buffers to bf16 (GaLore's fp32 projectors, the LoRA scales)."""
ALLOW_UNTESTED_ENV = "LOWRANK_PT_ALLOW_UNTESTED_DEEPSPEED"

# torch marks collectives deprecated that DeepSpeed's ZeRO calls once per gather / reduce-scatter:
# one warning per call, per rank, thousands per run. They say nothing a user can act on.
_DEEPSPEED_DEPRECATIONS = (".*all_gather_into_tensor.*", ".*reduce_scatter_tensor.*")


# --- setup ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _release(version: str) -> tuple[int, int, int]:
    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not m:
        raise ValueError(f"unreadable DeepSpeed version {version!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _installed_deepspeed() -> str:
    return importlib.metadata.version("deepspeed")


def check_deepspeed(version: str | None = None) -> str:
    """Refuse a DeepSpeed outside ``SUPPORTED_DEEPSPEED`` (``version`` defaults to the installed
    one); ``LOWRANK_PT_ALLOW_UNTESTED_DEEPSPEED=1`` turns the refusal into a warning."""
    version = _installed_deepspeed() if version is None else version
    low, high = SUPPORTED_DEEPSPEED
    try:
        ok = low <= _release(version) < high
    except ValueError:
        ok = False
    if ok:
        return version
    supported = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high[:2]))}"
    message = (f"deepspeed {version} is installed, but lowrank_pt is tested with deepspeed{supported} "
               f"only: it relies on that version's ZeRO internals (lowrank_pt/zero/), and other "
               f"versions can fail or silently train wrong (e.g. fp32 projectors cast to bf16). "
               f"Install a tested one (pip install 'deepspeed{supported}'), or set "
               f"{ALLOW_UNTESTED_ENV}=1 to run anyway.")
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(message + f" ({ALLOW_UNTESTED_ENV}=1: running anyway)", RuntimeWarning, stacklevel=2)
        return version
    raise RuntimeError(message)


_shown: set = set()
_previous_showwarning = None


def _show_once(message, category, filename, lineno, file=None, line=None):
    key = (category, str(message))
    if key in _shown:
        return
    _shown.add(key)
    _previous_showwarning(message, category, filename, lineno, file, line)


def quiet_warnings() -> None:
    """Every warning at most once per process, DeepSpeed's deprecated-collective ones never.

    Python's own ``once``/``default`` actions cannot do this: they remember what was shown in a
    per-module registry that is cleared whenever any code touches the warning filters (every
    ``catch_warnings`` block does, and some run inside every ZeRO-3 training step), so a warning
    raised per step printed again at every step. Instead the display hook drops a warning
    whose category and text it has shown before; the first occurrence of every warning still
    prints, and the filters (Python's defaults, the user's, other libraries') decide as before
    what is shown at all. A user's own ``-W`` / ``PYTHONWARNINGS`` wins: then only the two
    DeepSpeed filters are added."""
    global _previous_showwarning
    for pattern in _DEEPSPEED_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    if not sys.warnoptions and warnings.showwarning is not _show_once:
        _previous_showwarning = warnings.showwarning
        warnings.showwarning = _show_once


def init(backend: str | None = None, timeout_s: float | None = None) -> None:
    """Join (or create) the process group. A lone process gets a world of one on localhost.

    ``timeout_s`` (``engine.collective_timeout_s``; None: DeepSpeed's default, 10 minutes) bounds
    every collective of the group and the wait for the others at start-up: under gloo a
    collective whose peer died fails at once (connection closed) and one whose peer hangs fails
    at the timeout, each raising in the survivors (``failures.describe`` turns that into one
    message, exit 3); under NCCL torch's watchdog ends the process at the timeout."""
    check_deepspeed()
    quiet_warnings()
    if _td.is_available() and _td.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce op (30-50 s) on first use;
        # gloo alone is enough for the CPU runs this path serves.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if torch.cuda.is_available():
        # Before the group exists: NCCL binds its communicator to the current device.
        torch.cuda.set_device(local_rank())
    import deepspeed  # after the JIT patch above; core imports no DeepSpeed at module level

    if timeout_s is None:
        deepspeed.init_distributed(dist_backend=backend)
    else:
        timeout = datetime.timedelta(seconds=float(timeout_s))
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        # The groups created later without a timeout (DeepSpeed's data-parallel clone of the world
        # group, which carries the gradient all-reduce) take torch's default instead, 30 minutes
        # under gloo: a hung rank then held the survivor that long. They take the world's.
        c10d = importlib.import_module("torch.distributed.distributed_c10d")
        c10d.default_pg_timeout = timeout
        if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
            c10d.default_pg_nccl_timeout = timeout


def is_initialized() -> bool:
    return _td.is_available() and _td.is_initialized()


def rank() -> int:
    return _td.get_rank() if is_initialized() else 0


def world_size() -> int:
    return _td.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def backend() -> str | None:
    """The default group's backend ("nccl", "gloo", ...); None before ``init``."""
    return str(_td.get_backend()) if is_initialized() else None


def device() -> torch.device:
    """The device whose tensors the group's collectives take: ``cuda:LOCAL_RANK`` under NCCL,
    the CPU under gloo (and under a mixed ``cpu:...`` group). Before ``init``: what ``init``
    would pick (CUDA when present)."""
    name = backend()
    if name is None:
        use_cuda = torch.cuda.is_available()
    else:
        use_cuda = name == "nccl"
    return torch.device("cuda", local_rank()) if use_cuda else torch.device("cpu")


def memory_bytes_per_rank() -> int:
    """Memory one rank may plan for: its GPU's total memory, or on the CPU the host's physical
    memory shared by the ranks on it (LOCAL_WORLD_SIZE). Not a collective (see
    ``min_over_ranks`` for one value every rank agrees on)."""
    where = device()
    if where.type == "cuda":
        return int(torch.cuda.get_device_properties(where).total_memory)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


# --- tensor collectives: in place on the caller's tensor, whatever its device ----------------------


def _staged(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the group can take it, else a contiguous copy on ``device()``."""
    dev = device()
    if t.device == dev and t.is_contiguous():
        return t
    return t.detach().to(dev, copy=True).contiguous()


def _unstage(t: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    if work is not t:
        t.copy_(work)
    return t


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """``t`` reduced over all ranks with ``op`` (default sum), in place on every rank."""
    if not is_initialized():
        return t
    work = _staged(t)
    _td.all_reduce(work, op=_td.ReduceOp.SUM if op is None else op)
    return _unstage(t, work)


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all ranks, in place on every rank."""
    return all_reduce_(t)


def reduce_sum_(t: torch.Tensor, dst: int) -> torch.Tensor:
    """``t`` summed over all ranks into ``t`` on rank ``dst``; elsewhere ``t`` is left unspecified
    (as torch's ``reduce``: a rank other than ``dst`` must not read it afterwards)."""
    if not is_initialized():
        return t
    work = _staged(t)
    _td.reduce(work, dst=dst, op=_td.ReduceOp.SUM)
    if rank() == dst:
        _unstage(t, work)
    return t


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    """``t`` of rank ``src`` copied into ``t`` on every rank."""
    if not is_initialized():
        return t
    work = _staged(t)
    _td.broadcast(work, src=src)
    return _unstage(t, work)


# --- scalars -----------------------------------------------------------------------------------


def _reduced_scalar(value, dtype: torch.dtype, op):
    """``value`` reduced over all ranks with ``op``, through a one-element tensor on the group's device."""
    t = torch.tensor([value], dtype=dtype, device=device())
    _td.all_reduce(t, op=op)
    return t.item()


def all_reduce_mean(value: float) -> float:
    """The mean of ``value`` over all ranks (float64 on the group's device)."""
    if not is_initialized():
        return value
    return float(_reduced_scalar(value, torch.float64, _td.ReduceOp.SUM)) / world_size()


def all_reduce_sum(value: float) -> float:
    """The sum of ``value`` over all ranks."""
    if not is_initialized():
        return value
    return float(_reduced_scalar(value, torch.float64, _td.ReduceOp.SUM))


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` over all ranks (e.g. a batch count every rank must agree on)."""
    if not is_initialized():
        return int(value)
    return int(_reduced_scalar(int(value), torch.int64, _td.ReduceOp.MIN))


def max_over_ranks(value: int) -> int:
    """The largest ``value`` over all ranks."""
    if not is_initialized():
        return int(value)
    return int(_reduced_scalar(int(value), torch.int64, _td.ReduceOp.MAX))


# --- synchronisation and Python objects --------------------------------------------------------


def barrier(timeout: float | datetime.timedelta | None = None) -> None:
    """Wait until every rank arrives. With ``timeout`` (seconds or a timedelta), fail once it
    passes instead of waiting for the group's own timeout: under gloo ``monitored_barrier``
    raises naming the ranks that did not arrive; under NCCL the wait for a one-element
    all-reduce raises (and NCCL may abort the communicator: the job cannot go on either way)."""
    if not is_initialized():
        return
    if timeout is not None and not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    cuda = device().type == "cuda"
    if timeout is None:
        # device_ids: NCCL's barrier otherwise guesses the device from the rank.
        _td.barrier(device_ids=[device().index]) if cuda else _td.barrier()
        return
    if backend() == "gloo":
        _td.monitored_barrier(timeout=timeout)
        return
    work = _td.all_reduce(torch.zeros(1, device=device()), async_op=True)
    if work.wait(timeout=timeout) is False:
        raise TimeoutError(f"barrier: not every rank arrived within {timeout}")


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    _td.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    _td.broadcast_object_list(box, src=src)
    return box[0]
