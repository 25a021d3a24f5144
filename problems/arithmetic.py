"""A seeded generator of multi-step arithmetic word problems: the demo's stand-in for GSM8K.

A problem is a short story of 2-4 operations on a quantity. Its worked solution has one
reasoning step per line, each a checkable equation on the previous result, then `#### <answer>`:

    Question: Mia has 7 apples. She buys 5 more. Then the apples are tripled. She gives away 4.
    How many apples does Mia have now?
    Answer:
    7+5=12
    12*3=36
    36-4=32
    #### 32

The difficulty knobs (steps, operand range, multiplier range, largest intermediate) are those of
`ArithmeticConfig`; the defaults are what a ~1M-parameter model learns on a CPU in minutes.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = ["Mia", "Sam", "Ann", "Tom", "Lea", "Max", "Eva", "Ben", "Zoe", "Leo"]
PRONOUN = {"Mia": "She", "Ann": "She", "Lea": "She", "Eva": "She", "Zoe": "She"}
ITEMS = ["apples", "coins", "books", "stickers", "marbles", "shells", "cards", "pens"]
MULTIPLIER_WORDS = {2: "doubled", 3: "tripled", 4: "multiplied by 4", 5: "multiplied by 5"}
ADD_TEMPLATES = ["{P} buys {b} more.", "{P} finds {b} more.", "{P} gets {b} more."]
SUB_TEMPLATES = ["{P} gives away {b}.", "{P} loses {b}.", "{P} sells {b}."]
MUL_TEMPLATE = "Then the {item} are {mult}."
OPENING = "{name} has {a} {item}."
CLOSING = "How many {item} does {name} have now?"


@dataclass(frozen=True)
class Difficulty:
    min_steps: int = 2
    max_steps: int = 3
    max_operand: int = 10
    max_multiplier: int = 5
    max_intermediate: int = 150


def _vocab_words() -> list[str]:
    """Every word the generator writes: the demo tokenizer gives each one a single token."""
    text = " ".join(
        NAMES + list(PRONOUN.values()) + ["He"] + ITEMS + list(MULTIPLIER_WORDS.values())
        + ADD_TEMPLATES + SUB_TEMPLATES + [MUL_TEMPLATE, OPENING, CLOSING, "Question", "Answer"]
    )
    return sorted(set(re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", text))))


VOCAB_WORDS = _vocab_words()


def _next_step(rng: random.Random, value: int, d: Difficulty) -> tuple[str, int] | None:
    """One operation applicable to `value` within the bounds, or None if none fits."""
    ops = []
    if value + 1 <= d.max_intermediate:
        ops.append("+")
    if value >= 2:
        ops.append("-")
    if value * 2 <= d.max_intermediate:
        ops.append("*")
    if not ops:
        return None
    op = rng.choice(ops)
    if op == "+":
        b = rng.randint(1, min(d.max_operand, d.max_intermediate - value))
    elif op == "-":
        b = rng.randint(1, min(d.max_operand, value - 1))
    else:
        b = rng.randint(2, min(d.max_multiplier, d.max_intermediate // value))
    return op, b


def make_problem(rng: random.Random, d: Difficulty) -> dict:
    """One problem as {question, solution, answer}."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    pronoun = PRONOUN.get(name, "He")
    value = rng.randint(2, d.max_operand)
    sentences = [OPENING.format(name=name, a=value, item=item)]
    lines = []
    for _ in range(rng.randint(d.min_steps, d.max_steps)):
        step = _next_step(rng, value, d)
        if step is None:
            break
        op, b = step
        new = value + b if op == "+" else value - b if op == "-" else value * b
        if op == "+":
            sentences.append(rng.choice(ADD_TEMPLATES).format(P=pronoun, b=b))
        elif op == "-":
            sentences.append(rng.choice(SUB_TEMPLATES).format(P=pronoun, b=b))
        else:
            sentences.append(MUL_TEMPLATE.format(item=item, mult=MULTIPLIER_WORDS[b]))
        lines.append(f"{value}{op}{b}={new}")
        value = new
    sentences.append(CLOSING.format(item=item, name=name))
    solution = "\n".join(lines + [f"#### {value}"])
    return {"question": " ".join(sentences), "solution": solution, "answer": str(value)}


def generate_problems(n: int, seed: int, difficulty: Difficulty = Difficulty()) -> list[dict]:
    """`n` problems, the same for the same seed and difficulty. Each gets a stable `id`."""
    rng = random.Random(seed)
    return [{"id": f"arith-{seed}-{i}", **make_problem(rng, difficulty)} for i in range(n)]


def generate_splits(train_size: int, test_size: int, seed: int, difficulty: Difficulty) -> tuple[list[dict], list[dict]]:
    """Disjoint train/test splits: a question text seen in test never appears in train."""
    test = generate_problems(test_size, seed + 1, difficulty)
    seen = {p["question"] for p in test}
    train = [p for p in generate_problems(train_size + test_size, seed, difficulty) if p["question"] not in seen]
    return train[:train_size], test
