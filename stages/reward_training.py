"""Reward-model data, replay buffer, (re)training and evaluation: paths in, paths + metrics out.

On disk, under a run's folder `run_root` (`stages.run_layout.RunLayout`: rm_data, rm_eval, reward_model):
training rows of data iteration k (the replay source), their held-out rows (questions never trained
on), and the reward-model checkpoints (backbone safetensors + value_head.safetensors + reward_model.json).

Iteration 0 holds the SFT policy's samples (initial training before RL); iteration k >= 1 the
samples of RL iteration k. One row serves both reward models: it carries the outcome label (final
answer right) and the per-step labels (rule checks, or Math-Shepherd estimates).

Retraining mixes iteration k's rows with a replay of earlier rows, the replay being `replay_ratio`
of the mix: exactly round(ratio * n_new / (1 - ratio)) rows, drawn uniformly without replacement
from all rows of iterations < k with a seeded RNG.
"""
from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.advantages import delimiter_token_ids, step_ends_from_tokens
from models.reward_model import (META_FILE, Example, ValueHeadRewardModel, evaluate_value_model,
                                 train_value_model)
from models.rewards import math_shepherd_labels
from problems.verify import is_correct
from stages.rewards import verifier_step_labels
from stages.rollout_store import write_atomic
from stages.run_layout import RunLayout

