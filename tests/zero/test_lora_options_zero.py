"""LoRA options under DeepSpeed ZeRO 0-3, 1 and 2 ranks, built as the trainer builds a stage
(ZeRO-3 under ``deepspeed.zero.Init``, weight-dependent inits in ``after_weights_loaded``, bf16
masters from what it wrote): each init keeps the model's function, every copy holds the new
factors, the preconditioner and LoRA-GA rewrite the reduced gradients, ReLoRA restarts keep the
logits, LoRA+ steps B at its ratio, and the exported plain model gives the engine's logits.

One process group per world size; the (stage, precision, options) cases loop inside it.
"""

from __future__ import annotations

import glob
import hashlib

import pytest
import torch
from fixtures import random_batches, spawn

VOCAB = 63
LR = 1e-2
COMMON = dict(rank=3, alpha=6, restart_every=2, restart_warmup_steps=1, reset_fraction=0.75, seed=5)
OPTIONS = {
    # Every option but lora_ga at once: PiSSA factors, DoRA magnitudes, rsLoRA scale, LoRA+, preconditioner.
    "pissa+dora": dict(COMMON, init="pissa", dora=True, scaling="alpha/sqrt(r)", lr_ratio=4.0,
                       precondition="riemannian"),
    "lora_ga": dict(COMMON, init="lora_ga"),
    # DoRA's restart without a weight init: the merge rescales rows by norms summed over the shards.
    "dora": dict(COMMON, init="kaiming", dora=True),
}
# DoRA's restart runs whole at stages 0-2 (the base is not partitioned there) and on the shards at 3.
CASES = ([(stage, "fp32", name) for stage in (0, 1, 2, 3) for name in OPTIONS if name != "dora"]
         + [(3, "bf16", "pissa+dora"), (0, "fp32", "dora"), (3, "fp32", "dora"), (3, "bf16", "dora")])
# Logit changes: fp32 absolute (measured <= 2.4e-7 at init, restarts and export, |logits| ~0.8); bf16
# relative to max |logit| (the residual base is stored in bf16, as any frozen bf16 base is; measured
# 2.4e-3 at init, 3.9e-3 at a restart: one bf16 ulp at |logit| 0.5-1).
LOGIT_TOL = {"fp32": 1e-5, "bf16": 2e-2}


def model_cfg():
    from lowrank_pt.model.llama import ModelConfig, resolve

    # Odd sizes (intermediate 85, vocab 63, rank 3) so ZeRO pads every partition.
    return resolve(ModelConfig(size="tiny", hidden_size=32, num_heads=2, intermediate_size=85, seq_len=16),
                   vocab_size=VOCAB)


def plain_model():
    from lowrank_pt.model.llama import LlamaModel

    torch.manual_seed(0)
    return LlamaModel(model_cfg())


def recording_relora():
    """ReLoRA that records what its gradient rewrites saw and wrote (collective reads)."""
    from lowrank_pt.methods.relora import ReLoRA
    from lowrank_pt.model.lowrank_linear import lowrank_modules
    from lowrank_pt.zero import state as zero_io

    class Recording(ReLoRA):
        def _lora_ga_init(self, engine):
            mods = lowrank_modules(engine.module)
            # The capture's sum on its owner, divided as capture.mean() will: the reduced mean.
            self.captured = {i: m.capture.grad.clone() / m.capture.world for i, (_, m) in enumerate(mods)
                             if m.capture is not None and m.capture.grad is not None}
            self.before_ga = {i: zero_io.full_param(engine, m.weight) for i, (_, m) in enumerate(mods)}
            super()._lora_ga_init(engine)
            self.after_ga = {i: {k: zero_io.full_param(engine, getattr(m, k)) for k in ("weight", "lora_A", "lora_B")}
                             | {f"grad_{k}": zero_io.full_grad(engine, getattr(m, k)) for k in ("lora_A", "lora_B")}
                             | {"module_A": module_copy(engine, m.lora_A)}
                             for i, (_, m) in enumerate(mods)}

        def _precondition(self, engine):
            mods = lowrank_modules(engine.module)
            self.before_pc = {i: [zero_io.full_param(engine, m.lora_A), zero_io.full_param(engine, m.lora_B),
                                  zero_io.full_grad(engine, m.lora_A), zero_io.full_grad(engine, m.lora_B)]
                              for i, (_, m) in enumerate(mods)}
            super()._precondition(engine)
            self.after_pc = {i: [zero_io.full_grad(engine, m.lora_A), zero_io.full_grad(engine, m.lora_B)]
                             for i, (_, m) in enumerate(mods)}

    return Recording


