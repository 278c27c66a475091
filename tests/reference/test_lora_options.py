"""LoRA options on plain torch, against peft where peft implements them (PiSSA, OLoRA, DoRA,
rsLoRA, LoRA+) and against the formula where it does not the same thing (MiLoRA, our LoRA-GA,
the r×r preconditioner): the same initial factors, the same outputs, the same first updates.

peft is a test-only reference (the ``test`` extra); both sides wrap the same tiny LLaMA.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from fixtures import TINY

from lowrank_pt.config.recipe import ConfigError, OptimizerConfig, StageConfig
from lowrank_pt.methods import parse_options
from lowrank_pt.methods.lora import LoRA, precondition_grads
from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
from lowrank_pt.model.lowrank_linear import (
    LowRankLinear,
    lora_ga_factors,
    lowrank_modules,
    merged_state_dict,
    row_norms,
    svd_factors,
)
from lowrank_pt.model.targets import DEFAULT_TARGETS

peft = pytest.importorskip("peft")

RANK, ALPHA, LR = 4, 8.0, 1e-2
# fp32 tolerances, all measured with margin: factors from the same LAPACK call on the same matrix
# are bitwise equal (0.0, and so are PiSSA/OLoRA logits and first updates); the init moves logits by
# <= 2.1e-7, DoRA's differ from peft's by <= 1.5e-7 (summation order), its first updates by 7.5e-9.
EXACT, CLOSE = 0.0, 1e-5


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def tiny_model(seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    return LlamaModel(resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=64))


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 17), generator=g)
    return ids[:, :-1], ids[:, 1:]


def ours(base: LlamaModel, **options) -> tuple[LlamaModel, LoRA]:
    model = copy.deepcopy(base)
    method = LoRA(parse_options("lora", {"rank": RANK, "alpha": ALPHA, **options}),
                  StageConfig(steps=10, optimizer=OptimizerConfig(lr=LR)), None)
    method.prepare_model(model)
    method.after_weights_loaded(model)
    return model, method


def theirs(base: LlamaModel, init=True, dora=False, rslora=False):
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    model = copy.deepcopy(base)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(DEFAULT_TARGETS), init_lora_weights=init,
                        use_dora=dora, use_rslora=rslora, lora_dropout=0.0)
    LoraModel(model, config, "default")  # wraps in place
    return model


def pairs(our_model, peft_model):
    """(name, our LowRankLinear, peft's lora layer) for every wrapped linear."""
    return [(n, m, peft_model.get_submodule(n)) for n, m in lowrank_modules(our_model)]


def peft_tensors(layer, dora: bool) -> dict[str, torch.Tensor]:
    out = {"weight": layer.base_layer.weight, "lora_A": layer.lora_A["default"].weight,
           "lora_B": layer.lora_B["default"].weight}
    if dora:
        out["lora_magnitude"] = layer.lora_magnitude_vector["default"].weight
    return out


def copy_factors(our_model, peft_model, dora: bool, seed: int = 3) -> None:
    """Give both the same non-trivial B (and the same A, m): outputs then depend on every piece."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m, layer in pairs(our_model, peft_model):
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
            if dora:
                m.lora_magnitude.mul_(1 + 0.1 * torch.randn(m.lora_magnitude.shape, generator=g))
            for key, t in peft_tensors(layer, dora).items():
                t.copy_(getattr(m, key))


def adapter_params(our_model, peft_model, dora: bool):
    ours_p, theirs_p = [], []
    for _, m, layer in pairs(our_model, peft_model):
        keys = ["lora_A", "lora_B"] + (["lora_magnitude"] if dora else [])
        t = peft_tensors(layer, dora)
        ours_p += [getattr(m, k) for k in keys]
        theirs_p += [t[k] for k in keys]
    return ours_p, theirs_p


def first_update_gap(our_model, peft_model, dora: bool) -> tuple[float, float]:
    """(max |grad difference|, max |difference after one step|) over the adapter params,
    everything else frozen on both sides. The step is plain SGD: AdamW's first step,
    ``lr·g/(|g| + eps)``, turns a rounding-size gradient difference at an entry with ``|g| ≈ eps``
    into one of up to ``lr·Δg/eps`` (2.8e-5 measured with DoRA), which says nothing about the
    two implementations."""
    for model in (our_model, peft_model):
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    a, b = adapter_params(our_model, peft_model, dora)
    ids, labels = batch()
    for model in (our_model, peft_model):
        model(ids, labels).backward()
    grad_gap = max(gap(p.grad, q.grad) for p, q in zip(a, b))
    for params in (a, b):
        torch.optim.SGD(params, lr=LR).step()
    return grad_gap, max(gap(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("init, rslora", [("pissa", False), ("pissa", True), ("olora", False), ("olora", True)])
def test_weight_inits_match_peft(init, rslora):
    base = tiny_model()
    ids, _ = batch()
    with torch.no_grad():
        before = base(ids)
    model, _ = ours(base, init=init, scaling="alpha/sqrt(r)" if rslora else "alpha/r")
    reference = theirs(base, init=init, rslora=rslora)
    originals = dict(base.named_parameters())
    for name, m, layer in pairs(model, reference):
        assert m.scale == pytest.approx(ALPHA / (math.sqrt(RANK) if rslora else RANK))
        for key, t in peft_tensors(layer, False).items():
            assert gap(getattr(m, key), t) <= EXACT, f"{name}.{key}"
        # The residual plus the factors is the original weight, within fp32 rounding.
        restored = m.weight + m.scale * (m.lora_B @ m.lora_A)
        assert gap(restored, originals[f"{name}.weight"]) <= 1e-6, name
    with torch.no_grad():
        after, peft_out = model(ids), reference(ids)
    assert float((after - before).abs().max()) <= CLOSE, "the init keeps the model's output"
    assert float((after - peft_out).abs().max()) <= CLOSE
    grad_gap, step_gap = first_update_gap(model, reference, dora=False)
    assert grad_gap <= 1e-6 and step_gap <= CLOSE, (grad_gap, step_gap)


def test_pissa_factors_are_the_principal_triplets():
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    scale = 2.0
    for minor, pick in ((False, slice(0, RANK)), (True, slice(24 - RANK, 24))):  # pissa, milora
        A, B, residual = svd_factors(w, RANK, scale, minor=minor)
        top = U[:, pick] @ torch.diag(S[pick]) @ Vh[pick]
        assert torch.allclose(scale * B @ A, top, atol=1e-5)
        assert torch.allclose(residual, w - top, atol=1e-5)
        assert torch.allclose(A @ A.T, B.T @ B, atol=1e-5), "balanced: both factors carry √(S/s)"


def test_milora_keeps_the_output_and_puts_the_minor_part_in_the_factors():
    base = tiny_model()
    ids, _ = batch()
    model, _ = ours(base, init="milora")
    with torch.no_grad():
        assert float((model(ids) - base(ids)).abs().max()) <= CLOSE
    for name, m in lowrank_modules(model):
        s_all = torch.linalg.svdvals(dict(base.named_parameters())[f"{name}.weight"].detach())
        s_factors = torch.linalg.svdvals((m.scale * m.lora_B @ m.lora_A).detach())[:RANK]
        assert torch.allclose(s_factors, s_all[-RANK:], rtol=1e-4), name


@pytest.mark.parametrize("rslora", [False, True])
def test_dora_and_rslora_forward_and_first_update_match_peft(rslora):
    base = tiny_model()
    ids, _ = batch()
    scaling = "alpha/sqrt(r)" if rslora else "alpha/r"
    model, _ = ours(base, dora=True, scaling=scaling)
    reference = theirs(base, dora=True, rslora=rslora)
    for name, m, layer in pairs(model, reference):  # peft's magnitude is ‖W0‖ per output row too
        assert gap(m.lora_magnitude, layer.lora_magnitude_vector["default"].weight) <= 1e-6
    with torch.no_grad():
        assert float((model(ids) - base(ids)).abs().max()) <= CLOSE, "DoRA at init is the base model"
    copy_factors(model, reference, dora=True)
    with torch.no_grad():
        to_peft = gap(model(ids), reference(ids))
        moved = gap(model(ids), base(ids))
    assert to_peft <= CLOSE and moved > 1e-2, (to_peft, moved)
    # The merged plain weights (m ⊙ V/‖V‖_row) give the same logits.
    plain = tiny_model(seed=9)
    plain.load_state_dict(merged_state_dict(model.state_dict()), strict=True)
    with torch.no_grad():
        assert float((plain(ids) - model(ids)).abs().max()) <= CLOSE
    grad_gap, step_gap = first_update_gap(model, reference, dora=True)
    assert grad_gap <= 1e-6 and step_gap <= CLOSE, (grad_gap, step_gap)


def test_dora_with_dropout_matches_peft_in_training():
    base = tiny_model()
    ids, _ = batch()
    model, _ = ours(base, dora=True, dropout=0.2)
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    reference = copy.deepcopy(base)
    LoraModel(reference, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(DEFAULT_TARGETS),
                                    use_dora=True, lora_dropout=0.2), "default")
    copy_factors(model, reference, dora=True)
    outs = []
    for m in (model, reference):
        m.train()
        torch.manual_seed(7)  # one dropout draw per wrapped linear, in the same order on both sides
        with torch.no_grad():
            outs.append(m(ids))
    assert float((outs[0] - outs[1]).abs().max()) <= CLOSE


def test_rslora_scale_only_changes_s():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    for scaling, expected in (("alpha/r", ALPHA / 16), ("alpha/sqrt(r)", ALPHA / 4)):
        layer = LowRankLinear(copy.deepcopy(lin), 16, ALPHA, scaling=scaling)
        assert layer.scale == expected and float(layer.lora_scale) == expected


def test_loraplus_groups_and_first_update_match_peft():
    from peft.optimizers import create_loraplus_optimizer

    ratio = 4.0
    base = tiny_model()
    model, method = ours(base, lr_ratio=ratio)
    reference = theirs(base)
    copy_factors(model, reference, dora=False)
    groups = method.param_groups(model)
    # B in a last group at ratio × LR; group 0 (what the trainer logs) at the stage's LR.
    bs = {id(m.lora_B) for _, m in lowrank_modules(model)}
    assert {id(p) for p in groups[-1]["params"]} == bs and groups[-1]["lr"] == pytest.approx(ratio * LR)
    assert all("lr" not in g and not bs & {id(p) for p in g["params"]} for g in groups[:-1])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    # peft's helper over the same adapters (its other groups are empty: only adapters train there).
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    # SGD: the first update is then lr_group·g, which shows each param's LR (see first_update_gap).
    ours_opt = torch.optim.SGD([{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups],
                               lr=LR, weight_decay=0.0)
    theirs_opt = create_loraplus_optimizer(reference, torch.optim.SGD, lr=LR, loraplus_lr_ratio=ratio)
    lr_of = lambda opt: {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}  # noqa: E731
    ours_lr, theirs_lr = lr_of(ours_opt), lr_of(theirs_opt)
    for name, m, layer in pairs(model, reference):
        for key in ("lora_A", "lora_B"):
            assert ours_lr[id(getattr(m, key))] == pytest.approx(theirs_lr[id(peft_tensors(layer, False)[key])]), name
    ids, labels = batch()
    for mdl, opt in ((model, ours_opt), (reference, theirs_opt)):
        mdl(ids, labels).backward()
        opt.step()
    a, b = adapter_params(model, reference, dora=False)
    assert max(gap(p, q) for p, q in zip(a, b)) <= CLOSE


def test_lora_ga_first_step_follows_the_rank_2r_gradient():
    """With the LoRA-GA factors (and the residual in the base) the output is unchanged, the
    factors' gradients are s·Bᵀ·G and s·G·Aᵀ, and a plain gradient step moves B·A (to first order)
    along ζ²·s²·G₂ᵣ: the best rank-2r approximation of the full gradient G."""
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40)
    x = torch.randn(64, 48)
    target = torch.randn(64, 40)
    loss_of = lambda y: ((y - target) ** 2).mean()  # noqa: E731
    loss_of(base(x)).backward()
    G = base.weight.grad.clone()
    layer = LowRankLinear(copy.deepcopy(base), RANK, ALPHA)
    A, B = lora_ga_factors(G, RANK, gamma=16.0)
    with torch.no_grad():
        layer.weight.sub_(layer.scale * B @ A)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        assert float((layer(x) - base(x)).abs().max()) <= 1e-5
    loss_of(layer(x)).backward()
    s = layer.scale
    assert torch.allclose(layer.lora_A.grad, s * B.T @ G, atol=1e-6)
    assert torch.allclose(layer.lora_B.grad, s * G @ A.T, atol=1e-6)
    eta = 1e-3
    dA, dB = -eta * layer.lora_A.grad, -eta * layer.lora_B.grad
    first_order = s * (dB @ A + B @ dA)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    g2r = U[:, :2 * RANK] @ torch.diag(S[:2 * RANK]) @ Vh[:2 * RANK]
    zeta2 = 40 ** 0.5 / 16.0
    assert torch.allclose(first_order, -eta * s * s * zeta2 * g2r, atol=1e-7, rtol=1e-4)


def test_preconditioned_update_of_BA_does_not_depend_on_the_split():
    """Rescaling A by c and B by 1/c leaves the preconditioned first-order update of B·A
    unchanged; the plain gradient's update changes by orders of magnitude."""
    g = torch.Generator().manual_seed(0)
    m, n, r, s, eta = 40, 24, RANK, 2.0, 1e-3
    A = torch.randn(r, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)

    def update(A, B, precondition: bool, delta: float = 1e-12):
        gA, gB = s * B.T @ G, s * G @ A.T
        if precondition:
            gA, gB = (t.double() for t in precondition_grads(A, B, gA, gB, delta))
        return s * ((-eta * gB) @ A + B @ (-eta * gA))

    reference = update(A, B, True)
    for c in (1e-2, 0.3, 7.0, 1e2):
        moved = update(c * A, B / c, True)
        plain_ref, plain = update(A, B, False), update(c * A, B / c, False)
        assert float((moved - reference).norm() / reference.norm()) <= 1e-5, c  # float32 results: ~1e-7
        assert float((plain - plain_ref).norm() / plain_ref.norm()) > 0.5, c
    # With δ > 0 the invariance holds while δ is small against the factors' r×r Gram matrices:
    # the relative change is at most ~δ/λ_min (0.88% measured here, δ/λ_min = 1.8%).
    c, delta = 1e-2, 1e-6
    lam_min = min(float(torch.linalg.eigvalsh(c * c * A @ A.T).min()), float(torch.linalg.eigvalsh(B.T @ B / c / c).min()))
    damped = update(c * A, B / c, True, delta=delta)
    change = float((damped - reference).norm() / reference.norm())
    assert 0 < change <= delta / lam_min, (change, delta / lam_min)


def test_dora_row_norms_are_over_the_input_dimension():
    torch.manual_seed(0)
    w, A, B = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    assert torch.allclose(row_norms(w, A, B, 0.5), (w + 0.5 * B @ A).norm(dim=1))


@pytest.mark.parametrize("options, key", [
    ({"init": "gaussian"}, "init"), ({"scaling": "alpha"}, "scaling"), ({"lr_ratio": 0}, "lr_ratio"),
    ({"precondition": "shampoo"}, "precondition"), ({"precondition_delta": 0}, "precondition_delta"),
    ({"lora_ga_gamma": -1}, "lora_ga_gamma"), ({"dora": "maybe"}, "bool"),
])
def test_option_errors_name_the_key(options, key):
    for method in ("lora", "relora"):
        with pytest.raises(ConfigError, match=key):
            parse_options(method, {**options, **({"restart_every": 4} if method == "relora" else {})})


def test_init_needing_more_than_the_matrix_fails_naming_the_module():
    model = tiny_model()  # hidden 64: rank 40 fits pissa's r <= 64 but not lora_ga's 2r <= 64
    method = LoRA(parse_options("lora", {"rank": 40, "init": "lora_ga"}), StageConfig(steps=1), None)
    with pytest.raises(ValueError, match="lora_ga.*q_proj"):
        method.prepare_model(model)

    from lowrank_pt.config.recipe import load

    with pytest.raises(ConfigError, match=r"stages\[1\].*options.init=lora_ga needs 80"):  # before any work
        load(TINY, ["stages.1.method=lora", "stages.1.options={rank: 40, init: lora_ga}"])
