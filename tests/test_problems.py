"""The arithmetic task, its verifiers, and the GSM8K loader."""
import json

import pytest

from problems.arithmetic import Difficulty, generate_problems, generate_splits
from problems.gsm8k import DatasetError, load_gsm8k
from problems.verify import extract_answer, is_correct, split_steps, step_correctness


def test_generator_is_deterministic_and_solutions_check_out():
    a, b = generate_problems(50, seed=7), generate_problems(50, seed=7)
    assert a == b and a != generate_problems(50, seed=8)
    for p in a:
        assert all(step_correctness(p["solution"], p["solution"], p["answer"]))
        assert is_correct(p["solution"], p["answer"])


def test_difficulty_knobs_bound_the_problems():
    d = Difficulty(min_steps=3, max_steps=3, max_operand=5, max_multiplier=3, max_intermediate=40)
    for p in generate_problems(300, seed=1, difficulty=d):
        lines = p["solution"].split("\n")
        assert lines[-1].startswith("#### ")
        assert 1 <= len(lines) - 1 <= 3
        for line in lines[:-1]:
            value = int(line.split("=")[1])
            assert 0 <= value <= 40


def test_splits_are_disjoint():
    train, test = generate_splits(500, 100, 3, Difficulty())
    assert len(train) == 500 and len(test) == 100
    assert not {p["question"] for p in train} & {p["question"] for p in test}


@pytest.mark.parametrize("text,expected", [
    ("2+3=5\n#### 5", "5"),
    ("#### 1,000", "1000"),
    ("####1,000 apples", "1000"),
    ("#### -7", "-7"),
    ("#### 3.50", "3.5"),
    ("#### 12\n#### 13", "13"),
    ("#### 42 because 6*7=42", "42"),
    ("no answer line", None),
    ("#### ", None),
    ("#### many", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct_normalises_both_sides():
    assert is_correct("#### 1,000", "1000")
    assert is_correct("#### 1000.0", "1,000")
    assert not is_correct("#### 1001", "1000")
    assert not is_correct("1000", "1000")  # no answer line is wrong


def test_step_correctness_per_line():
    solution, answer = "7+5=12\n12*3=36\n36-4=32\n#### 32", "32"
    # line 2 has an arithmetic slip, line 3 then uses the wrong result correctly: still wrong
    completion = "7+5=12\n12*3=35\n35-4=31\n#### 31"
    assert step_correctness(completion, solution, answer) == [True, False, False, False]
    assert step_correctness("7+5=12\n12*3=36\n36-4=32\n36-4=32\n#### 32", solution, answer) == [True, True, True, False, True]
    assert step_correctness("7+5=12\nabc\n", solution, answer) == [True, False]
    assert step_correctness("", solution, answer) == []


def test_split_steps_matches_token_step_ends():
    assert split_steps("a\nb") == ["a", "b"]
    assert split_steps("a\nb\n") == ["a", "b"]
    assert split_steps("") == []


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_gsm8k_loader_strips_calculator_annotations(tmp_path):
    f = tmp_path / "gsm8k.jsonl"
    _write_jsonl(f, [{"question": "Q1?", "answer": "She has 48/2 = <<48/2=24>>24 left.\n#### 24"},
                     {"question": "Q2?", "answer": "#### 1,200"}])
    rows = load_gsm8k(f)
    assert rows[0]["solution"] == "She has 48/2 = 24 left.\n#### 24" and rows[0]["answer"] == "24"
    assert rows[1]["answer"] == "1200"


@pytest.mark.parametrize("bad,msg", [
    ({"question": "Q?", "answer": "She has 24 left"}, "no '####' line"),
    ({"question": "Q?", "answer": "#### lots"}, "holds no number"),
    ({"answer": "#### 3"}, "missing or non-text field"),
    ("{not json", "not valid JSON"),
])
def test_gsm8k_malformed_rows_name_file_and_line(tmp_path, bad, msg):
    f = tmp_path / "d.jsonl"
    _write_jsonl(f, [{"question": "ok?", "answer": "#### 1"}, bad])
    with pytest.raises(DatasetError, match=rf"d\.jsonl:2: .*{msg}"):
        load_gsm8k(f)
    assert len(load_gsm8k(f, skip_malformed=True)) == 1


def test_gsm8k_empty_dataset_is_an_error(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    with pytest.raises(DatasetError, match="no usable problems"):
        load_gsm8k(f)
