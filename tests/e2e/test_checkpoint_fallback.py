"""A damaged newest checkpoint: resume warns, naming the file and what is wrong, falls back to the
previous complete checkpoint, and ends bit for bit where the uninterrupted run ended.

One tiny run (ZeRO 1, so the optimizer shard is a file of its own; 4 steps, checkpoints at steps 2
and 4) is built once; each case damages a copy of its step-4 checkpoint (model states, optimizer
shard, RNG state, meta.json: truncated, emptied, deleted; the model states also garbled at the
same size, which only the checksum sees) and resumes it. All cases run in one spawned process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import pytest
import torch
from fixtures import TINY, spawn

from lowrank_pt.checkpoint import store as checkpoint
from lowrank_pt.tracking import metrics

NEWEST, PREVIOUS = "step_00000004", "step_00000002"
FILES = {
    "model_states": "mp_rank_00_model_states.pt",
    "optimizer_shard": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "rng": os.path.join("rng", "rank_0.pt"),
    "meta": "meta.json",
}
CASES = [(kind, mode) for kind in FILES for mode in ("truncated", "empty", "missing")] + [("model_states", "garbled")]
WHY = {"truncated": "bytes, meta.json records", "empty": "is 0 bytes", "missing": "is missing",
       "garbled": "fails its crc32 check"}
WHY_META = {"truncated": "meta.json is unreadable", "empty": "meta.json is unreadable (0 bytes",
            "missing": "meta.json is missing"}


def argv(run_dir, cache):
    return ["train", TINY, f"run_dir={run_dir}", f"data.cache_dir={cache}", "engine.zero_stage=1",
            "train.tensorboard=false", "train.progress=false", "train.log_every=1", "train.save_every=2",
            "train.keep_last=2", "stages=[{name: main, method: full, steps: 4, optimizer: {lr: 3.0e-3}}]"]


def damage(path: str, mode: str) -> None:
    if mode == "missing":
        os.remove(path)
    elif mode == "empty":
        open(path, "wb").close()
    elif mode == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:  # garbled: same size, some bytes in the middle flipped
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            chunk = f.read(64)
            f.seek(-len(chunk), 1)
            f.write(bytes(b ^ 0xFF for b in chunk))


def _cases(rank, world_size, base, cache):
    from lowrank_pt.cli import main

    def call(run_dir):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv(run_dir, cache))
        return code, out.getvalue(), err.getvalue()

    reference = os.path.join(base, "reference")
    code, _, err = call(reference)
    assert code == 0, err[-3000:]
    results = {}
    for kind, mode in CASES:
        run_dir = os.path.join(base, f"{kind}-{mode}")
        shutil.copytree(reference, run_dir)
        damage(os.path.join(run_dir, "checkpoints", NEWEST, FILES[kind]), mode)
        results[(kind, mode)] = (run_dir, *call(run_dir))
    return reference, results


@pytest.fixture(scope="module")
def fallback(tmp_path_factory, data_cache):
    base = str(tmp_path_factory.mktemp("fallback"))
    [result] = spawn(_cases, 1, base, data_cache)
    return result


def tensors_equal(a, b, where="") -> None:
    """Every tensor of two nested state structures equal, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        for key in a:
            if isinstance(a[key], (torch.Tensor, dict, list, tuple)):
                tensors_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            tensors_equal(x, y, f"{where}[{i}]")


