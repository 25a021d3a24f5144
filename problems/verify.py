"""Rule verifiers: final-answer extraction and comparison, and per-step checks.

These are the labels of the pipeline: outcome rewards and reward-model targets come from
`is_correct`, process rewards and process-RM targets from `step_correctness`.

Answers as real models write them. `extract_answer` takes, in this order: the last `#### N` line
(GSM8K), else the last `\\boxed{...}`, else the last "the answer is N" / "The final answer is: N" /
"Answer: N", else (only with `last_number=True`) the last number in the text. Plain numbers,
fractions and arithmetic (`1/2`, `\\frac{3}{4}`, `2^10`, `7 + 5`) are read here with `Decimal` and
`Fraction`, no sympy, so the common row costs microseconds; anything else that looks like
mathematics (`\\sqrt{2}`, `\\pi`, `x = 5`) goes to math-verify. Choices that decide wrong accepts:
- a comma groups thousands only before exactly three digits (`1,000`, `12,345,678`); `4,2` is
  refused (a decimal comma or a list, never 42);
- U+2212 (`−3`) is a minus sign;
- `%` is a unit and dropped: `50%` == `50` (GSM8K writes percentage answers as the bare number),
  so `50%` != `0.5`;
- currency, units and trailing words go: `$18.00`, `18 apples`, `18 \\text{ dollars}` are all 18;
- equal values get equal strings (Maj@K votes on strings): a fraction that is an exact decimal is
  that decimal (`1/2` -> '0.5'), other fractions are 'a/b' in lowest terms (`2/6` -> '1/3').
"""
from __future__ import annotations

import logging
import re
from decimal import Decimal, localcontext
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

ANSWER_MARK = "####"

