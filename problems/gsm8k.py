"""Load real datasets in GSM8K's format (JSONL or Parquet with `question` and `answer`).

The answer holds the worked solution and ends with `#### N`; steps may carry calculator
annotations `<<48/2=24>>`, which are stripped from the solution the policy is trained on. An answer
that is just the number (`"18"`, or the JSON number `18`) is accepted too: its solution is `#### 18`.
Text is UTF-8 whatever the locale: JSONL lines are decoded as UTF-8, and so are Parquet binary
columns (Parquet strings are UTF-8 by the format). Every problem with a file is a `DatasetError` (a
`configs.UserError`) naming the file and line, never echoing the file's bytes.
"""
from __future__ import annotations

import json
import logging
import re
from decimal import Decimal
from pathlib import Path

from configs.schema import UserError
from problems.verify import ANSWER_MARK, answer_after_mark, normalize_number

log = logging.getLogger(__name__)
_CALCULATOR = re.compile(r"<<[^>]*>>")


class DatasetError(UserError):
    """A missing, unreadable or malformed dataset; the message names the file (and line)."""


def _text(value: object, where: str, field: str) -> str | None:
    """A text field as str: bytes (a Parquet binary column) are decoded as UTF-8."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise DatasetError(f"{where}: field {field} is not valid UTF-8") from None
    return value if isinstance(value, str) else None


def _answer_text(value: object, where: str) -> str | None:
    """The answer field as text; a JSON or Parquet number (not a bool) is its positional decimal text
    (`1e3` -> '1000'; NaN stays 'NaN', which is no answer)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(Decimal(repr(value)), "f")
    return _text(value, where, "answer")


def _to_problem(row: object, where: str, idx: int) -> dict:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object with 'question' and 'answer'")
    question, text = _text(row.get("question"), where, "question"), _answer_text(row.get("answer"), where)
    missing = [k for k, v in (("question", question), ("answer", text)) if v is None]
    if missing:
        raise DatasetError(f"{where}: missing or non-text field(s) {', '.join(missing)}")
    if ANSWER_MARK in text:
        answer = answer_after_mark(text)
        if answer is None:
            raise DatasetError(f"{where}: the '{ANSWER_MARK}' line holds no number")
        body = _CALCULATOR.sub("", text[: text.rfind(ANSWER_MARK)]).strip()
    else:
        answer = normalize_number(text.strip())
        if answer is None:
            raise DatasetError(f"{where}: answer has no '{ANSWER_MARK}' line")
        body = ""
    solution = (body + "\n" if body else "") + f"{ANSWER_MARK} {answer}"
    return {"id": str(row.get("id", f"{Path(where.split(':')[0]).stem}-{idx}")), "question": question.strip(),
            "solution": solution, "answer": answer}


def _rows(path: Path):
    """(location, row) pairs; a line that is not UTF-8 or not JSON yields its error as the row. JSONL is
    read as UTF-8 whatever the locale, and an undecodable line is named by number, never echoed."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError):
            raise DatasetError(f"{path}: not a readable Parquet file") from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield f"{path}:row {i}", row
        return
    try:
        f = path.open("rb")
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None
    with f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield f"{path}:{i}", DatasetError(f"{path}:{i}: not valid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as err:
                yield f"{path}:{i}", DatasetError(f"{path}:{i}: not valid JSON ({err.msg})")


def load_gsm8k(path: str | Path, *, skip_malformed: bool = False) -> list[dict]:
    """Problems as {id, question, solution, answer}. A malformed row fails the load, naming file and
    line, unless `skip_malformed`, in which case it is skipped and the count is logged."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    problems, skipped = [], 0
    for idx, (where, row) in enumerate(_rows(path)):
        try:
            if isinstance(row, DatasetError):
                raise row
            problems.append(_to_problem(row, where, idx))
        except DatasetError:
            if not skip_malformed:
                raise
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d malformed row(s)", path, skipped)
    if not problems:
        raise DatasetError(f"{path}: no usable problems")
    return problems
