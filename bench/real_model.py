"""A real pretrained chat model through the pipeline on this CPU: SmolLM2-135M-Instruct, GRPO with LoRA.

Runs the pipeline flow itself (`python -m flows.iterative_grpo --config configs/smollm2-cpu.yaml ...`, one
subprocess per run, HF_HUB_OFFLINE=1, a private PREFECT_HOME per run under --root) and reads its run folder:

    lora  GRPO with LoRA (the config's), the time-matched SFT control on (control.sft_same_time=true):
          held-out greedy accuracy at the start and the end on --test-size questions, the control's
    full  a few GRPO steps of full fine-tuning (model.lora.enabled=false), a small held-out split:
          seconds per step, peak RSS and disk per checkpoint next to LoRA's

Figures: state.json (evaluations, RL wall and CPU seconds, the control's accuracy), metrics.jsonl (per
step: rollout_seconds = sampling + scoring + advantages + the rollouts' Parquet write, update_seconds, the
rest of update_step_seconds = saving the checkpoint), Prefect's task runs in the run's PREFECT_HOME (how
long each sample_groups / score_rollouts / compute_advantages / evaluate_policy / sft_control took), the
peak RSS of the run's process tree (os.wait4: the largest process, the flow's), du of checkpoints/.
Then greedy completions of the start model and the final policy on the first held-out questions.
Writes the section "## Real model: SmolLM2-135M-Instruct, GRPO on this CPU" of BENCHMARKS.md.

    .venv/bin/python bench/real_model.py                        # the whole benchmark (~60 min on 2 cores)
    .venv/bin/python bench/real_model.py --steps 6 --test-size 50 --no-control --no-full --no-write   # a probe
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.report import cpu_model, write_section  # noqa: E402

CONFIG = "configs/smollm2-cpu.yaml"
TITLE = "## Real model: SmolLM2-135M-Instruct, GRPO on this CPU"
TARGET_POINTS = 10.0


def du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20 if path.exists() else 0.0


def run_flow(root: Path, run_id: str, overrides: list[str], threads: int, config: str = CONFIG) -> dict:
    """One pipeline run of `config` in a subprocess; its wall time, peak RSS (MiB) and log path."""
    prefect_home = root / f"prefect-{run_id}"
    prefect_home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(HF_HUB_OFFLINE="1", PREFECT_HOME=str(prefect_home), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "flows.iterative_grpo", "--config", config, f"storage.artifacts_root={root}",
           f"run_id={run_id}", f"threads={threads}", *overrides]
    log = root / f"{run_id}.log"
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"run {run_id} failed (exit {proc.returncode}); log: {log}")
    return {"wall": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "log": str(log), "prefect_home": prefect_home,
            "command": shlex.join(["python", "-m", "flows.iterative_grpo", "--config", config, *overrides])}


def task_seconds(prefect_home: Path) -> dict[str, list[float]]:
    """{task name without its suffix: [seconds of each completed run, in start order]} from Prefect's DB."""
    db = prefect_home / "prefect.db"
    if not db.exists():
        return {}
    con = sqlite3.connect(db)
    rows = con.execute("select name, start_time, end_time from task_run where start_time is not null and "
                       "end_time is not null order by start_time").fetchall()
    con.close()
    out: dict[str, list[float]] = {}
    for name, start, end in rows:
        t = (datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))).total_seconds()
        out.setdefault(name.rsplit("-", 1)[0], []).append(t)
    return out


