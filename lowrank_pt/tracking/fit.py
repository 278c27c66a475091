"""``lowrank-pt plan --fit GIB``: the cheapest setting whose planned peak fits a memory budget per GPU.

The search runs over the switches that trade memory for something else, each with a price that
says what it costs (quality risk or compute), and returns the cheapest setting whose peak
estimate (``planner.plan``) is within the budget; among equal prices, the one that needs less
memory. A setting the config checks refuse (``config.engine_keys.check_engine``,
``config.recipe.check_update``, the method's own per-layer check, GaLore's one-micro-batch refresh
in backward) is never offered.

=========================  ======================================================  =====
switch                     what it costs                                           price
=========================  ======================================================  =====
activation_checkpointing   a second forward of every block in backward (~1/3 more   1
                           compute)
update per_layer           no global gradient clipping (the update itself is exact) 0.5
state_dtype bf16 / int8    rounded Adam moments (BENCHMARKS.md: quality)            1 / 2
master_weights bf16        stochastically rounded weights instead of fp32 masters   2
weight_dtype int8          int8 frozen bases (lora, relora, galore) or int8 weights  3
                           updated with stochastic rounding (other methods, ZeRO 0)
GaLore's subspace          refresh=backward svd=randomized (one micro-batch per     0.5 / 1
                           step, a randomized solve) / svd=sketch
projector_dtype bf16       galore, galore_weights: bases rounded once per refresh   0.5
zero_stage k               communication (k = 1, 2, 3; only with more than one GPU) 0.5·k
=========================  ======================================================  =====
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from dataclasses import dataclass

from lowrank_pt import methods
from lowrank_pt.config.engine_keys import check_engine
from lowrank_pt.config.recipe import check_update
from lowrank_pt.config.schema import EngineConfig, StageConfig
from lowrank_pt.tracking import planner

PRICES = {
    ("activation_checkpointing", True): 1.0,
    ("update", "per_layer"): 0.5,
    ("state_dtype", "bf16"): 1.0,
    ("state_dtype", "int8"): 2.0,
    ("master_weights", "bf16"): 2.0,
    ("weight_dtype", "int8"): 3.0,
    ("projector_dtype", "bf16"): 0.5,
}


@dataclass
class Fit:
    """A setting, its price and its plan."""

    setting: dict
    price: float
    plan: planner.Plan

    def flags(self) -> str:
        """The setting as ``lowrank-pt plan`` flags (and ``--option`` for a method option)."""
        s = self.setting
        out = [f"--zero-stage {s['zero_stage']}", f"--state-dtype {s['state_dtype']}",
               f"--master-weights {s['master_weights']}", f"--weight-dtype {s['weight_dtype']}",
               f"--update {s['update']}"]
        if s["activation_checkpointing"]:
            out.append("--activation-checkpointing")
        out += [f"--option {k}={v}" for k, v in s.get("options", {}).items()]
        return " ".join(out)


def method_variants(method: str, options: dict):
    """(method options the search adds, their price): GaLore's subspace solves (the adapter's) and
    projector dtype, each only where the user's own options leave it open."""
    if method not in ("galore", "galore_weights"):
        yield {}, 0.0
        return
    subspaces = [({}, 0.0)]
    if method == "galore" and "refresh" not in options:  # the search decides what refresh: auto would
        subspaces = [({"refresh": "step"}, 0.0)]
        if options.get("svd") != "sketch":
            subspaces.append(({"refresh": "backward", "svd": options.get("svd", "randomized")}, 0.5))
        if "svd" not in options:
            subspaces.append(({"refresh": "step", "svd": "sketch"}, 1.0))
    projectors = [{}] if "projector_dtype" in options else [{}, {"projector_dtype": "bf16"}]
    for (sub, cost), proj in itertools.product(subspaces, projectors):
        yield dict(sub, **proj), cost + sum(PRICES.get(kv, 0.0) for kv in proj.items())


