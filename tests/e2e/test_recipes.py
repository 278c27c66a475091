"""The recipes of configs/recipes: each names its paper, validates, and plans within the memory it
states on the GPU count it states (``lowrank-pt plan RECIPE --gpus N``); a tiny-scaled copy of
each (the same methods, options, engine and memory switches; the tiny model on the embedded
corpus, ranks scaled by the hidden size, 3 steps a stage) trains on CPU."""

from __future__ import annotations

import glob
import os
import re

import pytest
import yaml
from fixtures import ROOT, spawn

RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "recipes", "*.yaml")))
TINY_HIDDEN = 64


def stated(path: str) -> tuple[int, int]:
    """(GPUs, GiB per GPU) of the recipe's ``# plan: gpus=N memory_gib=M`` line."""
    with open(path) as f:
        found = re.search(r"^# plan: gpus=(\d+) memory_gib=(\d+)$", f.read(), re.M)
    assert found, f"{path} states no '# plan: gpus=N memory_gib=M' line"
    return int(found.group(1)), int(found.group(2))


def test_there_is_a_recipe_for_every_pre_training_method():
    from lowrank_pt.methods import METHODS

    used = {s["method"] for p in RECIPES for s in yaml.safe_load(open(p))["stages"]}
    assert set(METHODS) - used <= {"full", "lora", "galore_weights"}, set(METHODS) - used


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_recipe_names_its_source_and_plans_within_its_memory(path):
    from lowrank_pt.tracking.cli import recipe_plans

    with open(path) as f:
        header = f.read().split("\nrun_dir:")[0]
    assert re.search(r"arXiv \d{4}\.\d{5}", header), "the recipe names its paper"
    gpus, gib = stated(path)
    plans = recipe_plans(path, [], gpus)
    peak = max(p.total for _, p in plans)
    print(f"{os.path.basename(path)}: {peak / 2**30:.2f} GiB per GPU on {gpus} GPU(s), stated {gib}")
    assert peak <= gib * 2**30


def tiny_overrides(path: str, run_dir: str, cache: str) -> list[str]:
    """The recipe on the tiny model and the embedded corpus, its ranks scaled to the tiny model."""
    from lowrank_pt.model.llama import MODEL_SIZES

    raw = yaml.safe_load(open(path))
    hidden = MODEL_SIZES[raw["model"]["size"]]["hidden_size"]
    out = [f"run_dir={run_dir}", "model.size=tiny", "model.seq_len=32", "data.source=embedded", "data.hub_subset=null",
           "data.val_source=null", "data.val_hub_split=null", "data.vocab_size=512", "data.max_documents=200", f"data.cache_dir={cache}",
           "train.micro_batch_size=2", "train.grad_accum=1", "train.log_every=1", "train.eval_every=0",
           "train.save_every=0", "train.eval_sequences=4", "train.tensorboard=false", "train.progress=false",
           "train.report=false"]
    for i, stage in enumerate(raw["stages"]):
        out += [f"stages.{i}.steps=3", f"stages.{i}.schedule.warmup_steps=0"]
        options = stage.get("options", {})
        if "rank" in options:
            out.append(f"stages.{i}.options.rank={max(1, options['rank'] * TINY_HIDDEN // hidden)}")
        for key, value in (("update_proj_gap", 2), ("restart_every", 2), ("restart_warmup_steps", 0)):
            if key in options:
                out.append(f"stages.{i}.options.{key}={value}")
    return out


def _train_tiny_copies(rank, world_size, base, cache):
    from lowrank_pt.config.recipe import load
    from lowrank_pt.tracking import metrics
    from lowrank_pt.trainer.trainer import Trainer

    out = {}
    for path in RECIPES:
        run_dir = os.path.join(base, os.path.basename(path)[:-5])
        Trainer(load(path, tiny_overrides(path, run_dir, cache))).run_all()
        out[os.path.basename(path)] = [r["loss"] for r in metrics.read(run_dir) if "loss" in r]
    return out


def test_tiny_copies_of_the_recipes_train_on_cpu(tmp_path, data_cache):
    [losses] = spawn(_train_tiny_copies, 1, str(tmp_path), data_cache, timeout=900)
    for path in RECIPES:
        name = os.path.basename(path)
        stages = len(yaml.safe_load(open(path))["stages"])
        assert len(losses[name]) == 3 * stages and all(v == v and v < 20 for v in losses[name]), (name, losses[name])
