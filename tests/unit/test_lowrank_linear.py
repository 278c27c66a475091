"""LowRankLinear, wrap_linears and merged_state_dict on plain torch (no DeepSpeed), and the LoRA
method's model preparation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_pt.config.recipe import ConfigError, StageConfig
from lowrank_pt.methods import parse_options
from lowrank_pt.methods.lora import LoRA
from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
from lowrank_pt.model.lowrank_linear import (
    LowRankLinear,
    lowrank_modules,
    merged_state_dict,
    seeded_generator,
    wrap_linears,
)
from lowrank_pt.model.targets import DEFAULT_TARGETS


def tiny_model(seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    return LlamaModel(resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=64))


def test_output_equals_base_at_init_and_only_factors_get_gradients():
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=True)
    x = torch.randn(3, 5, 24)
    expected = base(x)
    layer = LowRankLinear(base, rank=4, alpha=8.0)
    assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (40, 4)
    assert torch.equal(layer(x), expected)  # B = 0: exactly the base output
    assert layer.weight is base.weight and not layer.weight.requires_grad
    with torch.no_grad():
        layer.lora_B.normal_()
    y = layer(x)
    assert torch.allclose(y, expected + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T, atol=1e-5)
    y.sum().backward()
    assert layer.weight.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_init_is_seeded_and_leaves_the_global_rng_alone():
    a, b = tiny_model(), tiny_model()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    wrap_linears(a, None, rank=4, alpha=8, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    wrap_linears(b, None, rank=4, alpha=8, seed=7)
    for (_, ma), (_, mb) in zip(lowrank_modules(a), lowrank_modules(b)):
        assert torch.equal(ma.lora_A, mb.lora_A)
    mods = lowrank_modules(a)
    assert not torch.equal(mods[0][1].lora_A, mods[1][1].lora_A)
    # Kaiming-uniform with a=sqrt(5): U(-1/sqrt(n), 1/sqrt(n)) for A of width n.
    assert mods[0][1].lora_A.abs().max() <= 64**-0.5
    assert seeded_generator(1, 2, 3).initial_seed() == seeded_generator(1, 2, 3).initial_seed()


def test_default_targets_wrap_projections_only():
    model = tiny_model()
    names = wrap_linears(model, None, rank=4, alpha=8)
    assert len(names) == 2 * len(DEFAULT_TARGETS)
    assert [n for n, _ in lowrank_modules(model)] == names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"{n}.weight" for n in names}
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight", "layers.0.input_layernorm.weight"} <= trainable
    assert {f"{n}.lora_A" for n in names} | {f"{n}.lora_B" for n in names} <= trainable


@pytest.mark.parametrize("patterns, expected", [
    (["q_proj"], ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]),
    (["layers.1.mlp.*"], ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]),
    ([r"layers\.0\.self_attn\.[qk]_proj"], ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj"]),
])
def test_patterns_suffix_glob_regex(patterns, expected):
    assert wrap_linears(tiny_model(), patterns, rank=2, alpha=2) == expected


def test_pattern_matching_nothing_is_an_error_naming_it():
    with pytest.raises(ValueError, match="qproj"):
        wrap_linears(tiny_model(), ["q_proj", "qproj"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="input_layernorm"):  # a module, but not an nn.Linear
        wrap_linears(tiny_model(), ["input_layernorm"], rank=2, alpha=2)


def test_merged_state_dict_reproduces_the_wrapped_model_in_a_plain_one():
    model = tiny_model()
    wrap_linears(model, None, rank=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lowrank_modules(model):
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    ids = torch.randint(0, 64, (2, 16), generator=g)
    logits = model(ids)

    merged = merged_state_dict(model.state_dict())
    plain = tiny_model(seed=99)
    assert list(merged) == list(plain.state_dict())  # same keys, same order, adapters dropped
    plain.load_state_dict(merged, strict=True)
    delta = (plain(ids) - logits).abs().max().item()
    assert delta <= 1e-5, delta
    assert (plain.layers[0].self_attn.q_proj.weight - model.layers[0].self_attn.q_proj.weight).abs().max() > 1e-3

    state = model.state_dict()
    del state["layers.0.mlp.up_proj.lora_scale"]
    with pytest.raises(ValueError, match="up_proj.lora_scale"):
        merged_state_dict(state)


def test_lora_method_trains_factors_and_full_rank_rest():
    options = parse_options("lora", {"rank": 4, "alpha": 8})
    method = LoRA(options, StageConfig(steps=10), None)
    model = tiny_model()
    method.prepare_model(model)
    in_groups = {id(p) for g in method.param_groups(model) for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in in_groups}
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith("proj.weight") for n in names)
    assert len(method.wrapped) == 14


@pytest.mark.parametrize("options, key", [
    ({"rank": 0}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"target_modules": []}, "target_modules"), ({"ranks": 4}, "ranks"),
])
def test_lora_options_errors_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        parse_options("lora", options)
