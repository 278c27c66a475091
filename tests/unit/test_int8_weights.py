"""Frozen bases in int8 (``engine.weight_dtype: int8``): the codes and scales, stochastic rounding,
the linear that keeps codes instead of a dequantised weight, the wrapped modules on an int8 base,
and merges into it (ReLoRA's restart, GaLore's install) that keep the function within the
quantisation error."""

from __future__ import annotations

import math

import torch

from lowrank_pt.methods import frozen_base
from lowrank_pt.methods.galore.adapter import GaLoreLinear
from lowrank_pt.model import int8_weights
from lowrank_pt.model.int8_weights import BLOCK, dequantise, quantise, stored_bytes
from lowrank_pt.model.lowrank_linear import LowRankLinear, merged_state_dict, seeded_generator


def test_codes_are_within_half_a_step_and_bytes_follow_the_formula():
    torch.manual_seed(0)
    w = torch.randn(5, 300) * torch.logspace(-3, 1, 5)[:, None]  # rows of very different size
    codes, scale = quantise(w)
    assert codes.dtype == torch.int8 and codes.shape == (5, 300) and scale.shape == (5, 2)
    step = scale.repeat_interleave(BLOCK, dim=1)[:, :300]
    assert bool(((dequantise(codes, scale) - w).abs() <= step / 2 + 1e-12).all())
    assert int(codes.abs().max()) == 127  # each block's largest value takes the largest code
    assert codes.numel() * codes.element_size() + scale.numel() * scale.element_size() == stored_bytes((5, 300))


def test_stochastic_rounding_is_unbiased_and_round_to_nearest_is_not():
    # One block whose largest value fixes the scale at 1/127 of it; the others sit 0.3 of a step
    # above a code. Many independent roundings must average to the exact value.
    exact = torch.full((1, BLOCK), 10.3 / 127)
    exact[0, 0] = 1.0
    draws = torch.stack([dequantise(*quantise(exact, seeded_generator("sr", i)))[0, 1:] for i in range(2000)])
    samples = draws.double().reshape(-1)
    standard_error = samples.std().item() / math.sqrt(samples.numel())
    assert abs(samples.mean().item() - 10.3 / 127) < 3 * standard_error
    assert set((samples * 127).round().unique().tolist()) == {10.0, 11.0}  # the two neighbouring codes only
    nearest = dequantise(*quantise(exact))[0, 1:].double()
    assert abs(nearest.mean().item() - 10.3 / 127) > 30 * standard_error  # the same test fails RTN


