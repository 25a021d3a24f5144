"""Iterative RL, measured where it matters: a learned reward model as the ONLY reward, frozen or retrained.

DeepSeekMath's iterative RL retrains the reward model after each iteration on the policy's new samples,
with 10% of the training mix replayed from history, so that the RM keeps up with a policy that would
otherwise learn to game it. This bench sets up that case and measures it. Same seed, same SFT start
(`STUDY`: the demo's worked solutions all step by step, `sft.answer_only_fraction=0`, 600 SFT steps: the
start on which a frozen RM as the only reward was hacked before), same budget
(iterations x steps x questions x G), one variant at a time:

    rm_frozen             outcome RM trained once on the SFT policy's samples, never retrained
    rm_replay10           outcome RM retrained after each iteration, 10% replay (the paper's)
    rm_replay0            ... retrained on the new iteration's samples alone
    rm_replay50           ... half of the mix replayed
    process_sum_replay10  process RM, retrained with 10% replay; token credit = sum of later step rewards (paper)
    process_min_replay10  the same, credit = min of later step rewards (PURE)
    verifier              reference row: the rule verifier's reward, no RM

In every RM variant the RM is the only reward source; the verifier only watches. Each step the run's
metrics (metrics.jsonl in the run folder, stages/run_state.py) carry the reward-hacking monitor
(stages/step_metrics.py): `rm_auc/<rm>` (ROC AUC of the RM's score against the verifier on the step's
samples), `rm_gap/<rm>` (mean RM reward minus verifier accuracy) next to `accuracy` (the verifier's
accuracy of the samples). Each iteration ends with a held-out evaluation (greedy accuracy, Maj@K), and
each retraining with the RM's held-out AUC on every data iteration's samples (the `rm/` records: the
section's table of what replay does to the RM, on the SFT policy's samples and on the newest ones).

Each variant is a real run of the pipeline flow (Prefect, MLflow, Parquet) under one artifacts root
(--root), so the data splits and the SFT warm start (cached under <root>/sft/<hash of its config>)
are built once, by the first variant, and reused. Outputs:

    bench/figures/iterative_monitor.png   the monitor's curves per step, iteration boundaries marked
    bench/figures/iterative_monitor.csv   the curves: one row per variant and GRPO step (record "step"), or per
                                          evaluation (record "eval", at the step it followed; iteration = iterations done)
    bench/figures/iterative_monitor.json  the table's numbers and the header, to re-render the section
    BENCHMARKS.md "## Iterative RL: reward sources and supervision"  (bench/report.py write_section), ending
                                          with the --reading file (bench/figures/iterative_reading.md, written
                                          by hand after looking at the numbers)

    .venv/bin/python bench/iterative.py [--iterations 6] [--steps 15] [--root /tmp/bench-iterative] \
        [--variants rm_frozen rm_replay10 ...] [--reading bench/figures/iterative_reading.md]
    # re-render the section and the plot from the saved numbers (e.g. after writing the reading):
    .venv/bin/python bench/iterative.py --from-saved --reading bench/figures/iterative_reading.md
    # a smoke run (3-4 minutes on 2 busy cores): writes the plot, CSV and JSON under --root, prints the section
    .venv/bin/python bench/iterative.py --iterations 2 --steps 2 --no-write --root /tmp/bench-iterative-smoke \
        --variants rm_frozen rm_replay10 process_min_replay10 verifier \
        --set sft.steps=20 data.test_size=16 loop.eval_sample_questions=4 reward_model.init_questions=16
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
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

from bench.report import cpu_model, write_section  # noqa: E402

HEADING = "## Iterative RL: reward sources and supervision"
FIGURES = ROOT / "bench" / "figures"
STEM = "iterative_monitor"

# The study's settings, on top of configs/demo.yaml, for every variant. The SFT start is the one
# before the demo's answer-only mix (every worked solution step by step), where an RM alone was
# hacked; no time-matched SFT control (it would double the wall time and answers another question).
STUDY = ["sft.answer_only_fraction=0", "sft.steps=600", "control.sft_same_time=false"]

OUTCOME_RM = "reward.sources=[{name: outcome_rm}]"
PROCESS_RM = ["reward.supervision=process", "reward.sources=[{name: process_rm}]"]
VARIANTS = {
    "rm_frozen": [OUTCOME_RM, "reward_model.retrain_each_iteration=false"],
    "rm_replay10": [OUTCOME_RM, "reward_model.replay_ratio=0.1"],
    "rm_replay0": [OUTCOME_RM, "reward_model.replay_ratio=0"],
    "rm_replay50": [OUTCOME_RM, "reward_model.replay_ratio=0.5"],
    "process_sum_replay10": [*PROCESS_RM, "reward.process_credit=sum", "reward_model.replay_ratio=0.1"],
    "process_min_replay10": [*PROCESS_RM, "reward.process_credit=min", "reward_model.replay_ratio=0.1"],
    "verifier": ["reward.sources=[{name: verifier}]"],
}
COLORS = {"rm_frozen": "tab:red", "rm_replay10": "tab:blue", "rm_replay0": "tab:orange", "rm_replay50": "tab:green",
          "process_sum_replay10": "tab:purple", "process_min_replay10": "tab:brown", "verifier": "black"}

STEP_FIELDS = {"sample_accuracy": "accuracy", "reward_mean": "reward_mean", "kl": "kl",
               "completion_length": "completion_length_mean"}
MONITOR_FIELDS = ("rm_auc", "rm_accuracy", "rm_gap")
CSV_FIELDS = ["variant", "record", "step", "iteration", *STEP_FIELDS, *MONITOR_FIELDS, "greedy_accuracy",
              "maj_at_k", "pass_at_k"]
NAN = float("nan")


# ---- reading a run back ------------------------------------------------------------------------
def run_curves(run_dir: str, steps_per_iteration: int, k: int) -> list[dict]:
    """One row per GRPO step ("step": the samples' verifier accuracy, mean reward, the monitor of the
    run's learned RM) and per held-out evaluation ("eval", at the step it followed; 0 = the SFT start),
    from the run's committed metric records."""
    from stages.run_layout import RunLayout
    from stages.run_state import committed_records, read_state

    layout = RunLayout(Path(run_dir))
    rows = []
    for r in committed_records(layout, read_state(layout)):
        m = r.metrics
        if r.prefix == "":
            row = {"record": "step", "step": r.step, "iteration": r.step // steps_per_iteration}
            row.update({name: m.get(key, NAN) for name, key in STEP_FIELDS.items()})
            for field in MONITOR_FIELDS:  # one learned RM per variant here: its source name is in the key
                row[field] = next((v for key, v in m.items() if key.startswith(field + "/")), NAN)
            rows.append(row)
        elif r.prefix == "eval/":
            rows.append({"record": "eval", "step": r.step, "iteration": r.step // steps_per_iteration,
                         "greedy_accuracy": m["accuracy"], "maj_at_k": m.get(f"maj_at_{k}", NAN),
                         "pass_at_k": m.get(f"pass_at_{k}", NAN)})
    return rows


def rm_retraining(run_dir: str) -> dict[str, list[float]]:
    """The learned RM's ROC AUC on held-out rows (questions it never trained on) after its initial training
    and each retraining: `old` on the SFT policy's samples (data iteration 0: what forgetting costs), `new`
    on the newest iteration's samples (what it has just learned)."""
    from stages.run_layout import RunLayout
    from stages.run_state import committed_records, read_state

    layout = RunLayout(Path(run_dir))
    out: dict[str, list[float]] = {"old": [], "new": []}
    for r in committed_records(layout, read_state(layout)):
        if r.prefix != "rm/":
            continue
        aucs = {}
        for key, v in r.metrics.items():  # "<source>/eval_it<j>_auc"
            name = key.split("/", 1)[-1]
            if name.startswith("eval_it") and name.endswith("_auc"):
                aucs[int(name[len("eval_it"):-len("_auc")])] = v
        if aucs:
            out["old"].append(aucs.get(0, NAN))
            out["new"].append(aucs[max(aucs)])
    return out


def mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else NAN


def per_iteration(curves: list[dict], field: str, iterations: int) -> list[float]:
    """The mean of `field` over each iteration's steps (NaN where undefined)."""
    return [mean(c[field] for c in curves if c["record"] == "step" and c["iteration"] == it) for it in range(iterations)]


# ---- the figure --------------------------------------------------------------------------------
def smooth(xs: list[float], width: int = 5) -> list[float]:
    """A trailing moving average that skips NaNs (a step whose samples were all right or all wrong has no AUC)."""
    return [mean(xs[max(0, i - width + 1):i + 1]) for i in range(len(xs))]


def plot(curves: dict[str, list[dict]], iterations: int, steps: int, k: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharex=True)
    panels = [(axes[0, 0], "rm_auc", "RM score vs verifier: ROC AUC on the step's samples", True),
              (axes[0, 1], "rm_gap", "mean RM reward - verifier accuracy of the step's samples", True),
              (axes[1, 0], "sample_accuracy", "verifier accuracy of the step's samples", False),
              (axes[1, 1], "greedy_accuracy", f"held-out greedy accuracy (markers), Maj@{k} (dashed)", False)]
    for ax, field, title, rm_only in panels:
        for name, rows in curves.items():
            if rm_only and name == "verifier":
                continue
            color = COLORS.get(name)
            if field == "greedy_accuracy":
                ev = [r for r in rows if r["record"] == "eval"]
                ax.plot([r["step"] for r in ev], [r["greedy_accuracy"] for r in ev], marker="o", color=color, label=name)
                ax.plot([r["step"] for r in ev], [r["maj_at_k"] for r in ev], ls="--", lw=0.8, color=color, alpha=0.6)
                continue
            st = [r for r in rows if r["record"] == "step"]
            xs, ys = [r["step"] + 1 for r in st], [r[field] for r in st]
            ax.plot(xs, ys, color=color, alpha=0.2, lw=0.8)
            ax.plot(xs, smooth(ys), color=color, lw=1.8, label=name)
        for it in range(1, iterations):
            ax.axvline(it * steps, color="grey", ls=":", lw=0.8)
        if field == "rm_auc":
            ax.axhline(0.5, color="grey", lw=0.8)
        if field == "rm_gap":
            ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("GRPO step")
    axes[0, 0].legend(fontsize=8)
    axes[1, 1].legend(fontsize=8)
    fig.suptitle("Learned RM as the only reward: the reward-hacking monitor (thin: per step; thick: 5-step mean)\n"
                 f"dotted: iteration ends ({steps} steps each): reference refreshed, RM retrained (except rm_frozen)",
                 fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=90)
    plt.close(fig)
    from PIL import Image  # a 64-colour palette: a third of the bytes of the RGBA file, the same picture

    Image.open(buf).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def write_csv(curves: dict[str, list[dict]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for name, rows in curves.items():
            for r in rows:
                w.writerow({"variant": name, **{k: ("" if isinstance(v, float) and math.isnan(v) else
                                                    round(v, 5) if isinstance(v, float) else v)
                                                 for k, v in r.items()}})


def read_csv(path: Path) -> dict[str, list[dict]]:
    curves: dict[str, list[dict]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {"record": r["record"], "step": int(r["step"]), "iteration": int(r["iteration"])}
            row.update({k: float(r[k]) if r[k] != "" else NAN for k in CSV_FIELDS[4:]})
            curves.setdefault(r["variant"], []).append(row)
    return curves


# ---- the section -------------------------------------------------------------------------------
def fmt(x: float, spec: str = ".3f") -> str:
    return "-" if x is None or math.isnan(x) else format(x, spec)


def section(saved: dict, reading: str) -> str:
    k, rows = saved["k"], saved["rows"]
    fig = f"bench/figures/{STEM}.png"
    lines = [
        HEADING, "",
        *saved["header"], "",
        f"| variant | SFT start | final greedy | change | Maj@{k} start -> final | mean rm_auc iteration 1 -> "
        f"{saved['iterations']} | mean rm_gap iteration 1 -> {saved['iterations']} | wall s |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r['variant']} | {r['start']:.3f} | {r['final']:.3f} | {r['final'] - r['start']:+.3f} | "
          f"{fmt(r['maj_start'])} -> {fmt(r['maj_final'])} | {fmt(r['auc'][0], '.2f')} -> {fmt(r['auc'][-1], '.2f')} | "
          f"{fmt(r['gap'][0], '+.2f')} -> {fmt(r['gap'][-1], '+.2f')} | {r['wall']:.0f} |" for r in rows],
        "",
        "Held-out greedy accuracy after each iteration (0: the SFT start), and the monitor's mean per iteration "
        "(AUC / gap):", "",
        "| variant | greedy: " + " ".join(str(i) for i in range(saved["iterations"] + 1)) +
        " | rm_auc per iteration | rm_gap per iteration |",
        "|---|---|---|---|",
        *[f"| {r['variant']} | " + " ".join(fmt(x) for x in r["greedy"]) + " | " +
          " ".join(fmt(x, ".2f") for x in r["auc"]) + " | " + " ".join(fmt(x, "+.2f") for x in r["gap"]) + " |"
          for r in rows],
        "",
        *retraining_table(rows),
        f"![The monitor's curves per variant]({fig})  ",
        f"[{fig}]({fig}): ROC AUC of the RM's score against the verifier on each step's 64 samples, the gap "
        "between its mean reward and the verifier's accuracy, the samples' verifier accuracy, and the held-out "
        f"evaluations; the curves are in bench/figures/{STEM}.csv.",
    ]
    if reading:
        lines += ["", reading.strip()]
    return "\n".join(lines) + "\n"


def retraining_table(rows: list[dict]) -> list[str]:
    """What replay does to the RM itself: its held-out AUC on the SFT policy's samples and on the newest samples,
    after its initial training (0) and each retraining (1..I; the last one, after the last iteration, is never used)."""
    rows = [r for r in rows if len(r.get("rm_retraining", {}).get("old", [])) > 1]
    if not rows:
        return []
    n = len(rows[0]["rm_retraining"]["old"])
    return [
        "The retrained RMs themselves: ROC AUC on held-out rows (questions never trained on) of the SFT policy's "
        "samples (data iteration 0: what forgetting costs) and of the iteration just trained on, after the initial "
        f"training (0) and each retraining (1..{n - 1}):", "",
        "| variant | AUC on the SFT policy's samples: " + " ".join(str(i) for i in range(n)) +
        " | AUC on the newest samples |",
        "|---|---|---|",
        *[f"| {r['variant']} | " + " ".join(fmt(x, ".2f") for x in r["rm_retraining"]["old"]) + " | " +
          " ".join(fmt(x, ".2f") for x in r["rm_retraining"]["new"]) + " |" for r in rows],
        "",
    ]


def header(args, cfg, torch_version: str, command: str) -> list[str]:
    k = cfg.loop.eval_samples
    return [
        f"Machine: {cpu_model()}, {platform.machine()}, {os.cpu_count()} cores shared with other jobs; torch "
        f"{torch_version}, threads {cfg.threads}; load average at the end {os.getloadavg()[0]:.1f}.",
        f"Command: `{command}`",
        f"Budget per variant: {args.iterations} iterations x {args.steps} steps x {cfg.loop.questions_per_step} "
        f"questions x G={cfg.sampling.group_size} (the same questions in every variant), configs/demo.yaml with "
        f"bench/iterative.py's `STUDY` ({', '.join(f'`{s}`' for s in STUDY)})"
        + (f" and `--set` {', '.join(f'`{s}`' for s in args.set)}" if args.set else "")
        + "; the same SFT start and seed. "
        f"The RM variants have the learned RM as their ONLY reward (the verifier only watches): outcome RM "
        f"frozen, or retrained after each iteration on that iteration's samples with 10%, 0% or 50% of the "
        f"mix replayed from earlier iterations; process RM retrained with 10% replay, token credit the sum "
        f"(paper) or min (PURE) of the normalised step rewards from the token's step on. Held-out greedy "
        f"accuracy on {cfg.data.test_size} test questions (standard error ~2 points at 500); Maj@{k} from {k} "
        f"samples at T={cfg.sampling.temperature} on the first {cfg.loop.eval_sample_questions} of them "
        f"(standard error ~6 points).",
    ]


def run_study(args) -> tuple[dict, dict[str, list[dict]]]:
    import torch

    from configs import load_config
    from flows.iterative_grpo import iterative_grpo

    common = [f"storage.artifacts_root={args.root}", f"threads={args.threads}", f"loop.iterations={args.iterations}",
              f"loop.steps_per_iteration={args.steps}", f"loop.eval_every={args.steps}", *STUDY, *args.set]
    rows, curves, cfg = [], {}, None
    t_all = time.perf_counter()
    for name in args.variants:
        cfg = load_config(ROOT / "configs/demo.yaml", [*common, f"run_id=bench-{name}-{int(time.time())}", *VARIANTS[name]])
        t0 = time.perf_counter()
        summary = iterative_grpo(cfg)
        wall = time.perf_counter() - t0
        k = cfg.loop.eval_samples
        c = run_curves(summary["run_dir"], args.steps, k)
        curves[name] = c
        evals = [r for r in c if r["record"] == "eval"]
        ev0, ev1 = summary["initial_eval"], summary["final_eval"]
        rows.append({"variant": name, "start": ev0.accuracy, "final": ev1.accuracy,
                     "maj_start": ev0.maj_at_k if ev0.k else NAN, "maj_final": ev1.maj_at_k if ev1.k else NAN,
                     "greedy": [r["greedy_accuracy"] for r in evals],
                     "auc": per_iteration(c, "rm_auc", args.iterations),
                     "gap": per_iteration(c, "rm_gap", args.iterations), "wall": wall, "run_dir": summary["run_dir"],
                     "rm_retraining": rm_retraining(summary["run_dir"])})
        r = rows[-1]
        print(f"{name}: greedy {r['start']:.3f} -> {r['final']:.3f} ({' '.join(fmt(x) for x in r['greedy'])}); "
              f"rm_auc per iteration {' '.join(fmt(x, '.2f') for x in r['auc'])}; "
              f"rm_gap {' '.join(fmt(x, '+.2f') for x in r['gap'])}; {wall:.0f} s", flush=True)
    command = f".venv/bin/python bench/iterative.py {shlex.join(sys.argv[1:])}".rstrip()
    saved = {"k": cfg.loop.eval_samples, "iterations": args.iterations, "steps": args.steps, "rows": rows,
             "header": header(args, cfg, torch.__version__, command)
             + [f"Total wall time {time.perf_counter() - t_all:.0f} s ({time.strftime('%Y-%m-%d')}); the first "
                f"variant's includes building the data splits and the SFT start."]}
    return saved, curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "bench-iterative"))
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--steps", type=int, default=15, help="GRPO steps per iteration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every variant, after configs/demo.yaml and STUDY")
    parser.add_argument("--reading", type=Path, help="a markdown file: the Reading paragraph to end the section with")
    parser.add_argument("--from-saved", action="store_true",
                        help=f"no runs: re-render the plot and the section from bench/figures/{STEM}.json and .csv")
    parser.add_argument("--no-write", action="store_true",
                        help="print the section and put the plot, CSV and JSON under --root; leave BENCHMARKS.md "
                             "and bench/figures alone")
    args = parser.parse_args()

    out_dir = Path(args.root) if args.no_write else FIGURES
    png, csv_path, json_path = (out_dir / f"{STEM}.{ext}" for ext in ("png", "csv", "json"))
    if args.from_saved:
        saved, curves = json.loads(json_path.read_text()), read_csv(csv_path)
        for r in saved["rows"]:  # numbers added to the bench after the runs: read from their folders if still there
            if "rm_retraining" not in r and Path(r["run_dir"]).exists():
                r["rm_retraining"] = rm_retraining(r["run_dir"])
        json_path.write_text(json.dumps(saved, indent=1) + "\n")
    else:
        saved, curves = run_study(args)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(saved, indent=1) + "\n")
        write_csv(curves, csv_path)
    plot(curves, saved["iterations"], saved["steps"], saved["k"], png)
    text = section(saved, args.reading.read_text() if args.reading else "")
    print(text)
    print(f"plot: {png}\ncurves: {csv_path}\nnumbers: {json_path}")
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
