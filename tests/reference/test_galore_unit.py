"""GaLore pieces on plain torch (no DeepSpeed): projector, adapter autograd, GaLoreAdamW against
galore-torch, moment handling at a refresh, options."""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures import random_batches
from galore_adamw import GaLoreAdamW
from torch import nn

from lowrank_pt.config.recipe import ConfigError, OptimizerConfig, StageConfig
from lowrank_pt.methods import parse_options
from lowrank_pt.methods.galore.adapter import GaLoreLinear
from lowrank_pt.methods.galore.capture import GradientCapture
from lowrank_pt.methods.galore.method import GaLore, GaLoreOptions
from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
from lowrank_pt.optim import projector

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    return LlamaModel(resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=64))


def galore_torch_with_canonical_signs(monkeypatch):
    """galore-torch's GaLoreAdamW with only the signs of its singular vectors made canonical.

    A singular vector's sign is arbitrary and MKL's choice flips under 1e-6 relative changes of
    the gradient; with moments kept across refreshes that reverses their momentum, so two runs
    whose gradients differ by rounding part ways at the next refresh. Both sides use the same
    sign rule here; everything else is galore-torch's code."""
    galore_torch = pytest.importorskip("galore_torch")
    from galore_torch.galore_projector import GaLoreProjector

    original = GaLoreProjector.get_orthogonal_matrix

    def canonical(self, weights, rank, type):
        return projector.canonical_signs(original(self, weights, rank, type), type)

    monkeypatch.setattr(GaLoreProjector, "get_orthogonal_matrix", canonical)
    return galore_torch.GaLoreAdamW


def reference_groups(model, rank, gap, scale=0.25, proj_type="std"):
    projected = [p for n, p in model.named_parameters() if n.endswith("_proj.weight")]
    ids = {id(p) for p in projected}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest},
            {"params": projected, "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": proj_type}]


