"""`data.prompt_set: gsm_symbolic`: reasoning-gym's GSM8K-derived problems as seeded, disjoint splits."""
import importlib.util
import sys

import pytest

from configs.schema import DataConfig
from problems.datasets import load_splits, split_key
from problems.gsm8k import DatasetError
from problems.gsm_symbolic import MISSING, generate_splits
from problems.verify import is_correct, normalize_number

needs_reasoning_gym = pytest.mark.skipif(
    importlib.util.find_spec("reasoning_gym") is None,
    reason='reasoning-gym is not installed (pip install -e ".[gsm_symbolic]")')


@needs_reasoning_gym
def test_same_seed_same_problems_and_splits_are_disjoint():
    train, test = generate_splits(300, 50, seed=5)
    assert (train, test) == generate_splits(300, 50, seed=5)
    assert (train, test) != generate_splits(300, 50, seed=6)
    assert len(train) == 300 and len(test) == 50
    questions = [p["question"] for p in train + test]
    assert len(set(questions)) == len(questions)
    assert len({p["id"] for p in train + test}) == len(questions)


@needs_reasoning_gym
def test_problems_have_a_numeric_answer_and_a_worked_solution_ending_in_it():
    train, test = generate_splits(300, 50, seed=5)
    for p in train + test:
        assert normalize_number(p["answer"]) == p["answer"]
        assert is_correct(p["solution"], p["answer"]) and p["solution"].split("\n")[-1] == f"#### {p['answer']}"
        assert "\n" in p["solution"]  # steps before the answer line, not just `#### N`
        assert not p["question"].endswith("Do not include units.")


@needs_reasoning_gym
def test_load_splits_dispatches_and_split_key_follows_the_config():
    cfg = DataConfig(prompt_set="gsm_symbolic", train_size=40, test_size=10, seed=3)
    assert load_splits(cfg) == generate_splits(40, 10, seed=3)
    assert split_key(cfg) == split_key(cfg.model_copy())
    assert split_key(cfg) != split_key(cfg.model_copy(update={"seed": 4}))


def test_missing_reasoning_gym_is_a_one_line_dataset_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import reasoning_gym` raise ImportError
    with pytest.raises(DatasetError) as err:
        load_splits(DataConfig(prompt_set="gsm_symbolic", train_size=4, test_size=2))
    assert str(err.value) == MISSING and "\n" not in MISSING
