"""The unified paradigm, measured: SFT, RFT, online RFT, DPO, PPO and GRPO from the same SFT policy.

    sft_policy <- SFT warm start (shared with the pipeline)
    for method in methods:                                  subflow "method-<name>", nested MLflow run
        policy <- sft_policy
        [rft, dpo: pool <- sample G outputs once from sft_policy for all steps' questions, score]
        for step = 1..M:                                    the same questions for every method
            rows   <- data source of the method (live samples | pool slice | ground truth)
            rows   <- score_rollouts(rows)                  rule verifier (grpo: + compute_advantages)
            write rows once: <run>/rollouts/iteration=0/step=<s>/part-0.parquet
            policy <- update (grpo_update for grpo, method_update for the others)
            every eval_every steps: greedy accuracy, Pass@K, Maj@K on the held-out split (loop.eval_*)
    plot accuracy vs samples seen (one line per method; DeepSeekMath Figure 5 on this task), table

Same budget for every method: M steps x questions_per_step x G rows (SFT: as many ground-truth
rows, from questions_per_step x G distinct questions). Same seed, same SFT start, same policy
optimizer (grpo.lr, AdamW), one update per step. The reward is the rule verifier (outcome) for all
methods: reward-model sources in the config are dropped (no reward model is trained here).

Run it: `python -m flows.compare_methods --config configs/demo.yaml [--methods grpo,ppo] [key.sub=value ...]`.
Each method has a run folder (stages/run_layout.py, run_id `<compare_id>-<method>`) with its step
tables (in memory between the tasks, written once for audit: the offline pool's rows keep
policy_version 0) and its final policy, checkpoints/policy/iteration=0. Not resumable: a method's run
folder is started afresh each time.
"""
from __future__ import annotations

import json
import resource
import shutil
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from configs import PipelineConfig
from configs.schema import RewardSource
from flows.cli import config_from_args, config_parser
from flows.iterative_grpo import pick_questions, train_problems
from problems.datasets import draw_questions
from stages import method_data
from stages.evaluation import Evaluation
from stages.rollout_store import write_atomic
from stages.run_layout import RunLayout
from tasks import tracking
from tasks.methods import drop_value_model, ground_truth_rows, method_update
from tasks.prepare import build_initial_policy, evaluate_policy, prepare_data
from tasks.step import compute_advantages, grpo_update, sample_groups, score_rollouts

ALL_METHODS = ("grpo", "ppo", "online_rft", "rft", "dpo", "sft")
PARENT_TAG = "mlflow.parentRunId"


class PeakRSS:
    """Peak resident memory of this process while a block runs (polls /proc/self/statm)."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._page = resource.getpagesize()

    def _rss(self) -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * self._page
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.every)

    def __enter__(self):
        self.start = self._rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def _child_run(cfg: PipelineConfig, parent_id: str, method: str, compare_id: str) -> str:
    client = tracking.client_for(cfg)
    exp_id = client.get_run(parent_id).info.experiment_id
    run = client.create_run(exp_id, run_name=method, tags={PARENT_TAG: parent_id, "method": method,
                                                            "compare_id": compare_id,
                                                            tracking.RUN_TAG: cfg.run_id})
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in cfg.flat().items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def step_rows(cfg: PipelineConfig, method: str, s: int, policy: str, sft_ckpt: str, train_path: str,
              pool: pa.Table | None) -> pa.Table:
    """Step s's training rows for `method`: its data source, scored by the verifier (+ advantages for grpo)."""
    q = cfg.loop.questions_per_step
    if method == "sft":
        questions = draw_questions(train_problems(train_path), q * cfg.sampling.group_size,
                                   f"{cfg.data.seed}-{cfg.model.seed}-{s}-sft")
        return ground_truth_rows(cfg, questions, sft_ckpt)
    if pool is not None:
        return method_data.pool_slice(pool, s * q, q)
    rows = sample_groups(cfg, policy, pick_questions(train_path, cfg, s), s, sft_ckpt)
    rows = score_rollouts(cfg, rows, sft_ckpt, {})
    return compute_advantages(cfg, rows) if method == "grpo" else rows


