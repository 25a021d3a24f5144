"""Micro-benchmark: what the rule verifier costs per row, its plain-number fast path vs math-verify.

Run from the repo root:  .venv/bin/python bench/verify_cost.py
Writes/replaces the "## Verifier cost per row" section of BENCHMARKS.md.

Rows: a few hundred distinct completions in the forms real chat models write (SmolLM2-style GSM8K
prose ending in `#### N`, Qwen-style markdown with `\\boxed{...}` including fractions and roots,
"The final answer is: $18.00", "The answer is **17**.", prose whose answer is only its last number),
about a fifth of them wrong, each with its reference answer. Timed per row, one pass over all rows
per repeat, the fastest repeat, caches cleared before each pass (every row is new to the verifier,
as in training, where no completion repeats):
- `problems.verify.is_correct(text, answer, last_number=True)` on all rows, and split by the path
  the answer took (plain: Decimal/Fraction only; symbolic: math-verify);
- math-verify alone: `verify(parse(answer), parse(text))`, timeouts off (as the verifier calls it),
  and with its default signal-alarm timeouts (main thread only);
- `problems.verify.line_correctness` (per-line process labels) on all rows.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import platform
import random
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import cpu_model, write_section  # noqa: E402

import problems.verify as verify_module  # noqa: E402
from problems.verify import extract_answer, is_correct, line_correctness  # noqa: E402

NAMES = ["Mia", "Natalia", "Tom", "Ali", "Zoë", "Ben"]
ITEMS = ["apples", "clips", "stickers", "cookies", "marbles"]


def _smol(rng: random.Random, i: int) -> tuple[str, str]:
    a, b, m, d = rng.randint(5, 60), rng.randint(5, 60), rng.randint(2, 9), rng.randint(1, 20)
    name, item = NAMES[i % len(NAMES)], ITEMS[i % len(ITEMS)]
    total = (a + b) * m - d
    said = total if rng.random() > 0.2 else total + rng.choice([-10, -1, 1, 2])
    slip = a + b if rng.random() > 0.15 else a + b + 1
    text = (f"{name} has {a} {item} and gets {b} more.\n{name} has {a} + {b} = {slip} {item}.\n"
            f"Then {slip} × {m} = {slip * m} {item}.\nShe gives away {d}: {slip * m} - {d} = {slip * m - d}.\n"
            f"#### {said}")
    return text, str(total)


def _qwen_boxed(rng: random.Random, i: int) -> tuple[str, str]:
    num, den = rng.randint(1, 40), rng.choice([2, 3, 4, 5, 8])
    value = Fraction(num, den)
    kind = i % 3
    if kind == 0:
        answer, boxed = str(value), f"\\frac{{{num}}}{{{den}}}"
    elif kind == 1:
        answer, boxed = str(num * den), f"{num * den}"
    else:
        answer, boxed = f"\\sqrt{{{num * 4}}}", f"2\\sqrt{{{num}}}"
    if rng.random() < 0.2:
        boxed = f"{num * den + 1}"
    text = ("To solve this problem, we need to find the amount.\n\n### Step 1: Set up\n"
            f"\\[ {num} \\times {den} = {num * den} \\]\n\n### Step 2: Divide\n"
            f"Dividing gives \\( \\frac{{{num}}}{{{den}}} \\).\n\n### Final Answer\n\\[\n\\boxed{{{boxed}}}\n\\]")
    return text, answer


def _final_answer_is(rng: random.Random, i: int) -> tuple[str, str]:
    price, n = rng.randint(2, 30), rng.randint(2, 12)
    said = price * n if rng.random() > 0.2 else price * n + 3
    text = (f"Each ticket costs ${price}.00 and she buys {n} tickets.\n"
            f"So the cost is ${price} x {n} = ${price * n}.\nThe final answer is: ${said}.00")
    return text, str(price * n)


def _answer_is_bold(rng: random.Random, i: int) -> tuple[str, str]:
    a, b = rng.randint(100, 5000), rng.randint(100, 5000)
    said = a + b if rng.random() > 0.2 else a + b - 100
    text = f"First, {a:,} + {b:,} = {a + b:,}.\n\nThe answer is **{said:,}**."
    return text, str(a + b)


def _last_number(rng: random.Random, i: int) -> tuple[str, str]:
    a, b = rng.randint(2, 50), rng.randint(2, 50)
    text = f"She had {a} and found {b} more, so now she has {a + b} of them."
    return text, str(a + b if rng.random() > 0.2 else a + b + 1)


FORMS = [_smol, _qwen_boxed, _final_answer_is, _answer_is_bold, _last_number]


def make_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [FORMS[i % len(FORMS)](rng, i) for i in range(n)]


def _clear_caches() -> None:
    # the verifier caches references, arithmetic and math-verify's parses (math-verify its own too);
    # a row seen before would be nearly free
    for cached in (verify_module._symbolic_parse, verify_module._reference, verify_module.arithmetic_value):
        cached.cache_clear()
    import math_verify.parser as mvp

    for fn in (mvp.parse_latex_cached, mvp.parse_expr_cached, mvp.extract_latex):
        fn.cache_clear()


def per_row_us(fn, rows, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _clear_caches()
        t = time.perf_counter()
        for text, answer in rows:
            fn(text, answer)
        times.append((time.perf_counter() - t) / len(rows) * 1e6)
    return min(times)  # the least disturbed pass: other jobs share this machine


def import_seconds() -> float:
    """Seconds to import math_verify (and sympy) in a fresh interpreter: what the first symbolic row costs."""
    code = "import time; t = time.perf_counter(); import math_verify; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = ap.parse_args()

    cold_import = import_seconds()
    from math_verify import parse, verify

    rows = make_rows(args.rows)
    # which path each row takes, as the verifier decides it: symbolic when either answer needs math-verify
    symbolic = [(t, a) for t, a in rows
                if verify_module._find_answer(t, True).symbolic or verify_module._reference(a).symbolic]
    plain = [r for r in rows if r not in symbolic]

    ours = per_row_us(lambda t, a: is_correct(t, a, last_number=True), rows, args.repeats)
    ours_plain = per_row_us(lambda t, a: is_correct(t, a, last_number=True), plain, args.repeats)
    ours_symbolic = per_row_us(lambda t, a: is_correct(t, a, last_number=True), symbolic, args.repeats)
    def math_verify_alone(t, a):
        return verify(parse(f"${a}$", parsing_timeout=None), parse(t, parsing_timeout=None), timeout_seconds=None)

    mv_off = per_row_us(math_verify_alone, rows, args.repeats)
    mv_plain = per_row_us(math_verify_alone, plain, args.repeats)
    mv_symbolic = per_row_us(math_verify_alone, symbolic, args.repeats)
    mv_alarm = per_row_us(lambda t, a: verify(parse(f"${a}$"), parse(t)), rows, args.repeats)
    lines = per_row_us(lambda t, a: line_correctness(t, a, last_number=True), rows, args.repeats)

    ours_ok = [is_correct(t, a, last_number=True) for t, a in rows]
    mv_ok = [math_verify_alone(t, a) for t, a in rows]
    differ = [(t, a) for (t, a), x, y in zip(rows, ours_ok, mv_ok) if x != y]
    example = ""
    if differ:
        t, a = differ[0]
        example = (f" (e.g. reference {a!r}, completion ending {t[-40:]!r}: ours {extract_answer(t, last_number=True)!r}, "
                   f"math-verify reads {parse(t, parsing_timeout=None)[:1]})")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("math-verify", "sympy", "latex2sympy2_extended"))
    section = f"""## Verifier cost per row

