"""The bad-input catalogue: one row per kind of bad input, each through the real CLI
(``lowrank_pt.cli.main``), each asserting the exit code, one ``error:`` line that names the key or
file, no traceback, and an existing run dir left byte for byte as it was.

Most rows fail in config validation, in this process, before anything is built (a sentinel on
``dist.init`` proves they never get further). The rows that need a process group or a checkpoint
(resume compatibility, a damaged checkpoint named by resume=PATH, a full disk, out of memory) run
together in one spawned process. One tiny run dir (two stages of 2 and 1 steps, checkpoints at
steps 2 and 3) is built once and shared.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil

import pytest
import torch
from fixtures import TINY, spawn

ON_CPU = not torch.cuda.is_available()
cpu_only = pytest.mark.skipif(not ON_CPU, reason="the device supports it")


def _cpu_has_fp16() -> bool:
    """DeepSpeed's CPU accelerator takes fp16 where oneDNN has fp16 kernels (AVX512-FP16/AMX CPUs)."""
    return bool(ON_CPU and torch.ops.mkldnn._is_mkldnn_fp16_supported())


cpu_without_fp16 = pytest.mark.skipif(not ON_CPU or _cpu_has_fp16(), reason="the device supports fp16")


def tree_hash(path: str, skip=lambda rel: False) -> str:
    """sha256 over every file's relative path and bytes and every dir's name, under ``path``."""
    digest = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        rel_dir = os.path.relpath(dirpath, path)
        if skip(rel_dir):
            continue
        digest.update(f"D {rel_dir}\n".encode())
        for name in sorted(files):
            rel = os.path.join(rel_dir, name)
            if skip(rel):
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                digest.update(f"F {rel}\n".encode() + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def checkpoints_only(rel: str) -> bool:
    """Skip everything but the complete checkpoints (rows that start a run rewrite config.yaml)."""
    return not rel.startswith("checkpoints") or ".partial" in rel


def call(argv: list[str]) -> tuple[int, str]:
    """``lowrank_pt.cli.main(argv)``: (exit code, stderr). argparse's own errors exit via SystemExit."""
    from lowrank_pt.cli import main

    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, err.getvalue()


def train_argv(run_dir: str, cache: str, *extra: str, config: str = TINY) -> list[str]:
    return ["train", config, f"run_dir={run_dir}", f"data.cache_dir={cache}", "train.tensorboard=false",
            "train.progress=false", "stages.0.steps=2", "stages.1.steps=1", *extra]


def _train(rank, world_size, argv):
    return call(argv)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files that rows point at (outside the run dir)."""
    d = tmp_path_factory.mktemp("bad_files")
    (d / "syntax.yaml").write_text("run_dir: x\ntrain: {log_every: [1,\n")
    (d / "latin1.yaml").write_bytes(b"run_dir: caf\xe9\n")
    (d / "stages_map.yaml").write_text("stages: {name: a, steps: 3}\n")
    (d / "typo.yaml").write_text("train:\n  micro_batch_sise: 4\n")
    (d / "a_dir").mkdir()
    (d / "empty.jsonl").write_text("\n\n")
    (d / "malformed.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    (d / "neither.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    (d / "a_file.txt").write_text("not a directory\n")
    pair = '{"prompt": "Who says this?", "chosen": "HAMLET", "rejected": "OPHELIA"}\n'
    (d / "pairs_malformed.jsonl").write_text(pair + "{oops\n")
    (d / "pairs_no_rejected.jsonl").write_text(pair * 2 + '{"prompt": "a", "chosen": "b"}\n')
    (d / "pairs_same.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    (d / "pairs_ok.jsonl").write_text(pair)
    (d / "garbage_run").mkdir()
    (d / "garbage_run" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\nnot json at all\n[1, 2]\n')
    return d


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, data_cache):
    """A finished tiny run: config.yaml, metrics.jsonl, summary.json, checkpoints step 2 and 3."""
    run_dir = str(tmp_path_factory.mktemp("existing") / "run")
    [(code, err)] = spawn(_train, 1, train_argv(run_dir, data_cache))
    assert code == 0, err[-3000:]
    return run_dir


def row(name, extra, code, *expect, config=None, marks=()):
    return pytest.param(extra, code, expect, config, id=name, marks=marks)


# (id, extra argv, exit code, substrings the message must hold; "{files}" / "{run}" expand)
IN_PROCESS = [
    # the config file itself
    row("yaml_syntax_error", [], 2, "syntax.yaml", "YAML syntax error", "line 3", config="{files}/syntax.yaml"),
    row("config_not_utf8", [], 2, "latin1.yaml", "not UTF-8", config="{files}/latin1.yaml"),
    row("config_is_a_directory", [], 2, "a_dir", "is a directory", config="{files}/a_dir"),
    row("config_missing", [], 2, "no_such.yaml", "not found", config="{files}/no_such.yaml"),
    row("stages_as_mapping_in_yaml", [], 2, "stages must be a list", config="{files}/stages_map.yaml"),
    row("unknown_key_in_yaml", [], 2, "typo.yaml", "micro_batch_sise", config="{files}/typo.yaml"),
    row("stages_as_mapping_override", ["stages={a: 1}"], 2, "stages must be a list"),
    row("unknown_key_override", ["train.no_such_key=1"], 2, "no_such_key"),
    row("override_without_value", ["train.log_every"], 2, "train.log_every", "key=value"),
    row("wrong_type", ["train.micro_batch_size=abc"], 2, "train.micro_batch_size"),
    # optimizer and schedule values
    row("lr_nan", ["stages.0.optimizer.lr=.nan"], 2, "stages[0] (warmup).optimizer.lr", "finite"),
    row("lr_negative", ["stages.0.optimizer.lr=-1e-3"], 2, "optimizer.lr", "> 0"),
    row("eps_negative", ["stages.1.optimizer.eps=-1e-8"], 2, "stages[1] (main).optimizer.eps"),
    row("weight_decay_nan", ["stages.0.optimizer.weight_decay=.nan"], 2, "optimizer.weight_decay", "finite"),
    row("weight_decay_negative", ["stages.0.optimizer.weight_decay=-0.1"], 2, "optimizer.weight_decay", ">= 0"),
    row("betas_out_of_range", ["stages.0.optimizer.betas=[0.9, 1.5]"], 2, "optimizer.betas"),
    row("grad_clip_negative", ["stages.0.optimizer.grad_clip=-1"], 2, "optimizer.grad_clip", ">= 0"),
    row("warmup_steps_negative", ["stages.0.schedule.warmup_steps=-2"], 2, "schedule.warmup_steps", ">= 0"),
    row("warmup_longer_than_stage", ["stages.0.schedule.warmup_steps=3"], 2,
        "stages[0] (warmup).schedule.warmup_steps=3", "longer than the stage (2 steps)"),
    row("min_lr_ratio_nan", ["stages.0.schedule.min_lr_ratio=.nan"], 2, "schedule.min_lr_ratio"),
    row("stage_without_length", ["stages.0.steps=null"], 2, "stages[0] (warmup)", "steps and tokens"),
    row("unknown_method", ["stages.1.method=nonsense"], 2, "stages[1] (main).method", "allowed"),
    row("unknown_method_option", ["stages.0.options={rank: 4}"], 2, "stages[0] (warmup).options", "rank"),
    # model
    row("num_layers_zero", ["model.num_layers=0"], 2, "model.num_layers", ">= 1"),
    row("hidden_size_negative", ["model.hidden_size=-64"], 2, "model.hidden_size", ">= 1"),
    row("vocab_size_zero", ["model.vocab_size=0"], 2, "model.vocab_size", ">= 1"),
    row("heads_do_not_divide_hidden", ["model.num_heads=5"], 2, "model.hidden_size=64", "num_heads=5"),
    row("norm_eps_negative", ["model.norm_eps=-1e-6"], 2, "model.norm_eps", ">= 0"),
    row("seq_len_one", ["model.seq_len=1"], 2, "model.seq_len", ">= 2"),
    row("unknown_size", ["model.size=huge"], 2, "model.size", "tiny"),
    # train section
    row("log_every_zero", ["train.log_every=0"], 2, "train.log_every", ">= 1"),
    row("eval_sequences_zero", ["train.eval_sequences=0"], 2, "train.eval_sequences", ">= 1"),
    row("eval_every_negative", ["train.eval_every=-1"], 2, "train.eval_every", ">= 0"),
    row("save_every_negative", ["train.save_every=-5"], 2, "train.save_every", ">= 0"),
    row("keep_last_zero", ["train.keep_last=0"], 2, "train.keep_last", ">= 1"),
    row("sample_tokens_negative", ["train.sample_tokens=-1"], 2, "train.sample_tokens", ">= 0"),
    row("temperature_negative", ["train.sample_temperature=-0.5"], 2, "train.sample_temperature", ">= 0"),
    row("stop_at_step_negative", ["train.stop_at_step=-1"], 2, "train.stop_at_step", ">= 1"),
    row("wandb_project_empty", ["train.wandb_project=''"], 2, "train.wandb_project=''", "null"),
    row("stop_at_step_zero", ["train.stop_at_step=0"], 2, "train.stop_at_step", ">= 1"),
    # engine
    row("zero_stage_4", ["engine.zero_stage=4"], 2, "engine.zero_stage", "allowed"),
    row("unknown_precision", ["engine.precision=fp8"], 2, "engine.precision", "allowed"),
    row("fp16_on_cpu", ["engine.precision=fp16"], 2, "engine.precision=fp16", "not supported",
        marks=cpu_without_fp16),
    row("unknown_backend", ["engine.backend=carrier_pigeon"], 2, "engine.backend", "gloo"),
    row("nccl_on_cpu", ["engine.backend=nccl"], 2, "engine.backend='nccl'", "not available", marks=cpu_only),
    row("offload_without_zero", ["engine.offload_optimizer=true"], 2, "engine.offload_optimizer", "zero_stage"),
    row("offload_without_a_gpu", ["engine.zero_stage=2", "engine.offload_optimizer=true"], 2,
        "engine.offload_optimizer=true", "no GPU", marks=cpu_only),
    row("raw_zero_stage_contradicts", ["engine.deepspeed={zero_optimization: {stage: 3}}"], 2,
        "engine.deepspeed.zero_optimization.stage=3", "engine.zero_stage=0"),
    row("raw_train_batch_size_contradicts", ["engine.deepspeed={train_batch_size: 7}"], 2,
        "engine.deepspeed.train_batch_size=7", "train.micro_batch_size", "train.grad_accum"),
    row("raw_micro_batch_contradicts", ["engine.deepspeed={train_micro_batch_size_per_gpu: 3}"], 2,
        "engine.deepspeed.train_micro_batch_size_per_gpu=3", "train.micro_batch_size=4"),
    row("raw_stage_micro_batch_contradicts", ["stages.1.micro_batch_size=2",
                                              "engine.deepspeed={train_micro_batch_size_per_gpu: 4}"], 2,
        "engine.deepspeed.train_micro_batch_size_per_gpu=4", "stages.1.micro_batch_size=2"),
    row("raw_grad_accum_contradicts", ["engine.deepspeed={gradient_accumulation_steps: 3}"], 2,
        "engine.deepspeed.gradient_accumulation_steps=3", "train.grad_accum=1"),
    row("raw_bf16_contradicts", ["engine.deepspeed={bf16: {enabled: true}}"], 2,
        "engine.deepspeed.bf16.enabled=True", "engine.precision=fp32"),
    row("raw_fp16_contradicts", ["engine.deepspeed={fp16: {enabled: true}}"], 2,
        "engine.deepspeed.fp16.enabled=True", "engine.precision=fp32"),
    # methods against the model and the stage (the model built on the meta device)
    row("lora_targets_match_nothing", ["stages.1.method=lora", "stages.1.options={target_modules: [qproj]}"], 2,
        "stages[1] (main).options.target_modules", "qproj"),
    row("galore_targets_match_nothing", ["stages.1.method=galore", "stages.1.options={target_modules: [mlp.up]}"],
        2, "stages[1] (main).options.target_modules", "mlp.up"),
    row("galore_refresh_in_backward_with_accumulation", ["stages.1.method=galore", "stages.1.grad_accum=2",
                                                          "stages.1.options={refresh: backward}"], 2,
        "stages[1] (main).options.refresh=backward", "grad_accum is 2"),
    row("galore_sketch_in_backward", ["stages.1.method=galore", "stages.1.options={refresh: backward, svd: sketch}"],
        2, "svd=sketch", "refresh=step"),
    row("galore_forward_step_at_zero3", ["engine.zero_stage=3", "stages.1.method=galore",
                                         "stages.1.options={forward: step}"], 2,
        "stages[1] (main).options.forward=step", "ZeRO-3"),
    row("galore_forward_unknown", ["stages.1.method=galore", "stages.1.options={forward: cached}"], 2,
        "forward='cached'", "factored"),
    row("relora_linear_schedule", ["stages.1.method=relora", "stages.1.steps=4", "stages.1.options={restart_every: 2}",
                                   "stages.1.schedule.kind=linear"], 2, "stages[1] (main).schedule.kind", "relora"),
    row("relora_restart_longer_than_stage", ["stages.1.method=relora", "stages.1.options={restart_every: 5}"], 2,
        "stages[1] (main).options.restart_every=5", "1 steps"),
    row("relora_restart_every_missing", ["stages.1.method=relora"], 2, "stages[1] (main).options", "restart_every"),
    row("jagged_cosine_on_full", ["stages.0.schedule.kind=jagged_cosine"], 2,
        "stages[0] (warmup).schedule.kind=jagged_cosine", "restart_every"),
    # files named by the config
    row("sft_file_empty", ["stages.1.sft={train: '{files}/empty.jsonl'}"], 2, "stages[1] (main).sft", "empty.jsonl",
        "no records"),
    row("sft_file_malformed", ["stages.1.sft={train: '{files}/malformed.jsonl'}"], 2, "malformed.jsonl:2",
        "not valid JSON"),
    row("sft_record_of_neither_form", ["stages.1.sft={train: '{files}/neither.jsonl'}"], 2, "neither.jsonl:1",
        "prompt"),
    row("sft_file_missing", ["stages.1.sft={train: '{files}/no_such.jsonl'}"], 2, "sft.train", "no_such.jsonl"),
    row("dpo_file_malformed", ["stages.1.dpo={train: '{files}/pairs_malformed.jsonl'}"], 2,
        "stages[1] (main).dpo", "pairs_malformed.jsonl:2", "not valid JSON"),
    row("dpo_record_without_rejected", ["stages.1.dpo={train: '{files}/pairs_no_rejected.jsonl'}"], 2,
        "pairs_no_rejected.jsonl:3", "rejected"),
    row("dpo_chosen_is_rejected", ["stages.1.dpo={train: '{files}/pairs_same.jsonl'}"], 2, "pairs_same.jsonl:1",
        "the same text"),
    row("dpo_file_empty", ["stages.1.dpo={train: '{files}/empty.jsonl', validation: '{files}/pairs_ok.jsonl'}"], 2,
        "stages[1] (main).dpo", "empty.jsonl", "no preference pairs"),
    row("dpo_beta_not_positive", ["stages.1.dpo={train: shakespeare, beta: 0}"], 2, "stages[1] (main).dpo",
        "dpo.beta"),
    row("dpo_and_sft_in_one_stage", ["stages.1.dpo={train: shakespeare}", "stages.1.sft={train: shakespeare}"], 2,
        "stages[1] (main)", "one of data"),
    row("init_from_missing_on_a_later_stage", ["stages.1.init_from=/no/such/run"], 2,
        "stages[1] (main).init_from=/no/such/run", "no such"),
    row("init_from_another_model_size", ["stages.0.init_from={run}", "model.size=small"], 2,
        "stages[0] (warmup).init_from=", "model.hidden_size is 128 here but 64 there"),
    row("data_source_missing", ["data.source=/no/such/corpus"], 2, "/no/such/corpus"),
    row("run_dir_is_a_file", ["run_dir={files}/a_file.txt"], 2, "run_dir=", "a_file.txt", "is a file"),
    row("resume_path_missing", ["resume=/no/such/checkpoint"], 2, "resume=/no/such/checkpoint"),
]


@pytest.mark.parametrize("extra, code, expect, config", IN_PROCESS)
def test_in_process_row(existing_run, data_cache, files, monkeypatch, extra, code, expect, config):
    from lowrank_pt.core import dist

    def reached(*args, **kwargs):
        raise AssertionError("the row got past config validation (dist.init was called)")

    monkeypatch.setattr(dist, "init", reached)
    fill = lambda s: s.replace("{files}", str(files)).replace("{run}", existing_run)  # noqa: E731
    argv = train_argv(existing_run, data_cache, *map(fill, extra), config=fill(config or TINY))
    before = tree_hash(existing_run)
    got, err = call(argv)
    assert_failed_well(got, err, code, [fill(e) for e in expect])
    assert tree_hash(existing_run) == before, "the existing run dir changed"


def assert_failed_well(got, err, code, expect):
    assert got == code, f"exit code {got}, expected {code}; stderr:\n{err[-2000:]}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, f"expected one error line:\n{err}"
    for text in expect:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"


def test_debug_flag_adds_the_traceback(existing_run, data_cache):
    got, err = call(["--debug", *train_argv(existing_run, data_cache, "train.log_every=0")])
    assert got == 2 and "Traceback" in err and "ConfigError" in err
    assert err.rstrip().splitlines()[-1].startswith("error: train.log_every=0")


@pytest.mark.parametrize("argv, expect", [
    pytest.param(["plan", "--size", "tiny", "--micro-batch", "-1"], "--micro-batch", id="plan_micro_batch_negative"),
    pytest.param(["plan", "--size", "tiny", "--gpus", "0"], "--gpus", id="plan_gpus_zero"),
    pytest.param(["plan", "--size", "tiny", "--vocab-size", "0"], "--vocab-size", id="plan_vocab_size_zero"),
    pytest.param(["plan", "--size", "tiny", "--gpus", "2", "--rank-index", "2"], "--rank-index",
                 id="plan_rank_index_past_the_ranks"),
    pytest.param(["export", "{run}", "--out", "{files}/a_file.txt"], "a_file.txt", id="export_out_is_a_file"),
    pytest.param(["export", "{files}/a_dir", "--out", "{files}/out"], "a_dir", id="export_source_not_a_run"),
    pytest.param(["generate", "{run}", "--prompt", "x", "--temperature", "-1"], "temperature=-1.0: give >= 0",
                 id="generate_negative_temperature"),
    pytest.param(["report", "{files}/garbage_run", "--out", "{files}/report"], "metrics.jsonl:2 is not a metrics record",
                 id="report_on_garbage_metrics"),
])
def test_other_commands(existing_run, files, argv, expect):
    argv = [a.replace("{run}", existing_run).replace("{files}", str(files)) for a in argv]
    before = tree_hash(existing_run)
    got, err = call(argv)
    assert got == 2, err
    assert "Traceback" not in err and "error" in err and expect in err, err
    assert tree_hash(existing_run) == before
    assert not os.path.exists(os.path.join(str(files), "report"))  # nothing written


# --- rows that need a process group: run together in one spawned process -----------------------

def _damage_newest(run_dir):
    path = os.path.join(run_dir, "checkpoints", "step_00000003", "mp_rank_00_model_states.pt")
    with open(path, "r+b") as f:
        f.truncate(100)


def _damage_all(run_dir):
    for step in ("step_00000002", "step_00000003"):
        os.remove(os.path.join(run_dir, "checkpoints", step, "rng", "rank_0.pt"))


def _edit_meta(run_dir, **changes):
    meta_path = os.path.join(run_dir, "checkpoints", "step_00000003", "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta.update(changes)
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def _saved_on_two_ranks_at_zero_1(run_dir):
    """meta.json says 2 ranks at ZeRO 1, but the files are a 1-rank ZeRO 0 save: no shards."""
    _edit_meta(run_dir, world_size=2, zero_stage=1)


def _disk_full():
    """torch.save of a checkpoint file writes to /dev/full: the real error torch gives on a full disk."""
    save = torch.save

    def full(obj, f, *args, **kwargs):
        if isinstance(f, str) and ".partial" in f:
            return save(obj, "/dev/full", *args, **kwargs)
        return save(obj, f, *args, **kwargs)

    torch.save = full
    return lambda: setattr(torch, "save", save)


def _out_of_memory():
    from lowrank_pt.methods.base import Method

    step = Method.train_step

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    Method.train_step = oom
    return lambda: setattr(Method, "train_step", step)


SETUPS = {"damage_newest": _damage_newest, "damage_all": _damage_all,
          "two_ranks_zero_1": _saved_on_two_ranks_at_zero_1,
          "saved_in_bf16": lambda run_dir: _edit_meta(run_dir, precision="bf16"),
          "saved_by_apollo": lambda run_dir: _edit_meta(run_dir, method="apollo")}
PATCHES = {"disk_full": _disk_full, "out_of_memory": _out_of_memory}

# (id, extra argv, exit code, substrings, setup of the run dir copy, patch, what must stay unchanged)
SPAWNED = [
    ("resume_changes_method", ["stages.1.method=lora"], 2,
     ["stages.1.method (main) is lora here but full in the checkpoint"], None, None, "all"),
    ("resume_changes_precision", ["engine.precision=bf16"], 2,
     ["engine.precision is bf16 here but fp32 in the checkpoint"], None, None, "all"),
    # Another world size or ZeRO stage is converted at resume (tests/e2e/test_resume_reshard.py) for
    # fp32 and the Adam-based methods; these are what it still refuses, before any work.
    ("resume_changes_zero_stage_in_bf16", ["engine.zero_stage=2", "engine.precision=bf16"], 2,
     ["engine.zero_stage 0 -> 2", "fp32 only"], "saved_in_bf16", None, "all"),
    ("resume_changes_zero_stage_of_apollo", ["engine.zero_stage=2", "stages.1.method=apollo",
                                             "stages.1.options={rank: 4}"], 2,
     ["engine.zero_stage 0 -> 2", "not supported for method apollo"], "saved_by_apollo", None, "all"),
    ("resume_changes_world_size_without_its_shards", ["engine.zero_stage=1"], 2,
     ["world size 2 -> 1", "2 *_optim_states.pt", "holds 0"], "two_ranks_zero_1", None, "all"),
    ("resume_changes_tokenizer", ["data.max_documents=100"], 2,
     ["would change the tokenizer", "sha256"], None, None, "all"),
    ("resume_changes_model_shape", ["model.size=small"], 2, ["model shape", "hidden_size"], None, None, "all"),
    ("resume_path_to_a_damaged_checkpoint", ["resume={run}/checkpoints/step_00000003"], 2,
     ["resume=", "step_00000003", "damaged", "mp_rank_00_model_states.pt is 100 bytes"], "damage_newest", None,
     "all"),
    ("resume_path_not_a_checkpoint", ["resume={run}/checkpoints/step_00000003/rng"], 2,
     ["resume=", "neither a checkpoint dir"], None, None, "all"),
    ("every_checkpoint_damaged", [], 2, ["no checkpoint under", "rng/rank_0.pt is missing"], "damage_all", None,
     "all"),
    ("resume_never_on_a_run_with_checkpoints", ["resume=never"], 2, ["resume=never", "holds checkpoints"],
     None, None, "all"),
    ("disk_full_during_a_save", ["stages.1.steps=2"], 3, ["the disk is full", "step_00000004.partial"],
     None, "disk_full", "checkpoints"),
    ("out_of_memory", ["stages.1.steps=2"], 3, ["out of memory", "train.micro_batch_size"],
     None, "out_of_memory", "checkpoints"),
]


def _spawned_rows(rank, world_size, existing, cache, base, rows):
    results = {}
    for name, extra, _, _, setup, patch, scope in rows:
        run_dir = os.path.join(base, name)
        shutil.copytree(existing, run_dir)
        if setup:
            SETUPS[setup](run_dir)
        skip = checkpoints_only if scope == "checkpoints" else (lambda rel: False)
        before = tree_hash(run_dir, skip)
        undo = PATCHES[patch]() if patch else None
        try:
            code, err = call(train_argv(run_dir, cache, *[e.replace("{run}", run_dir) for e in extra]))
        finally:
            if undo:
                undo()
        results[name] = (code, err, tree_hash(run_dir, skip) == before)
    return results


@pytest.fixture(scope="module")
def spawned_results(existing_run, data_cache, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("spawned_rows"))
    [results] = spawn(_spawned_rows, 1, existing_run, data_cache, base, SPAWNED)
    return results


@pytest.mark.parametrize("name, code, expect", [pytest.param(r[0], r[2], r[3], id=r[0]) for r in SPAWNED])
def test_spawned_row(spawned_results, name, code, expect):
    got, err, unchanged = spawned_results[name]
    assert_failed_well(got, err, code, expect)
    assert unchanged, "the existing run dir (or its checkpoints) changed"


def test_catalogue_size():
    assert len(IN_PROCESS) + len(SPAWNED) + 6 + 1 >= 40
