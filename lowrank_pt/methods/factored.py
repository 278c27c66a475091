"""What the methods whose model is factored from the first step share (``sltrain``, ``cola``):
their targeted linears are replaced before any weight exists, so a stage of theirs starts from
its own init (never from a dense model's weights), trains every param of the model it built
with the stage's AdamW, and counts FLOPs and activations from the modules it built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, List

import torch
from torch import nn

from lowrank_pt.methods.base import Method, MethodOptions
from lowrank_pt.model.llama import LlamaModel, attention_flops_per_token
from lowrank_pt.model.targets import DEFAULT_TARGETS, check_targets


@dataclass
class FactoredOptions(MethodOptions):
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linears replaced by the factored form (the same patterns as lora); embeddings, norms and the
    head stay dense and train with them."""
    seed: int = 0
    """Seed of every replaced linear's init (plus its index in module order): the same on every rank."""

    def check(self) -> None:
        if not self.target_modules:
            raise ValueError("target_modules: give at least one pattern (default: attention and MLP projections)")


class FactoredMethod(Method):
    """A method that builds its own architecture in place of the targeted linears."""

    starts_from_scratch: ClassVar[bool] = True
    module_type: ClassVar[type] = nn.Module
    """The class that replaces a targeted linear (what ``modules`` finds)."""

    @classmethod
    def check_stage(cls, options, stage, run, model_cfg, total_steps: int) -> None:
        if run is not None and run.engine.weight_dtype == "int8":
            raise ValueError(f"method={cls.name} with engine.weight_dtype=int8: the factored linears hold no dense "
                             "weight to store in int8; use weight_dtype bf16")
        super().check_stage(options, stage, run, model_cfg, total_steps)
        try:
            cls.build_model(model_cfg, options, meta=True)
        except ValueError as e:  # a pattern that matches nothing, a rank that does not fit a linear
            raise ValueError(f"options.{e}") from None

    @classmethod
    def build_model(cls, model_cfg, options: Any, meta: bool = False) -> nn.Module:
        """The model this method trains, freshly initialised (on the meta device with ``meta``)."""
        if meta:
            check_targets(model_cfg, options.target_modules)
            with torch.device("meta"):
                model = LlamaModel(model_cfg)
                cls.wrap(model, options)
            return model
        model = LlamaModel(model_cfg)
        cls.wrap(model, options)
        return model

    @classmethod
    def wrap(cls, model: nn.Module, options: Any) -> list[str]:
        """Replace the targeted linears of ``model``; their names in module order."""
        raise NotImplementedError

    @classmethod
    def modules(cls, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if isinstance(m, cls.module_type)]

    def prepare_model(self, model: nn.Module) -> None:
        super().prepare_model(model)
        self.wrapped = self.wrap(model, self.options)
        self.shapes = [(m.out_features, m.in_features, m.rank) for m in self.modules(model)]

    def flops_per_token(self, model_cfg, micro_tokens: int | None = None) -> int:
        """Training FLOPs per token of the model as built: its linears' own count
        (``linear_flops``) plus the attention products and the head, as the dense model's."""
        linears = sum(self.linear_flops(m, n, r, micro_tokens or model_cfg.seq_len) for m, n, r in self.shapes)
        return linears + attention_flops_per_token(model_cfg) + 6 * model_cfg.vocab_size * model_cfg.hidden_size \
            + self.untargeted_flops(model_cfg)

    def untargeted_flops(self, model_cfg) -> int:
        """6·m·n per token of each linear of the blocks left dense (not targeted)."""
        with torch.device("meta"):
            dense = LlamaModel(model_cfg)
        total = sum(6 * p.numel() for name, p in dense.layers.named_parameters() if name.endswith("_proj.weight"))
        return total - sum(6 * m * n for m, n, _ in self.shapes)

    def linear_flops(self, m: int, n: int, r: int, tokens: int) -> int:
        """Forward and backward FLOPs per token of one replaced m×n linear of rank r, with ``tokens``
        per forward call."""
        raise NotImplementedError
