"""Tracking pieces that need no process group: phase timer, FLOPs and peaks, summary.json,
the planner's activation estimate and paper comparison, the report and plan commands."""

from __future__ import annotations

import argparse
import json
import os
import time

import pytest
import torch

from lowrank_pt.core.timer import NULL_TIMER, PhaseTimer
from lowrank_pt.model.llama import LlamaModel, ModelConfig, count_parameters, resolve
from lowrank_pt.tracking import flops, planner, summary

# --- timer --------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds


def test_phases_are_exclusive_and_sum_to_the_step():
    clock = FakeClock()
    timer = PhaseTimer(sync=False, clock=clock)
    timer.start_step()
    with timer.phase("data"):
        clock.advance(0.1)
    with timer.phase("optimizer"):
        clock.advance(0.2)
        with timer.phase("refresh"):  # nested: charged to refresh only
            clock.advance(0.5)
        clock.advance(0.3)
    clock.advance(0.05)  # outside any span
    step = timer.end_step()
    assert step["data"] == pytest.approx(0.1)
    assert step["optimizer"] == pytest.approx(0.5)
    assert step["refresh"] == pytest.approx(0.5)
    assert step["other"] == pytest.approx(0.05)
    assert step["step"] == pytest.approx(1.15)
    assert sum(v for k, v in step.items() if k != "step") == pytest.approx(step["step"])

    with timer.phase("eval"):  # between steps: stage totals only
        clock.advance(2.0)
    assert timer.totals["eval"] == pytest.approx(2.0)
    timer.start_step()
    step2 = timer.end_step()
    assert "eval" not in step2
    assert timer.steps == 2 and timer.step_seconds == pytest.approx(1.15)


def test_phases_with_the_real_clock_cover_the_step():
    timer = PhaseTimer(sync=False)
    timer.start_step()
    for name in ("data", "forward", "backward", "optimizer"):
        with timer.phase(name):
            time.sleep(0.01)
    step = timer.end_step()
    phases = sum(step[n] for n in ("data", "forward", "backward", "optimizer"))
    assert all(step[n] >= 0.009 for n in ("data", "forward", "backward", "optimizer"))
    assert phases <= step["step"]
    assert step["other"] < 0.25 * step["step"]  # loose: shared CI machines


def test_listeners_and_exceptions():
    timer = PhaseTimer(sync=False)
    calls = []
    timer.on_enter("optimizer", lambda: calls.append(1))
    with timer.phase("optimizer"):
        pass
    with pytest.raises(ValueError):
        with timer.phase("forward"):
            raise ValueError("boom")
    assert calls == [1]
    assert "forward" in timer.totals  # time is recorded even when the span raises
    assert not timer._stack


def test_null_timer_is_a_no_op():
    with NULL_TIMER.phase("forward"):
        pass
    NULL_TIMER.start_step()
    assert NULL_TIMER.end_step() == {}
    assert NULL_TIMER.enabled is False


# --- FLOPs and peaks ----------------------------------------------------------------------------


def test_flops_per_token_formula():
    cfg = resolve(ModelConfig(size="tiny", seq_len=64), vocab_size=512)
    d, f, L, v, t = 64, 172, 2, 512, 64
    assert flops.flops_per_token(cfg) == 6 * (L * (4 * d * d + 3 * d * f) + v * d) + 12 * L * d * t
    # the matmul weights are every param except the input embedding and the norms
    model = LlamaModel(cfg)
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n)
    assert flops.flops_per_token(cfg) == 6 * n_matmul + 12 * L * d * t


