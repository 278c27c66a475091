import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from fixtures import THREADS  # noqa: E402

# Tests run on 2 cores: 2 torch threads, or 1 under pytest-xdist's 2 workers (two processes with
# 2 OpenMP threads each on 2 cores spin-wait and run ~10x slower). Subprocesses (launchers, the
# CLI) take the same through OMP_NUM_THREADS; the spawned ranks set theirs in fixtures.
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)


HEAVY_FIRST = ("test_projected_zero", "test_galore_zero", "test_launch", "test_readme", "test_recipes", "test_dpo",
               "test_gpu_check",
               "test_sft_stage", "test_resume_reshard", "test_trainer", "test_relora_recipe", "test_relora",
               "test_lora_options_zero", "test_galore_trainer", "test_kill_resume", "test_hygiene", "test_dead_rank",
               "test_tracking_memory", "test_checkpoint_fallback", "test_guard", "test_bad_input_catalogue")
"""The modules that take longest (measured), run first: pytest-xdist's workers take whole files
in collection order, so starting the long ones first keeps the two workers busy to the end."""


def _heavy_rank(item) -> int:
    name = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_heavy_rank)  # stable: a file's tests keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """A small tokenizer and shards of the embedded corpus, built once per test session."""
    from lowrank_pt.data import DataConfig, prepare_data

    cache = str(tmp_path_factory.mktemp("data_cache"))
    cfg = DataConfig(source="embedded", vocab_size=512, max_documents=200, cache_dir=cache)
    prepare_data(cfg, progress=False)
    return cache


@pytest.fixture
def one_thread():
    """One torch thread for the test: on busy shared cores OpenMP with 2 threads spins and runs
    tiny ops 10-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