def price(setting: dict, extra: float = 0.0) -> float:
    switches = sum(PRICES.get((k, v), 0.0) for k, v in setting.items() if k != "options")
    return switches + 0.5 * setting["zero_stage"] + extra


def settings(method: str, options: dict, world: int, precision: str):
    """Every setting the search considers (before the checks), with the price of its method options."""
    stages = (0, 1, 2, 3) if world > 1 else (0,)
    masters = ("fp32", "bf16") if precision == "bf16" else ("fp32",)
    weights = ("bf16", "int8") if precision == "bf16" else ("bf16",)
    for values in itertools.product(stages, ("fp32", "bf16", "int8"), masters, weights, ("step", "per_layer"),
                                    (False, True), method_variants(method, options)):
        *switches, (extra_options, extra_price) = values
        setting = dict(zip(("zero_stage", "state_dtype", "master_weights", "weight_dtype", "update",
                            "activation_checkpointing"), switches), options=extra_options)
        yield setting, extra_price


def check_setting(method: str, options: dict, engine: EngineConfig, update: str) -> None:
    """The config checks a plan's setting can fail, without a recipe (ValueError naming the keys):
    the engine keys, the update mode, the method's options, and the method's own checks of int8
    updated weights and of per-layer updates. What ``plan`` refuses and ``--fit`` skips."""
    check_engine(engine)
    check_update(engine, update)
    cls = methods.METHODS[method]
    parsed = methods.parse_options(method, options)
    if engine.weight_dtype == "int8" and not cls.has_frozen_base:
        cls.check_int8_updated(SimpleNamespace(engine=engine))
    if update == "per_layer":
        stage = StageConfig(method=method, steps=1, options=dict(options), update="per_layer")
        cls.check_per_layer(parsed, stage, None)


def allowed(method: str, options: dict, setting: dict, precision: str, grad_accum: int) -> bool:
    """Whether the config checks would take this setting (``options``: the user's and the search's)."""
    engine = EngineConfig(zero_stage=setting["zero_stage"], precision=precision,
                          master_weights=setting["master_weights"], weight_dtype=setting["weight_dtype"])
    try:
        check_setting(method, options, engine, setting["update"])
    except ValueError:
        return False
    return not (options.get("refresh") == "backward" and grad_accum != 1)


def fit(model_cfg, method: str, options: dict, budget: int, world: int = 1, precision: str = "bf16",
        grad_accum: int = 1, **plan_kwargs) -> tuple[Fit | None, Fit]:
    """(the cheapest setting whose peak is at most ``budget`` bytes, or None; the smallest plan found)."""
    options = {k: v for k, v in options.items() if (k, v) != ("refresh", "auto")}
    layouts: dict[tuple, planner.Layout] = {}
    best, smallest = None, None
    for setting, extra_price in settings(method, options, world, precision):
        opts = dict(options, **setting["options"])
        if not allowed(method, opts, setting, precision, grad_accum):
            continue
        key = (tuple(sorted(opts.items())), setting["state_dtype"], setting["weight_dtype"])
        if key not in layouts:
            layouts[key] = planner.layout(model_cfg, method, opts, plan_kwargs.get("weight_decay", 0.0),
                                          setting["state_dtype"], setting["weight_dtype"])
        p = planner.plan(model_cfg, method, opts, zero_stage=setting["zero_stage"], world=world, precision=precision,
                         activation_checkpointing=setting["activation_checkpointing"], grad_accum=grad_accum,
                         state_dtype=setting["state_dtype"], master_weights=setting["master_weights"],
                         weight_dtype=setting["weight_dtype"], update=setting["update"], lay=layouts[key],
                         device_bytes=budget, **plan_kwargs)
        found = Fit(setting, price(setting, extra_price), p)
        if smallest is None or p.total < smallest.plan.total:
            smallest = found
        if p.total <= budget and (best is None or (found.price, p.total) < (best.price, best.plan.total)):
            best = found
    return best, smallest