RM_DATA_SCHEMA = pa.schema([
    ("question_id", pa.string()),
    ("sample_index", pa.int32()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("completion_ids", pa.list_(pa.int32())),
    ("outcome_label", pa.float32()),            # 1.0 when the final answer is right
    ("step_ends", pa.list_(pa.int32())),        # completion-token index of each step end
    ("step_labels", pa.list_(pa.float32())),    # one per step end, in [0, 1]
    ("step_label_method", pa.string()),         # "rule" | "math_shepherd_hard" | "math_shepherd_soft"
    ("source", pa.string()),                    # where the row was sampled: "step=<s>" or "rm_bootstrap"
    ("policy_version", pa.int32()),             # GRPO steps the sampling policy had taken
])


def _iterations(root: Path) -> list[int]:
    found = []
    for d in root.glob("iteration=*"):
        m = re.fullmatch(r"iteration=(\d+)", d.name)
        if m and (d / "part.parquet").exists():
            found.append(int(m.group(1)))
    return sorted(found)


# ---- building rows -----------------------------------------------------------------------------
def math_shepherd_step_labels(policy, tokenizer, items: Sequence[dict], *, k: int, mode: str = "hard",
                              max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0,
                              batch_size: int = 64,
                              complete: Callable[[list[list[int]], int], list[list[int]]] | None = None
                              ) -> list[list[float]]:
    """Math-Shepherd labels for tasks without step rules: from the prefix ending at each step,
    sample `k` continuations with the policy and label the step by whether any (hard) or what
    fraction (soft) reach the right answer.

    items: dicts with prompt_ids, completion_ids, step_ends, answer (and optionally `finished`;
    default: the completion ends with EOS). The last step of a finished completion is the whole
    completion, so it is labelled by its own correctness without sampling. `complete(prefixes, k)`
    returns k continuations (token ids) per prefix, prefix-major; default: `models.generation.generate`.
    """
    if complete is None:
        from models.generation import generate

        def complete(prefixes, n):
            out = generate(policy, tokenizer, prefixes, n=n, max_new_tokens=max_new_tokens,
                           temperature=temperature, batch_size=batch_size, seed=seed)
            return [c.token_ids for c in out]

    eos = tokenizer.eos_token_id
    jobs = []  # (item, step, prefix completion ids)
    results: list[list[list[bool]]] = []
    for a, it in enumerate(items):
        comp = list(it["completion_ids"])
        finished = it.get("finished", bool(comp) and comp[-1] == eos)
        res: list[list[bool]] = []
        for j, e in enumerate(it["step_ends"]):
            if finished and j == len(it["step_ends"]) - 1:
                text = tokenizer.decode(comp, skip_special_tokens=True)
                res.append([is_correct(text, it["answer"])])
            else:
                res.append([])
                jobs.append((a, j, comp[:e + 1]))
        results.append(res)
    if jobs:
        prefixes = [list(items[a]["prompt_ids"]) + pre for a, _, pre in jobs]
        conts = complete(prefixes, k)
        if len(conts) != len(jobs) * k:
            raise ValueError(f"complete() returned {len(conts)} continuations for {len(jobs)} prefixes x {k}")
        for n, (a, j, pre) in enumerate(jobs):
            for cont in conts[n * k:(n + 1) * k]:
                text = tokenizer.decode(pre + list(cont), skip_special_tokens=True)
                results[a][j].append(is_correct(text, items[a]["answer"]))
    return [math_shepherd_labels(r, mode) for r in results]


def build_rm_rows(rollouts: pa.Table, tokenizer, *, step_labels: str = "rule", policy=None, k: int = 4,
                  ms_mode: str = "hard", max_new_tokens: int = 64, seed: int = 0) -> pa.Table:
    """Reward-model training rows (RM_DATA_SCHEMA) from rollouts, labelled by ground truth.

    outcome_label: the rollout's `correct`. step_labels: "rule" = the task's step checks, taken from
    the scored rollouts' `step_ends` / `step_labels` (computed here for unscored samples), or
    "math_shepherd" = estimated by completing from each step prefix with `policy` (k continuations,
    `ms_mode` hard|soft).
    """
    scored = "step_labels" in rollouts.column_names
    steps = rollouts.column("step").to_pylist() if "step" in rollouts.column_names else [None] * rollouts.num_rows
    out = []
    wanted = ["question_id", "sample_index", "prompt_ids", "completion_ids", "correct", "policy_version", "answer",
              "solution", "finish_reason"] + (["step_ends", "step_labels"] if scored else [])
    for r, step in zip(rollouts.select(wanted).to_pylist(), steps):
        comp = r["completion_ids"]
        if scored:
            ends, labels = r["step_ends"], r["step_labels"]
        else:
            ends = step_ends_from_tokens(comp, delimiter_token_ids(tokenizer))
            labels = verifier_step_labels(tokenizer, comp, ends, r.get("solution") or "", r["answer"])
        out.append({
            "question_id": r["question_id"], "sample_index": r["sample_index"],
            "prompt_ids": r["prompt_ids"], "completion_ids": comp,
            "outcome_label": float(r["correct"]), "step_ends": ends, "step_labels": [float(x) for x in labels],
            "step_label_method": "rule", "source": "rm_bootstrap" if step is None else f"step={step}",
            "policy_version": r["policy_version"], "_answer": r["answer"],
            "_finished": (r.get("finish_reason") == "eos") if r.get("finish_reason") else None,
        })
    if step_labels == "math_shepherd":
        if policy is None:
            raise ValueError("Math-Shepherd step labels need the policy to sample continuations")
        items = [{"prompt_ids": o["prompt_ids"], "completion_ids": o["completion_ids"], "step_ends": o["step_ends"],
                  "answer": o["_answer"], **({} if o["_finished"] is None else {"finished": o["_finished"]})}
                 for o in out]
        labels = math_shepherd_step_labels(policy, tokenizer, items, k=k, mode=ms_mode,
                                           max_new_tokens=max_new_tokens, seed=seed)
        for o, lab in zip(out, labels):
            o["step_labels"], o["step_label_method"] = lab, f"math_shepherd_{ms_mode}"
    elif step_labels != "rule":
        raise ValueError(f"unknown step label method {step_labels!r}; expected 'rule' or 'math_shepherd'")
    for o in out:
        del o["_answer"], o["_finished"]
    return pa.Table.from_pylist(out, schema=RM_DATA_SCHEMA)


def split_eval(table: pa.Table, fraction: float, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(train, eval) split by question (all samples of a question on one side), stable under a seed."""
    def held_out(qid: str) -> bool:
        h = int.from_bytes(hashlib.sha256(f"{seed}:{qid}".encode()).digest()[:8], "big")
        return h / 2**64 < fraction

    mask = pa.array([held_out(q) for q in table.column("question_id").to_pylist()], pa.bool_())
    return table.filter(pc.invert(mask)), table.filter(mask)


def prepare_rm_data(rollouts: pa.Table, run_root: str | Path, iteration: int, *, tokenizer, eval_fraction: float = 0.2,
                    seed: int = 0, **label_kwargs) -> tuple[Path, Path | None]:
    """Build rows from an iteration's rollouts, hold out `eval_fraction` of its questions, and write
    rm_data/iteration=k (the replay source) and rm_eval/iteration=k. Returns (train path, eval path)."""
    layout = RunLayout(Path(run_root))
    table = build_rm_rows(rollouts, tokenizer, seed=seed, **label_kwargs)
    train, held = split_eval(table, eval_fraction, seed) if eval_fraction > 0 else (table, None)
    train_path = write_atomic(train, layout.rm_data(iteration))
    eval_path = write_atomic(held, layout.rm_eval(iteration)) if held is not None else None
    return train_path, eval_path


def to_examples(rows: pa.Table, kind: str) -> list[Example]:
    """(prompt_ids, completion_ids, positions, labels) per row, for the RM of `kind`."""
    out = []
    for r in rows.select(["prompt_ids", "completion_ids", "outcome_label", "step_ends", "step_labels"]).to_pylist():
        if kind == "outcome":
            if r["completion_ids"]:
                out.append((r["prompt_ids"], r["completion_ids"], [len(r["completion_ids"]) - 1], [r["outcome_label"]]))
        elif kind == "process":
            if r["step_ends"]:
                out.append((r["prompt_ids"], r["completion_ids"], r["step_ends"], r["step_labels"]))
        else:
            raise ValueError(f"unknown reward model kind {kind!r}")
    return out


def read_rows(paths: Sequence[str | Path] | str | Path | pa.Table) -> pa.Table:
    if isinstance(paths, pa.Table):
        return paths
    if isinstance(paths, (str, Path)):
        paths = [paths]
    tables = [pq.read_table(p) for p in paths]
    return pa.concat_tables(tables) if tables else RM_DATA_SCHEMA.empty_table()


# ---- replay ------------------------------------------------------------------------------------
def replay_count(n_new: int, ratio: float) -> int:
    """Rows of replay so that they are `ratio` of the mix: round(ratio * n_new / (1 - ratio))."""
    if not 0 <= ratio < 1:
        raise ValueError(f"replay_ratio must be in [0, 1), got {ratio}")
    return round(ratio * n_new / (1 - ratio))


def replay_sample(run_root: str | Path, iteration: int, n_new: int, ratio: float, seed: int) -> pa.Table:
    """The replay part of iteration `iteration`'s mix: rows drawn uniformly without replacement from
    every earlier iteration's rm_data, seeded by (seed, iteration). Adds `replay_iteration` (int32),
    the iteration each row came from. Fewer rows than asked only when the buffer is smaller."""
    root = Path(run_root) / "rm_data"
    earlier = [j for j in _iterations(root) if j < iteration]
    want = replay_count(n_new, ratio)
    if want == 0 or not earlier:
        return RM_DATA_SCHEMA.append(pa.field("replay_iteration", pa.int32())).empty_table()
    tables = [pq.read_table(RunLayout(Path(run_root)).rm_data(j)).cast(RM_DATA_SCHEMA) for j in earlier]
    origin = [j for j, t in zip(earlier, tables) for _ in range(t.num_rows)]
    pool = pa.concat_tables(tables)
    rng = random.Random(seed * 1_000_003 + iteration)
    picked = sorted(rng.sample(range(pool.num_rows), min(want, pool.num_rows)))
    out = pool.take(pa.array(picked, pa.int64()))
    return out.append_column("replay_iteration", pa.array([origin[i] for i in picked], pa.int32()))


# ---- training / evaluation --------------------------------------------------------------------
def _load_rm(ref, *, device: str = "cpu") -> ValueHeadRewardModel:
    return ref if isinstance(ref, ValueHeadRewardModel) else ValueHeadRewardModel.from_pretrained(ref, device=device)


def evaluate_reward_model(rm, eval_rows, *, device: str = "cpu", batch_size: int = 128) -> dict[str, float]:
    """Held-out quality of a reward model (object or checkpoint path) on rm rows (table or paths):
    outcome: completion-level auc/accuracy; process: step-level; with the majority-class accuracy."""
    rm = _load_rm(rm, device=device)
    return evaluate_value_model(rm, to_examples(read_rows(eval_rows), rm.kind), batch_size=batch_size)


def _eval_splits(rm, run_root, eval_paths, iteration, device) -> dict[str, float]:
    """Metrics on each eval split; unprefixed `eval_*` keys are the fixed (earliest) split's."""
    if eval_paths is None:
        eval_paths = {j: RunLayout(Path(run_root)).rm_eval(j) for j in _iterations(Path(run_root) / "rm_eval") if j <= iteration}
    elif not isinstance(eval_paths, dict):
        eval_paths = {"fixed": eval_paths}
    metrics: dict[str, float] = {}
    for n, (name, p) in enumerate(eval_paths.items()):
        m = evaluate_reward_model(rm, p, device=device)
        for key, value in m.items():
            metrics[f"eval_it{name}_{key}" if isinstance(name, int) else f"eval_{name}_{key}"] = value
            if n == 0:
                metrics[f"eval_{key}"] = value
    return metrics


def train_reward_model(init_from, kind: str, train_rows, out_dir: str | Path, rm_cfg, seed: int, *,
                       eval_rows=None, score_mode: str = "probability", pad_id: int | None = None,
                       device: str = "cpu", tokenizer=None, on_step=None) -> tuple[Path, dict[str, float]]:
    """Train a reward model of `kind` and save it to `out_dir`.

    init_from: an RM checkpoint (continue) or a policy (path or loaded causal LM: new value head
    on its backbone). rm_cfg: a `RewardModelConfig` (lr, epochs, batch_size, freeze_backbone).
    Returns (out_dir, metrics: train loss first/last, n examples, and eval_* when eval_rows given).
    """
    if isinstance(init_from, ValueHeadRewardModel) or (isinstance(init_from, (str, Path))
                                                        and (Path(init_from) / META_FILE).exists()):
        rm = _load_rm(init_from, device=device)
        if rm.kind != kind:
            raise ValueError(f"{init_from} is a {rm.kind} reward model, not {kind}")
    else:
        rm = ValueHeadRewardModel.from_policy(init_from, kind, score_mode=score_mode, pad_id=pad_id, device=device)
    examples = to_examples(read_rows(train_rows), kind)
    losses = train_value_model(rm, examples, epochs=rm_cfg.epochs, batch_size=rm_cfg.batch_size, lr=rm_cfg.lr,
                               seed=seed, freeze_backbone=rm_cfg.freeze_backbone, on_step=on_step)
    out = rm.save_pretrained(out_dir, tokenizer=tokenizer)
    tail = losses[-max(1, len(losses) // 10):]
    metrics = {"train_examples": float(len(examples)), "train_steps": float(len(losses)),
               "train_loss_first": losses[0], "train_loss_last": sum(tail) / len(tail)}
    if eval_rows is not None:
        metrics.update({f"eval_{k}": v for k, v in evaluate_reward_model(rm, eval_rows, device=device).items()})
    return out, metrics


def train_initial_reward_model(policy, kind: str, run_root: str | Path, rm_cfg, seed: int, *,
                               score_mode: str = "probability", pad_id: int | None = None, device: str = "cpu",
                               tokenizer=None, eval_paths=None) -> tuple[Path, dict[str, float]]:
    """Before RL: a new head on the (SFT) policy's backbone, trained on rm_data/iteration=0;
    saved to checkpoints/<kind>_rm/iteration=0. Evaluated on rm_eval/iteration=0 by default."""
    layout = RunLayout(Path(run_root))
    out, metrics = train_reward_model(policy, kind, layout.rm_data(0), layout.reward_model(kind, 0),
                                      rm_cfg, seed, score_mode=score_mode, pad_id=pad_id, device=device,
                                      tokenizer=tokenizer)
    metrics.update(_eval_splits(out, run_root, eval_paths, 0, device))
    return out, metrics


def retrain_reward_model(current_rm_path, new_rows_paths, run_root: str | Path, iteration: int, rm_cfg,
                         seed: int, *, eval_paths=None, device: str = "cpu", tokenizer=None,
                         replay_ratio: float | None = None) -> tuple[Path, dict[str, float]]:
    """Continue the current reward model on iteration k's rows plus a replay of earlier iterations.

    new_rows_paths: rm rows of this iteration (normally rm_data/iteration=k, already written, so
    later iterations can replay it). The replay is `rm_cfg.replay_ratio` of the mix (override with
    `replay_ratio`). Saves checkpoints/<kind>_rm/iteration=k. Metrics: n_new, n_replay,
    replay_fraction, replay_from_iteration_<j> counts, train loss, and eval_* on every rm_eval split
    up to k (`eval_*` unprefixed: the earliest, fixed split).
    """
    rm = _load_rm(current_rm_path, device=device)
    new = read_rows(new_rows_paths).cast(RM_DATA_SCHEMA)
    ratio = rm_cfg.replay_ratio if replay_ratio is None else replay_ratio
    replay = replay_sample(run_root, iteration, new.num_rows, ratio, seed)
    mix = pa.concat_tables([new, replay.drop(["replay_iteration"])])
    out, metrics = train_reward_model(rm, rm.kind, mix, RunLayout(Path(run_root)).reward_model(rm.kind, iteration), rm_cfg,
                                      seed, device=device, tokenizer=tokenizer)
    metrics.update({"n_new": float(new.num_rows), "n_replay": float(replay.num_rows),
                    "replay_fraction": replay.num_rows / max(1, mix.num_rows)})
    for j in replay.column("replay_iteration").to_pylist():
        key = f"replay_from_iteration_{j}"
        metrics[key] = metrics.get(key, 0.0) + 1.0
    metrics.update(_eval_splits(rm, run_root, eval_paths, iteration, device))
    return out, metrics