`.venv/bin/python bench/verify_cost.py` (bench/verify_cost.py): {len(rows)} distinct completions in five forms real chat models write (SmolLM2-style `#### N` prose, Qwen-style markdown ending in `\\boxed{{...}}` with integers, fractions and roots, "The final answer is: $18.00", "The answer is **1,234**.", prose answered only by its last number), ~20% wrong; `is_correct(..., last_number=True)` against the reference; one pass per repeat with every parse cache cleared first (in training no completion repeats), fastest of {args.repeats} passes (other jobs share the machine).

- machine: {os.cpu_count()} CPUs ({cpu_model()}), shared with other jobs (load average {load} at the end; on this machine the figures move by up to 2x from run to run, the ratios much less), Python {platform.python_version()}, {versions}
- **`problems.verify.is_correct`: {ours:.0f} µs/row** over all rows; {ours_plain:.0f} µs/row on the {len(plain)} rows whose answer is a plain number or fraction (Decimal/Fraction fast path, no sympy); {ours_symbolic:.0f} µs/row on the {len(symbolic)} rows with a root in the box or the reference (math-verify parses and compares those)
- **math-verify alone** (`verify(parse("$answer$"), parse(completion))` on every row): {mv_off:.0f} µs/row with timeouts off (`parsing_timeout=None`, `timeout_seconds=None`, as the verifier calls it): {mv_plain:.0f} µs/row on the plain rows, {mv_symbolic:.0f} on the symbolic ones; {mv_alarm:.0f} µs/row over all rows with its default signal-alarm timeouts (setting an alarm costs microseconds: the gap between the two is run-to-run noise)
- **fast path vs math-verify alone on the plain rows: {ours_plain:.0f} vs {mv_plain:.0f} µs/row, {mv_plain / ours_plain:.0f}x**; over all rows {ours:.0f} vs {mv_off:.0f} µs/row
- `line_correctness` (per-line process labels, which also finds the answer): {lines:.0f} µs/row
- first use of math-verify in a process: {cold_import:.2f} s to import it (sympy); the fast path never imports it
- verdicts: ours and math-verify alone differ on {len(differ)} of {len(rows)} rows{example}; by design they differ on `4,2` (math-verify reads 4.2, ours no answer) and `50%` (math-verify equals both 50 and 0.5, ours only 50)
- threads: math-verify's default timeouts use `signal.alarm`, so `parse`/`verify` raise ValueError ("signal only works in main thread") when called from a worker thread, as Prefect runs tasks; the verifier passes `parsing_timeout=None` / `timeout_seconds=None` and bounds the work itself (short text only; powers above 100 and factorials refused)
"""
    print(section)
    if not args.no_write:
        write_section(section)


if __name__ == "__main__":
    main()