def read_run(root: Path, run_id: str) -> dict:
    run_dir = root / "runs" / run_id
    state = json.loads((run_dir / "state.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r["metrics"] | {"step": r["step"]} for r in records if r["prefix"] == ""]
    evals = [(r["step"], r["metrics"]) for r in records if r["prefix"] == "eval/"]
    ckpt = run_dir / "checkpoints"
    return {"dir": run_dir, "state": state, "steps": steps, "evals": evals,
            "checkpoints_mb": {p.name: du_mb(p) for p in sorted((ckpt / "policy").glob("*"))},
            "reference_mb": du_mb(ckpt / "reference"), "control_mb": du_mb(ckpt / "control_sft")
            if (ckpt / "control_sft").exists() else None}


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return float("nan") if not xs else (xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2)


def step_split(run: dict, tasks: dict[str, list[float]]) -> dict:
    """Median seconds per step and its parts. sampling: the sample_groups task; scoring + advantages: the
    rest of rollout_seconds (score_rollouts, compute_advantages, the Parquet write); update: the optimizer
    work (update_seconds: policy + reference forward, backward, step); checkpoint: the rest of
    update_step_seconds (saving the adapters / weights + optimizer state, bookkeeping)."""
    # The first step also loads what the update needs: left out when there are more. Steps whose groups all
    # scored alike take no update (flat_batch_skipped): left out of the medians too, counted.
    keep = [i for i, m in enumerate(run["steps"]) if not m.get("flat_batch_skipped")]
    keep = keep[1:] if len(keep) > 1 else keep
    s = [run["steps"][i] for i in keep]

    def at(name: str) -> list[float]:
        runs = tasks.get(name, [])
        return [runs[i] for i in keep if i < len(runs)]

    sampling = at("sample_groups")
    return {
        "n": len(s), "flat": sum(bool(m.get("flat_batch_skipped")) for m in run["steps"]),
        "step": median([m["step_seconds"] for m in s]),
        "rollout": median([m["rollout_seconds"] for m in s]),
        "sampling": median(sampling) if sampling else float("nan"),
        "scoring": median(at("score_rollouts")) if at("score_rollouts") else float("nan"),
        "advantages": median(at("compute_advantages")) if at("compute_advantages") else float("nan"),
        "update": median([m.get("update_seconds", 0.0) for m in s]),
        "update_step": median([m["update_step_seconds"] for m in s]),
        "checkpoint_mb": median([m["checkpoint_mb"] for m in s if "checkpoint_mb" in m]),
        "tokens": median([m["completion_tokens"] for m in s]),
        "first_step": run["steps"][0]["step_seconds"],
    }


def examples(root: Path, run: dict, test_size: int, n_questions: int, threads: int) -> list[dict]:
    """Greedy completions of the start model and the final policy on the first held-out questions."""
    import torch

    from configs import load_config
    from models.generation import generate
    from models.loading import load_policy
    from problems.datasets import read_problems
    from problems.prompts import encode_prompts, stop_marker
    from problems.verify import extract_answer, is_correct
    from stages.prepare import prepare_data

    torch.set_num_threads(threads)
    cfg = load_config(ROOT / CONFIG, [f"storage.artifacts_root={root}", f"data.test_size={test_size}"])
    problems = read_problems(prepare_data(cfg)[1])[:n_questions]
    final = run["dir"] / run["state"]["policy"]
    out = [{"question": p["question"], "answer": p["answer"]} for p in problems]
    for label, path in (("before", cfg.model.policy), ("after", str(final))):
        model, tok = load_policy(path, **cfg.model.load_kwargs())
        _, prompts = encode_prompts(tok, [p["question"] for p in problems], cfg.prompt)
        with cfg.model.compute():
            outs = generate(model, tok, prompts, greedy=True, max_new_tokens=cfg.loop.eval_max_new_tokens,
                            batch_size=len(prompts), stop_marker=stop_marker(tok, cfg.prompt))
        texts = tok.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
        for row, t, p in zip(out, texts, problems):
            row[label] = t
            row[f"{label}_answer"] = extract_answer(t, last_number=cfg.reward.verifier.last_number)
            row[f"{label}_correct"] = is_correct(t, p["answer"], last_number=cfg.reward.verifier.last_number)
        del model
    return out


def fmt_eval(ev: dict) -> str:
    return f"{ev['accuracy']:.3f} ({round(ev['accuracy'] * ev['n'])}/{ev['n']}; answered {ev['answered']:.2f}, " \
           f"mean length {ev['mean_length']:.0f} tokens)"


def section(args, argv: list[str], lora: dict | None, full: dict | None, exs: list[dict] | None) -> str:
    import peft
    import prefect
    import torch
    import transformers

    from configs import load_config

    cfg = load_config(ROOT / CONFIG, [])
    commands = [argv]
    if lora and lora["flow"].get("bench_argv") not in (None, argv):  # the LoRA run came from an earlier invocation
        commands = [lora["flow"]["bench_argv"], argv]
    shown = " then ".join(f"`.venv/bin/python bench/real_model.py {shlex.join(a)}`" for a in commands)
    lines = [TITLE, "",
             f"{shown} (bench/real_model.py): the pipeline flow "
             f"itself, one subprocess per run, on {CONFIG} (SmolLM2-135M-Instruct converted offline by "
             "`make smollm2-model`, float32; chat prompts with the instruction below; the built-in word problems of "
             f"1-2 steps, operands up to {cfg.data.arithmetic.max_operand}; rewards from the verifier alone, with the "
             "last-number fallback; no SFT warm start).",
             "",
             f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), shared with other jobs (load average "
             f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end), threads {args.threads}; Python "
             f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
             f"peft {peft.__version__}, prefect {prefect.__version__}",
             f"- instruction: \"{cfg.prompt.instruction}\""]
    if lora:
        st, sp, ts = lora["run"]["state"], lora["split"], lora["tasks"]
        c = lora["cfg"]
        ev0, ev1 = st["initial_eval"], st["last_eval"]
        delta = 100 * (ev1["accuracy"] - ev0["accuracy"])
        verdict = "met" if delta >= TARGET_POINTS else f"missed by {TARGET_POINTS - delta:.1f} points"
        steps = lora["run"]["steps"]
        evals = ", ".join(f"step {s}: {m['accuracy']:.3f}" for s, m in lora["run"]["evals"])
        lines += [
            f"- run: `{lora['flow']['command']}`",
            f"- GRPO with LoRA (r={c.model.lora.r}, alpha={c.model.lora.alpha:g}, all linear layers): "
            f"{c.loop.steps_per_iteration} steps x {c.loop.questions_per_step} questions x G={c.sampling.group_size} "
            f"at T={c.sampling.temperature:g}, up to {c.sampling.max_new_tokens} new tokens, lr {c.grpo.lr:g}, "
            f"beta {c.grpo.beta:g}, mu {c.grpo.mu}; greedy evaluation up to {c.loop.eval_max_new_tokens} tokens",
            "",
            f"**Held-out greedy accuracy on {ev0['n']} questions: {ev0['accuracy']:.3f} at the start -> "
            f"{ev1['accuracy']:.3f} at the end: {delta:+.1f} points (target +{TARGET_POINTS:.0f}: {verdict})**; "
            f"standard error of each ~{100 * (max(ev0['accuracy'] * (1 - ev0['accuracy']), 1e-9) / ev0['n']) ** 0.5:.1f} "
            "points.",
            "",
            f"- start: {fmt_eval(ev0)}; end: {fmt_eval(ev1)}",
            f"- evaluations along the way: {evals}",
            f"- control, SFT of the worked solutions from the same start for RL's {st['rl_cpu_seconds']:.0f} CPU s "
            f"(LoRA adapters as RL trains, lr {c.sft.lr:g}, batch {c.sft.batch_size}): "
            + (f"**{st['control_accuracy']:.3f}** ({100 * (st['control_accuracy'] - ev0['accuracy']):+.1f} points; "
               f"RL {delta:+.1f})" if st.get("control_accuracy") is not None else "not run"),
            f"- RL: {st['rl_seconds']:.0f} s wall, {st['rl_cpu_seconds']:.0f} CPU s; whole run {lora['flow']['wall']:.0f} s "
            f"wall (evaluations {', '.join(f'{x:.0f}' for x in ts.get('evaluate_policy', []))} s; control SFT "
            f"{sum(ts.get('sft_control', [0])):.0f} s)",
            f"- per step (median of the {sp['n']} steps with an update after the first; the first "
            f"{sp['first_step']:.1f} s; {sp['flat']} step(s) had every group scored alike and took no update): "
            f"**{sp['step']:.1f} s** = sampling {sp['sampling']:.1f} s ({sp['tokens']:.0f} completion tokens, "
            f"{sp['tokens'] / sp['sampling']:.0f} tokens/s) + scoring {sp['scoring']:.2f} s + advantages "
            f"{sp['advantages']:.2f} s + Prefect task overhead and the rollouts' Parquet write {sp['rollout'] - sp['sampling'] - sp['scoring'] - sp['advantages']:.2f} s "
            f"+ update {sp['update']:.1f} s (policy and reference forward, backward, AdamW) + checkpoint and "
            f"bookkeeping {sp['update_step'] - sp['update']:.2f} s",
            "- per step: " + "; ".join(
                f"{m['step']}: reward {m['reward_mean']:.2f}, kl {m.get('kl', 0):.4f}, len {m['completion_length_mean']:.0f}, "
                f"trunc {m['truncation_rate']:.2f}" for m in steps[:: max(1, len(steps) // 8)]),
            f"- peak RSS (the flow's process: model, reference = the base with adapters off, AdamW on adapters, "
            f"activations): {lora['flow']['peak_rss_mb']:.0f} MiB",
            f"- disk: {sp['checkpoint_mb']:.1f} MB per step checkpoint (adapters + their AdamW state); the merged "
            f"export at the iteration's end {max(lora['run']['checkpoints_mb'].values()):.0f} MB; the run's copy of "
            f"the start model (the reference) {lora['run']['reference_mb']:.0f} MB",
        ]
    if full:
        sp, fl = full["split"], full["flow"]
        c = full["cfg"]
        st = full["run"]["state"]
        lines += [
            "",
            f"Full fine-tuning vs LoRA, the same step (8 questions x G={c.sampling.group_size}), "
            f"`{fl['command']}`: {c.loop.steps_per_iteration} steps at lr {c.grpo.lr:g} (accuracy "
            f"{st['initial_eval']['accuracy']:.3f} -> {st['last_eval']['accuracy']:.3f} on {st['initial_eval']['n']}: "
            "too few steps to mean anything)",
            "",
            "| | s/step | sampling s | update s | checkpoint s | peak RSS MiB | MB per checkpoint | trained params |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, d in (("LoRA r=16", lora), ("full", full)):
            if d is None:
                continue
            s = d["split"]
            lines.append(f"| {name} | {s['step']:.1f} | {s['sampling']:.1f} | {s['update']:.1f} | "
                         f"{s['update_step'] - s['update']:.2f} | {d['flow']['peak_rss_mb']:.0f} | "
                         f"{s['checkpoint_mb']:.1f} | {d.get('params', '')} |")
    if not full:
        lines += ["", "- full fine-tuning: not run in this invocation (--no-full)"]
    lines += [f"- note: {n}" for n in args.note]
    if "reward.supervision=process" not in args.set:
        lines += ["", "- outcome vs process rewards: not in this invocation; the same run with process rewards (the "
                      "verifier's step checks) is `--no-full --no-control --run-id ID --set reward.supervision=process`"]
    if exs:
        changed = [e for e in exs if e["before_correct"] != e["after_correct"]]
        lines += ["", f"Greedy completions on the first {len(exs)} held-out questions, start model vs final policy: "
                      f"right {sum(e['before_correct'] for e in exs)} -> {sum(e['after_correct'] for e in exs)}, "
                      f"{len(changed)} changed. The first three (any change shown first):", ""]
        shown = (changed + [e for e in exs if e not in changed])[:3]
        for e in shown:
            lines += [f"- Q: {e['question']} (answer {e['answer']})",
                      f"  - before ({'right' if e['before_correct'] else 'wrong'}): `{one_line(e['before'])}`",
                      f"  - after ({'right' if e['after_correct'] else 'wrong'}): `{one_line(e['after'])}`"]
    return "\n".join(lines) + "\n"


def one_line(text: str) -> str:
    return text.strip().replace("\n", " \u23ce ").replace("`", "'")


def config_of(root: Path, overrides: list[str]):
    from configs import load_config

    return load_config(ROOT / CONFIG, [f"storage.artifacts_root={root}", *overrides])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT / "artifacts" / "bench" / "real-model"),
                        help="the runs' artifacts root (data, runs, MLflow, Prefect homes)")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps of the LoRA run (default: the config's)")
    parser.add_argument("--test-size", type=int, default=200, help="held-out questions of the LoRA run")
    parser.add_argument("--lr", type=float, default=None, help="LoRA run's grpo.lr (default: the config's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-control", action="store_true", help="LoRA run without the time-matched SFT control")
    parser.add_argument("--full-steps", type=int, default=3, help="GRPO steps of the full fine-tuning run")
    parser.add_argument("--full-lr", type=float, default=1e-6)
    parser.add_argument("--full-test-size", type=int, default=50)
    parser.add_argument("--no-full", action="store_true", help="skip the full fine-tuning run")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA run (re-read --run-id's folder if it exists)")
    parser.add_argument("--examples", type=int, default=32, help="held-out questions for the before/after completions")
    parser.add_argument("--run-id", default=None, help="the LoRA run's id (default: one with the time)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for the LoRA run")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not touch BENCHMARKS.md")
    parser.add_argument("--note", action="append", default=[], help="a line for the section (what the figures cannot say)")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    t_start = time.perf_counter()

    lora = full = exs = None
    lora_id = args.run_id or f"lora-{stamp}"
    if not args.no_lora or (root / "runs" / lora_id / "state.json").exists():
        ov = [f"data.test_size={args.test_size}", f"control.sft_same_time={'false' if args.no_control else 'true'}"]
        if args.steps:
            ov += [f"loop.steps_per_iteration={args.steps}", f"loop.eval_every={args.steps}"]
        if args.lr:
            ov.append(f"grpo.lr={args.lr}")
        ov += args.set
        saved = root / f"{lora_id}.bench.json"  # what a later invocation (--no-lora) reads back
        if args.no_lora:
            flow = json.loads(saved.read_text())
            ov = flow["overrides"]
        else:
            flow = run_flow(root, lora_id, ov, args.threads) | {"overrides": ov, "bench_argv": sys.argv[1:]}
        flow["prefect_home"] = Path(flow["prefect_home"])
        run = read_run(root, lora_id)
        tasks = task_seconds(flow["prefect_home"])
        lora = {"flow": flow, "run": run, "tasks": tasks, "split": step_split(run, tasks), "cfg": config_of(root, ov),
                "params": "4.88M (adapters)"}
        print(json.dumps({"lora": {k: v for k, v in lora["split"].items()}, "state": {
            k: run["state"][k] for k in ("initial_eval", "last_eval", "control_accuracy", "rl_seconds", "rl_cpu_seconds")},
            "peak_rss_mb": flow["peak_rss_mb"], "wall": flow["wall"]}, indent=1, default=str), flush=True)
        if "examples" in flow:
            exs = flow["examples"]
        elif args.examples:
            exs = flow["examples"] = examples(root, run, args.test_size, args.examples, args.threads)
        if not args.no_lora:
            saved.write_text(json.dumps(flow, indent=1, default=str))
    if not args.no_full:
        full_id = f"full-{stamp}"
        ov = [f"data.test_size={args.full_test_size}", "control.sft_same_time=false", "model.lora.enabled=false",
              f"grpo.lr={args.full_lr}", f"loop.steps_per_iteration={args.full_steps}",
              f"loop.eval_every={args.full_steps}"]
        flow = run_flow(root, full_id, ov, args.threads)
        run = read_run(root, full_id)
        tasks = task_seconds(flow["prefect_home"])
        full = {"flow": flow, "run": run, "tasks": tasks, "split": step_split(run, tasks), "cfg": config_of(root, ov),
                "params": "134.5M (all)"}
        print(json.dumps({"full": full["split"], "peak_rss_mb": flow["peak_rss_mb"], "wall": flow["wall"]}, indent=1),
              flush=True)
    text = section(args, sys.argv[1:], lora, full, exs)
    text += f"\nWall time of the whole benchmark: {time.perf_counter() - t_start:.0f} s.\n"
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
