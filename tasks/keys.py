"""Cache keys for resumable tasks: one key per (run incarnation, iteration, step, stage).

A re-run of the flow with the same run_id finds the completed stages' persisted results (paths)
under these keys and does not redo them. The key includes the run folder's incarnation id, a
random id written when the folder is created: two checkouts or test folders using the same
run_id never share results, and a run folder deleted and started again gets fresh keys instead
of cached paths to files that are gone.
"""
from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

INCARNATION_FILE = ".incarnation"
# What a cached stage persists: its result (paths, small dicts) as JSON, never pickle.
PERSISTED = dict(persist_result=True, result_serializer="json")


def run_incarnation(run_dir: Path) -> str:
    """The run folder's incarnation id, created on first use."""
    path = run_dir / INCARNATION_FILE
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex)
    return path.read_text().strip()


def stage_key(stage: str):
    def key(context, parameters) -> str:
        cfg, run_id = parameters["cfg"], parameters["run_id"]
        parts = [run_incarnation(cfg.artifacts() / "runs" / run_id), run_id,
                 str(parameters.get("iteration", "")), str(parameters.get("step", "")), stage]
        return f"{stage}-" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]

    return key
