"""Bytes measured from the tensors a rank holds equal the planner's formula, for every method at
ZeRO stages 0-3 on 1 and 2 ranks; a stage tracker's summary entry carries both."""

from __future__ import annotations

import pytest
import torch
from fixtures import random_batches, spawn, tiny_engine

from lowrank_pt.methods.base import StageContext

METHOD_OPTIONS = {
    "full": {},
    "lora": {"rank": 3},
    "relora": {"rank": 3, "restart_every": 2},
    "galore": {"rank": 3, "update_proj_gap": 2},
    # Method buffers in other layouts: W0 as an fp32 buffer (whole on every rank); projectors in
    # bf16 (frozen params, partitioned at ZeRO-3 like fp32 ones, half their bytes).
    "relora+fp32_base": {"rank": 3, "restart_every": 2, "base_in_fp32": True},
    "galore+bf16_projector": {"rank": 3, "update_proj_gap": 2, "projector_dtype": "bf16"},
    # Low-bit moments (optimizer.state_dtype): bf16 halves them; int8 codes pad each stepped
    # tensor to whole 256-value blocks, with a 4-byte scale a block.
    "full+bf16_states": {},
    "full+int8_states": {},
    "lora+int8_states": {"rank": 3},
    "galore+int8_states": {"rank": 3, "update_proj_gap": 2},
}


BF16_MASTERS = {
    # engine.master_weights=bf16 (bf16 training only): no fp32 copy of the trained weights.
    "full+bf16_masters": {},
    "lora+bf16_masters": {"rank": 3},
    "galore+int8_states+bf16_masters": {"rank": 3, "update_proj_gap": 2},
}


INT8_WEIGHTS = {
    # engine.weight_dtype=int8 (bf16 training): frozen bases as int8 codes (params: 1 byte, ZeRO-3
    # partitions them) with a 4-byte scale per 256 of a row (method buffers; rows of 38 and 100
    # here: one block each).
    "lora+int8_weights": {"rank": 3},
    "relora+int8_weights+bf16_states+bf16_masters": {"rank": 3, "restart_every": 2},
    "galore+int8_weights": {"rank": 3, "update_proj_gap": 2},
    # weights the optimizer updates as int8 codes (ZeRO 0, bf16 masters): each projection's param
    # holds one bf16 element, its codes 1 byte an element, its scales and update count are
    # method buffers; moments and gradients stay full-size.
    "full+int8_weights+bf16_masters": {},
}
INT8_UPDATED = {"full+int8_weights+bf16_masters"}
"""Labels built at ZeRO 0 only (config refuses int8 updated weights at ZeRO 1-3)."""


def state_dtype_of(label: str) -> str:
    """The moments' dtype a label trains with ("full+int8_states": int8)."""
    return next((part.removesuffix("_states") for part in label.split("+") if part.endswith("_states")), "fp32")


def master_weights_of(label: str) -> str:
    """The master weights a label trains with ("full+bf16_masters": bf16)."""
    return "bf16" if "bf16_masters" in label.split("+") else "fp32"


def options_of(label: str) -> dict:
    return {**METHOD_OPTIONS, **BF16_MASTERS, **INT8_WEIGHTS}[label]


def weight_dtype_of(label: str) -> str:
    return "int8" if "int8_weights" in label.split("+") else "bf16"


def method_of(label: str) -> str:
    """The method a METHOD_OPTIONS label runs ("galore+bf16_projector" runs galore)."""
    return label.split("+")[0]
# hidden 38 with one head and 100-wide MLP: group sizes that do not divide by 2·W, so DeepSpeed's
# alignment padding (stages 1-2) and uneven partitions are exercised, not only round numbers.
MODEL = dict(size="tiny", hidden_size=38, num_heads=1, intermediate_size=100, seq_len=16)
VOCAB = 64


def model_cfg():
    from lowrank_pt.model.llama import ModelConfig, resolve

    return resolve(ModelConfig(**MODEL), vocab_size=VOCAB)


def build(method_name: str, zero_stage: int, precision: str):
    from lowrank_pt import methods
    from lowrank_pt.config.recipe import OptimizerConfig, ScheduleConfig, StageConfig
    from lowrank_pt.model.llama import LlamaModel

    stage = StageConfig(name=f"s-{method_name}", method=method_of(method_name), steps=4,
                        options=options_of(method_name),
                        optimizer=OptimizerConfig(lr=1e-2, state_dtype=state_dtype_of(method_name)),
                        schedule=ScheduleConfig(kind="cosine"))
    method = methods.build(stage, None)
    torch.manual_seed(0)
    engine, method = tiny_engine(zero_stage, precision, method=method, model=LlamaModel(model_cfg()),
                                 vocab_size=VOCAB, master_weights=master_weights_of(method_name),
                                 int8_bases=weight_dtype_of(method_name) == "int8")
    return stage, engine, method


