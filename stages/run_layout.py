"""Where everything of a run lives: the one place that knows the run folder's layout.

    <artifacts>/runs/<run_id>/
        config.yaml                               the config the run was started with
        state.json                                what is done (stages/run_state.py), written atomically
        metrics.jsonl                             every metric record, before MLflow sees it
        run.lock                                  the process that owns the run (stages/run_lock.py)
        rollouts/iteration=<k>/step=<s>/part-0.parquet   one row per sampled output (hive-partitioned)
        rm_bootstrap/samples.parquet              the SFT policy's samples the first reward models learn from
        rm_data/iteration=<k>/part.parquet        reward-model training rows of data iteration k (replay source)
        rm_eval/iteration=<k>/part.parquet        their held-out rows
        checkpoints/policy/step=<s>/              the newest committed policy (older ones are pruned)
        checkpoints/policy/iteration=<k>/         the policy at the end of iteration k (full weights; under
                                                  LoRA the merged export), pi_ref of iteration k+1
        checkpoints/reference/iteration=0/        pi_ref of iteration 0: the run's start (weights only)
        checkpoints/{outcome,process}_rm/iteration=<k>/   reward models after data iteration k
        checkpoints/control_sft/                  the time-matched SFT control

Paths kept in the run's state are relative to the run folder (`ref`), so a run folder copied or
moved elsewhere resumes there (`path`).
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from configs import UserError
from configs.schema import RUN_ID_PATTERN
from stages.checkpoints import OPTIMIZER_FILES

RM_KIND_DIRS = {"outcome": "outcome_rm", "process": "process_rm"}


def check_run_id(run_id: str) -> str:
    if not re.fullmatch(RUN_ID_PATTERN, run_id) or ".." in run_id:
        raise UserError(f"run_id: {run_id!r} must be letters, digits, '.', '_' or '-' (no path separators, no '..')")
    return run_id


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def of(cls, artifacts: str | Path, run_id: str) -> RunLayout:
        return cls(Path(artifacts) / "runs" / check_run_id(run_id))

    @property
    def run_id(self) -> str:
        return self.root.name

    # ---- files -----------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    # ---- rollouts --------------------------------------------------------------------------------
    @property
    def rollouts_dir(self) -> Path:
        return self.root / "rollouts"

    def iteration_rollouts(self, iteration: int) -> Path:
        return self.rollouts_dir / f"iteration={iteration}"

    def rollouts(self, iteration: int, step: int) -> Path:
        return self.iteration_rollouts(iteration) / f"step={step}" / "part-0.parquet"

    @property
    def rm_bootstrap(self) -> Path:
        return self.root / "rm_bootstrap" / "samples.parquet"

    def rm_data(self, iteration: int) -> Path:
        return self.root / "rm_data" / f"iteration={iteration}" / "part.parquet"

    def rm_eval(self, iteration: int) -> Path:
        return self.root / "rm_eval" / f"iteration={iteration}" / "part.parquet"

    # ---- checkpoints -----------------------------------------------------------------------------
    def policy_step(self, step: int) -> Path:
        return self.root / "checkpoints" / "policy" / f"step={step}"

    def policy_iteration(self, iteration: int) -> Path:
        return self.root / "checkpoints" / "policy" / f"iteration={iteration}"

    def reference(self, iteration: int) -> Path:
        return self.root / "checkpoints" / "reference" / f"iteration={iteration}"

    def reward_model(self, kind: str, iteration: int) -> Path:
        return self.root / "checkpoints" / RM_KIND_DIRS[kind] / f"iteration={iteration}"

    @property
    def control_sft(self) -> Path:
        return self.root / "checkpoints" / "control_sft"

    # ---- references kept in the state ------------------------------------------------------------
    def ref(self, path: str | Path) -> str:
        """`path` as the state keeps it: relative when inside the run folder (as every checkpoint
        the run writes is), else as given."""
        p = Path(path)
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)

    def path(self, ref: str) -> str:
        """The loadable location of a state reference."""
        inside = self.root / ref
        return str(inside) if not Path(ref).is_absolute() and inside.exists() else ref

    # ---- housekeeping ----------------------------------------------------------------------------
    def prune_checkpoints(self, keep: Path) -> None:
        """After `keep` is committed: step checkpoints exist for resume, so only `keep` stays of them; the
        optimizer state is needed only to continue from the newest, so the iteration checkpoints (kept as
        the run's history and references) lose theirs."""
        keep = Path(keep).resolve()
        policies = self.root / "checkpoints" / "policy"
        for old in policies.glob("step=*"):
            if old.resolve() != keep:
                shutil.rmtree(old, ignore_errors=True)
        for old in policies.glob("iteration=*"):
            if old.resolve() != keep:
                for name in OPTIMIZER_FILES:
                    (old / name).unlink(missing_ok=True)

    def remove_partial_writes(self) -> list[Path]:
        """Temporaries that a killed process left (dot-prefixed `.name.tmp-*` folders and `.*.tmp` files:
        every write goes through one, then a rename). Returns what was removed."""
        removed = []
        for old in self.root.rglob(".*.old-*"):  # killed between the two renames of a swap: put it back
            final = old.with_name(old.name[1:].rsplit(".old-", 1)[0])
            if not final.exists():
                old.rename(final)
        for p in list(self.root.rglob(".*.tmp*")) + list(self.root.rglob(".*.old-*")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
        return removed
