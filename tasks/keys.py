"""Cache keys for resumable tasks: one key per (artifacts root, run, iteration, step, stage).

A re-run of the flow with the same run_id finds the completed stages' persisted results (paths)
under these keys and does not redo them. The artifacts root is part of the key so that two
checkouts (or two test folders) using the same run_id never share results.
"""
from __future__ import annotations

import hashlib


def stage_key(stage: str):
    def key(context, parameters) -> str:
        cfg = parameters["cfg"]
        parts = [str(cfg.artifacts()), parameters["run_id"], str(parameters.get("iteration", "")),
                 str(parameters.get("step", "")), stage]
        return f"{stage}-" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]

    return key
