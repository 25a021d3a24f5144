"""Shared fixtures: the tiny model is built once per test session, offline.

The session gets a Prefect home of its own, set here before anything imports prefect: flow runs
the tests start (and leave RUNNING, when a test kills one) go to a throwaway database, never to the
user's ~/.prefect. The user's PREFECT_* variables are dropped too, since any of them (an API URL, a
profile, a database URL) can point the tests at the user's own server or files. Subprocesses the
tests start inherit this environment.
"""
import os
import shutil
import tempfile

for _name in [name for name in os.environ if name.startswith("PREFECT_")]:
    del os.environ[_name]
PREFECT_HOME = tempfile.mkdtemp(prefix="pytest-prefect-home-")
os.environ["PREFECT_HOME"] = PREFECT_HOME
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import tasks  # noqa: E402,F401  (usage telemetry off by default)

hf_logging.disable_progress_bar()


def pytest_unconfigure(config):
    shutil.rmtree(PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A randomly initialised tiny policy + tokenizer saved with save_pretrained."""
    from models.tiny import save_tiny
    from problems.arithmetic import VOCAB_WORDS

    return save_tiny(tmp_path_factory.mktemp("tiny"), VOCAB_WORDS, seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) loaded from `tiny_dir` through the generic loading path."""
    from models.loading import load_policy

    model, tok = load_policy(str(tiny_dir))
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API server for the whole session (starting one takes ~25 s on two cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models on a shared 2-core CPU run ~6x slower with two spinning threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
