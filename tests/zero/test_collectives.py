"""Every collective lowrank_pt issues goes through lowrank_pt/core/dist.py, on the group's device.

NCCL takes CUDA tensors only, and this workplace has no two GPUs: multi-GPU correctness holds
by construction (one module owns the device of every collective), and these CPU tests prove
the construction. Three checks:

- static: no module of lowrank_pt but dist.py names a ``torch.distributed`` (or
  ``deepspeed.comm``) collective, whatever the import spelling;
- the helpers: each works in place on the caller's tensor (any layout), on 2 gloo ranks, and
  ``device()`` follows the backend (cuda:LOCAL_RANK under NCCL);
- at run time: on 2 gloo ranks, every ``torch.distributed`` collective is intercepted while a
  GaLore engine at ZeRO-3 refreshes its subspaces, a tracker starts and finishes, a checkpoint
  is saved and an evaluation-style mean is taken. Each call is attributed to the nearest frame
  outside torch: DeepSpeed's own calls are DeepSpeed's business; a call from lowrank_pt must
  come from dist.py, with every tensor on ``dist.device()``.

tests/gpu/test_gpu.py runs the helpers under a real (one-rank) NCCL group where a GPU exists.
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import sys
from collections import Counter

import pytest
import torch
from fixtures import ROOT, random_batches, spawn, tiny_engine

PACKAGE = os.path.join(ROOT, "lowrank_pt")
DOOR = os.path.join(PACKAGE, "core", "dist.py")

COLLECTIVES = frozenset({
    "all_reduce", "all_reduce_coalesced", "all_reduce_multigpu", "reduce", "reduce_multigpu",
    "broadcast", "broadcast_multigpu", "all_gather", "all_gather_multigpu", "all_gather_into_tensor",
    "all_gather_coalesced", "all_gather_base", "_all_gather_base", "all_gather_object", "gather",
    "gather_object", "scatter", "scatter_object_list", "reduce_scatter", "reduce_scatter_tensor",
    "reduce_scatter_multigpu", "reduce_scatter_base", "_reduce_scatter_base", "reduce_scatter_fn",
    "all_to_all", "all_to_all_single", "barrier", "monitored_barrier", "broadcast_object_list",
    "send", "recv", "isend", "irecv", "batch_isend_irecv", "send_object_list", "recv_object_list",
    "inference_all_reduce",
})
DIST_MODULES = ("torch.distributed", "torch.distributed.distributed_c10d", "deepspeed.comm")


# --- static ----------------------------------------------------------------------------------------


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def direct_collectives(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, expression) of every reference to a torch.distributed / deepspeed.comm collective
    in ``source``: ``torch.distributed.all_reduce``, ``X.broadcast`` where ``X`` is bound to one
    of those modules by any import form, and names imported from them directly."""
    tree = ast.parse(source, filename)
    modules = set(DIST_MODULES)  # dotted names that denote a collective-bearing module
    functions = set()  # bare names bound to a collective
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in DIST_MODULES and alias.asname:
                    modules.add(alias.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in DIST_MODULES:
                    modules.add(alias.asname or alias.name)
                elif node.module in DIST_MODULES and alias.name in COLLECTIVES:
                    functions.add(alias.asname or alias.name)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and _dotted(node.value) in modules:
            found.append((node.lineno, _dotted(node)))
        elif isinstance(node, ast.Name) and node.id in functions and isinstance(node.ctx, ast.Load):
            found.append((node.lineno, node.id))
    return sorted(found)


def test_the_static_check_sees_every_import_spelling():
    bad = """
import torch
import torch.distributed as td
from torch import distributed
from torch.distributed import all_gather_object as gather_all
from deepspeed import comm
torch.distributed.all_reduce(t)
td.broadcast(t, src=0)
distributed.barrier()
gather_all(out, obj)
comm.reduce_scatter_tensor(a, b)
f = torch.distributed.distributed_c10d.reduce
"""
    assert [line for line, _ in direct_collectives(bad)] == [7, 8, 9, 10, 11, 12]
    good = """
import torch.distributed as td
from lowrank_pt.core import dist
dist.all_reduce_mean(1.0)
dist.barrier()
dist.broadcast_(t, src=0)
td.get_rank()
td.is_initialized()
"""
    assert direct_collectives(good) == []


def test_no_module_but_dist_calls_collectives_directly():
    found = []
    for path in sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)):
        if os.path.samefile(path, DOOR):
            continue
        with open(path) as f:
            source = f.read()
        rel = os.path.relpath(path, ROOT)
        found += [f"{rel}:{line}: {expr}" for line, expr in direct_collectives(source, rel)]
    assert not found, ("collectives called outside lowrank_pt/core/dist.py (use its helpers, which put "
                       "tensors on the group's device):\n" + "\n".join(found))


