"""Per-layer updates (``update: per_layer``, ``lowrank_pt.zero.per_layer``) at ZeRO 0 against
ordinary steps of the same method, from the same weights on the same batches.

fp32, 8 steps with a cosine schedule after 2 warm-up steps and weight decay 0.1; GaLore and the
projected optimizers refresh every 3 steps (steps 0, 3, 6), ReLoRA restarts every 3. At
accumulation 1 and 4 every method's weights and optimizer state equal the ordinary step's bit for
bit (each update reads one tensor's gradient and state; the micro-batches before the last
accumulate as an ordinary step does). A run that steps at every micro-batch (GaLore issue #78's
bug) is the negative control: the accumulation test tells it apart. On 2 ranks the gradients are
all-reduced in the hooks with DeepSpeed's arithmetic: bit for bit again, in bf16 without fp32
masters too (stochastic rounding keyed by step and tensor, the same on both ranks); a NaN loss on one rank
skips the step on both with nothing applied; a NaN gradient behind a finite loss stops the run.
The most gradient bytes held at once equal the planner's formula.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import random_batches, spawn

STEPS, GAP = 8, 3
CASES = {
    "full": ("full", {}),
    "galore": ("galore", {"rank": 4, "update_proj_gap": GAP}),
    "galore_backward": ("galore", {"rank": 4, "update_proj_gap": GAP, "refresh": "backward"}),
    "relora": ("relora", {"rank": 4, "restart_every": GAP, "restart_warmup_steps": 1}),
    "apollo": ("apollo", {"rank": 4, "update_proj_gap": GAP}),
    "apollo_mini": ("apollo_mini", {"update_proj_gap": GAP}),
    "fira": ("fira", {"rank": 4, "update_proj_gap": GAP}),
    "galore_weights": ("galore_weights", {"rank": 4, "update_proj_gap": GAP}),
    "muon": ("muon", {}),
    "dion": ("dion", {"rank": 4}),
}


def build(case: str, per_layer: bool, accum: int, world: int = 1, precision: str = "fp32"):
    """(engine, method) as the trainer builds a stage, with per-layer updates or without."""
    from lowrank_pt import methods
    from lowrank_pt.config.recipe import EngineConfig, OptimizerConfig, ScheduleConfig, StageConfig
    from lowrank_pt.methods.base import StageContext
    from lowrank_pt.model.llama import LlamaModel, ModelConfig, resolve
    from lowrank_pt.zero import engine as E
    from lowrank_pt.zero.per_layer import PerLayerUpdates

    name, options = CASES[case]
    stage = StageConfig(method=name, steps=100, options=options, update="per_layer" if per_layer else "step",
                        optimizer=OptimizerConfig(lr=3e-3, eps=1e-12, weight_decay=0.1, grad_clip=0.0),
                        schedule=ScheduleConfig(kind="cosine", warmup_steps=2))
    method = methods.build(stage, None)
    masters = "bf16" if precision == "bf16" else "fp32"
    engine_cfg = EngineConfig(zero_stage=0, precision=precision, master_weights=masters)
    ds = E.deepspeed_config(engine_cfg, 4 // accum // world, accum, method.grad_clip(), world)
    torch.manual_seed(0)
    model = LlamaModel(resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=64))
    method.prepare_model(model)
    optimizer = method.build_optimizer(method.param_groups(model), stage, engine_cfg)
    engine = E.initialize(model, optimizer, method.lr_lambda(100), ds,
                          cast_to=torch.bfloat16 if E.bf16_params(engine_cfg) else None)
    method.on_engine_ready(StageContext(engine=engine, total_steps=100,
                                        per_layer=PerLayerUpdates(engine) if per_layer else None))
    return engine, method


def batches(step: int, accum: int, rank: int = 0, world: int = 1) -> list[dict]:
    """The step's 4 sequences in ``accum`` micro-batches; rank r of 2 takes its half of each."""
    whole = random_batches(1, micro_batch_size=4, seed=step, vocab_size=64)[0]
    per = 4 // accum
    micro = [{k: v[i * per:(i + 1) * per] for k, v in whole.items()} for i in range(accum)]
    if world == 1:
        return micro
    half = per // world
    return [{k: v[rank * half:(rank + 1) * half] for k, v in b.items()} for b in micro]


def state(engine) -> dict:
    """Weights, every optimizer state tensor, the schedule's step."""
    from lowrank_pt.zero.held import inner_optimizer

    out = {f"w.{n}": p.detach().clone() for n, p in engine.module.named_parameters()}
    out.update({f"b.{n}": b.detach().clone() for n, b in engine.module.named_buffers()})
    inner = inner_optimizer(engine)
    for i, p in enumerate(q for g in inner.param_groups for q in g["params"]):
        for k, v in inner.state.get(p, {}).items():
            if torch.is_tensor(v):
                out[f"s.{i}.{k}"] = v.clone()
    out["lr_step"] = torch.tensor(engine.lr_scheduler.last_epoch)
    return out


