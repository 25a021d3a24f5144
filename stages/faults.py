"""Deterministic crash injection, for the crash-matrix test: a process told to die at a named point
kills itself with SIGKILL there, as `kill -9` would, but always at the same place.

    GRPO_CRASH_AT=<point>[@<n>]   die the n-th time (default: the first) this process reaches <point>

Unset (every normal run), `crash_point` is a dictionary look-up and nothing else.
"""
from __future__ import annotations

import os
import signal

ENV = "GRPO_CRASH_AT"
POINTS = frozenset({
    "sft",               # after an intermediate SFT checkpoint of the warm start
    "initial_rm",        # after the initial reward models are trained, before the run records them
    "sampler_replica",   # cluster.backend ray: a sampler replica (a Ray actor) SIGKILLs itself inside its
                         # sampling call, after sampling, before answering (the flow's process lives on)
    "trainer_rank",      # cluster.backend ray: the trainer group's last rank SIGKILLs itself as an update starts
    "sampling",          # after a step's groups are sampled (in memory, nothing written)
    "scoring",           # after they are scored
    "advantages",        # after advantages are computed, before the step's Parquet is written
    "update",            # after the GRPO update, before its checkpoint
    "checkpoint_write",  # inside a checkpoint write: the files are in a temporary folder, not yet renamed
    "rm_retraining",     # after the iteration's reward models are retrained, before the run records them
    "iteration_eval",    # after an iteration-end evaluation (not the last iteration's), before it is recorded
    "final_eval",        # after the last iteration's evaluation (the final policy's), before it is recorded
    "sft_control",       # after the SFT control is trained, before it is evaluated
})
_hits: dict[str, int] = {}


def fault_due(name: str) -> bool:
    """Whether GRPO_CRASH_AT names `name` and this is the chosen hit (counted in this process, so a fault
    handed on to another process, as `sampler_replica`'s is, fires once however often that one is replaced)."""
    if name not in POINTS:
        raise ValueError(f"unknown crash point {name!r}")
    spec = os.environ.get(ENV)
    if not spec:
        return False
    point, _, nth = spec.partition("@")
    if point != name:
        return False
    _hits[name] = _hits.get(name, 0) + 1
    return _hits[name] == int(nth or 1)


def crash_point(name: str) -> None:
    """SIGKILL this process when GRPO_CRASH_AT names `name` and this is the chosen hit."""
    if fault_due(name):
        os.kill(os.getpid(), signal.SIGKILL)
