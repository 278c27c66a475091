"""Registry of training methods: one line per method."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lowrank_pt.core.errors import ConfigError
from lowrank_pt.methods.apollo import APOLLO
from lowrank_pt.methods.apollo_mini import APOLLOMini
from lowrank_pt.methods.base import Method
from lowrank_pt.methods.cola import CoLA
from lowrank_pt.methods.dion import Dion
from lowrank_pt.methods.fira import Fira
from lowrank_pt.methods.galore.method import GaLore
from lowrank_pt.methods.galore_weights import GaLoreWeights
from lowrank_pt.methods.lora import LoRA
from lowrank_pt.methods.muon import Muon
from lowrank_pt.methods.relora import ReLoRA
from lowrank_pt.methods.sltrain import SLTrain

METHODS: dict[str, type[Method]] = {
    "full": Method,
    "galore": GaLore,
    "galore_weights": GaLoreWeights,
    "relora": ReLoRA,
    "lora": LoRA,
    "apollo": APOLLO,
    "apollo_mini": APOLLOMini,
    "fira": Fira,
    "muon": Muon,
    "dion": Dion,
    "sltrain": SLTrain,
    "cola": CoLA,
}


def parse_options(method: str, options: dict) -> Any:
    """The method's options dataclass filled from ``options``; unknown keys or bad types fail."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: allowed {sorted(METHODS)}")
    schema = OmegaConf.structured(METHODS[method].Options)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(dict(options or {})))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{method}: {str(e).splitlines()[0]}") from None
    parsed = OmegaConf.to_object(merged)
    try:
        parsed.check()
    except ValueError as e:
        raise ConfigError(f"{method}: {e}") from None
    return parsed


def build(stage, run, plan_refresh=None) -> Method:
    """The stage's method; ``plan_refresh`` decides GaLore's ``refresh: auto`` (``Method.plan_refresh``)."""
    method = METHODS[stage.method](parse_options(stage.method, stage.options), stage, run)
    method.plan_refresh = plan_refresh
    return method


__all__ = ["METHODS", "Method", "build", "parse_options"]
