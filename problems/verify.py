"""Rule verifiers: final-answer extraction and comparison, and per-step checks.

These are the labels of the pipeline: outcome rewards and reward-model targets come from
`is_correct`, process rewards and process-RM targets from `step_correctness`.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

ANSWER_MARK = "####"
_NUMBER = re.compile(r"-?\s*\d[\d,]*(?:\.\d+)?|-?\s*\.\d+")
_EQUATION = re.compile(r"^\s*(-?\d+)\s*([-+*/])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")


def normalize_number(text: str) -> str | None:
    """'1,000' -> '1000', '- 3' -> '-3', '2.50' -> '2.5', '7.0' -> '7'; None if not a number."""
    cleaned = text.replace(",", "").replace(" ", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The number after the last `####`, normalised; None when there is no answer line or number.

    Robust to spaces, thousands separators and trailing text (`#### 1,000 apples` -> '1000').
    """
    idx = text.rfind(ANSWER_MARK)
    if idx < 0:
        return None
    match = _NUMBER.search(text[idx + len(ANSWER_MARK):].split("\n", 1)[0])
    return normalize_number(match.group(0)) if match else None


def is_correct(completion: str, answer: str) -> bool:
    """Outcome check: the completion's final answer equals the ground truth. No answer is wrong."""
    got = extract_answer(completion)
    return got is not None and got == normalize_number(answer)


def split_steps(completion: str) -> list[str]:
    """One step per line, the way step ends are found on tokens: a trailing newline ends the last
    step rather than starting an empty one, and an empty completion has no steps."""
    if not completion:
        return []
    lines = completion.split("\n")
    return lines[:-1] if completion.endswith("\n") else lines


def _evaluate(a: int, op: str, b: int) -> int | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b if b != 0 and a % b == 0 else None


def parse_equation(line: str) -> tuple[int, str, int, int] | None:
    """'12*3=36' -> (12, '*', 3, 36); None if the line is not a single binary equation."""
    m = _EQUATION.match(line)
    return (int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))) if m else None


def step_correctness(completion: str, solution: str, answer: str) -> list[bool]:
    """Per-step labels of a completion against the reference solution of the synthetic task.

    Step j (line j) is correct when it is a true equation that applies the problem's j-th operation
    to the correct previous result (operands and operator equal the reference's line j); the
    `####` line is correct when its answer is. Anything else (extra lines, malformed lines,
    a true equation on a wrong earlier result) is wrong. One label per `split_steps` step.
    """
    reference = [parse_equation(line) for line in split_steps(solution)]
    labels = []
    for j, line in enumerate(split_steps(completion)):
        if line.lstrip().startswith(ANSWER_MARK):
            labels.append(is_correct(line, answer))
            continue
        eq = parse_equation(line)
        ref = reference[j] if j < len(reference) else None
        labels.append(
            eq is not None and ref is not None and eq[:3] == ref[:3] and _evaluate(*eq[:3]) == eq[3]
        )
    return labels