def build(stage: int, precision: str, options: dict, world: int):
    """A stage as ``Trainer.build_stage`` makes it, without data or tracker."""
    from lowrank_pt.config.recipe import EngineConfig, OptimizerConfig, StageConfig
    from lowrank_pt.methods import parse_options
    from lowrank_pt.methods.base import StageContext
    from lowrank_pt.model.llama import LlamaModel
    from lowrank_pt.optim.adamw import build_optimizer
    from lowrank_pt.zero import engine as E

    cfg = StageConfig(method="relora", steps=100, options=options, optimizer=OptimizerConfig(lr=LR))
    method = recording_relora()(parse_options("relora", options), cfg, None)
    ds = E.deepspeed_config(EngineConfig(zero_stage=stage, precision=precision), 2, 1, 1.0, world)
    torch.manual_seed(0)
    with E.partitioned_build(ds):
        model = LlamaModel(model_cfg())
        method.prepare_model(model)
    held = method.after_weights_loaded(model)
    optimizer = build_optimizer(method.param_groups(model), cfg.optimizer)
    engine = E.initialize(model, optimizer, method.lr_lambda(100), ds, masters=held)
    method.on_engine_ready(StageContext(engine=engine, total_steps=100))
    return engine, method


def module_copy(engine, p) -> torch.Tensor:
    from lowrank_pt.zero import state as zero_io

    with zero_io.gathered([p]):
        return p.detach().float().clone()


def reference_grads(world: int) -> dict[str, torch.Tensor]:
    """The full gradient of every targeted weight of the plain model at step 0, averaged over
    the ranks' first micro-batches: what DeepSpeed's reduction gives."""
    model = plain_model()
    for r in range(world):
        b = random_batches(1, vocab_size=VOCAB, rank=r)[0]
        (model(b["input_ids"], b["labels"]) / world).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}


def check_init(engine, method, precision, world, plain_logits, probe, out) -> None:
    """Before any step: the function is the plain model's, and masters and module copies hold
    the init's factors (pissa: those of the base as it was loaded)."""
    from lowrank_pt.model.lowrank_linear import init_factors, lowrank_modules, row_norms
    from lowrank_pt.zero import state as zero_io

    with torch.no_grad():
        logits = engine(probe).float()
    change = float((logits - plain_logits).abs().max())
    assert change <= LOGIT_TOL[precision] * (1 if precision == "fp32" else float(plain_logits.abs().max())), change
    out["init_logit_change"] = change
    if method.options.init != "pissa":
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    weights = dict(plain_model().named_parameters())
    for name, m in lowrank_modules(engine.module):
        A, B, residual = init_factors("pissa", weights[f"{name}.weight"].detach().to(dtype), m.rank, m.scale)
        assert torch.equal(zero_io.full_param(engine, m.lora_A), A), f"{name}: A's master is the fp32 factor"
        assert torch.equal(zero_io.full_param(engine, m.lora_B), B), name
        assert torch.equal(module_copy(engine, m.lora_A), A.to(dtype).float()), name
        assert torch.equal(zero_io.full_param(engine, m.weight), residual.to(dtype).float()), name
        norms = row_norms(residual.to(dtype).float(), A, B, m.scale)
        assert torch.allclose(zero_io.full_param(engine, m.lora_magnitude), norms, rtol=1e-6), name


