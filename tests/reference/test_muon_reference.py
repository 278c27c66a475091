"""Muon against torch.optim.Muon (the installed torch's): the hidden matrices of our MuonAdamW
equal torch's Muon with the same settings bit for bit over 25 steps (its bf16 Newton–Schulz and
both update scales), the other params torch's AdamW; the update is orthonormal to Newton–Schulz's
accuracy (singular values in its published band); bad options are refused at config time."""

from __future__ import annotations

import pytest
import torch

from lowrank_pt.optim.muon import MuonAdamW, newton_schulz


@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_equals_torch_muon_and_adamw_bit_for_bit(adjust_lr, nesterov):
    torch.manual_seed(0)
    shapes = [(24, 16), (16, 40), (32, 32)]
    ours_m = [torch.nn.Parameter(torch.randn(*s) * 0.1) for s in shapes]
    ours_v = torch.nn.Parameter(torch.randn(7))
    ref_m = [torch.nn.Parameter(p.detach().clone()) for p in ours_m]
    ref_v = torch.nn.Parameter(ours_v.detach().clone())
    start = [p.detach().clone() for p in ours_m]
    ours = MuonAdamW([{"params": ours_m, "muon": True, "weight_decay": 0.1, "nesterov": nesterov,
                       "adjust_lr": adjust_lr}, {"params": [ours_v], "weight_decay": 0.0}],
                     lr=2e-2, betas=(0.9, 0.95), eps=1e-8)
    muon = torch.optim.Muon(ref_m, lr=2e-2, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr)
    adamw = torch.optim.AdamW([ref_v], lr=2e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=False)
    for _ in range(25):
        grads = [torch.randn(*s) for s in shapes]
        g = torch.randn(7)
        for p, q, gi in zip(ours_m, ref_m, grads):
            p.grad, q.grad = gi.clone(), gi.clone()
        ours_v.grad, ref_v.grad = g.clone(), g.clone()
        ours.step()
        muon.step()
        adamw.step()
    assert all(torch.equal(p, q) for p, q in zip(ours_m, ref_m))
    assert torch.equal(ours_v, ref_v)
    assert min((p.detach() - s).abs().max().item() for p, s in zip(ours_m, start)) > 1e-2  # they trained


def test_the_update_is_orthonormal_to_newton_schulz_accuracy():
    torch.manual_seed(1)
    u = torch.randn(48, 32) @ torch.diag(torch.logspace(0, -2, 32))  # ill-conditioned
    s = torch.linalg.svdvals(newton_schulz(u).float())
    assert 0.6 < s.min() and s.max() < 1.25, s  # the quintic's band (~0.7-1.2), not U·Vᵀ exactly
    exact = torch.linalg.svdvals(newton_schulz(u, steps=5, dtype=torch.float64))
    assert exact.max() / exact.min() < 2.0


def test_options_are_checked_at_config_time():
    from lowrank_pt import methods
    from lowrank_pt.core.errors import ConfigError

    assert methods.parse_options("muon", {}).adjust_lr == "match_rms_adamw"
    for bad in ({"momentum": 1.0}, {"ns_steps": 0}, {"adjust_lr": "spectral"}):
        with pytest.raises(ConfigError):
            methods.parse_options("muon", bad)


def test_int8_states_leave_the_momentum_buffers_alone_and_step_again():
    """A flat of Muon or Dion matrices has no Adam moments: low-bit states must not trip on it."""
    from lowrank_pt.optim.dion import DionAdamW

    for cls, key in ((MuonAdamW, "muon"), (DionAdamW, "dion")):
        torch.manual_seed(0)
        w, v = torch.nn.Parameter(torch.randn(16, 24)), torch.nn.Parameter(torch.randn(300))
        opt = cls([{"params": [w], key: True}, {"params": [v]}], lr=1e-2, state_dtype="int8")
        for _ in range(3):
            w.grad, v.grad = torch.randn(16, 24), torch.randn(300)
            opt.step()
        assert opt.state[v]["exp_avg_codes"].dtype == torch.uint8 and opt.state[w]["momentum"].numel() == 16 * 24
