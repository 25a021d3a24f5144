"""Prompt format and the fixed train/test splits, written once as Parquet and reused."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from problems import gsm_symbolic
from problems.arithmetic import Difficulty, generate_splits
from problems.gsm8k import DatasetError, load_gsm8k

# The prompt sets generated in code; any other `data.prompt_set` is a GSM8K-format file.
BUILT_IN = ("arithmetic", "gsm_symbolic")
PROBLEM_SCHEMA = pa.schema(
    [("id", pa.string()), ("question", pa.string()), ("solution", pa.string()), ("answer", pa.string())]
)


def write_problems(problems: list[dict], path: Path) -> Path:
    """Atomic Parquet write: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(problems, schema=PROBLEM_SCHEMA), tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def read_problems(path: str | Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _file_sha256(path: str, field: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as err:
        raise DatasetError(f"{field}: {path}: cannot read ({err.strerror or type(err).__name__})") from None


def split_key(data_cfg) -> str:
    """The name of the splits' folder: a hash of `data_cfg`, and for GSM8K-format files of their
    content too, so a file edited in place makes new splits instead of reusing the old ones. The
    built-in sets are keyed by the config alone."""
    fields = data_cfg.model_dump()
    if data_cfg.prompt_set not in BUILT_IN:
        fields["content_sha256"] = {field: _file_sha256(path, f"data.{field}")
                                    for field, path in (("prompt_set", data_cfg.prompt_set),
                                                        ("test_set", data_cfg.test_set)) if path}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def _load_gsm8k_field(data_cfg, field: str) -> list[dict]:
    path = getattr(data_cfg, field)
    try:
        return load_gsm8k(path, skip_malformed=data_cfg.skip_malformed)
    except DatasetError as err:
        raise DatasetError(f"data.{field}: {err}") from None


def load_splits(data_cfg) -> tuple[list[dict], list[dict]]:
    """(train, test) problems of `data_cfg` (a `DataConfig`), in memory. A bad GSM8K-format file raises
    `DatasetError` naming the field, the file and the line."""
    if data_cfg.prompt_set == "arithmetic":
        return generate_splits(
            data_cfg.train_size, data_cfg.test_size, data_cfg.seed, Difficulty(**data_cfg.arithmetic.model_dump())
        )
    if data_cfg.prompt_set == "gsm_symbolic":
        return gsm_symbolic.generate_splits(data_cfg.train_size, data_cfg.test_size, data_cfg.seed)
    train = _load_gsm8k_field(data_cfg, "prompt_set")
    if data_cfg.test_set:
        test = _load_gsm8k_field(data_cfg, "test_set")[: data_cfg.test_size]
    else:
        test, train = train[: data_cfg.test_size], train[data_cfg.test_size:]
    train = train[: data_cfg.train_size]
    if not train or not test:
        raise DatasetError(f"data.prompt_set: {data_cfg.prompt_set}: too few problems for a train and a test split "
                           f"(data.test_size is {data_cfg.test_size})")
    return train, test


def prepare_splits(data_cfg, data_dir: Path) -> tuple[Path, Path]:
    """(train, test) Parquet paths for `data_cfg` (a `DataConfig`), generated or loaded once.

    Keyed by `split_key`, so a change of difficulty, size or file content makes new splits instead of
    silently reusing old ones.
    """
    out = data_dir / split_key(data_cfg)
    train_path, test_path = out / "train.parquet", out / "test.parquet"
    if train_path.exists() and test_path.exists():
        return train_path, test_path
    train, test = load_splits(data_cfg)
    write_problems(test, test_path)
    write_problems(train, train_path)
    return train_path, test_path


def draw_questions(problems: list[dict], n: int, key: str) -> list[dict]:
    """A seeded draw of `n` problems: the same key gives the same questions (so a resumed step asks
    the same ones), different keys (steps) give independent draws."""
    import random

    return random.Random(key).sample(problems, min(n, len(problems)))