def check_lora_ga(engine, method, reference, rank, world) -> None:
    """Each module's owner captured the reduced full gradient (at step 0: the plain model's,
    ``reference``); every rank installed its factors with the residual in the base, and the new
    factors' gradients."""
    from lowrank_pt.model.lowrank_linear import lora_ga_factors, lowrank_modules

    mods = lowrank_modules(engine.module)
    owners = method.ga_owners(mods, world)  # balanced by bytes, as GaLore's refresh owners
    assert sorted(method.captured) == [i for i, owner in enumerate(owners) if owner == rank], "owners by bytes"
    if world > 1:
        held = [sum(m.out_features * m.in_features for (_, m), o in zip(mods, owners) if o == r) for r in range(world)]
        assert max(held) - min(held) <= max(m.out_features * m.in_features for _, m in mods), held
    for i, (name, m) in enumerate(mods):
        after = method.after_ga[i]
        if i in method.captured:
            G = method.captured[i]
            if reference is not None:
                want = reference[f"{name}.weight"]
                gap = float((G - want).abs().max() / want.abs().max())
                assert gap <= 1e-5, f"{name}: captured gradient off by {gap:.1e} (relative)"
            A, B = lora_ga_factors(G, m.rank, method.options.lora_ga_gamma)
            assert torch.equal(after["lora_A"], A) and torch.equal(after["lora_B"], B), name
            assert torch.allclose(after["grad_lora_A"], m.scale * B.T @ G, atol=1e-7, rtol=1e-5), name
            assert torch.allclose(after["grad_lora_B"], m.scale * G @ A.T, atol=1e-7, rtol=1e-5), name
        restored = after["weight"] + m.scale * after["lora_B"] @ after["lora_A"]
        assert float((restored - method.before_ga[i]).abs().max()) <= 1e-6, f"{name}: W0' + s·B·A = W0"
        assert torch.equal(after["module_A"], after["lora_A"]), f"{name}: module copy written"


def check_precondition(method, precision) -> None:
    """The gradients the optimizer steps are the preconditioned ones, exactly, in the dtype
    DeepSpeed keeps reduced gradients in (bf16 at ZeRO-3 bf16, as the unpreconditioned ones)."""
    from lowrank_pt.methods.lora import precondition_grads

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for i, (A, B, gA, gB) in method.before_pc.items():
        want_A, want_B = precondition_grads(A, B, gA, gB, method.options.precondition_delta)
        got_A, got_B = method.after_pc[i]
        assert torch.equal(got_A, want_A.to(dtype).float()) and torch.equal(got_B, want_B.to(dtype).float()), i


def digest(engine) -> str:
    from lowrank_pt.zero import state as zero_io

    h = hashlib.sha256()
    for _, p in engine.module.named_parameters():
        h.update(zero_io.full_param(engine, p).numpy().tobytes())
    return h.hexdigest()


def run_case(rank, world, stage, precision, name) -> dict:
    options = OPTIONS[name]
    probe = random_batches(1, vocab_size=VOCAB, seed=99)[0]["input_ids"]
    with torch.no_grad():
        plain_logits = plain_model()(probe).float()
    engine, method = build(stage, precision, options, world)
    out = {"logit_change": []}
    check_init(engine, method, precision, world, plain_logits, probe, out)
    batches = random_batches(4, vocab_size=VOCAB, rank=rank)
    reference = reference_grads(world) if options["init"] == "lora_ga" else None
    for step in range(4):
        lrs = engine.get_lr()
        method.train_step(engine, [batches[step]], step)
        if options.get("lr_ratio", 1.0) != 1.0:
            assert lrs[-1] == pytest.approx(options["lr_ratio"] * lrs[0], rel=1e-9), "B's group at lr_ratio × LR"
        if method.is_lora_ga_step(step):  # step 0 and step 2, the first after restart 1
            check_lora_ga(engine, method, reference if step == 0 else None, rank, world)
        if method.options.precondition != "none":
            check_precondition(method, precision)
        if not method.is_restart_step(step):
            method.after_step(engine, step)
            continue
        with torch.no_grad():
            before = engine(probe).float()
        assert method.after_step(engine, step) == {"relora/restart": method.restarts}
        with torch.no_grad():
            after = engine(probe).float()
        change = float((after - before).abs().max())
        assert change <= LOGIT_TOL[precision] * (1 if precision == "fp32" else float(before.abs().max())), \
            f"restart {method.restarts}: logits moved by {change:.2e}"
        out["logit_change"].append(change)
    if precision == "fp32":
        plain = plain_model()
        plain.load_state_dict(method.export_weights(engine), strict=True)
        with torch.no_grad():
            out["export_gap"] = float((plain(probe) - engine(probe).float()).abs().max())
        assert out["export_gap"] <= 1e-5, out["export_gap"]
    out["digest"] = digest(engine)
    return out