@flow(name="method-run", flow_run_name="method-{method}")
def method_run(config: PipelineConfig, method: str, compare_id: str, parent_mlflow_id: str, train_path: str,
               test_path: str, sft_ckpt: str, initial_eval: Evaluation) -> dict:
    """One method of the unified paradigm from the SFT policy, with its own nested MLflow run."""
    logger = get_run_logger()
    cfg = config.model_copy(update={"algorithm": method, "run_id": f"{compare_id}-{method}"})
    layout = RunLayout.of(cfg.artifacts(), cfg.run_id)
    shutil.rmtree(layout.root, ignore_errors=True)  # a fresh incarnation: nothing left from an earlier attempt
    layout.root.mkdir(parents=True)
    mlflow_id = _child_run(cfg, parent_mlflow_id, method, compare_id)
    M, per_step = cfg.loop.steps_per_iteration, cfg.loop.questions_per_step * cfg.sampling.group_size
    curve = [{"samples": 0, **initial_eval.metrics()}]
    tracking.log_metrics(cfg, mlflow_id, initial_eval.metrics(), 0, prefix="eval/")
    policy = sft_ckpt
    step_seconds, update_seconds = [], []
    t_start = time.perf_counter()
    with PeakRSS() as mem:
        pool = None
        if method in ("rft", "dpo"):
            # Offline: sampled once, from the SFT model (policy_version 0), for every step's questions, scored.
            everything = [x for s in range(M) for x in pick_questions(train_path, cfg, s)]
            pool = score_rollouts(cfg, sample_groups(cfg, sft_ckpt, everything, 0, sft_ckpt), sft_ckpt, {})
        for s in range(M):
            t0 = time.perf_counter()
            rows = step_rows(cfg, method, s, policy, sft_ckpt, train_path, pool)
            write_atomic(rows, layout.rollouts(0, s))
            t1 = time.perf_counter()
            last = s == M - 1
            target = str(layout.policy_iteration(0) if last else layout.policy_step(s))  # only the last is saved
            if method == "grpo":
                policy, update = grpo_update(cfg, policy, sft_ckpt, rows, target, last)
            else:
                policy, update = method_update(cfg, policy, sft_ckpt, rows, target, last,
                                               seed=cfg.model.seed * 1000 + s)
            t2 = time.perf_counter()
            samples = (s + 1) * per_step
            metrics = {**method_data.batch_metrics(rows), **update, "data_seconds": t1 - t0,
                       "update_step_seconds": t2 - t1, "step_seconds": t2 - t0, "train_step": s + 1}
            step_seconds.append(t2 - t0)
            update_seconds.append(t2 - t1)
            tracking.log_metrics(cfg, mlflow_id, metrics, samples)
            if (s + 1) % cfg.loop.eval_every == 0 or last:
                ev = evaluate_policy(cfg, policy, test_path)
                tracking.log_metrics(cfg, mlflow_id, ev.metrics(), samples, prefix="eval/")
                curve.append({"samples": samples, **ev.metrics()})
                logger.info("%s step %d/%d (%d samples): %s", method, s + 1, M, samples, ev.describe())
    wall = time.perf_counter() - t_start
    value = {k: update[k] for k in ("value_params", "value_state_mb") if k in update}
    summary = {"method": method, "mlflow_run_id": mlflow_id, "run_id": cfg.run_id, "policy": policy, "curve": curve,
               "final": curve[-1], "wall_seconds": wall, "step_seconds_mean": sum(step_seconds) / max(1, M),
               "update_seconds_mean": sum(update_seconds) / max(1, M), "peak_rss_mb": mem.peak_mb,
               "rss_start_mb": mem.start / 2**20, "samples": M * per_step, **value}
    tracking.log_metrics(cfg, mlflow_id, {k: v for k, v in summary.items() if isinstance(v, (int, float))}, M * per_step,
                         prefix="summary/")
    tracking.finish_run(cfg, mlflow_id)
    drop_value_model(cfg.run_id)
    return summary


