"""Iterative RL, measured: where the rewards come from, and outcome vs process supervision.

Same seed, same SFT start, same budget (iterations x steps x questions x G) for each variant:

    verifier          rule rewards only (no reward model)
    rm_frozen         outcome RM trained once on SFT samples, never retrained
    rm_iterative      outcome RM retrained after each iteration with 10% replay (the paper's iterative RL)
    process_iterative process supervision: process RM retrained each iteration with replay

Each variant is a real run of the pipeline flow (Prefect, MLflow, Parquet) under one artifacts root,
so the SFT warm start and the data splits are built once. Writes the section
"## Iterative RL: reward sources and supervision" of BENCHMARKS.md.

    .venv/bin/python bench/iterative.py [--steps 60] [--iterations 2] [--root /tmp/bench-iterative]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
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
    parser.add_argument("--root", default="/tmp/bench-iterative")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="GRPO steps per iteration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()

    import torch

    from configs import load_config
    from flows.iterative_grpo import iterative_grpo
    from stages.evaluation import sampled_scores

    common = [f"storage.artifacts_root={args.root}", f"threads={args.threads}", f"loop.iterations={args.iterations}",
              f"loop.steps_per_iteration={args.steps}", f"loop.eval_every={args.steps}", "control.sft_same_time=false"]
    rows = []
    for name in args.variants:
        cfg = load_config(ROOT / "configs/demo.yaml", [*common, f"run_id=bench-{name}-{int(time.time())}", *VARIANTS[name]])
        t0 = time.perf_counter()
        summary = iterative_grpo(cfg)
        (k, maj0, pass0), (_, maj1, pass1) = (sampled_scores(summary[e]) or (0, float("nan"), float("nan"))
                                              for e in ("initial_eval", "final_eval"))
        rows.append((name, summary["initial_accuracy"], summary["final_accuracy"], maj0, maj1, pass0, pass1,
                     time.perf_counter() - t0))
        print(f"{name}: {summary['initial_accuracy']:.3f} -> {summary['final_accuracy']:.3f}", flush=True)

    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, threads {args.threads}; "
        f"load average at the end {os.getloadavg()[0]:.1f}.",
        f"Command: `.venv/bin/python bench/iterative.py --iterations {args.iterations} --steps {args.steps}`",
        f"Budget per variant: {args.iterations} iterations x {args.steps} steps x 8 questions x G=8, configs/demo.yaml "
        "otherwise; the same SFT start and seed. Held-out greedy accuracy on 500 test questions (standard error ~2 points); "
        f"Maj@{k} / Pass@{k} from {k} samples at T={cfg.sampling.temperature} on the first "
        f"{cfg.loop.eval_sample_questions} of them (standard error ~6 points).",
        "",
        f"| variant | SFT start | final | change | Maj@{k} start -> final | Pass@{k} start -> final | wall s |",
        "|---|---|---|---|---|---|---|",
        *[f"| {n} | {a:.3f} | {b:.3f} | {b - a:+.3f} | {m0:.3f} -> {m1:.3f} | {p0:.3f} -> {p1:.3f} | {s:.0f} |"
          for n, a, b, m0, m1, p0, p1, s in rows],
    ]
    write_section("## Iterative RL: reward sources and supervision\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