def train(model, optimizer, steps, micro=2, after_step=None):
    """Plain-torch loop over the same micro-batches the ZeRO tests use (mean over micro-batches)."""
    for step in range(steps):
        batches = random_batches(micro, micro_batch_size=2, seed=step)
        for b in batches:
            (model(b["input_ids"], b["labels"]) / len(batches)).backward()
        optimizer.step()
        optimizer.zero_grad()
        if after_step:
            after_step(step)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal up to ``rel`` of the largest magnitude (moments span many orders of magnitude)."""
    return bool((a - b).abs().max() <= rel * b.abs().max())


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --- projector ----------------------------------------------------------------------------------


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (16, 16)])
def test_projection_side_and_shapes_follow_galore_torch(proj_type, shape):
    from galore_torch.galore_projector import GaLoreProjector

    g = torch.randn(shape)
    ref = GaLoreProjector(6, update_proj_gap=1, proj_type=proj_type)
    low_ref = ref.project(g, 0)
    side = projector.projection_side(shape, proj_type)
    basis, why = projector.new_basis(g, 6, side)
    assert why == "" and basis.shape == projector.basis_shape(shape, 6, side)
    low = projector.project(g, basis, side)
    assert low.shape == low_ref.shape == projector.low_rank_shape(shape, 6, side)
    # Same subspace as galore-torch (signs aside): identical projector onto it.
    back, back_ref = projector.project_back(low, basis, side), ref.project_back(low_ref) / ref.scale
    assert torch.allclose(back, back_ref, atol=1e-5)


def test_randomized_basis_finds_the_top_subspace_and_warm_start_helps():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(96, 96))
    v, _ = torch.linalg.qr(torch.randn(40, 40))
    s = torch.cat([torch.linspace(10, 5, 8), torch.full((32,), 0.5)])
    g = u[:, :40] @ torch.diag(s) @ v.t()
    exact, _ = projector.new_basis(g, 8, "right", "exact")
    cold, _ = projector.new_basis(g, 8, "right", "randomized", niter=2, seed=1)
    # Warm start from a slightly stale subspace, no power iteration at all.
    stale, _ = projector.new_basis(g + 0.3 * torch.randn_like(g), 8, "right")
    warm, _ = projector.new_basis(g, 8, "right", "randomized", previous=stale, niter=0, seed=1)
    proj = lambda q: q.t() @ q  # noqa: E731 - the projector onto the row space of q
    assert (proj(cold) - proj(exact)).norm() < 1e-4
    assert (proj(warm) - proj(exact)).norm() < (proj(stale) - proj(exact)).norm()
    left, _ = projector.new_basis(g, 8, "left", "randomized", seed=1)
    exact_left, _ = projector.new_basis(g, 8, "left")
    assert (left @ left.t() - exact_left @ exact_left.t()).norm() < 1e-4
    # Deterministic given the seed (every rank and a resumed run draw the same numbers).
    again, _ = projector.new_basis(g, 8, "right", "randomized", niter=2, seed=1)
    assert torch.equal(again, cold)


def test_degenerate_gradients_give_no_basis(monkeypatch):
    assert projector.new_basis(torch.zeros(8, 4), 2, "right") == (None, "zero gradient")
    g = torch.randn(8, 4)
    g[1, 2] = float("nan")
    assert projector.new_basis(g, 2, "right") == (None, "non-finite gradient")
    g[1, 2] = float("inf")
    assert projector.new_basis(g, 2, "left", "randomized")[0] is None

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    basis, why = projector.new_basis(torch.randn(8, 4), 2, "right")
    assert basis is None and why.startswith("svd failed")


def test_canonical_signs_make_the_basis_continuous_in_the_gradient():
    torch.manual_seed(3)
    g = torch.randn(64, 64) * 1e-3
    a, _ = projector.new_basis(g, 8, "right")
    for _ in range(5):
        b, _ = projector.new_basis(g + 1e-10 * torch.randn_like(g), 8, "right")
        assert (a - b).abs().max() < 1e-4
    pivots = a.abs().argmax(dim=1)
    assert (a.gather(1, pivots[:, None]) > 0).all()


def test_reprojected_moments_are_the_documented_change_of_basis():
    torch.manual_seed(0)
    old, _ = projector.new_basis(torch.randn(30, 12), 4, "right")
    m, v = torch.randn(30, 4), torch.rand(30, 4)
    # Same subspace, vectors permuted and one flipped: the moments follow exactly.
    perm = old[[2, 0, 3, 1]] * torch.tensor([1.0, -1.0, 1.0, 1.0])[:, None]
    m2, v2 = projector.reproject_moments(m, v, old, perm, "right")
    assert torch.allclose(m2, m[:, [2, 0, 3, 1]] * torch.tensor([1.0, -1.0, 1.0, 1.0]), atol=1e-6)
    assert torch.allclose(v2, v[:, [2, 0, 3, 1]], atol=1e-6)
    # A different subspace: the first moment is the projection of the old full-size moment.
    new, _ = projector.new_basis(torch.randn(30, 12), 4, "right")
    m3, v3 = projector.reproject_moments(m, v, old, new, "right")
    full_old = projector.project_back(m, old, "right")
    assert torch.allclose(m3, projector.project(full_old, new, "right"), atol=1e-5)
    c = new @ old.t()
    assert torch.allclose(v3, v @ (c * c).t(), atol=1e-6) and (v3 >= 0).all()
    # Left side: the same rules transposed.
    old_l, new_l = old.t().contiguous(), new.t().contiguous()
    m4, v4 = projector.reproject_moments(m.t(), v.t(), old_l, new_l, "left")
    assert torch.allclose(m4, m3.t(), atol=1e-5) and torch.allclose(v4, v3.t(), atol=1e-6)


# --- adapter ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_adapter_gradients_equal_autograd_through_the_merged_weight(shape):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=False)
    layer = GaLoreLinear(linear, rank=5, scale=0.25, proj_type="std")
    assert layer.side == ("right" if shape[0] >= shape[1] else "left")
    basis, _ = projector.new_basis(torch.randn(shape), 5, layer.side)
    with torch.no_grad():
        layer.galore_basis.copy_(basis)
        layer.galore_b.normal_()
    x = torch.randn(3, 7, shape[1], requires_grad=True)
    dy = torch.randn(3, 7, shape[0])
    layer.capture = GradientCapture()
    layer(x).backward(dy)

    w = linear.weight.detach().clone().requires_grad_()
    b = layer.galore_b.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    delta = b @ basis if layer.side == "right" else basis @ b
    y_ref = x_ref @ (w + 0.25 * delta).t()
    y_ref.backward(dy)
    assert torch.allclose(layer(x), y_ref, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(layer.galore_b.grad, b.grad, atol=1e-5)
    assert torch.allclose(layer.capture.mean(), w.grad, atol=1e-5)  # the full gradient, only when asked
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_method_wraps_targets_and_groups_eps_by_scale():
    model = tiny_model()
    stage = StageConfig(steps=10, optimizer=OptimizerConfig(eps=1e-8, weight_decay=0.1))
    method = GaLore(GaLoreOptions(rank=8, scale=0.5), stage, None)
    method.prepare_model(model)
    assert len(method.adapters) == 14
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "layers.0.mlp.down_proj.galore_b" in trainable and "layers.0.mlp.down_proj.weight" not in trainable
    assert model.layers[0].mlp.down_proj.galore_b.shape == (8, 172)  # 64x172: left, r x n
    assert model.layers[0].mlp.up_proj.galore_b.shape == (172, 8)  # 172x64: right, m x r
    groups = method.param_groups(model)
    assert groups[0]["eps"] == pytest.approx(0.5e-8) and groups[0]["weight_decay"] == 0.1
    assert "eps" not in groups[1] and "eps" not in groups[2]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    buffers = dict(model.named_buffers())
    assert "layers.1.self_attn.q_proj.galore_basis" in model.state_dict()
    assert buffers["layers.1.self_attn.q_proj.galore_decay"].item() == 1.0


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_plain_weights_reproduce_the_wrapped_model(proj_type):
    wrapped = tiny_model()
    stage = StageConfig(steps=10, optimizer=OptimizerConfig(weight_decay=0.1))
    options = GaLoreOptions(rank=8, scale=0.5, proj_type=proj_type)
    method = GaLore(options, stage, None)
    method.prepare_model(wrapped)
    torch.manual_seed(1)
    with torch.no_grad():
        for adapter in method.adapters.values():
            basis, _ = projector.new_basis(torch.randn(adapter.shape), adapter.rank, adapter.side)
            adapter.galore_basis.copy_(basis)
            adapter.galore_b.normal_(0, 0.05)
            adapter.galore_decay.fill_(0.97)
    plain = tiny_model(seed=5)
    state = GaLore.to_plain(wrapped.state_dict(), options)
    plain.load_state_dict(state)  # strict: exactly the plain model's keys
    ids = torch.randint(0, 64, (2, 16))
    assert torch.allclose(plain(ids), wrapped(ids), atol=1e-5)
    assert not torch.allclose(state["layers.0.mlp.up_proj.weight"], tiny_model().layers[0].mlp.up_proj.weight)


def test_options_are_checked_by_key():
    assert parse_options("galore", {"rank": 4, "svd": "randomized"}).rank == 4
    for bad, key in [({"rank": 0}, "rank"), ({"proj_type": "full"}, "proj_type"), ({"svd": "qr"}, "svd"),
                     ({"moments_on_refresh": "zero"}, "moments_on_refresh"),
                     ({"update_proj_gap": 0}, "update_proj_gap"), ({"scale": 0}, "scale"),
                     ({"target_modules": []}, "target_modules"), ({"ranks": 3}, "ranks")]:
        with pytest.raises(ConfigError, match=key):
            parse_options("galore", bad)
    with pytest.raises(ValueError, match="target_modules"):
        GaLore(GaLoreOptions(target_modules=["nothing_here"]), StageConfig(), None).prepare_model(tiny_model())


# --- GaLoreAdamW against galore-torch ----------------------------------------------------------


def test_galore_adamw_follows_galore_torch_over_four_refreshes(monkeypatch):
    """13 steps, gap 4: refreshes at 0, 4, 8, 12. lr 3e-3 moves weights by ~3.5e-2; both sides
    differ only by float rounding (measured 1.2e-7), so 1e-6 is ~10x the rounding. eps 1e-12
    because galore-torch adds eps to the uncorrected sqrt(v) and torch's AdamW to the corrected
    one: with eps 1e-8 the two differ on entries whose gradient is ~eps (2e-4 on lm_head here)."""
    Reference = galore_torch_with_canonical_signs(monkeypatch)
    init = tiny_model().state_dict()
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)

    ref_model = tiny_model()
    ref = train(ref_model, Reference(reference_groups(ref_model, 8, 4), no_deprecation_warning=True, **kw), 13)
    ours_model = tiny_model()
    ours = train(ours_model, GaLoreAdamW(reference_groups(ours_model, 8, 4), **kw), 13)
    assert max_diff(ours, ref) < 1e-6
    assert max_diff(ref, init) > 1e-2


def test_first_interval_needs_no_sign_convention():
    """Before a refresh carries moments over, a basis vector's sign cancels out: plain galore-torch."""
    galore_torch = pytest.importorskip("galore_torch")
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    ref_model, ours_model = tiny_model(), tiny_model()
    ref = train(ref_model, galore_torch.GaLoreAdamW(reference_groups(ref_model, 8, 4), no_deprecation_warning=True,
                                                     **kw), 4)
    ours = train(ours_model, GaLoreAdamW(reference_groups(ours_model, 8, 4), **kw), 4)
    assert max_diff(ours, ref) < 1e-6


