"""SLTrain's and CoLA's linears against the expressions they stand for, CoLA-M against CoLA, and
the methods' FLOPs, parameters and activations against what torch counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from fixtures import saved_bytes

from lowrank_pt import methods
from lowrank_pt.config.recipe import StageConfig
from lowrank_pt.model import cola, sltrain
from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
from lowrank_pt.tracking import planner

CFG = dict(size="tiny", hidden_size=64, num_heads=2, intermediate_size=96, num_layers=2, seq_len=32)


def model_cfg(**overrides):
    return resolve(ModelConfig(**{**CFG, **overrides}), vocab_size=100)


def prepared(name: str, options: dict, cfg=None):
    """(method, model): the method's model of ``cfg``, built as a stage builds it."""
    method = methods.build(StageConfig(method=name, steps=1, options=options), None)
    torch.manual_seed(0)
    model = LlamaModel(cfg or model_cfg())
    method.prepare_model(model)
    return method, model


def sparse_dense(module: sltrain.SparseLowRankLinear) -> torch.Tensor:
    """S as a dense m×n matrix: the values written at the support's positions."""
    s = torch.zeros(module.out_features * module.in_features, dtype=torch.float64)
    s[module.positions().long()] = module.sparse_values.detach().double()
    return s.view(module.out_features, module.in_features)


def test_an_sltrain_linear_is_the_dense_sum_and_its_gradients_are_the_dense_ones_on_the_support():
    torch.manual_seed(1)
    module = sltrain.SparseLowRankLinear(nn.Linear(48, 40, bias=True), rank=6, alpha=12.0, density=0.1, seed=3,
                                         index=2)
    with torch.no_grad():
        module.sltrain_B.normal_()  # B starts at zero; a product that is not zero tests the scale
        module.bias.normal_()
    x = torch.randn(3, 5, 48, requires_grad=True)
    dy = torch.randn(3, 5, 40)
    y = module(x)
    y.backward(dy)
    # The reference in float64: W = s·B·A + S, as a dense matrix with autograd.
    A = module.sltrain_A.detach().double().requires_grad_()
    B = module.sltrain_B.detach().double().requires_grad_()
    S = sparse_dense(module).requires_grad_()
    bias = module.bias.detach().double()
    xd = x.detach().double().requires_grad_()
    ref = F.linear(xd, module.scale * B @ A + S, bias)
    ref.backward(dy.double())
    assert torch.allclose(y.double(), ref, atol=1e-5)
    assert torch.allclose(x.grad.double(), xd.grad, atol=1e-5)
    assert torch.allclose(module.sltrain_A.grad.double(), A.grad, atol=1e-4)
    assert torch.allclose(module.sltrain_B.grad.double(), B.grad, atol=1e-4)
    on_support = S.grad.view(-1)[module.positions().long()]
    assert torch.allclose(module.sparse_values.grad.double(), on_support, atol=1e-5)
    assert module.sparse_values.grad.numel() == module.count == round(0.1 * 48 * 40)


def test_the_support_is_drawn_from_the_seed_and_never_stored():
    a = sltrain.SparseLowRankLinear(nn.Linear(30, 20, bias=False), 4, 8.0, 0.2, seed=7, index=1)
    b = sltrain.SparseLowRankLinear(nn.Linear(30, 20, bias=False), 4, 8.0, 0.2, seed=7, index=1)
    c = sltrain.SparseLowRankLinear(nn.Linear(30, 20, bias=False), 4, 8.0, 0.2, seed=7, index=2)
    pa = a.positions()
    assert torch.equal(pa, b.positions()) and not torch.equal(pa, c.positions())
    assert pa.numel() == 120 and pa.unique().numel() == 120 and torch.equal(pa, pa.sort().values)
    assert 0 <= int(pa.min()) and int(pa.max()) < 600
    assert set(a.state_dict()) == {"sltrain_A", "sltrain_B", "sparse_values", "sparse_key"}
    # The dense form from a state dict alone is the weight the module computes with.
    with torch.no_grad():
        a.sltrain_B.normal_()
    dense = sltrain.dense_state_dict({f"m.{k}": v for k, v in a.state_dict().items()}, alpha=8.0)
    x = torch.randn(4, 30)
    assert set(dense) == {"m.weight"}
    assert torch.allclose(a(x), x @ dense["m.weight"].t(), atol=1e-6)


