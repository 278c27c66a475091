"""ZeRO-3 builds the model partitioned from the start, with the same initial weights as a whole
build, and a stage hand-over streams the previous stage's weights into such a model one module
at a time, each rank keeping its shard only."""

from __future__ import annotations

import torch
from fixtures import random_batches, spawn, tiny_engine

VOCAB = 64


def model_cfg():
    from lowrank_pt.model.llama import ModelConfig, resolve

    # Sizes that do not divide by 2 ranks: the last rank's shard is padded.
    return resolve(ModelConfig(size="tiny", hidden_size=38, num_heads=1, intermediate_size=101, seq_len=16),
                   vocab_size=VOCAB)


def ds_config(world, precision="fp32"):
    from lowrank_pt.config.recipe import EngineConfig
    from lowrank_pt.zero import engine as E

    return E.deepspeed_config(EngineConfig(zero_stage=3, precision=precision), 2, 1, 1.0, world)


def gathered(model) -> dict[str, torch.Tensor]:
    from lowrank_pt.zero.params import read_whole

    return {name: read_whole(p) for name, p in model.named_parameters()}


def build_worker(rank, world):
    from lowrank_pt.model.llama import LlamaModel
    from lowrank_pt.zero import engine as E

    torch.manual_seed(5)
    with E.partitioned_build(ds_config(world)):
        model = LlamaModel(model_cfg())
    shards = {n: (p.numel(), p.ds_tensor.numel(), p.ds_numel) for n, p in model.named_parameters()}
    torch.manual_seed(5)
    reference = LlamaModel(model_cfg()).state_dict()
    values = gathered(model)
    return {"shards": shards, "equal": all(torch.equal(values[n], reference[n]) for n in values)}


def test_zero3_build_is_partitioned_and_initialised_like_a_whole_build():
    for r in spawn(build_worker, 2):
        assert r["equal"], "the partitioned build draws the same initial weights"
        for name, (held, shard, full) in r["shards"].items():
            assert held == 0, f"{name}: no rank holds the whole param"
            assert shard == (full + 1) // 2, name


def handover_worker(rank, world, method_name, precision):
    from lowrank_pt import methods
    from lowrank_pt.config.recipe import OptimizerConfig, ScheduleConfig, StageConfig
    from lowrank_pt.model.llama import LlamaModel
    from lowrank_pt.zero import engine as E
    from lowrank_pt.zero.materialise import load_streamed

    options = {"lora": {"rank": 3, "alpha": 6}, "galore": {"rank": 3, "update_proj_gap": 2}, "full": {}}[method_name]
    stage = StageConfig(method=method_name, steps=10, options=options, optimizer=OptimizerConfig(lr=1e-2),
                        schedule=ScheduleConfig(kind="constant"))
    method = methods.build(stage, None)
    torch.manual_seed(0)
    engine, method = tiny_engine(3, precision, method=method, model=LlamaModel(model_cfg()), vocab_size=VOCAB)
    for step, batch in enumerate(random_batches(3, vocab_size=VOCAB, rank=rank)):
        method.train_step(engine, [batch], step)
    expected = method.export_weights(engine)

    with E.partitioned_build(ds_config(world, precision)):
        model = LlamaModel(model_cfg())
        plain = [n for n, _ in model.named_parameters()]
    held = load_streamed(model, method.plain_weights(engine), plain)
    loaded = gathered(model)
    tol = 0 if precision == "fp32" else 1e-2
    worst = max(float((loaded[n] - expected[n]).abs().max()) for n in plain)
    # What each rank keeps for the masters is its own fp32 shard of the carried value, exactly.
    shards_exact = all(torch.equal(held[id(p)].flatten()[: p.ds_tensor.numel()],
                                   _shard(expected[n], rank, p.ds_tensor.numel()))
                       for n, p in model.named_parameters())
    largest = max(p.ds_numel for p in model.parameters() if p.requires_grad)
    return {"worst": worst, "tol": tol, "shards_exact": shards_exact, "largest_half": (largest + 1) // 2,
            "shard_sizes": sorted(t.numel() for t in held.values())}


