"""Refresh owners balanced by bytes (``lowrank_pt.core.owners``), on the 7B layout the planner builds:
pure functions, no ranks spawned. That 2 ranks still give identical results is
tests/zero/test_galore_zero.py's (its 2-rank runs refresh with these owners)."""

from __future__ import annotations

import pytest

from lowrank_pt.core.owners import balanced_owners, owned_bytes
from lowrank_pt.model.llama import ModelConfig, resolve
from lowrank_pt.tracking import planner


@pytest.fixture(scope="module")
def sizes_7b():
    """m·n of every GaLore-projected matrix of LLaMA 7B, in module order (224 matrices)."""
    cfg = resolve(ModelConfig(size="7b", seq_len=2048), vocab_size=32000)
    lay = planner.layout(cfg, "galore", {"rank": 1024})
    return lay, lay.captures


def test_owners_by_bytes_balance_a_world_of_seven(sizes_7b):
    _, sizes = sizes_7b
    assert len(sizes) == 7 * 32
    by_index = [sum(n for i, n in enumerate(sizes) if i % 7 == r) for r in range(7)]
    held = owned_bytes(sizes, 7)
    assert sum(held) == sum(sizes)
    # Owners by index put each of the 7 linears of a block on its own rank: 2.69x (measured).
    assert max(by_index) / min(by_index) > 2.5
    assert max(held) / min(held) < 1.05  # measured 1.018: within one matrix of the mean
    assert max(held) - min(held) <= max(sizes)


@pytest.mark.parametrize("world", [1, 2, 3, 8, 16])
def test_owners_are_deterministic_and_never_worse_than_one_matrix_off(sizes_7b, world):
    _, sizes = sizes_7b
    owners = balanced_owners(sizes, world)
    assert owners == balanced_owners(list(sizes), world)  # the same on every rank
    assert set(owners) == set(range(min(world, len(sizes))))
    held = owned_bytes(sizes, world)
    assert max(held) - min(held) <= max(sizes)


def test_planner_refresh_transient_follows_the_owners(sizes_7b):
    lay, sizes = sizes_7b
    per_rank = [planner.capture_bytes(lay, 7, r) for r in range(7)]
    assert per_rank == [4 * n for n in owned_bytes(sizes, 7)]
    assert max(per_rank) / min(per_rank) < 1.05


def test_owners_reject_an_empty_world():
    with pytest.raises(ValueError, match="world"):
        balanced_owners([1, 2], 0)


def test_muon_balances_its_owners_by_newton_schulz_flops():
    """Muon's owners by m·n·min(m, n), the fragment optimizer's by size: two 30×30 matrices and a thin
    1000×1 one (the largest by bytes, the cheapest to orthonormalise) on 2 ranks."""
    from lowrank_pt.optim.fragment_optimizer import FragmentOptimizer
    from lowrank_pt.optim.muon import MuonAdamW
    from lowrank_pt.zero.partition import MatrixPlan, ParamSpec, assign_owners

    def plans():
        shapes = [(1000, 1), (30, 30), (30, 30)]
        return [MatrixPlan(ParamSpec(i, 0, f"w{i}", s, True), (0, 0), ((0, 0, 1), (1, 1, 2))) for i, s in enumerate(shapes)]

    by_size, by_flops = plans(), plans()
    assign_owners(by_size, 2, lambda p: FragmentOptimizer.owner_cost(None, p))
    assign_owners(by_flops, 2, lambda p: MuonAdamW.owner_cost(None, p))
    assert [p.owner for p in by_size] == [0, 1, 1]  # 1000 bytes against 900 + 900
    assert [p.owner for p in by_flops] == [0, 0, 1]  # the squares (27000 FLOPs each) apart, the thin one (1000) beside one
