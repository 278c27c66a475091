"""One target matcher for every adapter method: the same selection, the same errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_pt.config.recipe import StageConfig
from lowrank_pt.methods.galore.method import GaLore, GaLoreOptions
from lowrank_pt.methods.lora import LoRA, LoRAOptions
from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
from lowrank_pt.model.targets import DEFAULT_TARGETS, matches, select_linears


def tiny_model(tie: bool = False) -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(resolve(ModelConfig(size="tiny", seq_len=16, tie_embeddings=tie), vocab_size=64))


def adapted_names(method_cls, options_cls, patterns, tie=False) -> list[str]:
    model = tiny_model(tie)
    method_cls(options_cls(target_modules=patterns), StageConfig(), None).prepare_model(model)
    plain = {n for n, m in tiny_model(tie).named_modules() if isinstance(m, nn.Linear)}
    return sorted(n for n, m in model.named_modules() if n in plain and not isinstance(m, nn.Linear))


@pytest.mark.parametrize("pattern, name, hit", [
    ("q_proj", "layers.0.self_attn.q_proj", True), ("self_attn.q_proj", "layers.0.self_attn.q_proj", True),
    ("proj", "layers.0.self_attn.q_proj", False), ("layers.*.mlp.*", "layers.1.mlp.up_proj", True),
    (r"layers\.[01]\..*_proj", "layers.1.self_attn.o_proj", True), (r"layers\.[01]\..*_proj", "layers.2.self_attn.o_proj", False),
    ("[", "layers.0.self_attn.q_proj", False),  # not a valid regex, not a match
])
def test_pattern_rules(pattern, name, hit):
    assert matches(pattern, name) is hit


@pytest.mark.parametrize("patterns", [None, ["q_proj", "down_proj"], ["layers.0.*"]])
def test_lora_and_galore_wrap_the_same_linears(patterns):
    expected = sorted(n for n, _ in select_linears(tiny_model(), patterns))
    assert expected, "the patterns select something"
    lora = adapted_names(LoRA, LoRAOptions, patterns if patterns is not None else list(DEFAULT_TARGETS))
    galore = adapted_names(GaLore, GaLoreOptions, patterns if patterns is not None else list(DEFAULT_TARGETS))
    assert lora == galore == expected


@pytest.mark.parametrize("method_cls, options_cls", [(LoRA, LoRAOptions), (GaLore, GaLoreOptions)])
def test_each_unmatched_pattern_is_named(method_cls, options_cls):
    with pytest.raises(ValueError, match=r"\['typo_proj'\] match no nn.Linear"):
        adapted_names(method_cls, options_cls, ["q_proj", "typo_proj"])


@pytest.mark.parametrize("method_cls, options_cls", [(LoRA, LoRAOptions), (GaLore, GaLoreOptions)])
def test_tied_head_is_never_wrapped(method_cls, options_cls):
    model = tiny_model(tie=True)
    head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is model.embed_tokens.weight]
    assert head, "the tiny model's head is tied to its embedding"
    with pytest.raises(ValueError, match="match no nn.Linear"):
        adapted_names(method_cls, options_cls, head, tie=True)
    assert head[0] not in adapted_names(method_cls, options_cls, [".*"], tie=True)