@pytest.mark.parametrize("kind, mode", CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_resume_falls_back_past_a_damaged_checkpoint(fallback, kind, mode):
    reference, results = fallback
    run_dir, code, out, err = results[(kind, mode)]
    assert code == 0, err[-3000:]
    # The warning names the damaged checkpoint, the file and what is wrong with it.
    warning = next(line for line in err.splitlines() if line.startswith("warning: checkpoint"))
    assert NEWEST in warning and PREVIOUS in warning, warning
    if kind == "meta":
        assert WHY_META[mode] in warning, warning
    else:
        assert f"{FILES[kind]} " in warning and WHY[mode] in warning, warning
    assert f"resuming from {os.path.join(run_dir, 'checkpoints', PREVIOUS)}" in out
    # Steps 3-4 again, exactly as the uninterrupted run took them.
    trace = lambda d: [(r["step"], r["loss"], r["lr"]) for r in metrics.read(d) if "loss" in r]  # noqa: E731
    assert trace(run_dir) == trace(reference)
    assert [os.path.basename(p) for p in checkpoint.complete(run_dir)] == [PREVIOUS, NEWEST]
    new, old = (os.path.join(d, "checkpoints", NEWEST) for d in (run_dir, reference))
    assert checkpoint.verify(new) is None
    wa, wb = checkpoint.load_weights(old), checkpoint.load_weights(new)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    for name in (FILES["optimizer_shard"], FILES["rng"]):
        tensors_equal(torch.load(os.path.join(old, name), weights_only=False),
                      torch.load(os.path.join(new, name), weights_only=False), name)


def test_meta_records_every_file_and_what_resume_must_keep(fallback):
    reference, _ = fallback
    path = os.path.join(reference, "checkpoints", NEWEST)
    meta = checkpoint.read_meta(path)
    assert sorted(meta["files"]) == checkpoint.listing(path)
    assert set(FILES.values()) - {"meta.json"} <= set(meta["files"])
    for rel, entry in meta["files"].items():
        assert entry["bytes"] == os.path.getsize(os.path.join(path, rel))
        assert entry["crc32"] == checkpoint.crc32(os.path.join(path, rel))
    assert meta["format"] == checkpoint.FORMAT
    assert (meta["precision"], meta["zero_stage"], meta["world_size"], meta["method"]) == ("fp32", 1, 1, "full")
    assert len(meta["tokenizer_sha256"]) == 64


def _fake_checkpoint(run_dir, step, damaged=False):
    path = os.path.join(checkpoint.root(run_dir), f"step_{step:08d}")
    os.makedirs(path)
    with open(os.path.join(path, "weights.pt"), "wb") as f:
        f.write(b"x" * 100)
    meta = {"stage_index": 0, "stage_name": "main", "stage_step": step, "global_step": step, "tokens": 0,
            "model": {}, "files": {"weights.pt": {"bytes": 100 if not damaged else 999, "crc32": "0"}}}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return path


def test_retention_never_deletes_the_newest_checkpoint_that_verifies(tmp_path):
    run_dir = str(tmp_path)
    good = _fake_checkpoint(run_dir, 1)
    older_good = _fake_checkpoint(run_dir, 0)
    broken = [_fake_checkpoint(run_dir, s, damaged=True) for s in (2, 3)]
    deleted = checkpoint.retain(run_dir, keep_last=1)
    assert sorted(deleted) == sorted([older_good, broken[0]])
    assert [os.path.basename(p) for p in checkpoint.complete(run_dir)] == ["step_00000001", "step_00000003"]
    assert os.path.isdir(good)


def test_export_takes_the_newest_checkpoint_that_verifies_and_refuses_a_damaged_one(fallback, tmp_path, capsys):
    """``lowrank-pt export RUN_DIR`` past a damaged newest checkpoint: a warning naming it, the
    export of the previous one; the damaged checkpoint named itself: exit 2, one line, nothing
    written."""
    from lowrank_pt.checkpoint.export import import_hf, plain_checkpoint
    from lowrank_pt.cli import main

    reference, _ = fallback
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference, run_dir)
    damaged = os.path.join(run_dir, "checkpoints", NEWEST)
    damage(os.path.join(damaged, FILES["model_states"]), "garbled")
    out = str(tmp_path / "export")
    assert main(["export", run_dir, "--out", out]) == 0
    err = capsys.readouterr().err
    assert f"warning: checkpoint {damaged} is damaged" in err and "crc32" in err and PREVIOUS in err
    _, exported = import_hf(out)
    _, _, previous = plain_checkpoint(os.path.join(run_dir, "checkpoints", PREVIOUS))
    assert all(torch.equal(exported[k].float(), previous[k]) for k in previous)
    refused = str(tmp_path / "refused")
    assert main(["export", damaged, "--out", refused]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
    assert err == [f"error: checkpoint {damaged} is damaged: {FILES['model_states']} fails its crc32 check "
                   "(its bytes changed since the save); give the run dir to take its newest checkpoint that verifies"]
    assert not os.path.exists(refused)