# --- the helpers on 2 gloo ranks -------------------------------------------------------------------


def _helpers(rank, world):
    from lowrank_pt.core import dist

    out = {"device": str(dist.device()), "backend": dist.backend()}
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * rank
    t = base.clone()
    assert dist.all_reduce_sum_(t) is t
    out["sum"] = t.tolist()
    view = base.clone().t()  # not contiguous: the helper works on a copy and writes it back
    dist.all_reduce_sum_(view)
    out["sum_view"] = view.tolist()
    t = base.clone()
    dist.reduce_sum_(t, dst=1)
    out["reduce"] = t.tolist()
    t = base.clone()
    dist.broadcast_(t, src=1)
    out["broadcast"] = t.tolist()
    out["mean"] = dist.all_reduce_mean(float(rank + 1))
    out["sum_scalar"] = dist.all_reduce_sum(float(rank + 1))
    out["min"] = dist.min_over_ranks(5 + rank)
    out["max"] = dist.max_over_ranks(5 + rank)
    out["objects"] = dist.all_gather_object({"rank": rank})
    out["object"] = dist.broadcast_object(f"from {rank}", src=1)
    dist.barrier()
    dist.barrier(timeout=60)
    return out


def test_helpers_work_in_place_on_two_ranks():
    r0, r1 = spawn(_helpers, 2)
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    total = (2 * a + 10).tolist()
    for r in (r0, r1):
        assert r["device"] == "cpu" and r["backend"] == "gloo"
        assert r["sum"] == total
        assert r["sum_view"] == (2 * a + 10).t().tolist()
        assert r["broadcast"] == (a + 10).tolist()
        assert r["mean"] == 1.5 and r["sum_scalar"] == 3.0
        assert r["min"] == 5 and r["max"] == 6
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]
        assert r["object"] == "from 1"
    assert r1["reduce"] == total


def test_helpers_without_a_group_are_identities():
    from lowrank_pt.core import dist

    t = torch.ones(3)
    assert dist.all_reduce_sum_(t) is t and t.tolist() == [1.0, 1.0, 1.0]
    assert dist.all_reduce_mean(2.5) == 2.5 and dist.min_over_ranks(4) == 4
    assert dist.all_gather_object("x") == ["x"] and dist.broadcast_object("y") == "y"
    dist.barrier(timeout=1)


def test_device_follows_the_backend(monkeypatch):
    from lowrank_pt.core import dist

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(dist, "backend", lambda: "nccl")
    assert dist.device() == torch.device("cuda", 3)
    for name in ("gloo", "cpu:gloo,cuda:nccl"):
        monkeypatch.setattr(dist, "backend", lambda name=name: name)
        assert dist.device() == torch.device("cpu")


# --- every collective intercepted at run time ---------------------------------------------------


class Interceptor:
    """Wraps torch.distributed's collectives (both the public names and the module globals
    that torch's own object collectives call) and records, per call: the op, the devices of
    its tensor arguments, and its origin: the nearest frame outside torch and outside this
    wrapper, as a path relative to the repo ('lowrank_pt/core/dist.py', 'deepspeed/...', ...)."""

    def __init__(self):
        import torch.distributed as td
        import torch.distributed.distributed_c10d as c10d

        self.records: list[tuple[str, tuple[str, ...], str]] = []
        self._codes = set()
        torch_dir = os.path.dirname(torch.__file__) + os.sep
        self._skip = (torch_dir,)
        for name in sorted(COLLECTIVES):
            original = getattr(c10d, name, None)
            if not callable(original):
                continue
            wrapper = self._wrap(name, original)
            self._codes.add(wrapper.__code__)
            setattr(c10d, name, wrapper)
            if getattr(td, name, None) is original:
                setattr(td, name, wrapper)

    def _wrap(self, name, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            self.records.append((name, _devices(args, kwargs), self._origin(sys._getframe(1))))
            return original(*args, **kwargs)

        return wrapper

    def _origin(self, frame) -> str:
        while frame is not None:
            path = frame.f_code.co_filename
            if frame.f_code in self._codes or path.startswith(self._skip):
                frame = frame.f_back
                continue
            if "deepspeed" + os.sep in path:
                return "deepspeed/" + path.split("deepspeed" + os.sep, 1)[1]
            return os.path.relpath(path, ROOT)
        return "<none>"


def _devices(args, kwargs) -> tuple[str, ...]:
    out = []
    for value in [*args, *kwargs.values()]:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, torch.Tensor):
                out.append(str(item.device))
    return tuple(out)