def saved_bytes(fn):
    """Bytes autograd saves for backward while ``fn()`` runs (inputs included)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def test_the_int8_linear_matches_its_dequantised_weight_and_saves_only_codes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 256, bias=False).requires_grad_(False)
    int8_weights.store(linear)
    x = torch.randn(4, 512, requires_grad=True)
    y, held = saved_bytes(lambda: int8_weights.linear(x, linear))
    dense = int8_weights.value(linear).requires_grad_(False)
    x2 = x.detach().clone().requires_grad_(True)
    y2, dense_held = saved_bytes(lambda: torch.nn.functional.linear(x2, dense))
    assert torch.equal(y, y2)
    y.square().sum().backward()
    y2.square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-6, atol=1e-7)
    assert held == 256 * 512 + 4 * 256 * 2  # the codes and their scales, no fp32 weight
    assert dense_held >= 256 * 512 * 4


def wrapped(kind: str, bias: bool = False, dora: bool = False):
    torch.manual_seed(1)
    base = torch.nn.Linear(300, 40, bias=bias)
    if kind == "lora":
        m = LowRankLinear(base, rank=4, alpha=8, dora=dora)
        torch.nn.init.normal_(m.lora_B, std=0.1)
    else:
        m = GaLoreLinear(base, rank=4, scale=0.25, proj_type="std")
        m.galore_basis.data.copy_(torch.linalg.qr(torch.randn(m.galore_basis.shape[1], 4))[0].t()
                                  if m.side == "right" else torch.linalg.qr(torch.randn(40, 4))[0])
        torch.nn.init.normal_(m.galore_b, std=0.1)
    return m


def test_wrapped_modules_on_an_int8_base_compute_with_its_dequantised_value():
    for kind, bias, dora in (("lora", True, False), ("lora", False, True), ("galore", False, False)):
        plain = wrapped(kind, bias, dora)
        quantised = wrapped(kind, bias, dora)
        int8_weights.store(quantised)
        plain.weight.data.copy_(int8_weights.value(quantised))  # the same base, dense
        x = torch.randn(3, 300)
        for m in (plain, quantised):
            m.zero_grad()
            m(x).square().sum().backward()
        assert torch.allclose(plain(x), quantised(x), rtol=1e-5, atol=1e-6), kind
        trained = dict(quantised.named_parameters())
        for name, p in plain.named_parameters():
            if p.requires_grad:
                assert torch.allclose(p.grad, trained[name].grad, rtol=1e-4, atol=1e-6), (kind, name)
        stored = dict(quantised.named_parameters())  # frozen params: ZeRO-3 partitions them like weights
        assert stored["weight"].dtype == torch.int8 and not stored["weight"].requires_grad
        assert stored["weight_scale"].dtype == torch.float32 and not stored["weight_scale"].requires_grad
        state = {k: v.clone() for k, v in quantised.state_dict().items()}
        if kind == "lora":  # the plain weight of an export: dequantised base, then the adapter merged in
            merged = merged_state_dict({f"m.{k}": v for k, v in state.items()})
            assert set(merged) == {"m.weight"} | ({"m.bias"} if bias else set())
            assert torch.allclose(torch.nn.functional.linear(x, merged["m.weight"], merged.get("m.bias")),
                                  quantised(x), rtol=1e-5, atol=1e-5)


def test_a_merge_into_an_int8_base_keeps_the_function_within_the_quantisation_error():
    # ReLoRA's restart (W0 += s·B·A, B then 0) and GaLore's install (W0 += α·B·Q, B then 0),
    # both re-quantised with stochastic rounding: the layer's output moves by no more than the
    # first quantisation moved it (round to nearest: half a step; stochastic: under a step).
    for kind in ("lora", "galore"):
        m = wrapped(kind)
        x = torch.randn(64, 300)
        with torch.no_grad():
            exact = m(x)
            int8_weights.store(m)
            stored = m(x)
            if kind == "lora":
                frozen_base.add_low_rank_product(None, m, m.lora_B, m.lora_A, m.scale, ("t", 0))
                m.lora_B.zero_()
            else:
                left, right = ((m.galore_b, m.galore_basis) if m.side == "right" else (m.galore_basis, m.galore_b))
                frozen_base.add_low_rank_product(None, m, left, right, m.scale, ("t", 0))
                m.galore_b.zero_()
            merged = m(x)
        quantisation = (stored - exact).abs().max()
        moved = (merged - stored).abs().max()
        assert 0 < moved < 3 * quantisation, (kind, float(moved), float(quantisation))
        # and the stored codes are the merged weight's, within one step of each element
        assert m.weight.dtype == torch.int8


def test_the_config_refuses_int8_bases_where_they_cannot_work():
    from test_lowbit import refusal

    assert refusal("lora", "fp32", precision="bf16", weight_dtype="int8", zero_stage=2) is None
    assert refusal("galore", "int8", precision="bf16", weight_dtype="int8", master_weights="bf16") is None
    said = refusal("lora", "fp32", weight_dtype="int8")  # precision fp32
    assert "engine.weight_dtype=int8" in said and "engine.precision=fp32" in said
    assert refusal("relora", "fp32", precision="bf16", weight_dtype="int8", zero_stage=3) is None
    for method in ("full", "apollo_mini", "galore_weights"):  # no frozen base: int8 updated weights
        assert refusal(method, "int8", precision="bf16", weight_dtype="int8", master_weights="bf16") is None
        said = refusal(method, "fp32", precision="bf16", weight_dtype="int8")  # fp32 masters
        assert "engine.weight_dtype=int8" in said and "engine.master_weights=fp32" in said and f"method={method}" in said
        said = refusal(method, "fp32", precision="bf16", weight_dtype="int8", master_weights="bf16", zero_stage=1)
        assert "engine.weight_dtype=int8" in said and "engine.zero_stage=1" in said
    said = refusal("lora", "fp32", precision="bf16", weight_dtype="int8", options={"base_in_fp32": True})
    assert "base_in_fp32" in said and "weight_dtype=int8" in said
    assert "engine.weight_dtype" in refusal("lora", "fp32", precision="bf16", weight_dtype="int4")


def test_grad_accum_dtype_reaches_deepspeed_where_it_means_something():
    from test_lowbit import refusal

    from lowrank_pt.config.schema import EngineConfig
    from lowrank_pt.zero.engine import deepspeed_config

    cfg = EngineConfig(zero_stage=1, precision="bf16", grad_accum_dtype="fp32")
    assert deepspeed_config(cfg, 1, 4, 1.0, 2)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in deepspeed_config(EngineConfig(zero_stage=1, precision="bf16"), 1, 4, 1.0, 2)
    # bf16 masters at ZeRO 0 run no bf16 wrapper: DeepSpeed must not see a bf16 accumulation dtype
    cfg = EngineConfig(zero_stage=0, precision="bf16", master_weights="bf16", grad_accum_dtype="bf16")
    assert "data_types" not in deepspeed_config(cfg, 1, 4, 1.0, 1)
    assert refusal("full", "fp32", precision="bf16", zero_stage=1, grad_accum_dtype="fp32") is None
    for stage in (0, 2, 3):
        said = refusal("full", "fp32", precision="bf16", zero_stage=stage, grad_accum_dtype="fp32")
        assert "engine.grad_accum_dtype=fp32" in said and f"engine.zero_stage={stage}" in said
    said = refusal("full", "fp32", grad_accum_dtype="bf16")
    assert "engine.grad_accum_dtype=bf16" in said and "engine.precision=fp32" in said
    said = refusal("full", "fp32", precision="bf16", zero_stage=1, grad_accum_dtype="fp32", master_weights="bf16")
    assert "grad_accum_dtype=fp32" in said and "master_weights=bf16" in said
    said = refusal("full", "fp32", precision="bf16", zero_stage=1, grad_accum_dtype="fp32",
                   deepspeed={"data_types": {"grad_accum_dtype": "bf16"}})
    assert "engine.deepspeed.data_types.grad_accum_dtype" in said


def test_the_planner_takes_the_engine_switches_as_flags():
    from lowrank_pt.model.llama import ModelConfig, resolve
    from lowrank_pt.tracking import planner

    cfg = resolve(ModelConfig(size="60m", seq_len=256), vocab_size=32000)
    bf16 = planner.plan(cfg, "galore", {"rank": 128}, precision="bf16")
    int8 = planner.plan(cfg, "galore", {"rank": 128}, precision="bf16", weight_dtype="int8")
    lay = planner.layout(cfg, "galore", {"rank": 128}, weight_dtype="int8")
    bases = sum(int8_weights.stored_bytes((m, n)) for m, n in planner_shapes(cfg))
    elements = sum(m * n for m, n in planner_shapes(cfg))
    assert sum(lay.frozen_int8) == elements
    # codes: 1 byte where bf16 took 2; scales: method buffers, 4 bytes per 256
    assert int8.bytes["params"] == bf16.bytes["params"] - elements
    assert int8.bytes["method_buffers"] - bf16.bytes["method_buffers"] == bases - elements
    assert int8.layout["total_params"] == bf16.layout["total_params"]
    one = planner.plan(cfg, "full", zero_stage=1, world=2, precision="bf16", grad_accum_dtype="fp32")
    assert one.bytes["grads"] > planner.plan(cfg, "full", zero_stage=1, world=2, precision="bf16").bytes["grads"]


def planner_shapes(cfg):
    """(out, in) of every linear GaLore wraps by default in ``cfg``'s model."""
    from lowrank_pt.model.llama import LlamaModel
    from lowrank_pt.model.targets import DEFAULT_TARGETS, select_linears

    with torch.device("meta"):
        model = LlamaModel(cfg)
    return [(m.out_features, m.in_features) for _, m in select_linears(model, DEFAULT_TARGETS)]
