"""ReLoRA under DeepSpeed ZeRO 0-3, fp32 and bf16, 1 and 2 ranks: a restart keeps the function,
rewrites every copy DeepSpeed keeps, prunes only the factors' moments, and resumes bit-identically.

The sweeps run one process group per world size and loop over (stage, precision) inside it: a
second engine in a warm process costs ~0.5 s, a fresh process ~5 s.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile

import pytest
import torch
from fixtures import LOGIT_TOL, RELORA_VOCAB, make_relora, odd_model, random_batches, spawn, tiny_engine

from lowrank_pt.config.recipe import ConfigError, ScheduleConfig, StageConfig
from lowrank_pt.methods import parse_options
from lowrank_pt.methods.base import StageContext
from lowrank_pt.methods.relora import MOMENTS, ReLoRA, random_keep_mask
from lowrank_pt.model.lowrank_linear import init_lora_A, lowrank_modules, merged_weight, seeded_generator
from lowrank_pt.optim.schedule import LRSchedule
from lowrank_pt.zero import state as zero_io

CONFIGS = [(stage, precision) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")]

LR = 1e-2
MODES = ["zero", "random", "magnitude", "none"]  # restart k (1-based) prunes with MODES[k - 1]
# Full-rank params whose moments a restart must leave alone, from both optimizer groups (norms sit
# in the no-decay group, whose moments DeepSpeed 0.19.8 stages 1/2 only reach after zero_io re-links).
OTHERS = ["embed_tokens.weight", "lm_head.weight", "norm.weight", "layers.0.input_layernorm.weight"]


def module_copy(engine, p) -> torch.Tensor:
    """The module's own copy of ``p`` (not the master), gathered at stage 3."""
    with zero_io.gathered([p]):
        return p.detach().float().clone()


