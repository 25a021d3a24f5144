"""Checkpoints and run state on disk: safetensors and JSON only, never pickle.

    <run>/checkpoints/policy/latest/       model (save_pretrained) + optimizer.safetensors + optimizer.json
    <run>/checkpoints/policy/iteration=k/  the policy at the end of iteration k
    <run>/state.json                       the last completed (iteration, step) and what it left behind
    <run>/step_metrics.jsonl               every step's metrics, the source MLflow is re-filled from

Every directory is written beside its final name and renamed into place, so a crash leaves the
previous checkpoint intact rather than a half-written one.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _swap_into_place(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_optimizer(optimizer: torch.optim.Optimizer, out: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in state["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{name}"] = value
    save_file(tensors, str(out / "optimizer.safetensors"))
    (out / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def load_optimizer(optimizer: torch.optim.Optimizer, src: Path) -> None:
    meta = json.loads((src / "optimizer.json").read_text())
    state: dict[int, dict] = {}
    for key, value in {**load_file(str(src / "optimizer.safetensors")), **meta["scalars"]}.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(model, tokenizer, out: str | Path, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """save_pretrained (safetensors) + optional optimizer state, atomically replacing `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if optimizer is not None:
        save_optimizer(optimizer, tmp)
    _swap_into_place(tmp, out)
    return out


def copy_checkpoint(src: str | Path, out: str | Path) -> Path:
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(src, tmp)
    _swap_into_place(tmp, out)
    return out


def append_step_metrics(run_dir: str | Path, step: int, metrics: dict[str, float]) -> None:
    """The run's own record of each step's metrics (JSON lines), written before the step counts as done."""
    with open(Path(run_dir) / "step_metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "metrics": metrics}) + "\n")


def read_step_metrics(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """{step: metrics}, steps in order; a step redone after a crash keeps its last record, and a line
    cut short by a crash is skipped."""
    path = Path(run_dir) / "step_metrics.jsonl"
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[rec["step"]] = rec["metrics"]
    return dict(sorted(out.items()))


def read_state(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "state.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_state(run_dir: str | Path, state: dict) -> None:
    path = Path(run_dir) / "state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".state.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)
