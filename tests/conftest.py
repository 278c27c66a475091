import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Tests run on 2 cores; the spawned ranks set their own thread counts.
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
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