def measure_all(rank, world, precision):
    """measured vs planned bytes for every (stage, method) on this rank."""
    from lowrank_pt.core.timer import PhaseTimer
    from lowrank_pt.tracking import planner
    from lowrank_pt.tracking.memory import MemoryTracker

    torch.set_num_threads(1)  # tiny tensors: threads only add OpenMP waits on a busy machine
    out = {}
    for zero_stage in (0, 1, 2, 3):
        for name in [*METHOD_OPTIONS, *((*BF16_MASTERS, *INT8_WEIGHTS) if precision == "bf16" else ())]:
            if name in INT8_UPDATED and zero_stage != 0:
                continue
            _, engine, method = build(name, zero_stage, precision)
            timer = PhaseTimer(sync=False)
            tracker = MemoryTracker(engine, timer)
            for batch in random_batches(1, vocab_size=VOCAB, rank=rank):
                loss = engine(batch["input_ids"], batch["labels"])
                engine.backward(loss)
                with timer.phase("optimizer"):
                    engine.step()
            measured = tracker.measure()
            lay = planner.layout(model_cfg(), method_of(name), options_of(name), state_dtype=state_dtype_of(name),
                                 weight_dtype=weight_dtype_of(name))
            planned = planner.state_bytes(lay, zero_stage, world, precision, rank,
                                          master_weights=master_weights_of(name))
            out[(zero_stage, name)] = (measured, planned)
            del engine, method
    return out


def two_ranks(rank, world, run_dir):
    """Everything the 2-rank tests need, in one process group (a spawn costs seconds)."""
    return {"bytes": measure_all(rank, world, "bf16"), "tracked": tracked_stages(rank, world, run_dir)}


@pytest.fixture(scope="module")
def on_two_ranks(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("tracked"))
    return run_dir, spawn(two_ranks, 2, run_dir)


