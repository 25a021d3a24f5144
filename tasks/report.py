"""What a person looks at after an iteration: MLflow artifacts and Prefect artifacts."""
from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from configs import PipelineConfig
from stages.evaluation import Evaluation
from stages.rollout_store import open_rollouts
from stages.run_layout import RunLayout
from tasks import tracking

SAMPLE_COLUMNS = ["iteration", "step", "question_id", "sample_index", "completion", "answer", "correct", "reward"]


def _curve_png(cfg: PipelineConfig, mlflow_run_id: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracking.wait_for_logging()
    client = tracking.client_for(cfg)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in [("reward_mean", "train reward (mean)"), ("accuracy", "train accuracy"),
                       ("eval/accuracy", "held-out greedy accuracy")]:
        hist = sorted(client.get_metric_history(mlflow_run_id, key), key=lambda m: m.step)
        if hist:
            ax.plot([m.step for m in hist], [m.value for m in hist], marker="o" if key.startswith("eval") else None,
                    label=label)
    ax.set_xlabel("GRPO step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@task(cache_policy=NO_CACHE)
def iteration_report(cfg: PipelineConfig, run_dir: str, iteration: int, mlflow_run_id: str,
                     evaluation: Evaluation) -> None:
    """Curve PNG and sample table to MLflow (the rollouts' lineage is logged with the iteration's models,
    tasks/registry.py); summary and samples to Prefect. Safe to repeat (a resumed run redoes a report a
    killed process had not finished)."""
    layout = RunLayout(Path(run_dir))
    df = open_rollouts(layout.iteration_rollouts(iteration)).to_table().to_pandas()
    df["iteration"] = iteration
    samples = df.sort_values(["step", "group_index", "sample_index"]).groupby("step").head(2)[SAMPLE_COLUMNS]
    with tempfile.TemporaryDirectory() as tmp:
        tracking.log_artifact(cfg, mlflow_run_id, _curve_png(cfg, mlflow_run_id, Path(tmp) / f"curve-iteration-{iteration}.png"),
                              "curves")
    client = tracking.client_for(cfg)
    table_file = f"samples/iteration-{iteration}.json"
    if table_file not in {a.path for a in client.list_artifacts(mlflow_run_id, "samples")}:  # log_table appends
        client.log_table(mlflow_run_id, data=samples.astype({"correct": bool}), artifact_file=table_file)
    ev = evaluation
    sampled = (f"| held-out Maj@{ev.k} / Pass@{ev.k} (first {ev.sample_questions}) | "
               f"{ev.maj_at_k:.3f} / {ev.pass_at_k:.3f} |\n") if ev.k else ""
    create_markdown_artifact(
        f"## Iteration {iteration}\n\n"
        f"| metric | value |\n|---|---|\n"
        f"| held-out greedy accuracy | {ev.accuracy:.3f} |\n{sampled}"
        f"| train accuracy (sampled) | {df['correct'].mean():.3f} |\n"
        f"| mean reward | {df['reward'].mean():.3f} |\n"
        f"| rollouts | {len(df)} rows, {df['step'].nunique()} steps |\n",
        key=f"iteration-{iteration}", description=f"{layout.run_id}: iteration {iteration}")
    create_table_artifact(samples.head(8).astype(str).to_dict("records"), key=f"samples-iteration-{iteration}",
                          description="A few sampled completions with their rewards")
