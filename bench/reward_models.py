"""Reward-model quality and replay on the demo task.

Run from the repo root:  .venv/bin/python bench/reward_models.py
Writes/replaces the "## Reward models: quality and replay" section of BENCHMARKS.md.

1. The SFT policy (stages.prepare.initial_policy, sft.steps=600, cached under artifacts/sft/) samples
   G completions for each of N0 training questions (T=1.0): iteration 0 of the RM data. 20% of
   the questions are held out (rm_eval/iteration=0): the fixed eval split.
2. Outcome RM and process RM are trained on the rest with labels from ground truth (final answer;
   per-step rule checks) and evaluated on the held-out split: completion-level AUC (outcome),
   step-level AUC (process), next to the majority-class accuracy. Variants: backbone initialised
   from the SFT policy and fine-tuned (the default), the same with the backbone frozen, and a
   fresh random backbone fine-tuned.
3. A shifted policy (the SFT policy trained further, on a lower learning rate, standing in for
   "after one RL iteration") samples N1 other questions: iteration 1. The default RMs are
   retrained on it with the 10% replay of iteration 0 and without replay; the old eval split's
   AUC before/after shows what the replay keeps.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import cpu_model, write_section  # noqa: E402

from transformers.utils import logging as hf_logging  # noqa: E402

from configs.schema import RewardModelConfig, build_config  # noqa: E402
from models.generation import generate  # noqa: E402
from models.loading import load_policy  # noqa: E402
from models.reward_model import ValueHeadRewardModel, evaluate_value_model, train_value_model  # noqa: E402
from models.sft import train_sft  # noqa: E402
from problems.datasets import read_problems  # noqa: E402
from problems.prompts import encode_sft_examples, plain_prompt  # noqa: E402
from problems.verify import extract_answer, is_correct  # noqa: E402
from stages.prepare import initial_policy, prepare_data  # noqa: E402
from stages.reward_training import prepare_rm_data, read_rows, retrain_reward_model, to_examples  # noqa: E402
from stages.rollout_store import ROLLOUT_SCHEMA, write_atomic  # noqa: E402
from stages.run_layout import RunLayout  # noqa: E402

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

SECTION = "## Reward models: quality and replay"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", default=os.environ.get("RM_BENCH_QUICK") == "1",
                    help="150 + 100 questions instead of 600 + 300 (also RM_BENCH_QUICK=1)")
    ap.add_argument("--sft-steps", type=int, default=600, help="SFT steps of the policy that samples iteration 0")
    ap.add_argument("--shift-steps", type=int, default=300, help="further SFT steps of the shifted policy")
    ap.add_argument("--artifacts", default="artifacts",
                    help="artifacts root: the SFT cache (sft/) and this bench's folder (bench_rm/)")
    ap.add_argument("--no-write", action="store_true", help="print the section, do not touch BENCHMARKS.md")
    return ap.parse_args(argv)


ARGS = parse_args()
COMMAND = ".venv/bin/python bench/reward_models.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
QUICK = ARGS.quick
N0, N1, G = (150, 100, 4) if QUICK else (600, 300, 4)
SFT_STEPS, SHIFT_STEPS, SHIFT_LR = ARGS.sft_steps, ARGS.shift_steps, 1e-3
RM_CFG = RewardModelConfig(lr=1e-3, epochs=3, batch_size=64)
CURVE_POINTS = 4
BENCH = Path(ARGS.artifacts) / "bench_rm"


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def shifted_policy(sft_path: Path, cfg) -> Path:
    """The SFT policy trained SHIFT_STEPS more steps (cached): the 'after one RL iteration' stand-in."""
    out = BENCH / f"shifted-{SFT_STEPS}+{SHIFT_STEPS}"
    if (out / "config.json").exists():
        return out
    model, tok = load_policy(str(sft_path))
    train_path, _ = prepare_data(cfg)
    examples = encode_sft_examples(tok, read_problems(train_path), cfg.prompt)
    train_sft(model, examples[::-1], pad_id=tok.pad_token_id, steps=SHIFT_STEPS, batch_size=32, lr=SHIFT_LR,
              warmup_steps=10, seed=1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def sample_rollouts(policy_path: Path, problems: list[dict], out: Path, seed: int,
                    policy_version: int) -> tuple[pa.Table, float]:
    """G samples per problem at T=1.0 in ROLLOUT_SCHEMA, also written to `out`; returns (table, accuracy).
    `policy_version`: 0 for the SFT policy, 1 for the shifted stand-in of one RL iteration."""
    model, tok = load_policy(str(policy_path))
    model.eval()
    prompts = [plain_prompt(p["question"]) for p in problems]
    prompt_ids = tok(prompts)["input_ids"]
    outs = generate(model, tok, prompt_ids, n=G, max_new_tokens=64, seed=seed)
    rows = []
    for k, o in enumerate(outs):
        p = problems[k // G]
        text = tok.decode(o.token_ids, skip_special_tokens=True)
        rows.append({
            "run_id": "bench", "question_id": p["id"], "group_index": k // G, "sample_index": k % G,
            "prompt": prompts[k // G], "completion": text, "prompt_ids": prompt_ids[k // G],
            "completion_ids": o.token_ids, "old_logprobs": [0.0] * len(o.token_ids),
            "completion_length": len(o.token_ids), "truncated": not o.finished,
            "finish_reason": "eos" if o.finished else "length", "answer": p["answer"], "solution": p["solution"],
            "extracted_answer": extract_answer(text), "correct": is_correct(text, p["answer"]),
            "policy_version": policy_version, "sampler_backend": "hf", "seed": seed,
            "sampled_at": datetime.now(timezone.utc),
        })
    table = pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)
    write_atomic(table, out)
    return table, sum(r["correct"] for r in rows) / len(rows)


def train_with_curve(rm, train_ex, eval_ex, cfg, seed, *, freeze=False):
    """Train like stages.reward_training does, evaluating held-out AUC along the way."""
    steps_total = cfg.epochs * -(-len(train_ex) // cfg.batch_size)
    marks = {round(steps_total * i / CURVE_POINTS) - 1 for i in range(1, CURVE_POINTS + 1)}
    curve = [(0, evaluate_value_model(rm, eval_ex)["auc"])]
    losses = []

    def on_step(step, loss):
        losses.append(loss)
        if step in marks:
            rm.eval()
            curve.append((step + 1, evaluate_value_model(rm, eval_ex)["auc"]))
            rm.train()
            if freeze:
                rm.backbone.eval()

    t0 = time.perf_counter()
    train_value_model(rm, train_ex, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                      freeze_backbone=freeze, on_step=on_step)
    secs = time.perf_counter() - t0
    return evaluate_value_model(rm, eval_ex), curve, secs


def fmt(x, nd=3):
    return "n/a" if x != x else f"{x:.{nd}f}"






def main():
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    cfg = build_config(overrides=[f"sft.steps={SFT_STEPS}", "threads=1", f"storage.artifacts_root={ARGS.artifacts}"])
    log("SFT policy (cached after the first run)")
    sft = Path(initial_policy(cfg))
    shifted = shifted_policy(sft, cfg)
    train_path, _ = prepare_data(cfg)
    problems = read_problems(train_path)
    run = BENCH / ("run-quick" if QUICK else "run")
    layout = RunLayout(run)
    shutil.rmtree(run, ignore_errors=True)
    _, tok = load_policy(str(sft))

    log("sampling iteration 0 (SFT policy) and iteration 1 (shifted policy)")
    t0 = time.perf_counter()
    r0, acc0 = sample_rollouts(sft, problems[-N0:], layout.rollouts(0, 0), seed=0, policy_version=0)
    r1, acc1 = sample_rollouts(shifted, problems[-N0 - N1:-N0], layout.rollouts(1, 0), seed=1, policy_version=1)
    t_sample = time.perf_counter() - t0
    prepare_rm_data(r0, run, 0, tokenizer=tok, eval_fraction=0.2, seed=0)
    prepare_rm_data(r1, run, 1, tokenizer=tok, eval_fraction=0.2, seed=0)
    rows0, eval0 = read_rows(layout.rm_data(0)), read_rows(layout.rm_eval(0))
    eval1 = read_rows(layout.rm_eval(1))
    log(f"sampled in {t_sample:.0f}s; accuracy {acc0:.3f} / {acc1:.3f}; rows {rows0.num_rows} train, "
        f"{eval0.num_rows} eval")

    results, curves, main_rm = {}, {}, {}
    variants = [("sft-init, fine-tuned", "sft", False), ("sft-init, frozen backbone", "sft", True),
                ("fresh init, fine-tuned", "fresh", False)]
    for kind in ("outcome", "process"):
        train_ex, eval_ex = to_examples(rows0, kind), to_examples(eval0, kind)
        for name, init, freeze in variants:
            source = str(sft) if init == "sft" else str(BENCH / "fresh")
            if init == "fresh" and not (BENCH / "fresh" / "config.json").exists():
                from models.tiny import save_tiny
                from problems.arithmetic import VOCAB_WORDS

                save_tiny(BENCH / "fresh", VOCAB_WORDS, seed=0)
            rm = ValueHeadRewardModel.from_policy(source, kind, pad_id=tok.pad_token_id)
            m, curve, secs = train_with_curve(rm, train_ex, eval_ex, RM_CFG, seed=0, freeze=freeze)
            results[(kind, name)] = (m, secs)
            curves[(kind, name)] = curve
            log(f"{kind} RM [{name}]: auc {fmt(m['auc'])} acc {fmt(m['accuracy'])} "
                f"(majority {fmt(m['majority_accuracy'])}) in {secs:.0f}s; "
                f"curve {[(s, round(a, 3)) for s, a in curve]}")
            if name == variants[0][0]:
                main_rm[kind] = rm.save_pretrained(layout.reward_model(kind, 0))

    log("retraining on iteration 1 with and without replay")
    retrain = {}
    for kind in ("outcome", "process"):
        before = evaluate_value_model(ValueHeadRewardModel.from_pretrained(main_rm[kind]), to_examples(eval0, kind))
        before1 = evaluate_value_model(ValueHeadRewardModel.from_pretrained(main_rm[kind]), to_examples(eval1, kind))
        for label, ratio in (("with 10% replay", 0.1), ("without replay", 0.0)):
            target = run / f"retrain-{'replay' if ratio else 'none'}"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(run / "rm_data", target / "rm_data")
            shutil.copytree(run / "rm_eval", target / "rm_eval")
            _, m = retrain_reward_model(main_rm[kind], RunLayout(target).rm_data(1), target, 1, RM_CFG, seed=0,
                                        replay_ratio=ratio)
            retrain[(kind, label)] = (before, before1, m)
            log(f"{kind} retrain {label}: old-split auc {fmt(before['auc'])} -> {fmt(m['eval_it0_auc'])}; "
                f"new-split auc {fmt(before1['auc'])} -> {fmt(m['eval_it1_auc'])}; replay {m['n_replay']:.0f} "
                f"of {m['train_examples']:.0f}")
    total = time.perf_counter() - t_start

    # ---- the section ----
    o, p = results[("outcome", variants[0][0])][0], results[("process", variants[0][0])][0]
    lines = [SECTION, "",
             f"`{COMMAND}` (bench/reward_models.py). Demo arithmetic task, tiny Llama (1.07M params, word+digit "
             f"tokenizer). SFT policy: `stages.prepare.initial_policy` with sft.steps={SFT_STEPS}. RM data: "
             f"{G} samples (T=1.0, max 64 new tokens) for each of {N0} training questions from the SFT policy "
             f"(sampled accuracy {acc0:.3f}); 20% of the questions held out as the fixed eval split "
             f"({eval0.num_rows} completions, {sum(len(x[3]) for x in to_examples(eval0, 'process'))} steps); "
             f"labels from ground truth (final answer; per-line step checks). RM training: BCE on the value head, "
             f"AdamW lr {RM_CFG.lr}, batch {RM_CFG.batch_size}, {RM_CFG.epochs} epochs, warm-up + cosine, seed 0.",
             "",
             "| reward model (held-out split of the SFT policy's own completions) | target | AUC | accuracy | "
             "majority-class accuracy | positives |",
             "|---|---|---|---|---|---|",
             f"| outcome RM, completion-level | AUC >= 0.80 | **{fmt(o['auc'])}** | {fmt(o['accuracy'])} | "
             f"{fmt(o['majority_accuracy'])} | {fmt(o['positive_rate'])} |",
             f"| process RM, step-level | AUC >= 0.85 | **{fmt(p['auc'])}** | {fmt(p['accuracy'])} | "
             f"{fmt(p['majority_accuracy'])} | {fmt(p['positive_rate'])} |",
             "",
             "What was tried (same data, same schedule): held-out AUC / accuracy, train time on 1 thread.",
             "",
             "| variant | outcome AUC | outcome acc | process step AUC | process step acc |",
             "|---|---|---|---|---|"]
    for name, _, _ in variants:
        mo, so = results[("outcome", name)]
        mp, sp = results[("process", name)]
        lines.append(f"| {name} | {fmt(mo['auc'])} | {fmt(mo['accuracy'])} ({so:.0f}s) | {fmt(mp['auc'])} | "
                     f"{fmt(mp['accuracy'])} ({sp:.0f}s) |")
    lines += ["", "Learning curve (held-out AUC after n optimiser steps):", ""]
    for key, curve in curves.items():
        lines.append(f"- {key[0]} RM, {key[1]}: " + ", ".join(f"{s}: {fmt(a)}" for s, a in curve))
    lines += ["",
              f"Retraining after a distribution shift: iteration 1 = {G} samples for each of {N1} other questions "
              f"from a shifted policy (the SFT policy trained {SHIFT_STEPS} more SFT steps at lr {SHIFT_LR}, "
              f"standing in for one RL iteration; sampled accuracy {acc1:.3f}). `retrain_reward_model` continues "
              f"from the iteration-0 RM ({RM_CFG.epochs} epochs) on iteration 1's rows, with the 10% replay "
              f"(round(0.1 x n_new / 0.9) rows drawn from iteration 0) or without. Target: the old eval split's "
              f"AUC drops by no more than 0.05.",
              "",
              "| RM | mix | old split AUC before -> after | change | new split AUC before -> after | "
              "replay rows / mix |",
              "|---|---|---|---|---|---|"]
    for (kind, label), (before, before1, m) in retrain.items():
        lines.append(f"| {kind} | {label} | {fmt(before['auc'])} -> {fmt(m['eval_it0_auc'])} | "
                     f"{m['eval_it0_auc'] - before['auc']:+.3f} | {fmt(before1['auc'])} -> {fmt(m['eval_it1_auc'])} | "
                     f"{m['n_replay']:.0f} / {m['train_examples']:.0f} |")
    load = os.getloadavg()
    lines += ["",
              f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), 1 torch thread, shared with other jobs (load "
              f"average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} at the end); torch {torch.__version__}, "
              f"transformers {__import__('transformers').__version__}, Python {platform.python_version()}",
              f"- wall time {total:.0f}s (sampling {t_sample:.0f}s), SFT and the shifted policy cached beforehand",
              ""]
    text = "\n".join(lines) + "\n"
    print(text)
    if not ARGS.no_write:
        write_section(text)
    log(f"done in {total:.0f}s")


if __name__ == "__main__":
    main()