def _shard(value, rank, part):
    flat = torch.zeros(part * 2)
    flat[: value.numel()] = value.flatten()
    return flat[rank * part:(rank + 1) * part]


CASES = (("lora", "fp32"), ("galore", "fp32"), ("full", "bf16"))


def handover_cases(rank, world):
    return [handover_worker(rank, world, *case) for case in CASES]


def test_handover_streams_shard_by_shard():
    for per_rank in spawn(handover_cases, 2):
        for (method_name, precision), r in zip(CASES, per_rank):
            assert r["worst"] <= r["tol"], (method_name, precision, r["worst"])
            assert r["shards_exact"], (method_name, precision)
            assert max(r["shard_sizes"]) == r["largest_half"], "each rank holds its shard, not the whole param"


def test_init_from_at_zero3_reaches_every_shard(tmp_path, data_cache):
    """A ZeRO-3 stage on 2 ranks started from another run's checkpoint (read on rank 0 only and
    handed over param by param) starts from exactly those weights."""
    from fixtures import final_weights, run_invocations

    source, target = str(tmp_path / "source"), str(tmp_path / "target")
    common = [f"data.cache_dir={data_cache}", "train.eval_every=0", "train.tensorboard=false", "train.progress=false",
              "train.micro_batch_size=2"]
    spawn(run_invocations, 2, [
        [f"run_dir={source}", *common, "stages=[{name: a, method: full, steps: 2, optimizer: {lr: 1.0e-2}}]"],
        [f"run_dir={target}", *common, "engine.zero_stage=3",
         f"stages=[{{name: b, method: full, steps: 1, init_from: {source}, optimizer: {{lr: 1.0e-12}}}}]"],
    ])
    start, end = final_weights(source), final_weights(target)
    fresh_moved = max(float((start[n] - end[n]).abs().max()) for n in start)
    assert fresh_moved < 1e-6, "the ZeRO-3 stage began from the source run's weights (lr 1e-12 moves nothing)"


def shared_masters_worker(rank, world):
    """Four bf16 steps at ZeRO 3 with bf16 masters, the masters shared with the param partitions
    and (the same run again) kept as DeepSpeed's own second copy."""
    from lowrank_pt.model.llama import LlamaModel
    from lowrank_pt.zero import engine as E

    out = {}
    for shared in (True, False):
        original = E.share_masters
        if not shared:
            E.share_masters = lambda engine: None
        try:
            torch.manual_seed(0)
            engine, _ = tiny_engine(3, "bf16", model=LlamaModel(model_cfg()), vocab_size=VOCAB, master_weights="bf16")
        finally:
            E.share_masters = original
        opt = engine.optimizer
        same = [m.data_ptr() == p.data_ptr() for m, p in zip(opt.fp32_partitioned_groups_flat,
                                                             opt.fp16_partitioned_groups_flat)]
        for batch in random_batches(4, vocab_size=VOCAB, rank=rank):
            engine.backward(engine(batch["input_ids"], batch["labels"]))
            engine.step()
        out[shared] = (same, [p.detach().clone() for p in opt.fp16_partitioned_groups_flat],
                       [m.dtype for m in opt.fp32_partitioned_groups_flat])
    return out


def test_zero3_bf16_masters_are_the_param_partitions_and_train_the_same():
    """``zero.engine.share_masters``: at ZeRO 3 with bf16 masters every master partition is the
    rank's bf16 param partition (one storage, where DeepSpeed 0.19.8 keeps a copy), and the
    weights after four steps equal, bit for bit, those of the run that keeps the copy."""
    for r in spawn(shared_masters_worker, 2):
        same, weights, dtypes = r[True]
        kept, reference, _ = r[False]
        assert same and all(same) and not any(kept), (same, kept)
        assert all(d == torch.bfloat16 for d in dtypes)
        assert all(torch.equal(a, b) for a, b in zip(weights, reference))