def test_gpu_peak_table_matches_longest_name_first():
    assert flops.gpu_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert flops.gpu_peak_flops("NVIDIA A10", "bf16") == 125e12
    assert flops.gpu_peak_flops("NVIDIA L40S", "bf16") == 362e12
    assert flops.gpu_peak_flops("NVIDIA L4", "bf16") == 121e12
    assert flops.gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert flops.gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert flops.gpu_peak_flops("NVIDIA H200", "fp32") in (67e12, 494e12)  # tf32 when enabled
    assert flops.gpu_peak_flops("Tesla V100-SXM2-16GB", "bf16") is None
    assert flops.gpu_peak_flops("Some Future GPU", "bf16") is None


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []

    def fake_measure(dtype, seconds=1.0, size=1024):
        calls.append(dtype)
        return 1.5e11

    monkeypatch.setattr(flops, "measure_matmul_flops", fake_measure)
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    cache = str(tmp_path)
    assert flops.cpu_peak_flops("fp32", cache) == 1.5e11
    assert flops.cpu_peak_flops("fp32", cache) == 1.5e11
    assert flops.cpu_peak_flops("bf16", cache) == 1.5e11
    assert calls == ["fp32", "bf16"]
    with open(tmp_path / flops.CPU_PEAK_FILE) as f:
        keys = list(json.load(f))
    assert len(keys) == 2 and all(f"threads={torch.get_num_threads()}" in k for k in keys)
    monkeypatch.setenv(flops.PEAK_ENV, "2.5")
    assert flops.device_peak("fp32", cache)[0] == 2.5e12


def test_real_cpu_matmul_measurement_is_plausible():
    value = flops.measure_matmul_flops("fp32", seconds=0.05, size=256)
    assert 1e8 < value < 1e14
    assert flops.mfu(1000.0, 1e6, 1e10, 1) == pytest.approx(0.1)
    assert flops.mfu(1000.0, 1e6, None, 1) is None


def test_tracking_leaves_the_global_rng_alone():
    """A resumed run is bit-exact only if measuring the peak or laying out the model draws
    nothing from the global generator."""
    torch.manual_seed(123)
    before = torch.get_rng_state().clone()
    flops.measure_matmul_flops("fp32", seconds=0.01, size=64)
    cfg = resolve(ModelConfig(size="tiny", seq_len=16), vocab_size=64)
    for method, options in (("full", {}), ("lora", {"rank": 4}), ("galore", {"rank": 4})):
        planner.layout(cfg, method, options)
    assert torch.equal(before, torch.get_rng_state())


# --- summary.json --------------------------------------------------------------------------------


def entry(name, index, **extra):
    base = {"name": name, "index": index, "method": "full", "world_size": 1, "flops_per_token": 100,
            "peak_flops_per_device": 1e6, "timed_steps": 10, "timed_tokens": 1000, "train_time_s": 2.0,
            "time_s": 3.0, "phase_s": {"forward": 1.0}, "start_step": 0, "end_step": 10, "complete": True,
            "memory": {"peak_rss_bytes": 10}}
    base.update(extra)
    return summary.derive_rates(base)


def test_write_stage_summary_merges_by_stage_name(tmp_path):
    run = str(tmp_path)
    summary.write_stage_summary(run, entry("main", 1))
    summary.write_stage_summary(run, entry("warmup", 0))
    data = summary.read_summary(run)
    assert [s["name"] for s in data["stages"]] == ["warmup", "main"]  # recipe order
    assert data["stages"][1]["tokens_per_s"] == pytest.approx(500.0)
    assert data["stages"][1]["mfu"] == pytest.approx(500 * 100 / 1e6)
    # the same stage again (a rerun of a finished stage) replaces its entry
    summary.write_stage_summary(run, entry("main", 1, train_time_s=4.0, timed_tokens=1000))
    data = summary.read_summary(run)
    assert len(data["stages"]) == 2 and data["stages"][1]["tokens_per_s"] == pytest.approx(250.0)
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]