def train(engine, method, accum: int, rank: int = 0, world: int = 1, steps: int = STEPS) -> None:
    for step in range(steps):
        method.train_step(engine, batches(step, accum, rank, world), step)
        method.after_step(engine, step)


def every_micro_batch(engine, method, accum: int) -> None:
    """The negative control: one per-layer update per micro-batch (what GaLore's per-layer path
    does under accumulation), each with its micro-batch's gradient."""
    per_layer = method.context.per_layer
    for step in range(STEPS):
        for batch in batches(step, accum):
            loss = engine(batch["input_ids"], batch["labels"])
            with per_layer.updating(method, step):
                engine.backward(loss)
            engine.step()
        method.after_step(engine, step)


def _equivalence(rank, world):
    from lowrank_pt.tracking import planner
    from lowrank_pt.model.llama import ModelConfig, resolve

    torch.set_num_threads(1)
    out = {}
    cfg = resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=64)
    for case in CASES:
        for accum in (1, 4):
            if case == "galore_backward" and accum != 1:  # a refresh in backward takes one micro-batch
                continue
            runs = []
            for per_layer in (False, True):
                engine, method = build(case, per_layer, accum)
                start = state(engine)
                train(engine, method, accum)
                runs.append(state(engine))
            held = method.context.per_layer
            name, options = CASES[case]
            lay = planner.layout(cfg, name, options, weight_decay=0.1)
            planned = planner.state_bytes(lay, 0, 1, "fp32", update="per_layer", grad_accum=accum)["grads"]
            out[(case, accum)] = {
                "same": sorted(k for k in runs[0] if not torch.equal(runs[0][k], runs[1][k])),
                "keys": len(runs[0]), "stepped": held.stepped, "tensors": len(held.params),
                "held": held.peak_grad_bytes, "planned": planned,
                "all": sum(p.numel() * p.element_size() for p in held.params),
                "moved": max((runs[1][k] - start[k]).abs().max().item() for k in runs[1] if k.startswith("w.")),
            }
        if case == "full":  # the negative control
            engine, method = build(case, True, 4)
            every_micro_batch(engine, method, 4)
            control = state(engine)
            engine, method = build(case, False, 4)
            train(engine, method, 4)
            ordinary = state(engine)
            out["control"] = max((control[k] - ordinary[k]).abs().max().item() for k in ordinary if k.startswith("w."))
    return out


@pytest.fixture(scope="module")
def equivalence():
    return spawn(_equivalence, 1, timeout=600)[0]


# (galore refresh=backward takes one micro-batch per step: config refuses grad_accum > 1)
@pytest.mark.parametrize("case,accum", [(c, a) for c in sorted(CASES) for a in (1, 4)
                                        if not (c == "galore_backward" and a > 1)])
def test_per_layer_equals_step_bit_for_bit(equivalence, case, accum):
    r = equivalence[(case, accum)]
    assert r["same"] == [], f"{case} accum {accum}: differ in {r['same'][:5]}"
    assert r["moved"] > 1e-3  # the runs trained
    assert r["stepped"] == r["tensors"]  # the last backward stepped every trained tensor itself


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_bytes_held_equal_the_plan(equivalence, case):
    for accum in (1, 4):
        r = equivalence.get((case, accum))
        if r is None:
            continue
        assert r["held"] == r["planned"], (case, accum, r)
    r = equivalence[(case, 1)]
    if case == "galore":  # its refresh steps hold every gradient (captured full gradients need them)
        assert r["held"] == r["all"]
    else:
        assert r["held"] < r["all"] / 2


def test_one_update_per_micro_batch_fails_the_accumulation_test(equivalence):
    # Four updates with quarter gradients instead of one: off by far more than rounding.
    assert equivalence["control"] > 1e-3


