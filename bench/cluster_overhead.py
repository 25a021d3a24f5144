"""What the Ray backend costs on one machine: seconds per demo step, `cluster.backend: local` against
`ray` with 1 sampler replica + 1 trainer rank, and with 2 + 2.

Runs the pipeline flow itself, one subprocess per run (bench/real_model.py's `run_flow`), on the demo's
shapes (configs/demo.yaml: the tiny model, 8 questions x G=8, 48 new tokens, the verifier and the learned
outcome RM, a checkpoint every step, one torch thread per process). A first local run does the SFT warm
start; every run then starts RL from that same SFT policy (`model.policy=<its folder> sft.steps=0`), so
the three runs sample the same kind of outputs. Per run: the median of `step_seconds` over the steps after
the first (the first also starts the actors and loads the models), split into rollout (sampling, scoring,
advantages, the Parquet write) and update (the trainer's update and checkpoint), and the first step.

    .venv/bin/python bench/cluster_overhead.py               # ~10 min on 2 cores; writes BENCHMARKS.md
    .venv/bin/python bench/cluster_overhead.py --steps 4 --no-write

On 2 cores, 2 replicas + 2 ranks cannot be faster: four actor processes and the flow share two cores,
and the ranks exchange every layer's weights and gradients through gloo.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.real_model import median, read_run, run_flow  # noqa: E402
from bench.report import cpu_model, write_section  # noqa: E402
from stages.run_layout import RunLayout  # noqa: E402

CONFIG = "configs/demo.yaml"
TITLE = "## Ray backend: the cost of the indirection on one machine"
TARGET = 0.10  # Ray 1 + 1 at most 10% slower per step than local
COMMON = ["loop.iterations=1", "loop.eval_every=1000", "loop.eval_samples=0", "data.test_size=16",
          "control.sft_same_time=false", "reward_model.init_questions=64"]
BACKENDS = {
    "local": ["cluster.backend=local"],
    "ray 1+1": ["cluster.backend=ray", "cluster.sampler_replicas=1", "cluster.trainer_world_size=1"],
    "ray 2+2": ["cluster.backend=ray", "cluster.sampler_replicas=2", "cluster.trainer_world_size=2"],
}


def per_step(run: dict) -> dict:
    steps = run["steps"]
    later = steps[1:] or steps
    return {"step": median([s["step_seconds"] for s in later]),
            "rollout": median([s["rollout_seconds"] for s in later]),
            "update": median([s["update_step_seconds"] for s in later]),
            "first": steps[0]["step_seconds"], "steps": len(steps),
            "flat": sum(bool(s.get("flat_batch_skipped")) for s in steps)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=9, help="GRPO steps per run (the first is reported apart)")
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--root", type=Path, default=None, help="artifacts root (default: a temporary folder)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write BENCHMARKS.md")
    args = ap.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    common = [*COMMON, f"loop.steps_per_iteration={args.steps}"]

    sft = run_flow(root, "sft", [*common, f"sft.steps={args.sft_steps}", "loop.steps_per_iteration=1"], 1, CONFIG)
    start = RunLayout.of(root, "sft").reference(0)
    if not start.exists():
        raise SystemExit(f"the SFT run left no start policy at {start}; its log: {sft['log']}")
    results = {}
    for name, overrides in BACKENDS.items():
        run_id = name.replace(" ", "-").replace("+", "x")
        run = run_flow(root, run_id, [*common, f"model.policy={start}", "sft.steps=0", *overrides], 1, CONFIG)
        results[name] = {**per_step(read_run(root, run_id)), "wall": run["wall"], "command": run["command"]}
        print(name, results[name], flush=True)

    base = results["local"]["step"]
    import ray
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [TITLE, "",
             f"Machine: {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, torch {torch.__version__}, "
             f"ray {ray.__version__}; code at commit {commit}; one torch thread per process. Command: "
             f"`.venv/bin/python bench/cluster_overhead.py --steps {args.steps}`. Each backend is one run of the "
             f"pipeline flow on configs/demo.yaml's shapes (8 questions x G=8, 48 new tokens, verifier + outcome "
             f"RM, a checkpoint every step), {args.steps} GRPO steps from the same SFT policy ({args.sft_steps} "
             "SFT steps, run once). Medians over the steps after the first; the first also starts the actors.", "",
             "| backend | s/step | vs local | rollout s | update + checkpoint s | first step s | flat steps |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step']:.2f} | {r['step'] / base:.2f} | {r['rollout']:.2f} | {r['update']:.2f} | "
                     f"{r['first']:.1f} | {r['flat']} of {r['steps']} |")
    overhead = results["ray 1+1"]["step"] / base - 1
    lines += ["", f"Ray 1+1 against local: **{overhead:+.0%}** a step (target at most {TARGET:+.0%}: "
                  f"{'met' if overhead <= TARGET else 'missed'}). The difference is in the rollout part (sampling in "
                  "a replica, scoring as a Ray task, the new weights sent to the replica through the object store); "
                  "the update costs the same in the trainer actor as in the flow's process. The first step also "
                  "starts the actors (Ray workers importing torch and transformers, the models loaded), once a run.",
              "", "2 + 2 on two cores cannot be faster: four actor processes and the flow take turns on two cores, "
                  "and the two ranks exchange each layer's weights and gradients through gloo; it is reported as "
                  "measured."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(text)
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
