"""Shared fixtures: the tiny model is built once per test session, offline."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import tasks  # noqa: E402,F401  (usage telemetry off by default)

hf_logging.disable_progress_bar()


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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models on a shared 2-core CPU run ~6x slower with two spinning threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
