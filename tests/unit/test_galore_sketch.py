"""GaLore's streaming refresh: seeded test matrices, sketches summed over micro-batches, the
basis and low-rank gradient solved from them, the planner's count (in-process, no DeepSpeed)."""

from __future__ import annotations

import pytest
import torch

from lowrank_pt.methods.galore import sketch
from lowrank_pt.methods.galore.capture import GradientCapture, SketchCapture
from lowrank_pt.optim import projector


def test_seeded_gaussian_depends_on_the_seed_alone_and_is_standard_normal(monkeypatch):
    a = sketch.seeded_gaussian(400, 300, seed=7)
    assert torch.equal(a, sketch.seeded_gaussian(400, 300, seed=7))
    assert not torch.equal(a, sketch.seeded_gaussian(400, 300, seed=8))
    assert abs(a.mean().item()) < 0.01 and abs(a.std().item() - 1) < 0.01
    assert abs((a.abs() < 1).float().mean().item() - 0.6827) < 0.01  # the normal's mass within 1 sigma
    gram = a.t() @ a / 400
    assert (gram - torch.eye(300)).abs().max() < 0.35  # columns nearly orthogonal: ~3/sqrt(400)
    monkeypatch.setattr(sketch, "_CHUNK", 1000)  # hashing in chunks draws the same numbers
    assert torch.equal(a, sketch.seeded_gaussian(400, 300, seed=7))


@pytest.mark.parametrize("side", ["left", "right"])
def test_sketches_of_micro_batches_sum_to_the_sketches_of_the_gradient(side):
    torch.manual_seed(0)
    m, n, r = 48, 40, 6
    basis = torch.randn(projector.basis_shape((m, n), r, side))
    omega, psi = sketch.random_matrices(basis, side, r, 4, seed=3, shape=(m, n))
    batches = [(torch.randn(10, m), torch.randn(10, n)) for _ in range(3)]
    grad = sum(dy.t() @ x for dy, x in batches)
    a = grad if side == "left" else grad.t()
    parts = [sketch.sketch(*sketch.orient(dy, x, side), omega, psi) for dy, x in batches]
    assert torch.allclose(sum(p[0] for p in parts), a @ omega, atol=1e-4)
    assert torch.allclose(sum(p[1] for p in parts), psi @ a, atol=1e-4)
    # Ψ is warm-started: its first r rows are the current basis as rows of A's row space.
    assert torch.equal(psi[:r], sketch.basis_rows(basis, side))
    assert psi.shape[0] == r + 8 and omega.shape[1] == r + 4


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_rank_r_gradient_gives_its_exact_subspace_and_projection(side):
    """For a gradient of rank <= k the one-pass estimate is exact: the basis spans the top-r
    singular subspace and ``low`` equals ``project(G, basis)``."""
    torch.manual_seed(1)
    m, n, r = 60, 36, 5
    grad = torch.randn(m, 7) @ torch.diag(torch.tensor([9.0, 7, 5, 4, 3, 0.5, 0.2])) @ torch.randn(7, n)
    dy, x = torch.eye(m), grad  # G = dyᵀ·x
    basis0 = torch.zeros(projector.basis_shape((m, n), r, side))
    omega, psi = sketch.random_matrices(basis0, side, r, 4, seed=11, shape=(m, n))
    y, w = sketch.sketch(*sketch.orient(dy, x, side), omega, psi)
    basis, low, why = sketch.basis_from_sketch(y, w, psi, r, side)
    assert why == ""
    exact, _ = projector.new_basis(grad, r, side, "exact")
    # The same subspace: the projector onto it equals the exact one's.
    rows = sketch.basis_rows(basis, side)
    want = sketch.basis_rows(exact, side)
    assert torch.allclose(rows.t() @ rows, want.t() @ want, atol=1e-4)
    assert torch.allclose(low, projector.project(grad, basis, side), atol=1e-3)
    assert torch.allclose(basis, exact, atol=1e-4)  # canonical signs: the same vectors


def test_a_noisy_gradient_keeps_most_of_the_exact_subspaces_energy():
    """A gradient whose spectrum decays only 1000x over 96 values, rank 8: with oversampling
    p = 32 the one-pass basis captures ≥ 0.95 of the exact basis's energy ‖project(G, ·)‖²
    (measured 0.99), cold or warm-started; with p = 8 it is 0.85 (one-pass sketches need more
    oversampling than subspace iteration does: ``svd_oversample``)."""
    torch.manual_seed(2)
    m, n, r = 128, 96, 8
    u, _ = torch.linalg.qr(torch.randn(m, n))
    v, _ = torch.linalg.qr(torch.randn(n, n))
    grad = u @ torch.diag(torch.logspace(0, -3, n)) @ v.t()
    side = "right"
    exact, _ = projector.new_basis(grad, r, side, "exact")
    energy = lambda b: projector.project(grad, b, side).square().sum().item()  # noqa: E731
    for start in (torch.zeros_like(exact), exact):
        omega, psi = sketch.random_matrices(start, side, r, 32, seed=5, shape=(m, n))
        y, w = sketch.sketch(*sketch.orient(torch.eye(m), grad, side), omega, psi)
        basis, _, _ = sketch.basis_from_sketch(y, w, psi, r, side)
        assert energy(basis) > 0.95 * energy(exact)


def test_degenerate_sketches_keep_the_old_subspace():
    y, w, psi = torch.zeros(10, 4), torch.zeros(6, 8), torch.randn(6, 10)
    assert sketch.basis_from_sketch(y, w, psi, 2, "left")[2] == "zero gradient"
    y[0, 0] = float("nan")
    assert sketch.basis_from_sketch(y, w, psi, 2, "left")[2] == "non-finite gradient"


def test_captures_hold_the_gradient_or_only_its_sketches():
    torch.manual_seed(3)
    m, n, r = 40, 30, 4
    dy, x = torch.randn(16, m), torch.randn(16, n)
    basis = torch.zeros(r, n)
    full, sketched = GradientCapture(), SketchCapture((m, n), "right", r, 4, seed=1)
    for capture in (full, sketched):
        capture.add_factors(dy, x, basis)
        capture.add_factors(dy, x, basis)
    assert torch.allclose(full.mean(), 2 * dy.t() @ x, atol=1e-4)
    held = sum(t.numel() for t in sketched.tensors())
    assert held == sketch.sketch_numel((m, n), r, 4, "right") == n * (r + 4) + (r + 8) * m
    basis, low, why = sketched.subspace(torch.zeros(r, n), "canonical")
    assert why == "" and basis.shape == (r, n) and low.shape == (m, r)


def test_planner_counts_sketches_and_falls_back_where_they_are_not_smaller():
    from lowrank_pt.model.llama import ModelConfig, resolve
    from lowrank_pt.tracking.planner import layout

    cfg = resolve(ModelConfig(size="tiny"), vocab_size=64)  # linears 64×64, 172×64, 64×172
    exact = layout(cfg, "galore", {"rank": 8})
    sketched = layout(cfg, "galore", {"rank": 8, "svd": "sketch"})
    assert exact.captures == [m * n for m, n in [(64, 64)] * 4 + [(172, 64), (172, 64), (64, 172)]] * 2
    k, l = 16, 24
    assert sketched.captures == [64 * k + l * 64] * 4 + [64 * k + l * 172] * 3 + [64 * k + l * 64] * 4 + \
        [64 * k + l * 172] * 3
    big = layout(cfg, "galore", {"rank": 60, "svd": "sketch"})  # sketches >= m·n: the exact refresh
    assert big.captures[:4] == [64 * 64] * 4