def _two_ranks(rank, world):
    from lowrank_pt.core.errors import TrainingError

    torch.set_num_threads(1)
    out = {}
    for case in ("full", "galore_backward"):
        runs = []
        for per_layer in (False, True):
            engine, method = build(case, per_layer, 1, world=2)
            train(engine, method, 1, rank, world)
            runs.append(state(engine))
        out[case] = sorted(k for k in runs[0] if not torch.equal(runs[0][k], runs[1][k]))
    # bf16 weights without fp32 masters, each update stochastically rounded: the rounding's bits are
    # keyed by step and tensor, so the two ranks' replicas stay identical and per-layer updates
    # round as an ordinary step does (AdamW, and the fragment optimizer's projected path).
    for case in ("full", "galore_weights"):
        runs = []
        for per_layer in (False, True):
            engine, method = build(case, per_layer, 1, world=2, precision="bf16")
            torch.manual_seed(100 + rank)  # as the trainer seeds each rank's own randomness
            train(engine, method, 1, rank, world)
            runs.append(state(engine))
        out[f"bf16_{case}"] = sorted(k for k in runs[0] if not torch.equal(runs[0][k], runs[1][k]))
        out[f"bf16_{case}_weights"] = {k: v for k, v in runs[1].items() if k.startswith("w.")}
    # A NaN loss on rank 1 (its gradient finite): skipped on both ranks, nothing applied.
    engine, method = build("full", True, 1, world=2)
    train(engine, method, 1, rank, world, steps=2)
    before = state(engine)
    handle = None
    if rank == 1:
        handle = engine.module.register_forward_hook(lambda m, i, loss: loss + loss.detach() * float("nan"))
    method.train_step(engine, batches(2, 1, rank, world), 2)
    if handle is not None:
        handle.remove()
    after = state(engine)
    out["nan_loss_skipped"] = method.step_skipped
    out["nan_loss_changed"] = sorted(k for k in before if k != "lr_step" and not torch.equal(before[k], after[k]))
    out["lr_moved"] = int(after["lr_step"]) - int(before["lr_step"])
    method.train_step(engine, batches(3, 1, rank, world), 3)  # the next step trains
    out["next_applied"] = not torch.equal(after["w.norm.weight"], engine.module.norm.weight)
    # A NaN in rank 0's gradient of the first layer's attention (the loss finite): the run stops
    # on both ranks (the all-reduce in the hook gives both the NaN).
    if rank == 0:
        handle = engine.module.layers[0].self_attn.q_proj.weight.register_hook(lambda g: g * float("nan"))
    try:
        method.train_step(engine, batches(4, 1, rank, world), 4)
        out["nan_grad"] = "no error"
    except TrainingError as e:
        out["nan_grad"] = str(e)
    return out


def test_two_ranks_bit_for_bit_and_the_guard():
    results = spawn(_two_ranks, 2, timeout=600)
    for case in ("full", "galore_weights"):  # bf16 replicas equal on both ranks, and trained
        a, b = (r[f"bf16_{case}_weights"] for r in results)
        assert all(torch.equal(a[k], b[k]) for k in a), case
    for r in results:
        assert r["full"] == [] and r["galore_backward"] == []
        assert r["bf16_full"] == [] and r["bf16_galore_weights"] == []
        assert r["nan_loss_skipped"] is True
        assert r["nan_loss_changed"] == []
        assert r["lr_moved"] == 1  # the schedule moves on, as with an ordinary skipped step
        assert r["next_applied"]
        assert "not finite" in r["nan_grad"] and "per_layer" in r["nan_grad"]


# --- what the config refuses, naming both keys ---------------------------------------------------------


def refusal(method: str = "full", options=None, stage_update=None, train_update="per_layer", grad_clip=None,
            **engine) -> str | None:
    from lowrank_pt.config.recipe import validate
    from lowrank_pt.config.schema import OptimizerConfig, RunConfig, StageConfig
    from lowrank_pt.core.errors import ConfigError

    run = RunConfig(stages=[StageConfig(name="main", steps=4, method=method, options=dict(options or {}),
                                        update=stage_update, optimizer=OptimizerConfig(grad_clip=grad_clip))])
    run.train.update = train_update
    for key, value in engine.items():
        setattr(run.engine, key, value)
    try:
        validate(run, environment=False)
    except ConfigError as e:
        return str(e)
    return None


def test_the_config_refuses_what_per_layer_updates_cannot_do():
    assert refusal() is None
    assert refusal(precision="bf16", master_weights="bf16") is None
    assert refusal("lora", {"rank": 2}) is None
    assert "engine.zero_stage=1" in refusal(zero_stage=1) and "train.update=per_layer" in refusal(zero_stage=1)
    assert "stages[0] (main).update=per_layer" in refusal(zero_stage=3, stage_update="per_layer", train_update="step")
    assert refusal(zero_stage=3, stage_update="step") is None  # the stage's own key wins
    message = refusal(precision="bf16")
    assert "engine.master_weights=fp32" in message and "train.update=per_layer" in message
    message = refusal(grad_clip=1.0)
    assert "optimizer.grad_clip=1.0" in message and "update=per_layer" in message
    assert refusal(grad_clip=0.0) is None
    message = refusal("lora", {"rank": 2, "precondition": "riemannian"})
    assert "options.precondition" in message and "update=per_layer" in message
    assert "train.update" in refusal(train_update="layer")


def test_per_layer_turns_the_default_clipping_off():
    from lowrank_pt import methods
    from lowrank_pt.config.schema import RunConfig, StageConfig

    run = RunConfig(stages=[StageConfig(steps=4)])
    assert methods.build(run.stages[0], run).grad_clip() == 1.0
    run.train.update = "per_layer"
    assert methods.build(run.stages[0], run).grad_clip() == 0.0
