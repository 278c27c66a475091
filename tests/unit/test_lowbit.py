"""Low-bit AdamW states (``optimizer.state_dtype``): the fp32 path is torch's AdamW to the bit, the
8-bit blocks decode within their quantisation error, stochastic rounding is unbiased, and the state
bytes are the formula the planner uses."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_pt.optim.lowbit import BLOCK, LowBitAdamW, decode, encode, padded, round_to_bf16, state_bytes


def train(make, shape, steps=12, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = make([p])
    grads = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        p.grad = torch.randn(shape, generator=grads).to(dtype)
        opt.step()
    return p.detach().float(), opt


KW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("shape", [(64, 48), (1000,)])  # a matrix (ZeRO 0), a flat partition (ZeRO 1-3)
def test_fp32_states_step_exactly_as_torch_adamw(shape):
    ours, _ = train(lambda ps: LowBitAdamW(ps, state_dtype="fp32", **KW), shape)
    torch_, _ = train(lambda ps: torch.optim.AdamW(ps, foreach=False, **KW), shape)
    assert torch.equal(ours, torch_)


@pytest.mark.parametrize("state_dtype, tol", [("bf16", 2e-3), ("int8", 1e-2)])
def test_low_bit_states_follow_fp32_within_their_rounding(state_dtype, tol):
    exact, _ = train(lambda ps: LowBitAdamW(ps, state_dtype="fp32", **KW), (64, 48))
    low, _ = train(lambda ps: LowBitAdamW(ps, state_dtype=state_dtype, **KW), (64, 48))
    start, _ = train(lambda ps: LowBitAdamW(ps, state_dtype="fp32", **KW), (64, 48), steps=0)
    moved = (exact - start).abs().max().item()
    assert moved > 0.1  # the weights travel far more than the states' rounding moves them
    assert (low - exact).abs().max().item() < tol


@pytest.mark.parametrize("signed", [True, False])
def test_blocks_decode_within_the_quantisation_error(signed):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5 * BLOCK + 17, generator=g) * torch.logspace(-3, 0, 5 * BLOCK + 17)  # uneven scales
    if not signed:
        x = x.square()
    codes, scales = encode(x, signed)
    assert codes.dtype == torch.uint8 and codes.numel() == padded(x.numel()) == 6 * BLOCK
    assert scales.numel() == 6
    y = decode(codes, scales, signed, x.numel())
    block_max = torch.cat([x, x.new_zeros(padded(x.numel()) - x.numel())]).view(-1, BLOCK).abs().amax(1)
    error = (torch.cat([y - x, x.new_zeros(padded(x.numel()) - x.numel())]).view(-1, BLOCK).abs().amax(1))
    # The dynamic map's widest gap near 1 is 1/64 of the block's max (signed); half of it rounds.
    bound = (0.5 / 64 if signed else 0.5 / 128) + 1e-6
    assert bool((error <= bound * block_max).all()), (error / block_max).max()


def test_state_bytes_are_the_formula():
    for n, dtype in ((1000, "int8"), (256, "int8"), (257, "int8"), (1000, "bf16"), (1000, "fp32")):
        _, opt = train(lambda ps, d=dtype: LowBitAdamW(ps, state_dtype=d, **KW), (n,), steps=1)
        state = next(iter(opt.state.values()))
        held = sum(t.numel() * t.element_size() for t in state.values())
        assert held == state_bytes(n, dtype), (n, dtype)
        assert all(isinstance(t, torch.Tensor) and type(t) is torch.Tensor for t in state.values())


def test_stochastic_rounding_is_unbiased_and_round_to_nearest_is_not():
    exact = 1.0 + 2.0 ** -10  # an eighth of a bf16 step above 1
    x = torch.full((200_000,), exact)
    torch.manual_seed(0)
    samples = round_to_bf16(x).double()
    standard_error = samples.std().item() / math.sqrt(samples.numel())
    assert abs(samples.mean().item() - exact) < 3 * standard_error
    assert set(samples.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}  # the two neighbours only
    nearest = x.to(torch.bfloat16).double()
    assert abs(nearest.mean().item() - exact) > 30 * standard_error  # the same test fails RTN


def test_a_bf16_param_keeps_updates_smaller_than_half_its_step():
    # Without fp32 masters, an update below half a bf16 step is lost to round-to-nearest; with
    # stochastic rounding the weights move by it on average.
    def run(make):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = make([p])
        for _ in range(50):
            p.grad = torch.ones_like(p)
            opt.step()
        return p.detach().double().mean().item()

    lr = 1e-4  # Adam's step is ~lr a step: 5e-3 in all, each far below bf16's 3.9e-3 step at 1
    rounded = run(lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0, foreach=False))
    stochastic = run(lambda ps: LowBitAdamW(ps, lr=lr, weight_decay=0.0, state_dtype="fp32"))
    assert rounded == 1.0
    assert abs((1.0 - stochastic) - 50 * lr) < 0.1 * 50 * lr, stochastic


# --- what the config refuses, naming both keys -----------------------------------------------------


def refusal(method: str, state_dtype: str, **extra) -> str | None:
    from lowrank_pt.config.recipe import validate
    from lowrank_pt.config.schema import OptimizerConfig, RunConfig, StageConfig
    from lowrank_pt.core.errors import ConfigError

    options = {"relora": {"rank": 2, "restart_every": 2}, "galore": {"rank": 2, "update_proj_gap": 2}}.get(method, {})
    options.update(extra.pop("options", {}))
    run = RunConfig(stages=[StageConfig(name="main", steps=4, method=method, options=options,
                                        optimizer=OptimizerConfig(state_dtype=state_dtype))])
    for key, value in extra.items():
        setattr(run.engine, key, value)
    try:
        validate(run, environment=False)
    except ConfigError as e:
        return str(e)
    return None


def test_the_config_refuses_what_low_bit_states_cannot_do():
    assert refusal("full", "int8") is None and refusal("lora", "bf16") is None and refusal("relora", "bf16") is None
    assert "optimizer.state_dtype" in refusal("full", "int4")
    said = refusal("full", "int8", zero_stage=2, offload_optimizer=True)
    assert "optimizer.state_dtype=int8" in said and "engine.offload_optimizer" in said
    # a restart's pruning and a refresh's re-projection edit int8 moments decoded (moments_as_tensors)
    assert refusal("relora", "int8") is None
    assert refusal("galore", "int8", options={"moments_on_refresh": "reproject"}) is None
    for method in ("apollo", "apollo_mini", "fira", "muon", "dion"):  # their optimizers store moments (momentum) alike
        assert refusal(method, "bf16") is None and refusal(method, "int8") is None


def test_a_resume_keeps_the_states_dtype_and_their_partitions():
    from lowrank_pt.checkpoint import reshard, resume
    from lowrank_pt.config.schema import OptimizerConfig, RunConfig, StageConfig
    from lowrank_pt.core.errors import ConfigError

    run = RunConfig(stages=[StageConfig(steps=4, optimizer=OptimizerConfig(state_dtype="int8"))])
    meta = {"stage_index": 0, "method": "full", "precision": "fp32", "state_dtype": "fp32",
            "zero_stage": 0, "world_size": 1}
    with pytest.raises(ConfigError, match="state_dtype is int8 here but fp32 in the checkpoint"):
        resume.check_run(run, 1, meta, "ckpt")
    with pytest.raises(ConfigError, match="fp32 optimizer states only"):
        reshard.check({**meta, "state_dtype": "int8", "zero_stage": 2, "world_size": 2}, "ckpt", 2, 1, "fp32")


def test_the_config_refuses_bf16_masters_where_they_cannot_work():
    assert refusal("full", "fp32", precision="bf16", master_weights="bf16") is None
    assert refusal("galore", "int8", precision="bf16", master_weights="bf16", zero_stage=3) is None
    said = refusal("full", "fp32", master_weights="bf16")  # precision fp32
    assert "engine.master_weights=bf16" in said and "engine.precision=fp32" in said
    said = refusal("full", "fp32", precision="bf16", master_weights="bf16", zero_stage=2, offload_optimizer=True)
    assert "engine.master_weights=bf16" in said and "engine.offload_optimizer" in said
    for method in ("apollo", "apollo_mini", "fira"):  # their optimizer rounds stochastically too
        assert refusal(method, "fp32", precision="bf16", master_weights="bf16") is None


def test_deepspeed_gets_bf16_masters_at_zero_1_to_3_and_none_at_zero_0():
    from lowrank_pt.config.schema import EngineConfig
    from lowrank_pt.zero.engine import bf16_params, deepspeed_config

    for stage in (0, 1, 2, 3):
        cfg = EngineConfig(zero_stage=stage, precision="bf16", master_weights="bf16")
        bf16 = deepspeed_config(cfg, 1, 1, 1.0, 1)["bf16"]
        if stage == 0:  # no wrapper: the model's own bf16 params are updated
            assert bf16 == {"enabled": False} and bf16_params(cfg)
        else:
            assert bf16["enabled"] and bf16["bf16_master_weights_and_grads"] and not bf16_params(cfg)
        plain = deepspeed_config(EngineConfig(zero_stage=stage, precision="bf16"), 1, 1, 1.0, 1)["bf16"]
        assert plain == {"enabled": True}


def test_a_stage_says_what_a_rank_holds_per_parameter():
    from types import SimpleNamespace

    from lowrank_pt.tracking.stage import StageTracker

    n = 1000  # trained elements; on 2 ranks at ZeRO 1-3 a rank steps half of them
    tracker = SimpleNamespace(world=2, zero_stage=2, params={"trainable": n},
                              formula={"params": 2 * n, "master_params": 2 * n // 2, "grads": 2 * n // 2,
                                       "optimizer_states": state_bytes(n // 2, "int8"), "method_buffers": 0})
    line = StageTracker.describe(tracker)
    assert "params 0.0 MiB" in line and "method buffers" not in line
    per = (n + n + state_bytes(n // 2, "int8")) / (n // 2)
    assert f"{per:.2f} bytes per trained parameter" in line
    assert StageTracker.describe(SimpleNamespace(formula={}, params={})) == ""


def test_int8_moments_can_be_edited_as_tensors_and_come_back_to_the_same_codes():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, 7)), torch.nn.Parameter(torch.randn(50))]
    opt = LowBitAdamW(params, lr=1e-2, state_dtype="int8")
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    before = {(i, k): v.clone() for i, p in enumerate(params) for k, v in opt.state[p].items()}
    with opt.moments_as_tensors():  # decoded, untouched: the codes come back unchanged
        assert opt.state[params[0]]["exp_avg"].shape == params[0].shape
    assert all(torch.equal(opt.state[params[i]][k], v) for (i, k), v in before.items())
    with opt.moments_as_tensors():  # an edit (ReLoRA's pruning) of one param's moments
        m = opt.state[params[0]]["exp_avg"]
        edited = torch.where(m.abs() > m.abs().median(), m, 0.0)
        m.copy_(edited)
    assert "exp_avg" not in opt.state[params[0]]
    codes, scales = opt.state[params[0]]["exp_avg_codes"], opt.state[params[0]]["exp_avg_scales"]
    now = decode(codes, scales, True, params[0].numel()).view_as(params[0])
    assert bool((now[edited == 0] == 0).all())  # pruned entries are exactly zero
    assert torch.allclose(now, edited, rtol=0.05, atol=1e-3 * float(edited.abs().max()))
    assert all(torch.equal(opt.state[params[1]][k], before[(1, k)]) for k in opt.state[params[1]])


def test_a_loaded_state_is_stored_as_it_was_saved():
    # torch's Optimizer.load_state_dict casts every state tensor to its param's dtype: the codes
    # would come back as 4-byte floats, the bf16 moments as fp32.
    for dtype in ("int8", "bf16"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(600))
        opt = LowBitAdamW([p], lr=1e-2, state_dtype=dtype)
        p.grad = torch.randn_like(p)
        opt.step()
        saved = {k: v.clone() for k, v in opt.state[p].items()}
        fresh = LowBitAdamW([p], lr=1e-2, state_dtype=dtype)
        fresh.load_state_dict(opt.state_dict())
        loaded = fresh.state[p]
        assert {k: v.dtype for k, v in loaded.items()} == {k: v.dtype for k, v in saved.items()}, dtype
        assert all(torch.equal(loaded[k], saved[k]) for k in saved)
