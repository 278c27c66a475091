"""Sharded merges at ZeRO-3 on 2 ranks: a ReLoRA restart and a GaLore subspace install never
gather a whole frozen base on any rank (zero_io.full_param and GatheredParameters are never
asked for one), and each rank's shard afterwards is its slice of ``W0 + s·B·A`` (GaLore:
``d·W0 + α·B·Q``) computed here from the full values read before the merge.

One spawn of 2 ranks serves both methods; the merges' effect on logits and masters is checked
by tests/zero/test_relora.py and tests/zero/test_galore_zero.py at every stage.
"""

from __future__ import annotations

import contextlib

import deepspeed
import torch
from fixtures import RELORA_VOCAB, make_relora, odd_model, random_batches, spawn, tiny_engine

from lowrank_pt.model.lowrank_linear import lowrank_modules
from lowrank_pt.zero import state as zero_io

# fp32 throughout: the shard holds exactly what an fp32 merge computes, up to the matmul's
# row blocking (the rows a rank forms are a sub-block of the whole product); the measured
# error was not recorded, the bound is fp32 rounding at these magnitudes.
SHARD_TOL = 1e-6


def _slice(full: torch.Tensor, p) -> torch.Tensor:
    part = p.ds_tensor.ds_numel
    lo = torch.distributed.get_rank() * part
    return full.reshape(-1)[lo : lo + part]


@contextlib.contextmanager
def whole_reads_of(bases: set[int]):
    """Record every full_param / GatheredParameters call that would materialise a base."""
    seen: list[str] = []
    real_full, real_gathered = zero_io.full_param, deepspeed.zero.GatheredParameters

    def full_param(engine, p):
        if id(p) in bases:
            seen.append("full_param")
        return real_full(engine, p)

    def gathered(params, *args, **kwargs):
        if any(id(q) in bases for q in (params if isinstance(params, (list, tuple)) else [params])):
            seen.append("GatheredParameters")
        return real_gathered(params, *args, **kwargs)

    zero_io.full_param, deepspeed.zero.GatheredParameters = full_param, gathered
    try:
        yield seen
    finally:
        zero_io.full_param, deepspeed.zero.GatheredParameters = real_full, real_gathered


def _check(engine, pairs, merge, watch=None) -> dict:
    """``pairs``: (frozen base, function giving its expected merge from full values read now);
    runs ``merge`` with whole reads of the bases recorded (during ``watch``'s call, if given)."""
    expected = [(w, want()) for w, want in pairs]
    bases = {id(w) for w, _ in pairs}
    seen: list[str] = []
    if watch is None:
        with whole_reads_of(bases) as seen:
            merge()
    else:
        obj, name = watch
        real = getattr(obj, name)

        def watched(*args, **kwargs):
            with whole_reads_of(bases) as got:
                out = real(*args, **kwargs)
            seen.extend(got)
            return out

        setattr(obj, name, watched)
        try:
            merge()
        finally:
            delattr(obj, name)  # the bound method comes back
    errors = [(w.ds_tensor.float()[: _slice(e, w).numel()] - _slice(e, w)).abs().max().item()
              for w, e in expected]
    return {"whole_reads": seen, "shard_error": max(errors), "checked": len(errors)}


def _relora(rank) -> dict:
    engine, method = tiny_engine(3, "fp32", method=make_relora(reset_mode="zero"), model=odd_model(),
                                 vocab_size=RELORA_VOCAB)
    for step, batch in enumerate(random_batches(2, vocab_size=RELORA_VOCAB, rank=rank)):
        method.train_step(engine, [batch], step)
    pairs = []
    for _, m in lowrank_modules(engine.module):
        def want(m=m):
            w0 = zero_io.full_param(engine, m.weight)
            return w0 + m.scale * (zero_io.full_param(engine, m.lora_B) @ zero_io.full_param(engine, m.lora_A))
        pairs.append((m.weight, want))
    return _check(engine, pairs, lambda: method.after_step(engine, 1))


def _galore(rank, world) -> dict:
    from fixtures import GAP, build_galore, run_galore, step_batches

    engine, method = build_galore(3, world=world)
    run_galore(engine, method, GAP, rank, world)  # step 0 installs the first basis; B trains after it
    pairs = []
    for a in method.adapters.values():
        def want(a=a):
            w0, b = zero_io.full_param(engine, a.weight), zero_io.full_param(engine, a.galore_b)
            q = zero_io.full_param(engine, a.galore_basis)
            return a.merged(w0, b, q, a.galore_decay.cpu())
        pairs.append((a.weight, want))
    # The refresh (merge, new basis, B reset) runs inside step GAP, before the optimizer moves B.
    return _check(engine, pairs, lambda: method.train_step(engine, step_batches(GAP, rank, world), GAP),
                  watch=(method, "before_optimizer_step"))


def _both(rank, world):
    return {"relora": _relora(rank), "galore": _galore(rank, world)}


def test_zero3_merges_write_own_shards_only():
    results = spawn(_both, 2)
    for r in results:
        for name, out in r.items():
            assert out["checked"] > 0, name
            assert out["whole_reads"] == [], (name, out["whole_reads"])
            assert out["shard_error"] <= SHARD_TOL, (name, out["shard_error"])
