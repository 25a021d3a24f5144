"""Answers as real models write them: answer forms, equivalence, wrong accepts, free-form step labels,
and GSM8K files whose answer is just the number."""
import json
import threading

import pytest

from problems.gsm8k import DatasetError, load_gsm8k
from problems.verify import (arithmetic_value, canonical_answer, equations_hold, extract_answer, is_correct,
                             line_correctness, normalize_number, step_correctness)


@pytest.mark.parametrize("text,expected", [
    # GSM8K's answer line wins over every other form, and the last one counts
    ("7 + 5 = 12\n#### 12", "12"),
    ("#### 12\n#### 13", "13"),
    ("\\boxed{99}\n#### 12", "12"),
    # the last \boxed{...}, braces balanced
    ("So the total is \\boxed{18}.", "18"),
    ("First \\boxed{3}, then \\boxed{4}", "4"),
    ("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "sqrt(3)/2"),
    ("\\boxed{18 \\text{ apples}}", "18"),
    ("\\boxed{\\$18.00}", "18"),
    # "the answer is" and its spellings: any case, colon, `$`, bold
    ("She has 32 apples left. The answer is 32.", "32"),
    ("The final answer is: $18.00", "18"),
    ("the answer is **17**", "17"),
    ("**Answer:** 1,000 apples", "1000"),
    ("Final Answer: \\(\\frac{1}{3}\\)", "1/3"),
    ("The answer is: 3 and a bit, but the answer is 4", "4"),
    # a markdown heading on a `####` line is not an answer line: the box below it is
    ("#### Step 1: add\n7 + 5 = 12\n#### 2. Multiply\n\\boxed{36}", "36"),
    # no form, no answer (last number only on request)
    ("Mia has 7 + 5 = 12 apples.", None),
    ("The answer is that she has more.", None),
    ("#### ", None),
])
def test_answer_forms(text, expected):
    assert extract_answer(text) == expected


def test_last_number_only_when_asked():
    prose = "Mia has 7 + 5 = 12 apples, then 12 × 3 = 36 apples, so $1,000.50 in all."
    assert extract_answer(prose) is None
    assert extract_answer(prose, last_number=True) == "1000.5"
    assert extract_answer("She eats 1/2 of it", last_number=True) == "0.5"
    assert extract_answer("It is −3 degrees", last_number=True) == "-3"
    assert extract_answer("#### 5 and then 6", last_number=True) == "5"  # an answer line still wins
    assert not is_correct(prose, "1000.5") and is_correct(prose, "1000.5", last_number=True)


@pytest.mark.parametrize("completion,answer", [
    ("#### 1,000", "1000"),
    ("#### 1000", "1,000"),
    ("#### 0.5", "1/2"),
    ("#### 1/2", "0.5"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\frac12}", "1/2"),
    ("#### 18", "18.00"),
    ("The final answer is: $18.00", "18"),
    ("The answer is $18.", "$18"),
    ("#### 18 dollars", "18"),
    ("#### 4/6", "2/3"),
    ("#### 1 1/2 cups", "1.5"),
    ("\\boxed{2^{10}}", "1024"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),  # symbolic: math-verify decides
    ("\\boxed{x = 5}", "5"),
])
def test_equivalent_answers(completion, answer):
    assert is_correct(completion, answer)


@pytest.mark.parametrize("completion,answer", [
    ("#### 1001", "1000"),
    ("#### 0.33", "1/3"),
    ("#### 18.01", "18"),
    ("\\boxed{\\sqrt{2}}", "1.414"),
    ("1000", "1000"),  # no answer form
    ("#### 5", "not a number"),
])
def test_different_answers(completion, answer):
    assert not is_correct(completion, answer)


def test_percent_is_a_unit():
    # GSM8K writes "what percent" answers as the bare number, so 50% means 50, not 0.5
    assert is_correct("The answer is 50%.", "50")
    assert is_correct("\\boxed{50\\%}", "50")
    assert not is_correct("The answer is 50%.", "0.5")


@pytest.mark.parametrize("text,means", [
    ("#### 1/2", "0.5"),     # was 1
    ("#### 2^10", "1024"),   # was 2
    ("#### 4,2", None),      # was 42: a decimal comma or a list, never forty-two
    ("#### −3", "-3"),       # U+2212; was 3
])
def test_former_wrong_accepts(text, means):
    assert extract_answer(text) == means
    assert not is_correct(text, "1") and not is_correct(text, "2") and not is_correct(text, "42")
    assert not is_correct(text, "3")


def test_thousands_separator_needs_groups_of_three():
    assert extract_answer("#### 12,345,678") == "12345678"
    assert extract_answer("#### 1,0000") is None
    assert extract_answer("#### 4, 2") == "4"  # comma then space ends the number
    assert normalize_number("1,000") == "1000" and normalize_number("4,2") is None


def test_normalize_number():
    texts = ["- 3", "\u22123", "2.50", "7.0", "1/2", "2/6", "12 apples", "nan", "1/0"]
    assert [normalize_number(t) for t in texts] == ["-3", "-3", "2.5", "7", "0.5", "1/3", None, None, None]


def test_majority_vote_forms_are_equal_strings():
    spellings = ["#### 0.75", "#### 3/4", "\\boxed{\\frac{3}{4}}", "\\boxed{\\dfrac{3}{4}}", "The answer is 0.750.",
                 "Answer: $\\frac{6}{8}$"]
    assert {extract_answer(s) for s in spellings} == {"0.75"}
    assert {extract_answer(s) for s in ["#### 1,000", "The answer is $1000.00", "\\boxed{1000}"]} == {"1000"}
    assert {extract_answer(s) for s in ["#### 1/3", "#### 2/6", "\\boxed{\\frac{1}{3}}"]} == {"1/3"}
    assert {extract_answer(s) for s in ["\\boxed{\\sqrt{8}}", "\\boxed{2\\sqrt{2}}"]} == {"2*sqrt(2)"}
    assert canonical_answer("$18.00") == "18" and canonical_answer("\\frac{1}{2}") == "0.5"


def test_runaway_arithmetic_is_refused_not_computed():
    assert arithmetic_value("2^10") == 1024 and arithmetic_value("-2^2") == -4 and arithmetic_value("7+5*2") == 17
    assert arithmetic_value("9^9^9") is None and arithmetic_value("1/0") is None and arithmetic_value("2(3)") is None
    assert extract_answer("#### 9^9^9") is None and extract_answer("\\boxed{9^{9^{9}}}") is None


def test_symbolic_answers_work_in_a_worker_thread():
    # math-verify's default timeouts use signal.alarm, which fails outside the main thread
    results = []
    thread = threading.Thread(target=lambda: results.append(
        (is_correct("\\boxed{3\\sqrt{2}}", "\\sqrt{18}"), extract_answer("\\boxed{\\pi}"))))
    thread.start()
    thread.join()
    assert results == [(True, "pi")]


@pytest.mark.parametrize("line,holds", [
    ("Mia has 14 + 15 = 20 apples.", False),
    ("Mia has 14 + 15 = 29 apples.", True),
    ("12 × 3 = 36", True),
    ("12 × 3 = 35", False),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.", True),
    ("Natalia sold <<48/2=23>>23 clips in May.", False),
    ("So she has 36 - 4 = 32 left", True),
    ("$12 + $3 = $15", True),
    ("12 x 3 = 36 and 36 ÷ 4 = 9", True),
    ("12 x 3 = 36 and 36 ÷ 4 = 8", False),
    ("2.5 * 4 = 10.00", True),
    ("7 + 5 = 12 + 0 = 12", True),
    ("7 + 5 = 12 + 0 = 13", False),
    ("(7 + 5) * 3 = 36", True),
    ("Each costs 10 / 3 = 3.33 dollars", True),   # rounded to the places shown
    ("Each costs 10 / 3 = 3 dollars", False),
    ("20% of 50 = 10", True),
    ("1,000 + 500 = 1,500", True),
    ("\\( 12 \\times 3 = 36 \\)", True),
    ("She has 5. Then 7 + 5 = 12.", True),
    ("1 hour = 60 minutes", None),   # no operation: a conversion, not arithmetic
    ("2x + 3 = 7", None),            # algebra
    ("Total = 36", None),
    ("She likes apples.", None),
])
def test_equations_hold(line, holds):
    assert equations_hold(line) is holds


SMOL = ("Let's solve this step by step.\n"
        "Mia starts with 14 + 15 = 29 apples.\n"
        "Then she buys 12 × 3 = 36 more.\n"
        "So she has 29 + 36 = 65 apples.\n"
        "The answer is 65.")


def test_line_labels_on_free_form_text():
    assert line_correctness(SMOL, "65") == [True, True, True, True, True]
    assert line_correctness(SMOL, "64") == [True, True, True, True, False]
    slip = SMOL.replace("14 + 15 = 29", "14 + 15 = 20")
    assert line_correctness(slip, "65") == [True, False, True, True, True]
    # the answer line's own arithmetic counts too
    assert line_correctness("So 29 + 36 = 66. The answer is 66.", "66") == [False]
    # text that never answers: its last line is where it failed to
    assert line_correctness("Mia has 7 + 5 = 12 apples.\nShe is happy.", "12") == [True, False]
    assert line_correctness("Prose only.\n#### 12\n", "12") == [True, True]
    assert line_correctness("", "12") == []


def test_step_correctness_picks_the_rule_from_the_solution():
    builtin = "7+5=12\n12*3=36\n#### 36"
    # the built-in task: line j must apply the reference's j-th operation, so a true but different step is wrong
    assert step_correctness("7+5=12\n12*2=24\n#### 24", builtin, "36") == [True, False, False]
    gsm8k = "Mia has 7+5 = 12 apples.\nShe triples them: 12*3 = 36.\n#### 36"
    assert step_correctness("7+5=12\n12*2=24\n#### 24", gsm8k, "36") == [True, True, False]
    assert step_correctness(SMOL, gsm8k, "65") == [True] * 5
    assert step_correctness(SMOL, "#### 65", "65") == [True] * 5
    assert step_correctness(SMOL.replace("The answer is 65.", "65"), "", "65", last_number=True) == [True] * 5


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_gsm8k_file_whose_answer_is_the_number(tmp_path):
    f = _jsonl(tmp_path / "numeric.jsonl", [{"question": "Zoë has 18 crêpes?", "answer": "18"},
                                            {"question": "Q2?", "answer": 18},
                                            {"question": "Q3?", "answer": " 1,000 "},
                                            {"question": "Q4?", "answer": 2.5},
                                            {"question": "Q5?", "answer": 1e3}])
    rows = load_gsm8k(f)
    assert rows[0] == {"id": "numeric-0", "question": "Zoë has 18 crêpes?", "solution": "#### 18", "answer": "18"}
    assert [(r["solution"], r["answer"]) for r in rows[1:]] == [
        ("#### 18", "18"), ("#### 1000", "1000"), ("#### 2.5", "2.5"), ("#### 1000", "1000")]


@pytest.mark.parametrize("answer,msg", [
    ("eighteen", "answer has no '####' line"),
    (True, "missing or non-text field"),
    ("#### \\sqrt{2}", "holds no number"),
])
def test_gsm8k_answer_that_is_not_a_number(tmp_path, answer, msg):
    f = _jsonl(tmp_path / "d.jsonl", [{"question": "ok?", "answer": "18"}, {"question": "Q?", "answer": answer}])
    with pytest.raises(DatasetError, match=rf"d\.jsonl:2: .*{msg}"):
        load_gsm8k(f)


def test_gsm8k_parquet_numbers_and_utf8_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": pa.array(["Zoë?".encode(), b"Q2?"], pa.binary()),
                             "answer": pa.array([18, 7])}), f)
    assert [(r["question"], r["solution"]) for r in load_gsm8k(f)] == [("Zoë?", "#### 18"), ("Q2?", "#### 7")]
    pq.write_table(pa.table({"question": pa.array([b"caf\xe9?"], pa.binary()), "answer": pa.array([1])}), f)
    with pytest.raises(DatasetError, match=r"d\.parquet:row 1: field question is not valid UTF-8"):
        load_gsm8k(f)