def test_keep_moments_like_galore_torch_and_reproject_as_documented(monkeypatch):
    Reference = galore_torch_with_canonical_signs(monkeypatch)
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    ref_model, keep_model, re_model = tiny_model(), tiny_model(), tiny_model()
    ref_opt = Reference(reference_groups(ref_model, 8, 3), no_deprecation_warning=True, **kw)
    keep_opt = GaLoreAdamW(reference_groups(keep_model, 8, 3), **kw)
    groups = reference_groups(re_model, 8, 3)
    groups[1]["moments_on_refresh"] = "reproject"
    re_opt = GaLoreAdamW(groups, **kw)
    train(ref_model, ref_opt, 3)
    train(keep_model, keep_opt, 3)
    train(re_model, re_opt, 3)
    w_keep, w_re = keep_model.layers[1].mlp.down_proj.weight, re_model.layers[1].mlp.down_proj.weight
    before = {k: keep_opt.state[w_keep][k].clone() for k in ("exp_avg", "exp_avg_sq", "basis")}
    assert torch.equal(before["basis"], re_opt.state[w_re]["basis"])  # identical so far

    # Step 3 refreshes: capture the new basis and this step's projected gradient to check against.
    train(ref_model, ref_opt, 1)
    train(keep_model, keep_opt, 1)
    grad_holder = {}
    re_model.layers[1].mlp.down_proj.weight.register_hook(
        lambda g: grad_holder.__setitem__("g", grad_holder.get("g", 0) + g))
    train(re_model, re_opt, 1)
    beta1, beta2 = kw["betas"]
    state_keep, state_re = keep_opt.state[w_keep], re_opt.state[w_re]
    new = state_keep["basis"]
    assert not torch.allclose(new, before["basis"], atol=1e-3)
    # keep: the old moments are decayed and added to in the new coordinates, as galore-torch does.
    ref_state = ref_opt.state[ref_model.layers[1].mlp.down_proj.weight]
    assert close(state_keep["exp_avg"], ref_state["exp_avg"])
    assert close(state_keep["exp_avg_sq"], ref_state["exp_avg_sq"])
    # reproject: the old moments are first carried into the new basis (projector.reproject_moments).
    r = projector.project(grad_holder["g"], state_re["basis"], "left")
    m_old, v_old = projector.reproject_moments(before["exp_avg"], before["exp_avg_sq"], before["basis"],
                                               state_re["basis"], "left")
    assert close(state_re["exp_avg"], beta1 * m_old + (1 - beta1) * r)
    assert close(state_re["exp_avg_sq"], beta2 * v_old + (1 - beta2) * r * r)
    assert not close(state_re["exp_avg"], state_keep["exp_avg"], rel=1e-2)


