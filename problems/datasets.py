"""Prompt format and the fixed train/test splits, written once as Parquet and reused."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from problems.arithmetic import Difficulty, generate_splits
from problems.gsm8k import load_gsm8k

PROBLEM_SCHEMA = pa.schema(
    [("id", pa.string()), ("question", pa.string()), ("solution", pa.string()), ("answer", pa.string())]
)


def format_prompt(question: str) -> str:
    """Chat-free prompt; the completion is the worked solution, one step per line."""
    return f"Question: {question}\nAnswer:\n"


def write_problems(problems: list[dict], path: Path) -> Path:
    """Atomic Parquet write: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(problems, schema=PROBLEM_SCHEMA), tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def read_problems(path: str | Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def prepare_splits(data_cfg, data_dir: Path) -> tuple[Path, Path]:
    """(train, test) Parquet paths for `data_cfg` (a `DataConfig`), generated or loaded once.

    The built-in task is keyed by its knobs, so a change of difficulty or size makes new splits
    instead of silently reusing old ones.
    """
    import hashlib
    import json

    key = hashlib.sha256(json.dumps(data_cfg.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
    out = data_dir / key
    train_path, test_path = out / "train.parquet", out / "test.parquet"
    if train_path.exists() and test_path.exists():
        return train_path, test_path
    if data_cfg.prompt_set == "arithmetic":
        train, test = generate_splits(
            data_cfg.train_size, data_cfg.test_size, data_cfg.seed, Difficulty(**data_cfg.arithmetic.model_dump())
        )
    else:
        train = load_gsm8k(data_cfg.prompt_set, skip_malformed=data_cfg.skip_malformed)
        if data_cfg.test_set:
            test = load_gsm8k(data_cfg.test_set, skip_malformed=data_cfg.skip_malformed)[: data_cfg.test_size]
        else:
            test, train = train[: data_cfg.test_size], train[data_cfg.test_size:]
        train = train[: data_cfg.train_size]
        if not train or not test:
            raise ValueError(f"data.prompt_set {data_cfg.prompt_set}: too few problems for a train and a test split")
    write_problems(test, test_path)
    write_problems(train, train_path)
    return train_path, test_path


def draw_questions(problems: list[dict], n: int, key: str) -> list[dict]:
    """A seeded draw of `n` problems: the same key gives the same questions (so a resumed step asks
    the same ones), different keys (steps) give independent draws."""
    import random

    return random.Random(key).sample(problems, min(n, len(problems)))