def sweep(rank, world):
    out = {}
    for case in CASES:
        try:
            out[case] = run_case(rank, world, *case)
        except Exception as e:
            raise AssertionError(f"world {world}, stage {case[0]}, {case[1]}, {case[2]}: {e}") from e
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_lora_options_at_every_zero_stage(world):
    results = spawn(sweep, world, timeout=600)
    for case in CASES:
        per_rank = [r[case] for r in results]
        assert all(r["digest"] == per_rank[0]["digest"] for r in per_rank), f"{case}: ranks diverged"
        assert len(per_rank[0]["logit_change"]) == 2, case  # restarts after steps 1 and 3


# --- through the trainer -----------------------------------------------------------------------


def test_trainer_factors_the_carried_weights(tmp_path, data_cache):
    """A lora stage with init=pissa and DoRA after a full-rank stage, ZeRO-3 bf16 (built under
    zero.Init): the trainer calls after_weights_loaded once the carried weights are in, so the
    factors are those of the carried (bf16-rounded) bases, and A, B, m's fp32 masters hold them
    exactly. The stage's LR is 1e-12, so its one step leaves them where the init put them."""
    from fixtures import run_invocations

    from lowrank_pt.checkpoint import store as checkpoint
    from lowrank_pt.model.lowrank_linear import row_norms, svd_factors

    run_dir = str(tmp_path / "run")
    spawn(run_invocations, 1, [[
        f"run_dir={run_dir}", f"data.cache_dir={data_cache}", "engine.zero_stage=3", "engine.precision=bf16",
        "train.log_every=1", "train.eval_every=0", "train.tensorboard=false", "train.progress=false",
        "train.micro_batch_size=2", "train.keep_last=5", "stages.0.steps=2", "stages.1.steps=1",
        "stages.1.method=lora", "stages.1.options={rank: 4, alpha: 8, init: pissa, dora: true}",
        "stages.1.optimizer.lr=1e-12",
    ]])
    first, second = sorted(glob.glob(f"{run_dir}/checkpoints/step_*"))  # the ends of the two stages
    carried, after = checkpoint.load_weights(first), checkpoint.load_weights(second)
    wrapped = sorted(k[: -len(".lora_A")] for k in after if k.endswith(".lora_A"))
    assert len(wrapped) == 14
    for name in wrapped:
        w = carried[f"{name}.weight"].to(torch.bfloat16).float()  # the frozen base as loaded: bf16
        A, B, residual = svd_factors(w, 4, 2.0)
        assert torch.allclose(after[f"{name}.lora_A"], A, atol=1e-8, rtol=0), name
        assert torch.allclose(after[f"{name}.lora_B"], B, atol=1e-8, rtol=0), name
        assert torch.equal(after[f"{name}.weight"], residual.to(torch.bfloat16).float()), name
        norms = row_norms(residual.to(torch.bfloat16).float(), A, B, 2.0)
        assert torch.allclose(after[f"{name}.lora_magnitude"], norms, rtol=1e-6), name