def test_a_cola_linear_is_the_bottleneck():
    torch.manual_seed(2)
    module = cola.LowRankActivationLinear(nn.Linear(48, 40, bias=True), rank=8, seed=0, index=0)
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    module = module.double()
    A, B = module.cola_A.detach(), module.cola_B.detach()
    z = x @ A.t()
    expected = (z * torch.sigmoid(z)) @ B.t() + module.bias.detach()
    assert torch.allclose(module(x), expected, atol=1e-12)
    # The published init: entries of A and B with std r^(-1/4)·(m + n)^(-1/4).
    big = cola.LowRankActivationLinear(nn.Linear(512, 512, bias=False), rank=128, seed=0, index=0)
    std = 128 ** -0.25 * 1024 ** -0.25
    assert abs(big.cola_A.std().item() / std - 1) < 0.02 and abs(big.cola_B.std().item() / std - 1) < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cola_m_is_cola_bit_for_bit_with_fewer_activation_bytes(dtype):
    plain_method, plain = prepared("cola", {})
    m_method, recomputed = prepared("cola", {"recompute": True})
    plain, recomputed = plain.to(dtype), recomputed.to(dtype)
    recomputed.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    kept_plain, loss_plain, grads_plain = saved_bytes(plain, ids)
    kept_m, loss_m, grads_m = saved_bytes(recomputed, ids)
    assert torch.equal(loss_plain, loss_m)
    assert all(torch.equal(grads_plain[n], grads_m[n]) for n in grads_plain)
    # What CoLA-M does not keep: A·x and σ(A·x) of every bottleneck, the planner's count exactly.
    tokens, b = ids.numel(), torch.finfo(dtype).bits // 8
    assert kept_plain - kept_m == plain_method.saved_values_per_token * tokens * b > 0
    assert m_method.saved_values_per_token == 0


@pytest.mark.parametrize("name,options", [("sltrain", {"rank": 8}), ("cola", {}), ("cola", {"recompute": True}),
                                          ("sltrain", {"rank": 4, "target_modules": ["layers.*.mlp.*"]})])
def test_flops_per_token_are_what_torch_counts(name, options):
    """torch's FlopCounterMode on one forward and backward of two sequences. The attention runs on
    the math kernel, whose matmuls the counter sees (it has no formula for the CPU's fused one)."""
    method, model = prepared(name, options)
    cfg = model_cfg()
    ids = torch.randint(0, 100, (2, cfg.seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, ids).backward()
    assert counter.get_total_flops() == method.flops_per_token(cfg, micro_tokens=ids.numel()) * ids.numel()


@pytest.mark.parametrize("name,options", [("sltrain", {"rank": 8, "density": 0.05}), ("cola", {})])
def test_parameters_and_activations_are_the_planners(name, options):
    _, model = prepared(name, options)
    cfg = model_cfg()
    lay = planner.layout(cfg, name, options)
    assert lay.total_params == sum(p.numel() for p in model.parameters()) == lay.trainable
    assert lay.buffer_bytes == sum(b.numel() * b.element_size() for b in model.buffers()) - \
        sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.startswith("rope_"))
    dense = planner.layout(cfg, "full")
    assert lay.total_params < dense.total_params
    # Activations: the planner's estimate against autograd's saved tensors, as for the dense model.
    measured, _, _ = saved_bytes(model, torch.randint(0, 100, (2, cfg.seq_len)))
    estimate = planner.activation_bytes(cfg, 2, cfg.seq_len, "fp32", extra_values_per_token=lay.saved_values_per_token)
    assert abs(estimate["saved"] - measured) / measured < 0.12, (estimate, measured)


def test_config_validation_refuses_what_the_factored_models_cannot_do():
    from lowrank_pt.config.recipe import load
    from lowrank_pt.core.errors import ConfigError

    def check(stages: str, *extra: str):
        load(None, ["model.size=tiny", "data.source=embedded", f"stages={stages}", *extra],
                        environment=False)

    check("[{name: a, method: sltrain, steps: 4, options: {rank: 4}}, {name: b, method: full, steps: 2}]")
    check("[{name: a, method: cola, steps: 4}]")
    with pytest.raises(ConfigError, match="not a dense Llama"):  # CoLA has no dense form to hand over
        check("[{name: a, method: cola, steps: 4}, {name: b, method: full, steps: 2}]")
    with pytest.raises(ConfigError, match="cannot start from a dense model"):
        check("[{name: a, method: full, steps: 4}, {name: b, method: sltrain, steps: 2, options: {rank: 4}}]")
    with pytest.raises(ConfigError, match="rank=512"):
        check("[{name: a, method: sltrain, steps: 4, options: {rank: 512}}]")
    with pytest.raises(ConfigError, match="weight_dtype=int8"):
        check("[{name: a, method: cola, steps: 4}]", "engine.weight_dtype=int8", "engine.master_weights=bf16",
              "engine.precision=bf16")
