"""Iterative RL, measured: where the rewards come from, and outcome vs process supervision.

Same seed, same SFT start, same budget (iterations x steps x questions x G) for each variant:

    verifier          rule rewards only (no reward model)
    rm_frozen         outcome RM trained once on SFT samples, never retrained
    rm_iterative      outcome RM retrained after each iteration with 10% replay (the paper's iterative RL)
    process_iterative process supervision: process RM retrained each iteration with replay

Each variant is a real run of the pipeline flow (Prefect, MLflow, Parquet) under one artifacts root,
so the SFT warm start and the data splits are built once. Writes the section
"## Iterative RL: reward sources and supervision" of BENCHMARKS.md.

    .venv/bin/python bench/iterative.py [--steps 60] [--iterations 2] [--root <tmp>/bench-iterative]
    .venv/bin/python bench/iterative.py --iterations 1 --steps 1 --variants verifier --no-write \
        --set sft.steps=20 data.test_size=16 loop.eval_sample_questions=4 reward_model.init_questions=16   # a smoke run
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.report import write_section  # noqa: E402

VARIANTS = {
    "verifier": ["reward.sources=[{name: verifier}]"],
    "rm_frozen": ["reward.sources=[{name: outcome_rm}]", "reward_model.retrain_each_iteration=false"],
    "rm_iterative": ["reward.sources=[{name: outcome_rm}]"],
    "process_iterative": ["reward.supervision=process", "reward.sources=[{name: process_rm}]"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "bench-iterative"))
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="GRPO steps per iteration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every variant, on top of configs/demo.yaml")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not touch BENCHMARKS.md")
    args = parser.parse_args()

    import torch

    from configs import load_config
    from flows.iterative_grpo import iterative_grpo
    nan = float("nan")
    common = [f"storage.artifacts_root={args.root}", f"threads={args.threads}", f"loop.iterations={args.iterations}",
              f"loop.steps_per_iteration={args.steps}", f"loop.eval_every={args.steps}", "control.sft_same_time=false",
              *args.set]
    rows = []
    for name in args.variants:
        cfg = load_config(ROOT / "configs/demo.yaml", [*common, f"run_id=bench-{name}-{int(time.time())}", *VARIANTS[name]])
        t0 = time.perf_counter()
        summary = iterative_grpo(cfg)
        ev0, ev1 = summary["initial_eval"], summary["final_eval"]  # stages.evaluation.Evaluation
        k = ev1.k
        maj0, pass0 = (ev0.maj_at_k, ev0.pass_at_k) if ev0.k == k and k else (nan, nan)
        maj1, pass1 = (ev1.maj_at_k, ev1.pass_at_k) if k else (nan, nan)
        rows.append((name, summary["initial_accuracy"], summary["final_accuracy"], maj0, maj1, pass0, pass1,
                     time.perf_counter() - t0))
        print(f"{name}: {summary['initial_accuracy']:.3f} -> {summary['final_accuracy']:.3f}", flush=True)

    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, threads {args.threads}; "
        f"load average at the end {os.getloadavg()[0]:.1f}.",
        f"Command: `.venv/bin/python bench/iterative.py {shlex.join(sys.argv[1:])}`",
        f"Budget per variant: {args.iterations} iterations x {args.steps} steps x {cfg.loop.questions_per_step} "
        f"questions x G={cfg.sampling.group_size}, configs/demo.yaml otherwise (model.autocast {cfg.model.autocast}); "
        f"the same SFT start and seed. Held-out greedy accuracy on {cfg.data.test_size} test questions "
        "(standard error ~2 points at 500); "
        f"Maj@{k} / Pass@{k} from {k} samples at T={cfg.sampling.temperature} on the first "
        f"{cfg.loop.eval_sample_questions} of them (standard error ~6 points).",
        "",
        f"| variant | SFT start | final | change | Maj@{k} start -> final | Pass@{k} start -> final | wall s |",
        "|---|---|---|---|---|---|---|",
        *[f"| {n} | {a:.3f} | {b:.3f} | {b - a:+.3f} | {m0:.3f} -> {m1:.3f} | {p0:.3f} -> {p1:.3f} | {s:.0f} |"
          for n, a, b, m0, m1, p0, p1, s in rows],
    ]
    text = "## Iterative RL: reward sources and supervision\n\n" + "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
