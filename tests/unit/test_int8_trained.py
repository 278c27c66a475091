"""int8 storage of the weights an optimizer updates (``model.int8_trained``): the linear computes
with its dequantised weight and gives the dense gradient, its param holds one element, a step
re-quantises exactly what the optimizer produced with keyed stochastic rounding, and checkpoints
and exports see the codes' value."""

from __future__ import annotations

import torch
from torch import nn

from lowrank_pt.methods.base import int8_weight_draws
from lowrank_pt.model import int8_trained, int8_weights


def model(seed: int = 0, rows: int = 300, cols: int = 520) -> nn.Module:
    """A container whose ``layers.0`` is a bias-free linear (rows > ROWS_PER_DRAW, cols spanning
    three scale blocks, the last one short), as the blocks' projections are found."""
    torch.manual_seed(seed)
    m = nn.Module()
    m.layers = nn.Sequential(nn.Linear(cols, rows, bias=False))
    return m


def test_the_linear_computes_with_its_dequantised_weight_and_gives_the_dense_gradient():
    m = model()
    original = m.layers[0].weight.detach().clone()
    assert int8_trained.store(m) == 1
    lin = m.layers[0]
    w = int8_trained.value(lin)
    step = int8_weights._blocks(original).abs().amax(dim=2) / int8_weights.LEVELS
    assert (w - original).abs().max() <= step.max() / 2 + 1e-7  # rounded to nearest
    assert lin.weight.shape == original.shape and lin.weight.untyped_storage().nbytes() == 2
    x = torch.randn(2, 5, 520, requires_grad=True)
    y = lin(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    dense_x = x.detach().clone().requires_grad_(True)
    dense_w = w.clone().requires_grad_(True)
    dense = nn.functional.linear(dense_x, dense_w)
    dense.backward(dy)
    torch.testing.assert_close(y, dense, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, dense_x.grad, rtol=0, atol=0)
    torch.testing.assert_close(lin.weight.grad, dense_w.grad.to(lin.weight.grad.dtype), rtol=1e-6, atol=1e-5)
    lin.to(torch.bfloat16).to("cpu")  # what DeepSpeed does to the module: the placeholder stays one element
    assert lin.weight.dtype == torch.bfloat16 and lin.weight.untyped_storage().nbytes() == 2
    assert lin.weight.shape == original.shape


def test_a_step_stores_the_optimizers_result_stochastically_rounded_with_keyed_draws():
    m, plain = model(), nn.Linear(4, 3, bias=False)
    int8_trained.store(m)
    lin = m.layers[0]
    before = int8_trained.value(lin)
    lin.weight.grad = torch.ones(lin.weight.shape, dtype=lin.weight.dtype)  # a step 1e-5, far below a code's
    plain.weight.grad = torch.ones(3, 4)
    plain_before = plain.weight.detach().clone()
    opt = torch.optim.SGD([{"params": [lin.weight]}, {"params": [plain.weight]}], lr=1e-5)
    int8_trained.steps_through_codes(opt, int8_weight_draws)
    opt.step()
    exact = before - 1e-5 * lin.weight.grad.float()  # SGD in fp32 on the dequantised weight
    want = torch.cat([int8_weights.quantise(exact[r:r + 256], int8_weight_draws(1, 0, r))[0] for r in (0, 256)])
    assert torch.equal(lin.weight_codes, want)  # the formula, draw for draw
    assert int(lin.weight_updates) == 1
    assert lin.weight.untyped_storage().nbytes() == 2 and lin.weight.dtype == torch.bfloat16
    torch.testing.assert_close(plain.weight.detach(), plain_before - 1e-5)  # other params step as before
    # Unbiased: an update far below a code's step moves the stored weight by it on average.
    after = int8_trained.value(lin)
    moved, expected = (after - before).mean(), (exact - before).mean()
    spread = (after - before).std() / (after.numel() ** 0.5)
    assert abs(moved - expected) < 4 * spread, (moved, expected, spread)
    nearest = int8_weights.dequantise(*int8_weights.quantise(exact))
    assert abs((nearest - before).mean() - expected) > 4 * spread  # round to nearest would lose the update


def test_checkpoints_hold_the_codes_where_a_frozen_base_does_and_load_back():
    m = model(seed=1)
    int8_trained.store(m)
    lin = m.layers[0]
    lin.weight_updates.fill_(7)
    state = m.state_dict()
    assert set(state) == {"layers.0.weight", "layers.0.weight_scale", "layers.0.weight_updates"}
    assert state["layers.0.weight"].dtype == torch.int8
    plain = int8_weights.dequantised(state)
    assert set(plain) == {"layers.0.weight"} and torch.equal(plain["layers.0.weight"], int8_trained.value(lin))
    other = model(seed=2)
    int8_trained.store(other)
    other.load_state_dict(state)
    assert torch.equal(other.layers[0].weight_codes, lin.weight_codes) and int(other.layers[0].weight_updates) == 7
    bf16 = model(seed=3)
    try:
        int8_trained.store(bf16)
        bf16.load_state_dict({"layers.0.weight": torch.zeros(300, 520), "layers.0.weight_scale": state[
            "layers.0.weight_scale"], "layers.0.weight_updates": state["layers.0.weight_updates"]})
    except RuntimeError as e:
        assert "weight_dtype" in str(e)
    else:
        raise AssertionError("a 16-bit weight loaded into int8 codes")


def test_muon_and_dion_step_an_int8_weight_as_they_step_its_dequantised_value():
    """``engine.weight_dtype: int8`` with muon or dion: each step's codes are the keyed stochastic
    rounding of what the same optimizer does to the dequantised weight, step after step (their
    momentum and Dion's factor depend on the gradients only, so a reference stepping the
    dequantised weight keeps the same state)."""
    from lowrank_pt.optim.dion import DionAdamW
    from lowrank_pt.optim.muon import MuonAdamW

    for cls, key in ((MuonAdamW, "muon"), (DionAdamW, "dion")):
        m = model(seed=1)
        int8_trained.store(m)
        lin = m.layers[0]
        ref = nn.Parameter(int8_trained.value(lin))
        opt = int8_trained.steps_through_codes(cls([{"params": [lin.weight], key: True}], lr=2e-2), int8_weight_draws)
        ref_opt = cls([{"params": [ref], key: True}], lr=2e-2)
        torch.manual_seed(2)
        for step in (1, 2, 3):
            grad = torch.randn(lin.weight.shape).to(lin.weight.dtype)
            lin.weight.grad, ref.grad = grad, grad.float()
            opt.step()
            ref_opt.step()
            want = torch.cat([int8_weights.quantise(ref.detach()[r:r + 256], int8_weight_draws(step, 0, r))[0]
                              for r in (0, 256)])
            assert torch.equal(lin.weight_codes, want), (key, step)
            assert int(lin.weight_updates) == step and lin.weight.untyped_storage().nbytes() == 2
            moved = (int8_trained.value(lin) - ref.detach()).abs().max()
            assert moved > 0  # the stored weight is the rounded one
            ref.data = int8_trained.value(lin)  # the reference goes on from what was stored