def moment_bytes(engine) -> int:
    """Bytes of the moment tensors the wrapped torch optimizer holds on this rank (no step counters)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sum(t.numel() * t.element_size() for state in inner.state.values()
               for key, t in state.items() if torch.is_tensor(t) and key != "step")


def expected_moment_bytes(engine, method, stage: int, world: int) -> tuple[int, int]:
    """(nominal bytes / world where partitioned, the same with DeepSpeed's padding).

    Nominal: two fp32 moments of r·(m+n) per wrapped m×n linear plus every full-rank trainable param.
    Padding: stages 1/2 pad each param group's flat buffer to a multiple of 2·world elements
    (nccl_start_alignment_factor = 2); stage 3 pads each param to a multiple of world.
    """
    wrapped = {id(p) for _, m in lowrank_modules(engine.module) for p in (m.lora_A, m.lora_B)}
    nominal = sum(m.rank * (m.in_features + m.out_features) for _, m in lowrank_modules(engine.module))
    nominal += sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()
                   if p.requires_grad and id(p) not in wrapped)
    groups = [[getattr(p, "ds_numel", p.numel()) for p in g["params"]] for g in method.param_groups(engine.module)]
    assert sum(map(sum, groups)) == nominal, "the optimizer groups hold exactly the trainable params"
    if stage == 0:
        return 8 * nominal, 8 * nominal
    if stage in (1, 2):
        padded = sum(2 * math.ceil(sum(g) / (2 * world)) for g in groups)
    else:
        padded = sum(math.ceil(n / world) for g in groups for n in g)
    return 8 * nominal / world, 8 * padded


def snapshot(engine, probe) -> dict:
    """Masters of W0, A, B, moments of A, B and of a few full-rank params, logits. Collective."""
    snap = {"params": {}, "moments": {}}
    with torch.no_grad():
        snap["logits"] = engine(probe).float()
    for name, m in lowrank_modules(engine.module):
        for leaf in ("weight", "lora_A", "lora_B"):
            snap["params"][f"{name}.{leaf}"] = zero_io.full_param(engine, getattr(m, leaf))
    named = [(f"{n}.{leaf}", getattr(m, leaf))
             for n, m in lowrank_modules(engine.module) for leaf in ("lora_A", "lora_B")]
    named += [(n, engine.module.get_parameter(n)) for n in OTHERS]
    for name, p in named:
        for key in MOMENTS:
            snap["moments"][name, key] = zero_io.optimizer_state(engine, p, key)
    return snap


def digest(engine, snap) -> str:
    """Hash of this rank's local param copies (stages 0-2 hold them whole) and of ``snap``."""
    h = hashlib.sha256()
    if zero_io.zero_stage(engine) < 3:
        for p in engine.module.parameters():
            h.update(p.detach().float().numpy().tobytes())
    for t in list(snap["params"].values()) + list(snap["moments"].values()):
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def check_moments(mode: str, fraction: float, m0, v0, m1, v1, random_mask) -> None:
    """Moments (m, v) of one factor before/after a restart pruned as ``mode`` says."""
    if mode == "none":
        assert torch.equal(m1, m0) and torch.equal(v1, v0)
        return
    if mode == "zero":
        assert not m1.any() and not v1.any()
        return
    for before, after in ((m0, m1), (v0, v1)):
        assert torch.all((after == before) | (after == 0)), "entries are kept bitwise or zeroed"
    n_keep = v0.numel() - round(fraction * v0.numel())
    if mode == "random":  # the mask every rank derives from (seed, restart, module, factor)
        assert int(random_mask.sum()) == n_keep
        assert torch.equal(m1, torch.where(random_mask, m0, 0.0)) and torch.equal(v1, torch.where(random_mask, v0, 0.0))
        return
    # magnitude: each tensor keeps at most n_keep entries, all among its largest, every entry
    # strictly above the cut kept -- except exp_avg where exp_avg_sq was pruned (zeroed with it).
    assert not torch.any((m1 != 0) & (v1 == 0)), "no exp_avg survives where exp_avg_sq was pruned"
    for before, after, allowed in ((v0, v1, torch.ones_like(v1, dtype=torch.bool)), (m0, m1, v1 != 0)):
        kept = after != 0
        assert int(kept.sum()) <= n_keep
        if n_keep:
            cut = before.abs().flatten().topk(n_keep).values.min()
            assert torch.all(before.abs()[kept] >= cut), "kept entries are among the largest"
            assert torch.all(kept[(before.abs() > cut) & allowed]), "the largest entries are kept"


def check_restart(engine, method, before, after, k: int) -> None:
    """Restart ``k`` merged W0, re-initialised A and B in masters and module, pruned only A, B moments."""
    mode, fraction = MODES[k - 1], method.options.reset_fraction
    for index, (name, m) in enumerate(lowrank_modules(engine.module)):
        W0, A0, B0 = (before["params"][f"{name}.{leaf}"] for leaf in ("weight", "lora_A", "lora_B"))
        W1, A1, B1 = (after["params"][f"{name}.{leaf}"] for leaf in ("weight", "lora_A", "lora_B"))
        assert B0.abs().max() > 0, "B trained before the restart"
        assert torch.equal(W1, merged_weight(W0.to(m.weight.dtype), A0, B0, m.scale).float()), name
        assert not torch.equal(W1, W0)
        A_new = init_lora_A(m.rank, m.in_features, seeded_generator(method.options.seed, k, index))
        assert torch.equal(A1, A_new) and not B1.any(), f"{name}: masters re-initialised"
        assert torch.equal(module_copy(engine, m.lora_A), A_new.to(m.lora_A.dtype).float())
        assert not module_copy(engine, m.lora_B).any()
        for leaf in ("lora_A", "lora_B"):
            moments = [snap["moments"][f"{name}.{leaf}", key] for snap in (before, after) for key in MOMENTS]
            factor = leaf[-1]
            mask = random_keep_mask(moments[0].shape, fraction,
                                    seeded_generator("prune", method.options.seed, k, index, factor))
            try:
                check_moments(mode, fraction, *moments, mask)
            except AssertionError as e:
                raise AssertionError(f"restart {k} ({mode}), {name}.{leaf}: {e}") from None
    for name in OTHERS:
        for key in MOMENTS:
            assert torch.equal(after["moments"][name, key], before["moments"][name, key]), f"{name} {key} untouched"


def sweep_worker(rank, world, configs):
    """All checks of a restart for each (stage, precision); returns per-rank digests and measurements."""
    out = {}
    for stage, precision in configs:
        where = f"world {world}, stage {stage}, {precision}"
        try:
            out[stage, precision] = run_restart_checks(rank, world, stage, precision)
        except Exception as e:
            raise AssertionError(f"{where}: {e}") from e
    return out


def run_restart_checks(rank, world, stage, precision) -> dict:
    method = make_relora()
    engine, method = tiny_engine(stage, precision, method=method, model=odd_model(), lr=LR, vocab_size=RELORA_VOCAB)
    schedule = method.lr_lambda(100)
    batches = random_batches(8, vocab_size=RELORA_VOCAB, rank=rank)
    probe = random_batches(1, vocab_size=RELORA_VOCAB, seed=99)[0]["input_ids"]
    result = {"digests": [], "logit_change": []}
    for step in range(8):
        lr_used = engine.get_lr()[0]
        assert lr_used == pytest.approx(LR * schedule(step), rel=1e-6), f"step {step}: engine follows the jagged LR"
        method.train_step(engine, [batches[step]], step)
        if step == 0:
            result["bytes"] = moment_bytes(engine)
            result["nominal"], result["padded"] = expected_moment_bytes(engine, method, stage, world)
        if step == 2:  # first step after restart 1 (zero mode): it starts from the new A, B
            for index, (_, m) in enumerate(lowrank_modules(engine.module)):
                A_new = init_lora_A(m.rank, m.in_features, seeded_generator(method.options.seed, 1, index))
                # B = 0 makes A's gradient exactly 0 and its moments are zero: A must not move.
                assert torch.equal(zero_io.full_param(engine, m.lora_A), A_new)
                B = zero_io.full_param(engine, m.lora_B)
                # From B = 0 with zeroed moments, Adam moves each entry by at most lr.
                assert B.any() and B.abs().max() <= lr_used * (1 + 1e-5)
        if not method.is_restart_step(step):
            assert method.after_step(engine, step) == {}
            continue
        k = method.restarts + 1
        method.options.reset_mode = MODES[k - 1]
        before = snapshot(engine, probe)
        assert method.after_step(engine, step) == {"relora/restart": k}
        after = snapshot(engine, probe)
        check_restart(engine, method, before, after, k)
        change = (after["logits"] - before["logits"]).abs().max().item()
        scale = before["logits"].abs().max().item()
        assert change <= LOGIT_TOL[precision] * (1 if precision == "fp32" else scale), \
            f"restart {k}: logits moved by {change:.2e} (max |logit| {scale:.2e})"
        result["logit_change"].append((change, scale))
        result["digests"].append(digest(engine, after))
    if precision == "fp32":
        exported = method.export_weights(engine)
        plain = odd_model()
        plain.load_state_dict(exported, strict=True)
        with torch.no_grad():
            delta = (plain(probe) - engine(probe).float()).abs().max().item()
        assert delta <= 1e-5, f"exported plain model differs by {delta}"
    return result


@pytest.mark.parametrize("world", [1, 2])
def test_restart_at_every_stage_and_precision(world):
    results = spawn(run_sweep, world, timeout=600)
    for config in CONFIGS:
        per_rank = [r[config] for r in results]
        assert all(r["digests"] == per_rank[0]["digests"] for r in per_rank), f"{config}: ranks diverged"
        assert len(per_rank[0]["digests"]) == 4  # restarts after steps 1, 3, 5, 7
        for r in per_rank:
            # Optimizer state only for trainable params: the formula, partitioned from stage 1 up.
            # Measured at 2 ranks: 31,336 B nominal. Stages 1/2 hold 31,344: the decay group's flat
            # buffer is padded by 2 elements to a multiple of 2*world, +1 element (8 B) per rank.
            # Stage 3 holds 31,360: 6 params of odd size (85x3) get 1 element each, +3 per rank.
            assert r["bytes"] == r["padded"] >= r["nominal"], (config, r["bytes"], r["padded"], r["nominal"])


def run_sweep(rank, world):
    return sweep_worker(rank, world, CONFIGS)


# --- resume ------------------------------------------------------------------------------------


def resume_worker(rank, world, configs):
    out = {}
    for stage, precision in configs:
        out[stage, precision] = run_resume(rank, stage, precision)
    return out


def _train(engine, method, batches, steps):
    losses = []
    for step in steps:
        losses.append(method.train_step(engine, [batches[step]], step))
        method.after_step(engine, step)
    return losses


def run_resume(rank, stage, precision, k: int = 3):
    """2k steps straight vs k steps, save, fresh engine, load, k steps; restarts after steps 1 | 3, 5."""
    batches = random_batches(2 * k, vocab_size=RELORA_VOCAB, rank=rank)
    options = dict(reset_mode="random", reset_fraction=0.5)

    def fresh():
        return tiny_engine(stage, precision, method=make_relora(**options), model=odd_model(), lr=LR, vocab_size=RELORA_VOCAB)

    engine, method = fresh()
    straight = _train(engine, method, batches, range(2 * k))
    final = zero_io.full_state_dict(engine)

    ckpt = tempfile.mkdtemp(prefix="relora_resume_")
    try:
        engine, method = fresh()
        first = _train(engine, method, batches, range(k))
        assert method.restarts == 1
        engine.save_checkpoint(ckpt, tag="mid", client_state={"method": method.state_dict()})
        engine, method = fresh()
        _, client = engine.load_checkpoint(ckpt, tag="mid")
        method.load_state_dict(client["method"])
        second = _train(engine, method, batches, range(k, 2 * k))
        assert method.restarts == 3
        resumed = zero_io.full_state_dict(engine)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    return {"straight": straight, "resumed": first + second, "final_equal": {
        name: torch.equal(final[name], resumed[name]) for name in final}}


def run_resume_configs(rank, world):
    return resume_worker(rank, world, [(0, "fp32"), (3, "bf16")])


def test_resume_mid_cycle_is_bit_identical():
    (result,) = spawn(run_resume_configs, 1, timeout=600)
    for config, r in result.items():
        assert r["resumed"] == r["straight"], config
        assert all(r["final_equal"].values()), (config, [n for n, ok in r["final_equal"].items() if not ok])


# --- schedule and options ----------------------------------------------------------------------


def test_jagged_schedule_restarts_from_the_options():
    stage = StageConfig(steps=40, schedule=ScheduleConfig(kind="cosine", warmup_steps=3, min_lr_ratio=0.1))
    method = ReLoRA(parse_options("relora", {"restart_every": 10, "restart_warmup_steps": 4}), stage, None)
    lr = method.lr_lambda(40)
    method.on_engine_ready(StageContext(engine=None, total_steps=40))  # the stage's length, handed once
    envelope = LRSchedule("cosine", 40, warmup_steps=3, min_lr_ratio=0.1)
    assert [s for s in range(40) if method.is_restart_step(s)] == [9, 19, 29]  # not the last step
    for step in range(40):
        since = step % 10
        ramp = (since + 1) / 5 if step >= 10 and since < 4 else 1.0
        assert lr(step) == pytest.approx(envelope(step) * ramp)
    for restart in (10, 20, 30):
        assert lr(restart) < 0.3 * lr(restart - 1)  # drops at the step after each restart
        assert all(lr(s) < lr(s + 1) for s in range(restart, restart + 4))  # re-warms over 4 steps
        assert lr(restart + 4) == pytest.approx(envelope(restart + 4))


def test_schedule_must_be_cosine_and_agree_with_the_options():
    options = parse_options("relora", {"restart_every": 10, "restart_warmup_steps": 2})
    with pytest.raises(ValueError, match="schedule.kind"):
        ReLoRA(options, StageConfig(steps=40, schedule=ScheduleConfig(kind="linear")), None).lr_lambda(40)
    clash = ScheduleConfig(kind="jagged_cosine", restart_every=5, restart_warmup_steps=2)
    with pytest.raises(ValueError, match="restart_every"):
        ReLoRA(options, StageConfig(steps=40, schedule=clash), None).lr_lambda(40)
    same = ScheduleConfig(kind="jagged_cosine", restart_every=10, restart_warmup_steps=2)
    assert ReLoRA(options, StageConfig(steps=40, schedule=same), None).lr_lambda(40).restart_every == 10


@pytest.mark.parametrize("options, key", [
    ({}, "restart_every"), ({"restart_every": 0}, "restart_every"),
    ({"restart_every": 10, "restart_warmup_steps": 10}, "restart_warmup_steps"),
    ({"restart_every": 10, "reset_mode": "prune"}, "reset_mode"),
    ({"restart_every": 10, "reset_fraction": 1.5}, "reset_fraction"),
    ({"restart_every": 10, "rank": 0}, "rank"),
])
def test_options_errors_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        parse_options("relora", options)


def test_state_dict_is_plain_data():
    method = make_relora()
    method.restarts = 3
    state = method.state_dict()
    assert state == {"restarts": 3}
    other = make_relora()
    other.load_state_dict(state)
    assert other.restarts == 3