# The shapes of a number; a thousands separator is a comma followed by exactly three digits.
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_UNSIGNED = rf"(?:{_DIGITS}(?:\.\d+)?|\.\d+)"
_NUMBER_ONLY = re.compile(rf"-?{_UNSIGNED}")
_FRACTION_ONLY = re.compile(r"(-?\d+)/(\d+)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_CURRENCY = "$£€¥₹"
_PLAIN = re.compile(rf"(-?)\s*[{_CURRENCY}]?\s*({_UNSIGNED})")
_MIXED = re.compile(r"(-?)(\d+)\s+(\d+)/(\d+)")
# What may follow a number for it to be the whole answer: nothing, a word, or punctuation that
# ends a sentence. An operator, a digit or a comma/point and digit means the number goes on.
_NUMBER_GOES_ON = re.compile(r"\s*(?:[-+*/^=\d\\]|\((?=\s*[-\d.(]))|[.,]\d")
_ARITH_CHARS = frozenset("0123456789.+-*/^() ")
_EQUATION = re.compile(r"^\s*(-?\d+)\s*([-+*/])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")

_ANSWER_PHRASE = re.compile(r"\banswer(?:\*\*)?\s*(?:is\b\s*:?|:)", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_LAST_NUMBER = re.compile(rf"(?<![\w.])(?:-\s*)?[{_CURRENCY}]?(?:\d+\s*/\s*\d+(?![\d,.]\d)|{_UNSIGNED})")
# `#### 1. Find the total` is a markdown heading (chat models write them), not the answer 1.
_NUMBERED_HEADING = re.compile(r"\s*\d+[.)]\s+[A-Za-z*]")
# math-verify gets only text that looks like mathematics: a LaTeX command, a root or pi sign, or
# a one-letter unknown's equation; `Step 3: add` must not become the answer 3.
_SYMBOLIC = re.compile(r"\\[A-Za-z]|[√π∞]|^[A-Za-z]\s*=")
_MAX_SYMBOLIC_CHARS = 200
_MAX_EXPONENT = 100
_MAX_BITS = 4096

_LATEX_REPLACEMENTS = [
    ("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("{,}", ","), ("\\%", "%"), ("\\$", "$"),
    ("\\times", "*"), ("\\cdot", "*"), ("\\ast", "*"), ("\\div", "/"), ("×", "*"), ("·", "*"), ("⋅", "*"),
    ("÷", "/"), ("\u2212", "-"), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("**", " "),
]
_NEEDS_CLEANING = re.compile(r"[\\*{×·⋅÷\u2212]")  # the first characters of _LATEX_REPLACEMENTS
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
_PERCENT_OF = re.compile(r"(\d)\s*%\s*of\s+(?=[\d(])", re.IGNORECASE)
_WORD_OPERATORS = [
    (re.compile(r"(?<=[\d)])\s*(?:[xX]|times|multiplied by)\s*(?=[\d(])"), "*"),
    (re.compile(r"(?<=[\d)])\s+(?:of)\s+(?=[\d(])"), "*"),
    (re.compile(r"(?<=[\d)])\s+divided by\s+(?=[\d(])"), "/"),
    (re.compile(r"(?<=[\d)])\s+plus\s+(?=[\d(])"), "+"),
    (re.compile(r"(?<=[\d)])\s+minus\s+(?=[\d(])"), "-"),
]
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_EQUALS = re.compile(r"(?<![<>!=])=(?![=>])")
_RELATIVE_TOLERANCE = Fraction(1, 10**6)


class _Answer(NamedTuple):
    text: str                # canonical form
    symbolic: str | None     # the LaTeX math-verify parsed, when it was not a plain value
    start: int               # where the answer's form starts in the completion


# ---------------------------------------------------------------- numbers and their canonical text

def _decimal_text(value: Decimal) -> str:
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _fraction_text(value: Fraction) -> str:
    """An exact decimal when there is one ('0.75'), else 'a/b' in lowest terms ('-1/3')."""
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    with localcontext() as ctx:  # enough digits that the division is exact
        ctx.prec = len(str(abs(value.numerator))) + 4 * len(str(value.denominator)) + 2
        return _decimal_text(Decimal(value.numerator) / Decimal(value.denominator))


def normalize_number(text: str) -> str | None:
    """'1,000' -> '1000', '- 3' -> '-3', '−3' -> '-3', '2.50' -> '2.5', '7.0' -> '7', '1/2' -> '0.5',
    '2/6' -> '1/3'; None if the whole text is not a number ('4,2', '12 apples', 'nan')."""
    cleaned = text.replace(" ", "").replace("\u2212", "-")
    if _NUMBER_ONLY.fullmatch(cleaned):
        return _decimal_text(Decimal(cleaned.replace(",", "")))
    m = _FRACTION_ONLY.fullmatch(cleaned)
    if m and int(m.group(2)) != 0:
        return _fraction_text(Fraction(int(m.group(1)), int(m.group(2))))
    return None


# ---------------------------------------------------------------- arithmetic without sympy

def _tokens(expr: str) -> list[str] | None:
    out, i = [], 0
    while i < len(expr):
        c = expr[i]
        if c == " ":
            i += 1
        elif c in "+-*/^()":
            out.append(c)
            i += 1
        elif c.isdigit() or c == ".":
            j = i
            while j < len(expr) and (expr[j].isdigit() or expr[j] == "."):
                j += 1
            out.append(expr[i:j])
            i = j
        else:
            return None
    return out


@lru_cache(maxsize=4096)  # a side is read when found and again when compared
def arithmetic_value(expr: str) -> Fraction | None:
    """The exact value of `+ - * / ^` arithmetic on decimals with the usual precedence ('7+5*2' -> 17,
    '2^10' -> 1024, '-(1/2)' -> -1/2); None if `expr` is not such arithmetic, divides by zero, or
    raises to a power that is not an integer of at most 100 (so `9^9^9` is refused, not computed)."""
    tokens = _tokens(expr)
    if not tokens:
        return None
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def atom() -> Fraction:
        tok = take() if peek() is not None else ""
        if tok == "(":
            value = sum_()
            if peek() != ")":
                raise ValueError
            take()
            return value
        if tok.isdigit():
            return Fraction(int(tok))
        if tok[:1].isdigit() or tok[:1] == ".":
            return Fraction(tok)  # refuses '1.2.3' and '.'
        raise ValueError

    def power() -> Fraction:
        base = atom()
        if peek() != "^":
            return base
        take()
        exponent = unary()
        if exponent.denominator != 1 or abs(exponent) > _MAX_EXPONENT or (base == 0 and exponent < 0):
            raise ValueError
        value = base ** int(exponent)
        if max(value.numerator.bit_length(), value.denominator.bit_length()) > _MAX_BITS:
            raise ValueError
        return value

    def unary() -> Fraction:
        if peek() in ("-", "+"):
            return -unary() if take() == "-" else unary()
        return power()

    def product() -> Fraction:
        value = unary()
        while peek() in ("*", "/"):
            op, rhs = take(), unary()
            if op == "*":
                value *= rhs
            elif rhs == 0:
                raise ValueError
            else:
                value /= rhs
        return value

    def sum_() -> Fraction:
        value = product()
        while peek() in ("+", "-"):
            value = value + product() if take() == "+" else value - product()
        return value

    try:
        value = sum_()
    except (ValueError, ArithmeticError):
        return None
    return value if pos == len(tokens) else None


# ---------------------------------------------------------------- one answer's text -> canonical form

def _clean(text: str) -> str:
    """LaTeX and markdown spellings of the same characters made plain: `\\times` -> '*', `\\$` -> '$',
    `\\text{ apples}` -> ' apples ', bold markers removed, U+2212 -> '-'."""
    if not _NEEDS_CLEANING.search(text):  # the common `#### 18` pays one search, not twenty replaces
        return text
    for old, new in _LATEX_REPLACEMENTS:
        text = text.replace(old, new)
    return _TEXT_COMMAND.sub(r" \1 ", text)


def _unwrap(text: str) -> tuple[str, bool]:
    """The inside of `$...$`, `\\(...\\)`, `\\[...\\]` that opens the text (and whether it was delimited);
    a `$` with no closing one is a currency sign, dropped."""
    text = text.strip()
    for open_, close in (("$$", "$$"), ("\\(", "\\)"), ("\\[", "\\]"), ("$", "$")):
        if text.startswith(open_):
            end = text.find(close, len(open_))
            if end > len(open_):
                return text[len(open_):end].strip(), True
            if open_ == "$":
                return text[1:].strip(), False
    return text, False


def _plain_value(text: str) -> str | None:
    """Canonical text of a leading plain number, fraction, mixed number or arithmetic; None if the
    text does not start with one that stands alone ('1/2' is not 1, '4,2' is not 4 or 42)."""
    text = text.replace("%", " ").strip()
    m = _PLAIN.match(text)
    if m and not _NUMBER_GOES_ON.match(text, m.end()):
        digits = m.group(2).replace(",", "")
        return str(int(m.group(1) + digits)) if "." not in digits else _decimal_text(Decimal(m.group(1) + digits))
    m = _MIXED.match(text)
    if m and int(m.group(4)) and not _NUMBER_GOES_ON.match(text, m.end()):
        value = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
        return _fraction_text(-value if m.group(1) else value)
    # Arithmetic: the longest leading run of its characters, `\frac` and braces made parentheses;
    # in a chain `7 + 5 = 12` the last side is the claim.
    text = _FRAC.sub(lambda f: f"(({f.group(1) or f.group(2)})/({f.group(3) or f.group(4)}))", text)
    text = _THOUSANDS_COMMA.sub("", text.replace("{", "(").replace("}", ")"))
    text = text.lstrip(_CURRENCY + " ")
    end = 0
    while end < len(text) and (text[end] in _ARITH_CHARS or text[end] in "=" + _CURRENCY):
        end += 1
    if end == 0 or _NUMBER_GOES_ON.match(text, end):
        return None
    last_side = _EQUALS.split(text[:end])[-1].strip(" " + _CURRENCY).rstrip(".")
    value = arithmetic_value(last_side.replace(" ", "")) if last_side else None
    return _fraction_text(value) if value is not None else None


@lru_cache(maxsize=None)
def _math_verify():
    """math-verify's `parse` and `verify`, imported on first use (with sympy it takes about a second).

    Both are called with their timeouts off: math-verify times out with `signal.alarm`, which
    raises ValueError outside the main thread, and Prefect runs tasks in worker threads. Instead
    `_canonical` sends it only short text and `_safe_to_evaluate` refuses the expressions that
    could run away (`9^{9^9}`, `100000!`), so its warning that no timeout is set is filtered out.
    """
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(lambda record: "Timeout is disabled" not in record.getMessage())
    return math_verify.parse, math_verify.verify


@lru_cache(maxsize=4096)
def _symbolic_parse(latex: str):
    """math-verify's reading of `latex`: a sympy expression, or None."""
    parse, _ = _math_verify()
    parsed = parse(f"${latex}$", parsing_timeout=None)
    return parsed[0] if parsed and not isinstance(parsed[0], str) else None


def _safe_to_evaluate(expr) -> bool:
    """False for what sympy could spend minutes on: a power above 100 or not a number (`9^{9^9}`),
    an integer above 10^100, a factorial or gamma."""
    import sympy

    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow) and not (node.exp.is_Number and abs(node.exp) <= _MAX_EXPONENT):
            return False
        if isinstance(node, sympy.Integer) and abs(node) > 10**100:
            return False
        if isinstance(node, (sympy.factorial, sympy.gamma)):
            return False
    return True


def _symbolic_text(latex: str) -> str | None:
    """Canonical text of what math-verify reads in `latex`: a number's canonical form, else sympy's
    string of the evaluated expression ('\\sqrt{8}' -> '2*sqrt(2)'); None when it reads nothing."""
    import sympy

    expr = _symbolic_parse(latex)
    if expr is None or not _safe_to_evaluate(expr):
        return None
    try:
        expr = expr.doit()
    except Exception:  # noqa: BLE001 -- sympy raises many types on malformed input; no answer then
        return None
    if isinstance(expr, sympy.Rational):
        return _fraction_text(Fraction(int(expr.p), int(expr.q)))
    if isinstance(expr, sympy.Float):
        return _decimal_text(Decimal(str(expr)))
    return str(expr)


def _canonical(text: str, *, start: int = 0, delimited: bool = False) -> _Answer | None:
    """The answer that opens `text` (the rest of an answer line, or a box's inside), canonical.

    Text that is not delimited is cut at the first word or sentence end before math-verify sees it,
    so `\\sqrt{2} cm, which is...` is read as `\\sqrt{2}`."""
    text = _clean(text)
    if not delimited:
        text, delimited = _unwrap(text)
    plain = _plain_value(text)
    if plain is not None:
        return _Answer(plain, None, start)
    if not delimited:
        text = re.split(r"\s[A-Za-z]{2,}|[,;!?](?:\s|$)|\.(?:\s|$)", text, maxsplit=1)[0]
    latex = text.replace("%", "").strip()
    if not latex or len(latex) > _MAX_SYMBOLIC_CHARS or not _SYMBOLIC.search(latex):
        return None
    symbolic = _symbolic_text(latex)
    return _Answer(symbolic, latex, start) if symbolic is not None else None


# ---------------------------------------------------------------- finding the final answer

def _line_rest(text: str, start: int) -> str:
    end = text.find("\n", start)
    return text[start:] if end < 0 else text[start:end]


def _boxed_content(text: str, brace: int) -> str | None:
    """The inside of the balanced braces opening at `brace`; None when they never close."""
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1:i]
    return None


def _after_mark(text: str, idx: int) -> _Answer | None:
    rest = _line_rest(text, idx + len(ANSWER_MARK))
    if _NUMBERED_HEADING.match(rest):
        return None
    return _canonical(rest, start=idx)


def answer_after_mark(text: str) -> str | None:
    """The canonical number on the last `####` line alone (the GSM8K solution format); None when that
    line holds none. For datasets, where such a line is an error, not prose to look past."""
    idx = text.rfind(ANSWER_MARK)
    found = _after_mark(text, idx) if idx >= 0 else None
    return found.text if found and found.symbolic is None else None


def _find_answer(text: str, last_number: bool) -> _Answer | None:
    idx = text.rfind(ANSWER_MARK)
    while idx >= 0:  # a `####` line without an answer is a markdown heading: look further up
        found = _after_mark(text, idx)
        if found:
            return found
        idx = text.rfind(ANSWER_MARK, 0, idx)
    for m in reversed(list(_BOXED.finditer(text))):
        content = _boxed_content(text, m.end() - 1)
        found = _canonical(content, start=m.start(), delimited=True) if content is not None else None
        if found:
            return found
    for m in reversed(list(_ANSWER_PHRASE.finditer(text))):
        found = _canonical(_line_rest(text, m.end()), start=m.start())
        if found:
            return found
    if last_number:
        numbers = list(_LAST_NUMBER.finditer(text.replace("\u2212", "-")))
        if numbers:
            return _canonical(numbers[-1].group(0), start=numbers[-1].start())
    return None


def extract_answer(text: str, *, last_number: bool = False) -> str | None:
    """The completion's final answer in canonical form; None when it gives none.

    Forms, first found wins: the last `#### N` line, the last `\\boxed{...}` (nested braces fine), the
    last "the answer is N" / "The final answer is: N" / "Answer: N" (any case, optional colon, `$`,
    bold), and only with `last_number` the last number anywhere. Canonical: '1,000' -> '1000',
    '$18.00' -> '18', '\\frac{3}{4}' -> '0.75', '2/6' -> '1/3', '2^10' -> '1024', `\\sqrt{8}` ->
    '2*sqrt(2)', so equal answers are equal strings for Maj@K.
    """
    found = _find_answer(text, last_number)
    return found.text if found else None


@lru_cache(maxsize=4096)  # a reference is checked against each of its group's G samples
def _reference(answer: str) -> _Answer | None:
    return _canonical(answer)


def canonical_answer(answer: str) -> str | None:
    """A reference answer ('18', '1,000', '$18.00', '\\frac{1}{2}') in `extract_answer`'s canonical form."""
    found = _reference(str(answer))
    return found.text if found else None


def _same_answer(got: _Answer, want: _Answer) -> bool:
    if got.text == want.text:
        return True
    if got.symbolic is None and want.symbolic is None:
        return False  # two plain values: equal exactly when their canonical texts are
    _, verify = _math_verify()
    gold = _symbolic_parse(want.symbolic) if want.symbolic else _symbolic_parse(want.text)
    pred = _symbolic_parse(got.symbolic) if got.symbolic else _symbolic_parse(got.text)
    if gold is None or pred is None or not (_safe_to_evaluate(gold) and _safe_to_evaluate(pred)):
        return False
    return verify(gold, pred, timeout_seconds=None)  # no signal.alarm: see _math_verify


def is_correct(completion: str, answer: str, *, last_number: bool = False) -> bool:
    """Outcome check: the completion's final answer (`extract_answer`) equals the reference `answer`.
    Plain values compare by canonical text; when either is symbolic, math-verify decides
    (`\\sqrt{8}` == `2\\sqrt{2}`). No answer is wrong."""
    got = _find_answer(completion, last_number)
    want = _reference(str(answer))
    return got is not None and want is not None and _same_answer(got, want)


# ---------------------------------------------------------------- per-step labels

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


def _normalize_line(line: str) -> str:
    """A prose line with its arithmetic spelled one way: `×`, `x`, `times`, `\\times` -> '*', `÷` -> '/',
    `$12` -> '12', `1,000` -> '1000', `20% of 50` -> '20/100*50', `\\frac{a}{b}` -> '((a)/(b))'."""
    line = _clean(line)
    line = _FRAC.sub(lambda f: f"(({f.group(1) or f.group(2)})/({f.group(3) or f.group(4)}))", line)
    for delimiter in ("\\(", "\\)", "\\[", "\\]", "$", "£", "€", "¥", "₹"):
        line = line.replace(delimiter, " ")
    line = _PERCENT_OF.sub(r"\1/100*", line)
    for pattern, op in _WORD_OPERATORS:
        line = pattern.sub(op, line)
    return _THOUSANDS_COMMA.sub("", line)


def _balance(run: str) -> str | None:
    """`run` without the parentheses it only half holds ('(7 + 5' -> '7 + 5'); None if still unbalanced."""
    while run.startswith("(") and run.count("(") > run.count(")"):
        run = run[1:].lstrip()
    while run.endswith(")") and run.count(")") > run.count("("):
        run = run[:-1].rstrip()
    return run if run.count("(") == run.count(")") else None


def _side_before(part: str) -> str | None:
    """The arithmetic that ends `part` (the left side of the `=` after it); None when there is none or
    it is glued to more (`x + 5`, `2x`, `3%`), since then the claim is not plain arithmetic."""
    k = len(part)
    while k > 0 and part[k - 1] in _ARITH_CHARS:
        k -= 1
    sentence_end = part.rfind(". ", k)  # `She has 5. 7 + 5 = 12`: the claim starts after the period
    if sentence_end >= 0:
        k = sentence_end + 2
    run = part[k:].strip()
    before = part[:k].rstrip()
    if not run or (k > 0 and part[k] != " " and part[k - 1] not in " :;,[{<\"'"):
        return None
    if run[0] in "+*/^)" or (run[0] == "-" and before[-1:].isalnum()):
        return None
    run = _balance(run)
    return run if run and arithmetic_value(run) is not None else None


def _side_after(part: str) -> tuple[str | None, bool]:
    """The arithmetic that opens `part` (the right side of the `=` before it), and whether it is the
    whole of `part` (then it is also the left side of the next `=`, as in `a + b = c + d = e`)."""
    k = 0
    while k < len(part) and part[k] in _ARITH_CHARS:
        k += 1
    sentence_end = part.find(". ", 0, k)  # `= 12. Then 12 * 3`: the side ends at the period
    if sentence_end >= 0:
        k = sentence_end + 1
    run = part[:k].strip().rstrip(".").rstrip()
    whole = not part[k:].strip()
    if not run or (k < len(part) and " " not in (part[k - 1], part[k]) and part[k] not in ",;:!?]}>\"'"):
        return None, whole
    if run[-1] in "+-*/^(":
        return None, whole
    run = _balance(run)
    return (run if run and arithmetic_value(run) is not None else None), whole


def _chains(line: str) -> list[list[str | None]]:
    """The `=` chains of a normalised line, each a list of sides (None: a side that is not arithmetic)."""
    parts = _EQUALS.split(line)
    chains: list[list[str | None]] = []
    chain = [_side_before(parts[0])]
    for i, part in enumerate(parts[1:], start=1):
        side, whole = _side_after(part)
        chain.append(side)
        if i < len(parts) - 1 and not (whole and side is not None):
            chains.append(chain)
            chain = [_side_before(part)]
    chains.append(chain)
    return chains if len(parts) > 1 else []


def _decimals(side: str) -> int:
    """Decimal places of a bare number ('3.33' -> 2); 0 for anything else."""
    m = re.fullmatch(r"-?\d*\.(\d+)", side)
    return len(m.group(1)) if m else 0


def _sides_agree(a: str, b: str) -> bool:
    """Equal within a relative 1e-6, or equal once rounded to the places a bare decimal side shows
    (`10/3 = 3.33` is right, `10/3 = 3` is not)."""
    x, y = arithmetic_value(a), arithmetic_value(b)
    diff = abs(x - y)
    if diff <= _RELATIVE_TOLERANCE * max(abs(x), abs(y)):
        return True
    places = max(_decimals(a), _decimals(b))
    return places > 0 and diff <= Fraction(1, 2 * 10**places)


def _is_operation(side: str) -> bool:
    return any(op in side.lstrip("-(") for op in "+-*/^")


def equations_hold(line: str) -> bool | None:
    """Whether every arithmetic equation in a prose line is true; None when the line claims none.

    Checked: each `=` of a chain (`a + b = c + d = e`) between plain arithmetic sides, in a run of
    sides of which at least one is an operation, and GSM8K's `<<48/2=24>>` annotations. Not
    checked, because they are not arithmetic claims: `Total = 36`, `1 hour = 60 minutes`, `2x = 10`,
    `50% = 0.5`, `10/3 ≈ 3.33`.
    """
    if "=" not in line:
        return None
    verdicts = []
    for annotation in _ANNOTATION.findall(line):
        verdicts += _chain_verdicts(_chains(_normalize_line(annotation)))
    verdicts += _chain_verdicts(_chains(_normalize_line(_ANNOTATION.sub(" ", line))))
    return all(verdicts) if verdicts else None


def _chain_verdicts(chains: list[list[str | None]]) -> list[bool]:
    verdicts = []
    for chain in chains:
        run: list[str] = []
        for side in chain + [None]:  # None ends the last run
            if side is not None:
                run.append(side)
                continue
            if len(run) > 1 and any(_is_operation(s) for s in run):
                verdicts += [_sides_agree(a, b) for a, b in zip(run, run[1:])]
            run = []
    return verdicts


def line_correctness(completion: str, answer: str, *, last_number: bool = False) -> list[bool]:
    """Per-step labels of free-form text, one per `split_steps` line, with no reference solution.

    A line with arithmetic equations ("Mia has 7 + 5 = 12 apples.", "12 × 3 = 36", `<<48/2=24>>`)
    is correct when every one is true (`equations_hold`): a wrong sum like "14 + 15 = 20" is the slip
    a small model makes and a per-step check catches. A line that claims no equation is correct
    (prose carries no checkable claim), except the line holding the final answer (`extract_answer`),
    which is correct iff the answer is (and its equations hold). A completion with no final answer
    has its last line wrong: otherwise text that never answers would earn all-correct steps.
    """
    lines = split_steps(completion)
    found = _find_answer(completion, last_number)
    want = _reference(str(answer))
    answer_line = completion.count("\n", 0, found.start) if found else len(lines) - 1
    answer_ok = found is not None and want is not None and _same_answer(found, want)
    labels = []
    for i, line in enumerate(lines):
        ok = equations_hold(line) is not False
        labels.append(ok and answer_ok if i == answer_line else ok)
    return labels


def _reference_steps(solution: str) -> list[tuple[int, str, int, int]] | None:
    """The built-in task's solution as equations: every line before the `####` line a bare
    `a op b = c`; None for any other solution (GSM8K prose, a bare `#### N`, none)."""
    lines = split_steps(solution)
    if len(lines) < 2 or not lines[-1].lstrip().startswith(ANSWER_MARK):
        return None
    steps = [parse_equation(line) for line in lines[:-1]]
    return None if None in steps else steps


def step_correctness(completion: str, solution: str, answer: str, *, last_number: bool = False) -> list[bool]:
    """Per-step labels of a completion, one per `split_steps` step.

    Against the built-in task's reference (every solution line before `####` a bare `a op b = c`):
    step j (line j) is correct when it is a true equation that applies the problem's j-th operation
    to the correct previous result (operands and operator equal the reference's line j); the `####`
    line is correct when its answer is. Anything else (extra lines, malformed lines, a true equation
    on a wrong earlier result) is wrong. With any other solution (GSM8K prose, none) the labels are
    `line_correctness`: each line's own arithmetic, and the final answer.
    """
    reference = _reference_steps(solution)
    if reference is None:
        return line_correctness(completion, answer, last_number=last_number)
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