def plot_curves(results: list[dict], out: Path, k: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("accuracy", "greedy accuracy"), (f"maj_at_{k}", f"Maj@{k}"), (f"pass_at_{k}", f"Pass@{k}")]
    panels = [p for p in panels if any(p[0] in c for r in results for c in r["curve"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for r in results:
            pts = [(c["samples"], c[key]) for c in r["curve"] if key in c]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=r["method"])
        ax.set_xlabel("samples seen (questions x outputs)")
        ax.set_title(f"held-out {title}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend()
    fig.suptitle("Methods of the unified paradigm from the same SFT policy")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def results_table(results: list[dict], initial: Evaluation, k: int) -> str:
    def scores(m: dict) -> str:  # an evaluation's metrics() view
        return " | ".join(f"{m.get(key, float('nan')):.3f}" for key in ("accuracy", f"maj_at_{k}", f"pass_at_{k}"))

    head = (f"| method | greedy acc | Maj@{k} | Pass@{k} | wall (s) | s/step | update s/step | peak RSS (MB) "
            "| value model |\n|---|---|---|---|---|---|---|---|---|\n")
    rows = [f"| SFT start | {scores(initial.metrics())} | | | | | |"]
    for r in sorted(results, key=lambda r: -r["final"]["accuracy"]):
        vm = (f"{int(r['value_params']):,} params, {r['value_state_mb']:.1f} MB train state"
              if "value_params" in r else "")
        rows.append(f"| {r['method']} | {scores(r['final'])} | {r['wall_seconds']:.0f} | "
                    f"{r['step_seconds_mean']:.2f} | {r['update_seconds_mean']:.2f} | {r['peak_rss_mb']:.0f} | {vm} |")
    return head + "\n".join(rows) + "\n"


@flow(name="compare-methods", log_prints=True)
def compare_methods(config: PipelineConfig = PipelineConfig(), methods: list[str] = list(ALL_METHODS),
                    compare_id: str | None = None) -> dict:
    """Run `methods` from the same SFT policy with the same budget; nested MLflow runs, plot, table."""
    logger = get_run_logger()
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {list(ALL_METHODS)}")
    cfg = config
    if cfg.cluster.backend != "local":
        logger.info("compare-methods runs every method in this process; ignoring cluster.backend: %s",
                    cfg.cluster.backend)
        cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"backend": "local"})})
    rm_sources = [s.name for s in cfg.reward.sources if s.name != "verifier"]
    if rm_sources or cfg.reward.supervision != "outcome":
        # One reward for every method, the rule verifier (RFT and DPO are defined on it; no RM is
        # trained here, so PPO and GRPO get the same signal).
        logger.info("compare-methods scores with the rule verifier only (outcome); ignoring %s", rm_sources)
        cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={
            "sources": [RewardSource(name="verifier")], "supervision": "outcome"})})
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    compare_id = compare_id or time.strftime("compare-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    cfg = cfg.model_copy(update={"run_id": compare_id})
    train_path, test_path = prepare_data(cfg)
    sft_ckpt = build_initial_policy(cfg)
    parent = tracking.open_run(cfg, compare_id)
    client = tracking.client_for(cfg)
    from mlflow.entities import RunTag

    client.log_batch(parent, tags=[RunTag("methods", ",".join(methods)), RunTag("kind", "compare-methods")])
    initial = evaluate_policy(cfg, sft_ckpt, test_path)
    tracking.log_metrics(cfg, parent, initial.metrics(), 0, prefix="start/")  # not "sft/": that is the sft method's
    logger.info("SFT start: %s", initial.describe())
    results = []
    for m in methods:
        results.append(method_run(cfg, m, compare_id, parent, train_path, test_path, sft_ckpt, initial))
        r = results[-1]
        tracking.log_metrics(cfg, parent, {f"{m}/{k}": v for k, v in r["final"].items()}, r["samples"])
        tracking.log_metrics(cfg, parent, {f"{m}/wall_seconds": r["wall_seconds"],
                                           f"{m}/step_seconds": r["step_seconds_mean"],
                                           f"{m}/peak_rss_mb": r["peak_rss_mb"]}, r["samples"])
    out_dir = RunLayout.of(cfg.artifacts(), compare_id).root
    k = cfg.loop.eval_samples
    png = plot_curves(results, out_dir / "accuracy_vs_samples.png", k)
    table = results_table(results, initial, k)
    (out_dir / "results.md").write_text(table)
    (out_dir / "results.json").write_text(json.dumps({"initial": initial.model_dump(), "results": results}, indent=1,
                                                     default=str))
    tracking.log_artifact(cfg, parent, png)
    tracking.log_artifact(cfg, parent, out_dir / "results.md")
    tracking.log_artifact(cfg, parent, out_dir / "results.json")
    tracking.finish_run(cfg, parent)
    M, q, G = cfg.loop.steps_per_iteration, cfg.loop.questions_per_step, cfg.sampling.group_size
    create_markdown_artifact(
        f"# Methods compared ({compare_id})\n\nSame SFT start, {M} steps x {q} questions x G={G} "
        f"= {M * q * G} samples per method. Held-out greedy accuracy on {initial.n} questions, Maj@{k} / "
        f"Pass@{k} on {cfg.loop.eval_sample_questions} at T={cfg.sampling.temperature}.\n\n{table}\n"
        f"Plot: `{png}` (MLflow run {parent}).\n", key="methods-compared", description="Unified paradigm")
    return {"compare_id": compare_id, "mlflow_run_id": parent, "initial": initial, "results": results,
            "plot": str(png), "table": table}


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated, from " + ",".join(ALL_METHODS))
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if cfg is None:
        return 2
    t0 = time.perf_counter()
    out = compare_methods(cfg, [m.strip() for m in args.methods.split(",") if m.strip()])
    print(out["table"])
    print(f"plot: {out['plot']}\nMLflow parent run: {out['mlflow_run_id']} in {cfg.mlflow_uri()}\n"
          f"total wall time: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