def _intercepted_run(rank, world, run_dir):
    from lowrank_pt.checkpoint import store as checkpoint
    from lowrank_pt.config.recipe import OptimizerConfig, ScheduleConfig, StageConfig
    from lowrank_pt.core import dist
    from lowrank_pt.methods.galore.method import GaLore, GaLoreOptions
    from lowrank_pt.model.llama import ModelConfig, resolve
    from lowrank_pt.tracking import flops
    from lowrank_pt.tracking.stage import StageTracker

    flops.device_peak = lambda precision, cache_dir: (1e12, "test")  # no CPU matmul benchmark
    spy = Interceptor()
    stage = StageConfig(name="galore", method="galore", steps=100,
                        options={"rank": 4, "update_proj_gap": 1},
                        optimizer=OptimizerConfig(lr=1e-2), schedule=ScheduleConfig(kind="constant"))
    method = GaLore(GaLoreOptions(rank=4, update_proj_gap=1), stage, None)
    engine, method = tiny_engine(3, "fp32", method=method, micro_batch_size=1, grad_accum=2)
    assert engine.zero_optimization_stage() == 3
    tracker = StageTracker(engine=engine, stage=stage, index=0,
                           model_cfg=resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=64),
                           tokens_per_step=2 * 16 * world, precision="fp32", zero_stage=3, cache_dir=run_dir)
    losses = []
    for step in range(2):  # a refresh at both steps
        tracker.start_step()
        losses.append(method.train_step(engine, random_batches(2, micro_batch_size=1, seed=step, rank=rank), step))
        tracker.end_step()
    assert method.refreshes == 2
    eval_loss = dist.all_reduce_mean(sum(losses) / len(losses))  # what evaluate() logs
    batches = dist.min_over_ranks(3 + rank)
    tracker.finish(end_step=2, total_steps=100)
    checkpoint.save(engine, run_dir, 2, {"stage_index": 0}, {"trainer": {}}, keep_last=1)
    own = len(spy.records)

    # The interceptor's own check: a collective called from a lowrank_pt module other than
    # dist.py (code compiled under such a file name) is seen as exactly that.
    import torch.distributed as td

    exec(compile("td.all_reduce(torch.zeros(1))", os.path.join(PACKAGE, "not_dist.py"), "exec"),
         {"td": td, "torch": torch})
    return {"records": spy.records[:own], "planted": spy.records[own:], "device": str(dist.device()),
            "eval_loss": eval_loss, "batches": batches}


def test_every_collective_from_lowrank_pt_goes_through_dist(tmp_path):
    results = spawn(_intercepted_run, 2, str(tmp_path / "run"))
    for rank, r in enumerate(results):
        assert r["planted"] == [("all_reduce", ("cpu",), "lowrank_pt/not_dist.py")], r["planted"]
        ours = [rec for rec in r["records"] if rec[2].startswith("lowrank_pt/")]
        stray = Counter(f"{op} from {origin}" for op, _, origin in ours if origin != "lowrank_pt/core/dist.py")
        assert not stray, f"rank {rank}: collectives called outside lowrank_pt/core/dist.py (calls): {dict(stray)}"
        misplaced = Counter(f"{op} on {devices}" for op, devices, _ in ours if any(d != r["device"] for d in devices))
        assert not misplaced, f"rank {rank}: tensors off the group's device {r['device']}: {dict(misplaced)}"
        others = {rec[2] for rec in r["records"]} - {"lowrank_pt/core/dist.py"}
        assert all(o.startswith("deepspeed/") for o in others), others
        ops = {rec[0] for rec in ours}
        # GradientCapture's reduce, the refresh's broadcasts, the mean and min, the tracker's
        # object collectives, the checkpoint's barriers: every kind the run issues.
        assert {"reduce", "broadcast", "all_reduce", "broadcast_object_list", "all_gather_object",
                "barrier"} <= ops, ops
        assert any(o.startswith("deepspeed/") for o in others), "ZeRO-3 issued no intercepted collective?"
        assert r["batches"] == 3
    assert results[0]["eval_loss"] == results[1]["eval_loss"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
