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


@pytest.mark.parametrize("state_dtype", ["bf16", "int8"])
def test_low_bit_momentum_is_stored_low_bit_and_follows_fp32(state_dtype):
    """``optimizer.state_dtype`` reaches Muon's and Dion's momentum buffers (Dion's r-wide factor
    stays fp32): between steps the buffer is bf16, or int8 codes with a scale per 256-value block,
    and the weights' update stays near the fp32 run's over 20 steps (a lost or mis-decoded buffer
    would be ~1 off). Measured off by: bf16 0.0065 (Muon) / 0.0053 (Dion); int8 0.020 / 0.033."""
    from lowrank_pt.optim import lowbit
    from lowrank_pt.optim.dion import DionAdamW

    for cls, key in ((MuonAdamW, "muon"), (DionAdamW, "dion")):
        runs = {}
        for dtype in ("fp32", state_dtype):
            torch.manual_seed(0)
            w, v = torch.nn.Parameter(torch.randn(40, 24) * 0.1), torch.nn.Parameter(torch.randn(300))
            start = w.detach().clone()
            opt = cls([{"params": [w], key: True}, {"params": [v]}], lr=1e-2, state_dtype=dtype)
            for _ in range(20):
                w.grad, v.grad = torch.randn(40, 24), torch.randn(300)
                opt.step()
            runs[dtype] = (w.detach() - start, opt.state[w], opt.state[v])
        update, state, adam = runs[state_dtype]
        off = ((update - runs["fp32"][0]).norm() / runs["fp32"][0].norm()).item()
        print(f"{key} {state_dtype} momentum: update off fp32's by {off:.4f} of its norm")
        assert off < (0.01 if state_dtype == "bf16" else 0.05), (key, off)
        if state_dtype == "bf16":
            assert state["momentum"].dtype == torch.bfloat16 and state["momentum"].numel() == 40 * 24
        else:
            assert "momentum" not in state and state["momentum_codes"].dtype == torch.uint8
            assert state["momentum_codes"].numel() == lowbit.padded(40 * 24)
            assert adam["exp_avg_codes"].dtype == torch.uint8
        if key == "dion":
            assert state["q"].dtype == torch.float32
