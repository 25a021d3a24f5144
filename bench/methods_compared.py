"""Write the "Methods compared (unified paradigm)" section of BENCHMARKS.md from a compare-methods run.

    .venv/bin/python -m flows.compare_methods --config configs/demo.yaml threads=1 loop.eval_every=25 \
        tracking.experiment=methods-compared                       # make compare
    .venv/bin/python bench/methods_compared.py --compare-id <compare-...> [--wall <total s>]

Everything is read back from MLflow (the parent run and its nested runs), so any finished run can be
written up.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import cpu_model, write_section  # noqa: E402
from configs import load_config  # noqa: E402
from tasks.tracking import RUN_TAG, client_for  # noqa: E402

COMMAND = (".venv/bin/python -m flows.compare_methods --config configs/demo.yaml threads=1 loop.eval_every=25 "
           "tracking.experiment=methods-compared")


def _last(client, run_id: str, key: str):
    hist = client.get_metric_history(run_id, key)
    return max(hist, key=lambda m: m.step).value if hist else float("nan")


def _start(client, run_id: str, key: str):
    """The SFT start's evaluation on the parent run: "start/<key>" at step 0 (early runs: "sft/<key>")."""
    for prefix in ("start/", "sft/"):
        hist = [m for m in client.get_metric_history(run_id, prefix + key) if m.step == 0]
        if hist:
            return hist[0].value
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compare-id", required=True)
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--experiment", default="methods-compared")
    ap.add_argument("--wall", type=float, default=None, help="total wall time of the command, seconds")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    cfg = load_config(None, [f"storage.artifacts_root={args.artifacts}", f"tracking.experiment={args.experiment}"])
    client = client_for(cfg)
    exp = client.get_experiment_by_name(args.experiment)
    (parent,) = client.search_runs([exp.experiment_id], filter_string=f"tags.{RUN_TAG} = '{args.compare_id}'")
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    p = parent.data.params
    k = int(_start(client, parent.info.run_id, "sample_k"))
    nq = int(_start(client, parent.info.run_id, "sample_questions"))
    n_test = int(_start(client, parent.info.run_id, "n"))
    M, q, G = int(p["loop.steps_per_iteration"]), int(p["loop.questions_per_step"]), int(p["sampling.group_size"])
    rows = []
    for r in children:
        rid = r.info.run_id
        rows.append({
            "method": r.data.tags["method"],
            "acc": _last(client, rid, "eval/accuracy"), "maj": _last(client, rid, f"eval/maj_at_{k}"),
            "pass": _last(client, rid, f"eval/pass_at_{k}"), "pass1": _last(client, rid, "eval/pass_at_1"),
            "wall": _last(client, rid, "summary/wall_seconds"), "step": _last(client, rid, "summary/step_seconds_mean"),
            "update": _last(client, rid, "summary/update_seconds_mean"), "rss": _last(client, rid, "summary/peak_rss_mb"),
            "vparams": _last(client, rid, "summary/value_params"), "vmb": _last(client, rid, "summary/value_state_mb"),
        })
    rows.sort(key=lambda x: -x["acc"])
    sft = {key: _start(client, parent.info.run_id, key) for key in ("accuracy", f"maj_at_{k}", f"pass_at_{k}",
                                                                             "pass_at_1")}
    import matplotlib
    import mlflow
    import prefect
    import torch
    import transformers

    L = ["## Methods compared (unified paradigm)", ""]
    L.append(f"`make compare` = `{COMMAND}` (flows/compare_methods.py; this section: "
             f"`.venv/bin/python bench/methods_compared.py --compare-id {args.compare_id}`).")
    L.append("")
    L.append(f"Every method starts from the same SFT policy (tiny Llama, {p['sft.steps']} SFT steps, answer-only "
             f"fraction of the SFT solutions {p.get('sft.answer_only_fraction', '0.0')}) with the same budget: "
             f"{M} steps x {q} questions x G={G} = {M * q * G} samples (SFT: as many ground-truth solutions), the same "
             f"seed and questions, one AdamW update per step at lr {p['grpo.lr']}, reward = the rule verifier. GRPO: "
             f"beta {p['grpo.beta']}; PPO: KL {p['grpo.beta']} in the reward, GAE gamma {p['ppo.gamma']} lambda "
             f"{p['ppo.lam']}, whitened advantages, value model = value head on a copy of the SFT backbone, value lr "
             f"{p['ppo.value_lr']}, value clip {p['ppo.value_clip']}; DPO: beta {p['dpo.beta']}, one (correct, wrong) "
             f"pair per question from a pool sampled once from the SFT model, reference = SFT; RFT: the same offline "
             f"pool, GC 1 on correct outputs; online RFT: live samples, GC 1 on correct. Held-out greedy accuracy on "
             f"{n_test} questions; Maj@{k} / Pass@{k} from {k} samples at T={p['sampling.temperature']} on the first {nq} of "
             f"them.")
    L.append("")
    L.append(f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), shared with other engineers' jobs (wall times are "
             f"noisy); 1 torch thread; Python {platform.python_version()}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, prefect {prefect.__version__}, mlflow {mlflow.__version__}, matplotlib "
             f"{matplotlib.__version__}")
    if args.wall:
        L.append(f"- total wall time of the command: {args.wall / 60:.1f} min (the SFT warm start was cached; building "
                 f"it first adds its own time, shared with `make demo`)")
    L.append(f"- plot (accuracy vs samples seen, DeepSeekMath Figure 5 on this task): "
             f"`artifacts/runs/{args.compare_id}/accuracy_vs_samples.png`, also an artifact of the parent MLflow run "
             f"`{parent.info.run_id}` (experiment `{args.experiment}`)")
    L.append("")
    L.append(f"| method | greedy acc | Maj@{k} | Pass@{k} | pass@1 (T={p['sampling.temperature']}) | wall (s) | s / step | update s / step "
             f"| peak RSS (MB) |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    L.append(f"| SFT start | {sft['accuracy']:.3f} | {sft[f'maj_at_{k}']:.3f} | {sft[f'pass_at_{k}']:.3f} | "
             f"{sft['pass_at_1']:.3f} | | | | |")
    for x in rows:
        L.append(f"| {x['method']} | {x['acc']:.3f} | {x['maj']:.3f} | {x['pass']:.3f} | {x['pass1']:.3f} | "
                 f"{x['wall']:.0f} | {x['step']:.2f} | {x['update']:.2f} | {x['rss']:.0f} |")
    L.append("")
    by = {x["method"]: x for x in rows}
    if "ppo" in by and "grpo" in by:
        a, b = by["ppo"], by["grpo"]
        L.append(f"- PPO vs GRPO: value model {int(a['vparams']):,} parameters (as many as the policy's backbone, "
                 f"+{a['vmb']:.1f} MB of float32 params + grads + AdamW moments); peak RSS {a['rss']:.0f} MB vs "
                 f"{b['rss']:.0f} MB (process-wide, methods run one after another in one process); "
                 f"{a['step']:.2f} s vs {b['step']:.2f} s per step, update {a['update']:.2f} s vs {b['update']:.2f} s "
                 f"({a['update'] / b['update']:.2f}x: the value model's forward passes before the update and its own "
                 f"forward + backward after it).")
    L.append(f"- ranking by final greedy accuracy, as measured: "
             + " > ".join(f"{x['method']} ({x['acc']:.3f})" for x in rows) + ".")
    if args.note:
        L.append(f"- {args.note}")
    L.append("")
    write_section("\n".join(L))
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
