"""Dion against a dense single-matrix implementation written here from the paper's algorithm box
(Ahn et al. 2025, Algorithm 1: B = M + G; P = QR(B·Q); R = Bᵀ·P; M = B − (1 − μ)·P·Rᵀ;
Q = colnorm(R); W -= η·√max(1, m/n)·P·Qᵀ, with decoupled weight decay), its first Q drawn as ours
(a seeded normal, column-normalised): equal to rounding over 25 steps, error feedback included. At
full rank on a fixed gradient the update becomes orthonormal, as Muon's is."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_pt.optim.dion import DionAdamW


def dense_dion(w, grads, q, lr, wd, mu):
    m, n = w.shape
    momentum = torch.zeros_like(w)
    for g in grads:
        b = momentum + g
        p, _ = torch.linalg.qr(b @ q)
        r = b.t() @ p
        momentum = b - (1 - mu) * p @ r.t()
        q = r / r.norm(dim=0, keepdim=True)
        w = w * (1 - lr * wd) - lr * math.sqrt(max(1.0, m / n)) * p @ q.t()
    return w, momentum


@pytest.mark.parametrize("shape,rank", [((24, 16), 4), ((16, 40), 3)])
def test_dion_follows_the_algorithm_box(shape, rank):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*shape) * 0.1)
    start = w.detach().clone()
    grads = [torch.randn(*shape) for _ in range(25)]
    ours = DionAdamW([{"params": [w], "dion": True, "rank": rank, "weight_decay": 0.1, "seed": 7}], lr=2e-2)
    for g in grads:
        w.grad = g.clone()
        ours.step()
    q0 = torch.randn(shape[1], rank, generator=torch.Generator().manual_seed(7))
    want, momentum = dense_dion(start, grads, q0 / q0.norm(dim=0, keepdim=True), 2e-2, 0.1, 0.95)
    torch.testing.assert_close(w.detach(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.state[w]["momentum"].view(shape), momentum, rtol=0, atol=1e-5)
    assert (w.detach() - start).abs().max() > 1e-2


def test_at_full_rank_the_update_becomes_orthonormal():
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.zeros(12, 20))
    g = torch.randn(12, 20) @ torch.diag(torch.logspace(0, -1, 20))
    ours = DionAdamW([{"params": [w], "dion": True, "rank": 12, "momentum": 0.0}], lr=1.0)
    for _ in range(30):
        before = w.detach().clone()
        w.grad = g.clone()
        ours.step()
    s = torch.linalg.svdvals(before - w.detach())  # the last update, lr 1, scale 1 (m < n)
    # all equal to 1 within the rounding of a difference of two fp32 weights of size ~30 (2e-4);
    # Muon's Newton–Schulz leaves them between 0.7 and 1.2 (tests/reference/test_muon_reference.py)
    assert (s - 1).abs().max() < 1e-3, s
    assert (s - 1).abs().max() < 0.1 * (torch.linalg.svdvals(g) / torch.linalg.svdvals(g).max() - 1).abs().max()


def test_options_are_checked_at_config_time():
    from lowrank_pt import methods
    from lowrank_pt.core.errors import ConfigError

    assert methods.parse_options("dion", {}).rank_fraction == 0.25
    for bad in ({"rank": 0}, {"rank_fraction": 0.0}, {"momentum": 1.0}, {"adjust_lr": "x"}):
        with pytest.raises(ConfigError):
            methods.parse_options("dion", bad)