def test_zero_gradient_at_a_refresh_keeps_the_basis():
    model = tiny_model()
    opt = GaLoreAdamW(reference_groups(model, 8, 2), lr=1e-3)
    train(model, opt, 2)
    w = model.layers[0].self_attn.q_proj.weight
    basis = opt.state[w]["basis"].clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # step 2 is a refresh with a zero gradient
    assert torch.equal(opt.state[w]["basis"], basis)
    assert len(opt.refresh_failures) == 14 and "zero gradient" in opt.refresh_failures[0]
    train(model, opt, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_galore_adamw_refuses_flat_partitions():
    """What ZeRO 1-3 hands an optimizer: 1-D flat partitions. galore-torch fails with an IndexError."""
    flat = nn.Parameter(torch.randn(100))
    opt = GaLoreAdamW([{"params": [flat], "rank": 4}])
    flat.grad = torch.randn(100)
    with pytest.raises(ValueError, match="ZeRO"):
        opt.step()
    assert torch.equal(opt.param_groups[0]["params"][0], flat) and not opt.state


def test_state_dict_holds_tensors_only_and_round_trips():
    model = tiny_model()
    opt = GaLoreAdamW(reference_groups(model, 8, 2), lr=1e-3)
    train(model, opt, 3)
    state = opt.state_dict()
    for entry in state["state"].values():
        assert all(isinstance(v, (torch.Tensor, int)) for v in entry.values())
    model2 = copy.deepcopy(model)
    opt2 = GaLoreAdamW(reference_groups(model2, 8, 2), lr=1e-3)
    opt2.load_state_dict(copy.deepcopy(state))
    a = train(model, opt, 2)
    b = train(model2, opt2, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