def check_bytes(results):
    mismatches = []
    for rank, per_rank in enumerate(results):
        for (zero_stage, name), (measured, planned) in per_rank.items():
            for category, want in planned.items():
                if measured[category] != want:
                    mismatches.append(f"rank {rank} ZeRO-{zero_stage} {name} {category}: "
                                      f"measured {measured[category]} formula {want}")
            # sanity of the formula itself: low-rank methods and low-bit moments hold less state
            if method_of(name) != "full" or state_dtype_of(name) != "fp32":
                assert measured["optimizer_states"] < per_rank[(zero_stage, "full")][0]["optimizer_states"]
        for zero_stage in (0, 1, 2, 3):
            fp32, bf16, int8 = (per_rank[(zero_stage, label)][0]["optimizer_states"]
                                for label in ("full", "full+bf16_states", "full+int8_states"))
            assert int8 < 0.3 * fp32 and abs(bf16 - fp32 / 2) < 64, (zero_stage, fp32, bf16, int8)
            if (zero_stage, "full+bf16_masters") in per_rank:  # no fp32 copy: none at ZeRO 0, half at 1-2,
                fp32_masters = per_rank[(zero_stage, "full")][0]["master_params"]  # none at 3 (the params)
                bf16_masters = per_rank[(zero_stage, "full+bf16_masters")][0]["master_params"]
                assert bf16_masters == (fp32_masters // 2 if zero_stage in (1, 2) else 0), (zero_stage, bf16_masters)
                assert fp32_masters > 0
            if (zero_stage, "lora+int8_weights") in per_rank:  # bf16 bases (2 bytes) -> 1 byte + scales
                bf16, int8 = (per_rank[(zero_stage, label)][0] for label in ("lora", "lora+int8_weights"))
                elements = 2 * (4 * 38 * 38 + 3 * 38 * 100)  # q k v o, gate up down of 2 layers (38, MLP 100)
                rows = 2 * (4 * 38 + 2 * 100 + 38)  # one scale a row: no row is longer than 256
                if zero_stage < 3:  # whole on every rank (ZeRO-3: each rank its padded piece, as the formula)
                    assert bf16["params"] - int8["params"] == elements, (bf16, int8)
                    assert int8["method_buffers"] - bf16["method_buffers"] == 4 * rows
            if (zero_stage, "full+int8_weights+bf16_masters") in per_rank:  # 2 bytes -> one element + 1 byte
                bf16, int8 = (per_rank[(zero_stage, label)][0] for label in ("full+bf16_masters",
                                                                             "full+int8_weights+bf16_masters"))
                elements, matrices = 2 * (4 * 38 * 38 + 3 * 38 * 100), 2 * 7
                assert bf16["params"] - int8["params"] == elements - 2 * matrices, (bf16, int8)
                assert int8["grads"] == bf16["grads"] and int8["optimizer_states"] == bf16["optimizer_states"]
    assert not mismatches, "\n".join(mismatches)


def test_measured_bytes_equal_the_formula_one_rank_fp32():
    check_bytes(spawn(measure_all, 1, "fp32"))


def test_measured_bytes_equal_the_formula_two_ranks_bf16(on_two_ranks):
    results = [r["bytes"] for r in on_two_ranks[1]]
    check_bytes(results)
    full0 = results[0][(0, "full")][0]["optimizer_states"]
    full3 = results[0][(3, "full")][0]["optimizer_states"]
    assert full3 < 0.51 * full0  # ZeRO shards the moments


def run_stage(rank, world, run_dir, method_name, integrated):
    """One stage through StageTracker with the spans the integrated trainer opens. ``integrated``:
    the method opens forward/backward/optimizer (and GaLore's refresh) itself, as it will once
    ``Method.train_step`` is wired to ``self.timer``; otherwise this loop opens them."""
    from lowrank_pt.tracking.stage import StageTracker
    from lowrank_pt.tracking.summary import write_stage_summary

    stage, engine, method = build(method_name, 2, "fp32")
    tracker = StageTracker(engine=engine, stage=stage, index=0 if integrated else 1, model_cfg=model_cfg(),
                           tokens_per_step=2 * 16 * world, precision="fp32", zero_stage=2, cache_dir=run_dir,
                           sync=False)
    timer = tracker.timer
    if integrated:
        method.on_engine_ready(StageContext(engine=engine, total_steps=4, timer=timer))
    records = []
    batches = random_batches(4, vocab_size=VOCAB, rank=rank)
    for step in range(4):
        tracker.start_step()
        with timer.phase("data"):
            batch = batches[step]
        if integrated:
            loss = method.train_step(engine, [batch], step)
        else:
            with timer.phase("forward"):
                loss = engine(batch["input_ids"], batch["labels"])
            with timer.phase("backward"):
                engine.backward(loss)
            with timer.phase("optimizer"):
                engine.step()
        with timer.phase("method"):
            method.after_step(engine, step)
        tracker.end_step()
        if step % 2 == 1:
            record = {"step": step + 1, "loss": float(loss), **tracker.metrics()}
            tracker.observe(record)
            records.append(record)
    with timer.phase("checkpoint"):
        pass
    entry = tracker.finish(end_step=4, total_steps=4)
    if rank == 0:
        write_stage_summary(run_dir, entry)
    return entry, records


def tracked_stages(rank, world, run_dir):
    out = {"full": run_stage(rank, world, run_dir, "full", False)}
    try:
        out["galore"] = run_stage(rank, world, run_dir, "galore", True)
    except Exception as e:  # noqa: BLE001 - reported by the test that needs it
        out["galore"] = repr(e)
    return out


def check_entry(entry, records, phase_names):
    mem = entry["memory"]
    assert len(mem["measured_by_rank"]) == 2
    for category in ("params", "master_params", "optimizer_states", "grads", "method_buffers"):
        assert mem["measured"][category] == mem["formula"][category], category
    assert mem["peak_rss_bytes"] > 0
    assert entry["timed_steps"] == 4 and entry["tokens"] == 4 * 64 and entry["complete"]
    assert entry["tokens_per_s"] > 0 and entry["mfu"] > 0 and entry["flops_per_token"] > 0
    phases = entry["phase_s"]
    for name in phase_names:
        assert name in phases, name
    covered = sum(v for k, v in phases.items() if k not in ("checkpoint", "eval"))
    assert covered == pytest.approx(entry["train_time_s"], rel=1e-6)  # phases + other = the steps
    record = records[-1]
    for key in ("time/forward_s", "time/step_s", "throughput/tokens_per_s", "throughput/tokens_per_s_per_rank",
                "throughput/mfu", "memory/optimizer_states_bytes", "memory/grads_bytes", "memory/peak_rss_bytes"):
        assert key in record, key


def test_stage_tracker_entry_and_metrics(on_two_ranks):
    from lowrank_pt.tracking.summary import read_summary

    run_dir, results = on_two_ranks[0], [r["tracked"] for r in on_two_ranks[1]]
    entry, records = results[0]["full"]
    assert entry["memory"]["measured_by_rank"] == results[1]["full"][0]["memory"]["measured_by_rank"]
    check_entry(entry, records, ("data", "forward", "backward", "optimizer", "method", "checkpoint"))
    stored = {s["name"]: s for s in read_summary(run_dir)["stages"]}
    assert stored["s-full"]["method"] == "full" and stored["s-full"]["loss"] == records[-1]["loss"]


def test_methods_open_their_phases(on_two_ranks):
    """GaLore's train_step opens forward/backward/refresh/optimizer spans on ``self.timer``."""
    results = [r["tracked"] for r in on_two_ranks[1]]
    result = results[0]["galore"]
    assert not isinstance(result, str), result
    entry, records = result
    check_entry(entry, records, ("data", "forward", "backward", "optimizer", "refresh", "method"))
    # GaLore's refresh captured the full gradient of every projected matrix: 4·m·n bytes each.
    assert entry["memory"]["measured"]["method_transient"] == entry["memory"]["formula"]["method_transient"] > 0