def test_a_stopped_stage_continued_after_resume_adds_up(tmp_path):
    run = str(tmp_path)
    summary.write_stage_summary(run, entry("main", 0, end_step=4, complete=False, timed_steps=4,
                                           timed_tokens=400, train_time_s=1.0, memory={"peak_rss_bytes": 50}))
    summary.write_stage_summary(run, entry("main", 0, start_step=4, end_step=10, timed_steps=6,
                                           timed_tokens=600, train_time_s=1.0, memory={"peak_rss_bytes": 20}))
    (s,) = summary.read_summary(run)["stages"]
    assert s["complete"] and s["start_step"] == 0 and s["end_step"] == 10 and s["segments"] == 2
    assert s["timed_steps"] == 10 and s["timed_tokens"] == 1000
    assert s["tokens_per_s"] == pytest.approx(500.0)
    assert s["phase_s"]["forward"] == pytest.approx(2.0)
    assert s["memory"]["peak_rss_bytes"] == 50


def test_summary_survives_garbage(tmp_path):
    (tmp_path / summary.SUMMARY_FILE).write_text("{not json")
    assert summary.read_summary(str(tmp_path))["stages"] == []
    summary.write_stage_summary(str(tmp_path), entry("a", 0))
    assert len(summary.read_summary(str(tmp_path))["stages"]) == 1
    with pytest.raises(ValueError):
        summary.write_stage_summary(str(tmp_path), {"name": "x"})


# --- planner -------------------------------------------------------------------------------------


def saved_activation_bytes(cfg, dtype, batch):
    """Bytes of the tensors autograd saves for backward, parameters excluded."""
    from fixtures import saved_bytes

    torch.manual_seed(0)
    model = LlamaModel(cfg).to(dtype)
    return saved_bytes(model, torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len)))[0]


@pytest.mark.parametrize("size,precision,ckpt", [("small", "fp32", False), ("small", "bf16", False),
                                                 ("demo", "fp32", False), ("small", "bf16", True)])
def test_activation_estimate_matches_autograd(size, precision, ckpt):
    cfg = resolve(ModelConfig(size=size, seq_len=128, activation_checkpointing=ckpt), vocab_size=1000)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    measured = saved_activation_bytes(cfg, dtype, batch=2)
    estimate = planner.activation_bytes(cfg, 2, 128, precision, ckpt)["saved"]
    assert abs(estimate - measured) / measured < 0.12, (estimate, measured)


def test_planner_scales_with_zero_stage_and_method():
    cfg = resolve(ModelConfig(size="7b", seq_len=2048), vocab_size=32000)
    n = count_parameters(cfg)
    p0 = planner.plan(cfg, "full", zero_stage=0, world=8, precision="bf16").bytes
    assert p0["params"] == 2 * n and p0["master_params"] == 4 * n and p0["grads"] == 2 * n
    tensors = 3 + 9 * cfg.num_layers  # embedding, head, final norm; 7 linears and 2 norms per block
    assert p0["optimizer_states"] == 8 * n + 4 * tensors  # 2 fp32 moments + one step counter per param
    p3 = planner.plan(cfg, "full", zero_stage=3, world=8, precision="bf16").bytes
    assert p3["params"] == pytest.approx(2 * n / 8, rel=1e-4)
    assert p3["optimizer_states"] == pytest.approx(8 * n / 8, rel=1e-4)
    g2 = planner.plan(cfg, "galore", {"rank": 1024}, zero_stage=2, world=8, precision="bf16").bytes
    f2 = planner.plan(cfg, "full", zero_stage=2, world=8, precision="bf16").bytes
    assert g2["optimizer_states"] < 0.3 * f2["optimizer_states"]
    assert g2["method_buffers"] > 0 and g2["method_transient"] > 0 and f2["method_transient"] == 0
    ck = planner.plan(cfg, "full", zero_stage=2, world=8, activation_checkpointing=True).bytes
    assert ck["activations"] < 0.25 * f2["activations"]


