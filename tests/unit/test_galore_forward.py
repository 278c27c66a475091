"""GaLore's forward paths (``lowrank_pt.methods.galore.cost``): each gives the call path's outputs and
gradients, each costs what the cost model says (counted by torch's FLOP counter), and the choice
is the cheapest allowed one. Training under DeepSpeed with each path: tests/zero/test_galore_zero.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lowrank_pt.methods.galore import cost
from lowrank_pt.methods.galore.adapter import GaLoreLinear

RANK, TOKENS, ACCUM = 8, 10, 2


def adapter(shape, path: str) -> GaLoreLinear:
    """A GaLore linear with a non-zero B, an orthonormal basis and a decay factor of 0.9."""
    torch.manual_seed(1)
    a = GaLoreLinear(torch.nn.Linear(shape[1], shape[0], bias=False), RANK, 0.25, "std")
    a.use_decay = True
    a.galore_decay.fill_(0.9)
    with torch.no_grad():
        a.galore_b.normal_()
        rows, cols = a.galore_basis.shape
        q = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols)))[0]
        a.galore_basis.copy_(q if rows > cols else q.t())
    a.forward_path = path
    return a


def one_step(a: GaLoreLinear):
    """ACCUM micro-batches' forward and backward inside one open step: (y, dx, dB, FLOPs)."""
    torch.manual_seed(2)
    xs = [torch.randn(2, TOKENS // 2, a.in_features, requires_grad=True) for _ in range(ACCUM)]
    a.open_step()
    with FlopCounterMode(display=False) as counter:
        for x in xs:
            y = a(x)
            (y.pow(2).sum() / 2).backward()
    kept = a.w_eff is not None
    a.close_step()
    return y.detach(), torch.cat([x.grad for x in xs]), a.galore_b.grad.clone(), counter.get_total_flops(), kept


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)], ids=["right", "left"])
def test_every_path_gives_the_call_paths_outputs_and_gradients(shape):
    want = one_step(adapter(shape, "call"))
    step = one_step(adapter(shape, "step"))
    factored = one_step(adapter(shape, "factored"))
    for got, exact in ((step, True), (factored, False)):
        for g, w in zip(got[:3], want[:3]):
            if exact:  # the same W_eff, built once instead of four times
                assert torch.equal(g, w)
            else:  # the same products in another order
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
    assert step[4] and not want[4] and not factored[4]  # only the step path keeps W_eff


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)], ids=["right", "left"])
@pytest.mark.parametrize("path", cost.PATHS)
def test_the_cost_model_counts_the_flops_torch_counts(shape, path):
    a = adapter(shape, path)
    assert one_step(a)[3] == cost.flops(path, shape, RANK, a.side, TOKENS, ACCUM)


def test_outside_a_step_the_step_path_keeps_nothing():
    a = adapter((48, 32), "step")
    with torch.no_grad():
        a(torch.randn(3, 32))
    assert a.w_eff is None  # an evaluation between steps never sees a stale W_eff


def test_the_choice_is_the_cheapest_allowed_path():
    d = 1024
    shape = (d, d)
    for tokens in (512, 2048, 8192):
        for r in (d // 8, d // 4, d // 2):
            for zero_stage in (0, 3):
                path = cost.choose(shape, r, "right", tokens, 1, zero_stage)
                best = min(cost.flops(p, shape, r, "right", tokens) for p in cost.allowed(zero_stage))
                assert cost.flops(path, shape, r, "right", tokens) == best
                assert zero_stage < 3 or path != "step"
    # Few tokens against a large matrix: never form W_eff.
    assert cost.choose((4096, 4096), 128, "right", 64, 1, 3) == "factored"
    # Many tokens and several micro-batches: build it once per step.
    assert cost.choose((4096, 4096), 1024, "right", 8192, 4, 0) == "step"


def test_the_cache_budget_and_a_forced_path():
    shapes, ranks, sides = [(1024, 1024)] * 3, [512] * 3, ["right"] * 3
    one = 1024 * 1024 * 2
    paths = cost.assign(shapes, ranks, sides, 8192, 1, 0, "auto", cache_budget=2 * one, dtype_bytes=2)
    assert paths == ["step", "step", "call"]  # the third copy does not fit
    assert cost.cache_bytes(shapes, paths, 2) == 2 * one
    assert cost.assign(shapes, ranks, sides, 8192, 1, 3, "factored") == ["factored"] * 3


def test_a_stage_chooses_its_paths_from_its_workload():
    """The method asks the cost model with its stage's tokens per micro-batch, accumulation and ZeRO
    stage, and says what it chose; the planner's step cache is those paths' W_eff copies."""
    from lowrank_pt import methods
    from lowrank_pt.config.recipe import EngineConfig, ModelConfig, RunConfig, StageConfig, TrainConfig
    from lowrank_pt.model.llama import LlamaModel, resolve
    from lowrank_pt.tracking import planner

    for zero_stage in (0, 3):
        stage = StageConfig(method="galore", steps=10, options={"rank": 16})
        run = RunConfig(model=ModelConfig(size="tiny", seq_len=64), engine=EngineConfig(zero_stage=zero_stage),
                        train=TrainConfig(micro_batch_size=4, grad_accum=2), stages=[stage])
        method = methods.build(stage, run)
        with torch.device("meta"):
            method.prepare_model(LlamaModel(resolve(run.model, vocab_size=64)))
        adapters = list(method.adapters.values())
        for a in adapters:
            assert a.forward_path == cost.choose(a.shape, a.rank, a.side, 256, 2, zero_stage, 2**30, 4)
        paths = {a.forward_path for a in adapters}
        assert ("step" in paths) == (zero_stage < 3)
        ratio = (sum(cost.flops(a.forward_path, a.shape, a.rank, a.side, 256, 2) for a in adapters)
                 / sum(cost.full_rank_flops(a.shape, 256, 2) for a in adapters))
        assert f"{ratio:.3f}x full-rank FLOPs" in method.describe()
        planned = planner.plan(resolve(run.model, vocab_size=64), "galore", {"rank": 16}, zero_stage=zero_stage,
                               micro_batch=4, seq_len=64, precision="fp32", grad_accum=2).bytes["step_cache"]
        assert planned == cost.cache_bytes([a.shape for a in adapters], [a.forward_path for a in adapters], 4)
