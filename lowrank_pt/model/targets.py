"""Which linears an adapter method trains, and the one way they are replaced.

Every adapter method (lora, relora, galore) selects its targets with ``select_linears`` and swaps
them with ``replace_linears``, so the rules are the same for all of them:

- a pattern is a module name or its last dotted components (``q_proj``, ``mlp.down_proj``), a glob
  over the full name (``layers.*.mlp.*``) or a regex matching the full name
  (``layers\\.[01]\\..*_proj``);
- each pattern must match at least one ``nn.Linear``: a typo fails before training, naming it;
- a linear whose weight is shared with an embedding (tied input/output embeddings) is left alone:
  wrapping it would untie the two or train the embedding through a low-rank path.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Callable

import torch
from torch import nn

from lowrank_pt.model.llama import LlamaModel

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Attention and MLP projections; embeddings, norms and the head stay full-rank."""


def matches(pattern: str, name: str) -> bool:
    """Whether the dotted module ``name`` matches ``pattern`` (see the module doc)."""
    if name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def select_linears(model: nn.Module, patterns: list[str] | None) -> list[tuple[str, nn.Linear]]:
    """``(name, linear)`` of every targeted ``nn.Linear`` in module order (``None``: the defaults).

    Raises ValueError naming every pattern that matches no ``nn.Linear``.
    """
    patterns = list(DEFAULT_TARGETS if patterns is None else patterns)
    if not patterns:
        raise ValueError("target_modules: give at least one pattern (default: attention and MLP projections)")
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) not in tied]
    unmatched = [p for p in patterns if not any(matches(p, n) for n, _ in linears)]
    if unmatched:
        example = linears[0][0] if linears else "none"
        raise ValueError(f"target_modules: {unmatched} match no nn.Linear of the model "
                         f"(linears are named like {example!r})")
    return [(n, m) for n, m in linears if any(matches(p, n) for p in patterns)]


def check_targets(model_cfg, patterns: list[str] | None) -> None:
    """``select_linears`` on the model of a resolved ``model_cfg`` built on the meta device (no
    memory, no init, any size): a pattern that matches nothing fails before any work starts, as a
    ValueError naming the stage key (``options.target_modules...``)."""
    with torch.device("meta"):
        model = LlamaModel(model_cfg)
    try:
        select_linears(model, patterns)
    except ValueError as e:
        raise ValueError(f"options.{e}") from None


def replace_linears(model: nn.Module, targets: list[tuple[str, nn.Linear]],
                    make: Callable[[int, str, nn.Linear], nn.Module]) -> dict[str, nn.Module]:
    """Put ``make(index, name, linear)`` in place of each target; returns the new modules by name,
    in the order of ``targets`` (the index is what seeds per-module initialisation)."""
    out = {}
    for index, (name, linear) in enumerate(targets):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = make(index, name, linear)
        setattr(parent, leaf, module)
        out[name] = module
    return out
