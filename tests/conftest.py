"""Shared fixtures: the tiny checkpoint and the synthetic dataset are built once per test session."""
import os
import tempfile

import pytest

# Nothing may reach a model hub: everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Shot boundaries computed by the tests (template, CLI subprocesses) go to a throw-away cache.
os.environ.setdefault("SOPHIA_SHOT_CACHE", tempfile.mkdtemp(prefix="sophia-shots-"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from swift_sophia.tools.tiny import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("sophia-tiny")))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    from swift_sophia.tools.synthetic import make_dataset

    return make_dataset(str(tmp_path_factory.mktemp("synthetic")), num_train=48, num_val=4, seed=1)