def test_planner_shards_galore_projectors_at_zero3_and_halves_them_in_bf16():
    """The 7B plan of docs/memory.md (rank 1024, 8 GPUs, bf16): projectors are frozen params, whole
    at ZeRO 2, ⌈n/8⌉ per GPU at ZeRO 3, 2 bytes per element with projector_dtype bf16."""
    cfg = resolve(ModelConfig(size="7b", seq_len=2048), vocab_size=32000)
    lay = planner.layout(cfg, "galore", {"rank": 1024})
    elements = [n for n, _ in lay.method_params]
    assert len(elements) == 7 * cfg.num_layers and {size for _, size in lay.method_params} == {4}

    def buffers(zero_stage, **options):
        return planner.plan(cfg, "galore", {"rank": 1024, **options}, zero_stage=zero_stage, world=8,
                            precision="bf16").bytes["method_buffers"]

    assert buffers(2) == 4 * sum(elements) + lay.buffer_bytes
    assert buffers(3) == 4 * sum(-(-n // 8) for n in elements) + lay.buffer_bytes
    assert buffers(3, projector_dtype="bf16") == 2 * sum(-(-n // 8) for n in elements) + lay.buffer_bytes
    assert buffers(3) < 0.5 * 2**30 < 3.4 * 2**30 < buffers(2)  # 0.44 GiB per GPU instead of 3.50


def test_paper_accounting_is_near_the_galore_papers_table():
    """GaLore paper, memory of weights + optimizer states (BF16): 60M 0.36G full / 0.24G GaLore
    (rank 128); 1B 7.80G / 4.38G (rank 512). Their accounting is not spelled out; ours counts
    2 bytes per weight, moment and projector value (see BENCHMARKS.md for the comparison)."""
    for size, rank, full, galore in (("60m", 128, 0.36e9, 0.24e9), ("1b", 512, 7.80e9, 4.38e9)):
        cfg = resolve(ModelConfig(size=size), vocab_size=32000)
        ours_full = planner.paper_accounting(cfg, "full")
        ours_galore = planner.paper_accounting(cfg, "galore", {"rank": rank})
        assert abs(ours_full - full) / full < 0.05, (size, ours_full)
        assert abs(ours_galore - galore) / galore < 0.20, (size, ours_galore)
        assert ours_galore < ours_full


# --- commands ------------------------------------------------------------------------------------


def cli(argv):
    from lowrank_pt.tracking.cli import register

    parser = argparse.ArgumentParser(prog="lowrank-pt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_plan_command(capsys):
    assert cli(["plan", "--size", "7b", "--method", "galore", "--rank", "1024", "--zero-stage", "2", "--gpus", "8",
                "--micro-batch", "1", "--seq-len", "2048", "--precision", "bf16", "--activation-checkpointing"]) == 0
    out = capsys.readouterr().out
    for label in ("optimizer states", "gradients", "activations", "method buffers", "peak estimate"):
        assert label in out
    assert cli(["plan", "--size", "60m", "--method", "relora", "--rank", "128", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bytes"]["total"] > data["bytes"]["resident"] > 0
    assert cli(["plan", "--size", "tiny", "--method", "lora", "--option", "rank=0"]) == 2
    capsys.readouterr()
    # What train refuses, plan refuses with the same words instead of planning it (an int8 weight
    # the optimizer updates exists at ZeRO 0 only; planned at ZeRO 3 its bytes came out negative).
    assert cli(["plan", "--size", "tiny", "--method", "full", "--zero-stage", "3", "--gpus", "2", "--precision",
                "bf16", "--master-weights", "bf16", "--weight-dtype", "int8"]) == 2
    said = capsys.readouterr()
    assert "engine.weight_dtype=int8 at engine.zero_stage=3" in said.err and "peak estimate" not in said.out


def fake_run(run_dir, label_loss=5.0):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in range(1, 11):
            stage = "warmup" if step <= 5 else "main"
            f.write(json.dumps({"step": step, "stage": stage, "loss": label_loss - 0.1 * step, "tokens": 256 * step,
                                "throughput/tokens_per_s": 1000 + step}) + "\n")
            if step in (5, 10):
                f.write(json.dumps({"step": step, "stage": stage, "eval/loss": label_loss - 0.1 * step,
                                    "eval/perplexity": 100.0, "tokens": 256 * step}) + "\n")
        f.write('{"step": 11, "trunc')  # a line cut by a kill
    measured = {"params": 4000, "master_params": 0, "optimizer_states": 8000, "grads": 4000, "method_buffers": 0,
                "zero_buffers": 0, "total": 16000}
    for index, name in enumerate(("warmup", "main")):
        summary.write_stage_summary(run_dir, entry(name, index, memory={
            "measured": measured, "formula": dict(measured, grads=4100), "peak_rss_bytes": 2**30}))


def test_report_writes_markdown_html_and_plots(tmp_path):
    a, b = str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")
    fake_run(a)
    fake_run(b, 6.0)
    out = str(tmp_path / "report")
    assert cli(["report", a, b, "--out", out, "--html"]) == 0
    text = open(os.path.join(out, "report.md")).read()
    assert "x/run" in text and "y/run" in text  # same names disambiguated
    assert text.count("| x/run | warmup |") >= 3 and "| y/run | main |" in text
    assert "(4.00 KiB)" in text  # formula shown where it differs from the measurement
    for png in ("loss.png", "throughput.png", "memory.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in open(os.path.join(out, "report.html")).read()
    assert cli(["report", str(tmp_path / "missing"), "--out", out]) == 2


def test_planner_7b_refresh_in_backward_keeps_the_device_transient_small():
    """docs/memory.md's 7B plan (rank 1024, ZeRO-3, 8 GPUs, bf16, one micro-batch of 2048 tokens):
    refreshed at the step, a rank holds the full fp32 gradients it owns (3.0 GiB); refreshed in
    backward with randomized subspace iteration, the device holds one matrix's iteration blocks
    and its activations' fp32 copies at a time, and each rank keeps its eighth of the new bases
    in host memory until the step."""
    cfg = resolve(ModelConfig(size="7b", seq_len=2048), vocab_size=32000)
    gib = 2**30

    def plan(**options):
        return planner.plan(cfg, "galore", {"rank": 1024, **options}, zero_stage=3, world=8, micro_batch=1,
                            seq_len=2048, precision="bf16").bytes

    at_step = plan()
    assert at_step["method_transient"] > 2.9 * gib and at_step["refresh_working"] == 0
    backward = plan(refresh="backward", svd="randomized")
    assert backward["method_transient"] == 0
    rows_cols, k, r = 4096 + 11008, 1024 + 8, 1024
    assert backward["refresh_working"] == 4 * (2 * rows_cols * k + 2 * r * 4096 + 2048 * rows_cols)  # basis side 4096
    assert backward["refresh_working"] < 0.3 * gib
    assert backward["method_buffers"] < 0.5 * gib
    bases = sum(-(-n // 8) * size for n, size in planner.layout(cfg, "galore", {"rank": 1024}).method_params)
    assert backward["refresh_kept_on_host"] == bases
    assert plan(refresh="backward", svd="randomized", projector_dtype="bf16")["refresh_kept_on_host"] == bases // 2


# --- plan --fit ----------------------------------------------------------------------------------


def fit_run_config(method: str, options: dict, setting: dict, precision: str):
    """The tiny recipe with ``setting`` as a user would write it: the config checks must take it."""
    from lowrank_pt.config.recipe import load

    overrides = [f"engine.precision={precision}", f"engine.zero_stage={setting['zero_stage']}",
                 f"engine.master_weights={setting['master_weights']}", f"engine.weight_dtype={setting['weight_dtype']}",
                 f"train.update={setting['update']}",
                 f"model.activation_checkpointing={str(setting['activation_checkpointing']).lower()}",
                 "train.grad_accum=1"]
    for i in (0, 1):
        overrides += [f"stages.{i}.method={method}", f"stages.{i}.optimizer.state_dtype={setting['state_dtype']}"]
        overrides += [f"stages.{i}.options.{k}={v}" for k, v in {**options, **setting["options"]}.items()]
    return load("configs/tiny.yaml", overrides, environment=False)


@pytest.mark.parametrize("method,options", [("galore", {"rank": 64}), ("apollo_mini", {})])
def test_fit_finds_the_cheapest_setting_within_the_budget(method, options):
    """The setting ``plan --fit`` returns plans at most the budget when planned on its own, the
    config checks take it, a larger budget never costs more, and a budget below the smallest plan
    finds nothing."""
    from lowrank_pt.tracking.fit import fit

    cfg = resolve(ModelConfig(size="60m", seq_len=1024), vocab_size=32000)
    gib = 2**30
    unconstrained, smallest = fit(cfg, method, options, 10**15, micro_batch=4, seq_len=1024)
    assert unconstrained.price == 0 and unconstrained.setting["update"] == "step"
    budget = (smallest.plan.total + unconstrained.plan.total) // 2
    best, _ = fit(cfg, method, options, budget, micro_batch=4, seq_len=1024)
    s = best.setting
    again = planner.plan(cfg, method, {**options, **s["options"]}, zero_stage=s["zero_stage"], micro_batch=4,
                         seq_len=1024, precision="bf16", activation_checkpointing=s["activation_checkpointing"],
                         state_dtype=s["state_dtype"], master_weights=s["master_weights"],
                         weight_dtype=s["weight_dtype"], update=s["update"])
    assert again.total == best.plan.total <= budget < unconstrained.plan.total
    assert best.price > 0
    fit_run_config(method, options, s, "bf16")  # raises if a check refuses it
    tighter, _ = fit(cfg, method, options, smallest.plan.total, micro_batch=4, seq_len=1024)
    assert tighter.plan.total <= smallest.plan.total and tighter.price >= best.price
    none, smallest_again = fit(cfg, method, options, smallest.plan.total - 1, micro_batch=4, seq_len=1024)
    assert none is None and smallest_again.plan.total == smallest.plan.total
    assert smallest.plan.total < 0.8 * unconstrained.plan.total, (smallest.plan.total / gib,
                                                                  unconstrained.plan.total / gib)


def test_plan_fit_command(capsys):
    assert cli(["plan", "--size", "60m", "--method", "full", "--precision", "bf16", "--fit", "100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fits 100 GiB: --zero-stage 0 --state-dtype fp32") and "peak estimate" in out
    assert cli(["plan", "--size", "60m", "--method", "full", "--precision", "bf16", "--fit", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "no setting fits 0.01 GiB" in err and "--update per_layer" in err and "--state-dtype int8" in err


# --- GaLore's refresh: auto ----------------------------------------------------------------------


def test_refresh_auto_keeps_the_exact_refresh_while_it_fits():
    """auto is the exact refresh while the plan with it peaks within 90% of the memory; past it,
    the refresh in backward (randomized) at one micro-batch per step, the sketch with more, and
    a svd the user set is kept."""
    cfg = resolve(ModelConfig(size="60m", seq_len=1024), vocab_size=32000)
    kw = dict(micro_batch=4, seq_len=1024, precision="bf16")
    exact = planner.plan(cfg, "galore", {"rank": 64, "refresh": "step"}, **kw).total
    roomy = int(exact / planner.AUTO_HEADROOM) + 1
    fits = planner.plan(cfg, "galore", {"rank": 64}, device_bytes=roomy, **kw)
    assert fits.inputs["options"]["refresh"] == "step" and "svd" not in fits.inputs["options"]
    assert fits.total == exact and "-> step" in fits.inputs["refresh_auto"]
    tight = planner.plan(cfg, "galore", {"rank": 64}, device_bytes=roomy - 2, **kw)
    assert tight.inputs["options"] == {"rank": 64, "refresh": "backward", "svd": "randomized"}
    backward = planner.plan(cfg, "galore", {"rank": 64, "refresh": "backward", "svd": "randomized"}, **kw)
    assert tight.total == backward.total < exact
    accum = planner.plan(cfg, "galore", {"rank": 64}, device_bytes=roomy - 2, grad_accum=4, **kw)
    assert accum.inputs["options"] == {"rank": 64, "refresh": "step", "svd": "sketch"}
    kept = planner.plan(cfg, "galore", {"rank": 64, "svd": "exact"}, device_bytes=roomy - 2, grad_accum=4, **kw)
    assert kept.inputs["options"] == {"rank": 64, "svd": "exact", "refresh": "step"}
    assert "no streaming refresh" in kept.inputs["refresh_auto"]


@pytest.mark.parametrize("memory,expected", [(2**40, ("step", "exact")), (2**20, ("backward", "randomized"))])
def test_refresh_auto_is_decided_at_the_stage_start_against_the_ranks_memory(monkeypatch, memory, expected):
    """The run decides auto from its own config against the smallest memory over the ranks, says
    so at the stage's start, and the tracker and summary plan the decided options."""
    from lowrank_pt import methods
    from lowrank_pt.config.recipe import load
    from lowrank_pt.core import dist

    monkeypatch.setattr(dist, "memory_bytes_per_rank", lambda: memory)
    run = load("configs/tiny.yaml", ["stages.0.method=galore", "stages.0.options={rank: 4}",
                                     "engine.precision=fp32"], environment=False)
    model_cfg = resolve(run.model, vocab_size=512)
    undecided = methods.build(run.stages[0], run)  # no planner given: the exact refresh
    undecided.prepare_model(LlamaModel(model_cfg))
    assert undecided.options.refresh == "step" and undecided.decided_options() == {"rank": 4}
    method = methods.build(run.stages[0], run, plan_refresh=planner.resolve_refresh)
    assert method.options.refresh == "auto"
    method.prepare_model(LlamaModel(model_cfg))
    assert (method.options.refresh, method.options.svd) == expected
    assert f"refresh auto -> {expected[0]}" in method.describe()
    decided = method.decided_options()
    assert decided["rank"] == 4 and (decided["refresh"], decided["svd"]) == expected


def test_the_zero0_allreduce_bucket_is_deepspeeds():
    """An ordinary ZeRO-0 step flattens its gradients bucket by bucket (DeepSpeed's
    ``allreduce_no_retain``): the planner's largest bucket is the largest DeepSpeed makes."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    from lowrank_pt.zero.partition import allreduce_bucket_numel

    class Recorder:
        def __init__(self):
            self.buckets = []

        def allreduce_and_copy(self, small_bucket, dp_group, dp_world_size=None):
            self.buckets.append(sum(t.numel() for t in small_bucket))

    sizes = [7, 300, 5, 120, 120, 64, 1000, 3]
    for per_bucket in (10, 100, 250, 400, 10_000):
        rec = Recorder()
        DeepSpeedEngine.allreduce_no_retain(rec, [torch.empty(n) for n in sizes], None, numel_per_bucket=per_bucket)
        assert allreduce_bucket_numel(sizes, per_bucket) == max(rec.buckets), per_bucket
    cfg = resolve(ModelConfig(size="60m", seq_len=256), vocab_size=32000)
    step = planner.plan(cfg, "full", zero_stage=0, precision="bf16")
    per_layer = planner.plan(cfg, "full", zero_stage=0, precision="bf16", master_weights="bf16", update="per_layer")
    assert step.bytes["zero_transient"] == 2 * step.layout["trainable_params"]  # one bucket: under 5e8 elements
    assert per_layer.bytes["zero_transient"] == 0


def test_an_svd_refresh_of_a_projected_optimizer_is_planned():
    """fira and galore_weights refresh each matrix by an SVD of its fp32 gradient: the planner
    counts the largest matrix's gradient and factors; APOLLO's random projection needs none."""
    cfg = resolve(ModelConfig(size="60m", seq_len=256), vocab_size=32000)
    m, n = cfg.intermediate_size, cfg.hidden_size  # the MLP's matrices are the largest targeted
    expected = 4 * (m * n + min(m, n) * (m + n))
    for method in ("fira", "galore_weights"):
        assert planner.plan(cfg, method, {"rank": 64}).bytes["refresh_working"] == expected, method
    assert planner.plan(cfg, "apollo", {"rank": 64}).bytes["refresh_working"] == 0


def test_progress_line_gives_elapsed_time_and_the_stage_and_run_etas():
    from lowrank_pt.tracking import progress

    assert [progress.clock(s) for s in (0, 12.4, 190, 3725)] == ["0s", "12s", "3m10s", "1h02m"]
    # 10 steps in 20 s: 2 s a step; 30 steps left; later stages hold 50 steps' worth of tokens.
    stage_left, run_left = progress.estimates(20.0, 10, 30, 1000, 50_000)
    assert (stage_left, run_left) == (60.0, 160.0)
    assert progress.line(20.0, 10, 30, 1000, 50_000) == "elapsed 20s, ETA stage 1m00s, run 2m40s"
    assert progress.line(20.0, 10, 30, 1000, 0) == "elapsed 20s, ETA stage 1m00s"  # the last stage


def test_the_reduce_bucket_is_sized_to_the_model_configured_and_planned_alike():
    """ZeRO's gradient reduce bucket: the model's hidden_size² elements (at least 5e6) unless the run
    says otherwise (engine.reduce_bucket_size; a raw engine.deepspeed key wins, one contradicting
    ours is refused); DeepSpeed's config and the planner take the same number."""
    from lowrank_pt.config.recipe import validate
    from lowrank_pt.config.schema import EngineConfig, RunConfig
    from lowrank_pt.core.errors import ConfigError
    from lowrank_pt.model.llama import ModelConfig, resolve
    from lowrank_pt.tracking import planner
    from lowrank_pt.zero import engine as E

    def bucket(cfg, hidden):
        return E.deepspeed_config(cfg, 1, 1, 1.0, 8, hidden_size=hidden)["zero_optimization"].get("reduce_bucket_size")

    assert bucket(EngineConfig(zero_stage=3, precision="bf16"), 4096) == 4096**2
    assert bucket(EngineConfig(zero_stage=2), 64) == 5_000_000
    assert bucket(EngineConfig(zero_stage=0), 4096) is None  # no ZeRO partitioning, no bucket
    assert bucket(EngineConfig(zero_stage=3, reduce_bucket_size=2 * 10**8), 4096) == 2 * 10**8
    raw = {"zero_optimization": {"reduce_bucket_size": 123456}}
    assert bucket(EngineConfig(zero_stage=3, deepspeed=raw), 4096) == 123456
    seven_b = resolve(ModelConfig(size="7b", seq_len=2048), vocab_size=32000)
    common = dict(zero_stage=3, world=8, precision="bf16", activation_checkpointing=True)
    assert planner.plan(seven_b, "full", {}, **common).bytes["zero_buffers"] == 2 * 4096**2
    assert planner.plan(seven_b, "full", {}, reduce_bucket_size=5 * 10**8, **common).bytes["zero_buffers"] == 10**9
    for engine, said in ((EngineConfig(zero_stage=3, reduce_bucket_size=0), "must be >= 1"),
                         (EngineConfig(zero_stage=3, reduce_bucket_size=7, deepspeed=raw), "contradicts")):
        with pytest.raises(ConfigError, match=said):
            validate(RunConfig(engine=engine), environment=False)
