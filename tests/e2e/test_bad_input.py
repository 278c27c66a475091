"""Bad input fails before any work, names the problem, and leaves an existing run dir untouched."""

from __future__ import annotations

import os

import pytest
from fixtures import TINY, spawn

from lowrank_pt.config.recipe import ConfigError, load
from lowrank_pt.train import main as train_main


def snapshot(path) -> dict:
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def existing_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("run_dir: earlier\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    return str(run_dir)


@pytest.mark.parametrize("overrides, expected", [
    (["train.no_such_key=1"], "no_such_key"),
    (["stages.0.optimiser.lr=1"], "optimiser"),
    (["train.micro_batch_size=abc"], "micro_batch_size"),
    (["engine.zero_stage=4"], "engine.zero_stage"),
    (["engine.precision=fp8"], "engine.precision"),
    (["engine.offload_optimizer=true"], "offload_optimizer"),
    (["data.source=/no/such/corpus"], "/no/such/corpus"),
    (["stages.0.steps=null"], "give exactly one of steps and tokens"),
    (["stages.0.tokens=1000"], "give exactly one of steps and tokens"),
    (["stages.1.method=nonsense"], "stages[1] (main).method"),
    (["stages.0.options={rank: 4}"], "rank"),
    (["model.size=huge"], "model.size"),
    (["train.log_every"], "key=value"),
])
def test_bad_override_fails_fast_and_writes_nothing(existing_run, capsys, overrides, expected):
    before = snapshot(existing_run)
    code = train_main([TINY, f"run_dir={existing_run}", *overrides])
    assert code == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert snapshot(existing_run) == before


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run_dir: x\ntrain:\n  micro_batch_sise: 4\n")
    with pytest.raises(ConfigError, match="micro_batch_sise"):
        load(str(path))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load("/no/such/config.yaml")


def _run(rank, world_size, overrides):
    from lowrank_pt.trainer.trainer import Trainer

    return Trainer(load(TINY, overrides)).run_all()


def _fails(rank, world_size, overrides):
    from lowrank_pt.trainer.trainer import Trainer

    try:
        Trainer(load(TINY, overrides)).run_all()
    except ConfigError as e:
        return str(e)
    return None


def test_checkpoint_of_another_model_shape_is_refused(tmp_path, data_cache):
    run_dir = str(tmp_path / "run")
    common = [f"run_dir={run_dir}", f"data.cache_dir={data_cache}", "stages.0.steps=2", "stages.1.steps=1",
              "train.tensorboard=false", "train.progress=false"]
    spawn(_run, 1, common)
    before = snapshot(run_dir)
    [message] = spawn(_fails, 1, common + ["model.size=small"])
    assert message is not None and "model shape" in message and "hidden_size" in message
    assert snapshot(run_dir) == before
