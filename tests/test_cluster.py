"""The Ray backend (cluster.backend: ray) on a local Ray started here: the FSDP2 trainer group takes the
same step at world size 2 as at 1 (and as the local backend), also when a rank dies as the update starts
and a new group redoes it from the checkpoint, the sampler replicas serve the trainer's
weights after a sync, and the demo pipeline runs with 2 replicas + 2 ranks through a replica killed
mid-step: the step's sampling is redone once and every step's rollouts are written exactly once; the
run then goes on on the local backend from the trainer group's checkpoint.
"""
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
from safetensors.torch import load_file

from configs import load_config
from models.trainer import UpdateBatch
from stages.rollout_store import open_rollouts
from stages.run_layout import RunLayout
from tests.test_pipeline_e2e import TINY_RUN

ray = pytest.importorskip("ray")  # in the test extra: a missing Ray is a broken install, said as a skip
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _config(root, *extra):
    return load_config(ROOT / "configs/demo.yaml", [f"storage.artifacts_root={root}", *TINY_RUN, "cluster.backend=ray",
                                                    "cluster.sampler_replicas=2", "cluster.trainer_world_size=2",
                                                    "grpo.lr=1e-3", *extra])


@pytest.fixture(scope="module")
def local_ray():
    from tasks import cluster

    cluster.connect(_config("/tmp/unused"))  # the flow's own way of starting a local Ray
    yield
    ray.shutdown()


def _batch() -> UpdateBatch:
    """3 groups of G=4 (12 rows: 6 per rank at world size 2, micro-batches of 4: 2 each), completions of
    2-6 tokens, advantages of both signs."""
    g = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7, 8 + i // 4] for i in range(12)]
    completions = [torch.randint(10, 30, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(12)]
    return UpdateBatch(prompts, completions, group_size=4, advantages=torch.randn(12, generator=g))


def _weights(ckpt) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt) / "model.safetensors"))


def test_two_ranks_take_the_same_step_as_one_and_the_replicas_serve_it(local_ray, tiny_dir, tmp_path, monkeypatch):
    from models.loading import load_policy
    from models.trainer import grpo_update
    from stages import faults
    from tasks import cluster

    policy = str(tiny_dir)
    batch = _batch()
    knobs = dict(beta=0.04, micro_batch_size=4)
    cfg = {w: _config(tmp_path, f"run_id=ws{w}", f"cluster.trainer_world_size={w}", "grpo.micro_batch_size=4")
           for w in (1, 2)}
    metrics = {}
    for w in (1, 2):
        if w == 2:  # rank 1 SIGKILLs itself as the update starts: a new group redoes it from the checkpoint
            monkeypatch.setenv(faults.ENV, "trainer_rank")
            monkeypatch.setattr(faults, "_hits", {})
        metrics[w] = cluster.trainer_update(cfg[w], policy, policy, batch, str(tmp_path / f"ws{w}"), save=True)
        if w == 1:
            cluster.CLUSTER.drop_trainer()
    assert faults._hits == {"trainer_rank": 1}

    # The local backend's update on the same batch: one process, no FSDP
    model, tok = load_policy(policy)
    ref, _ = load_policy(policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    local = grpo_update(model, optimizer, batch, pad_id=tok.pad_token_id, ref_model=ref, **knobs)

    start, one, two = _weights(policy), _weights(tmp_path / "ws1"), _weights(tmp_path / "ws2")
    moved = max(float((one[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-4  # lr 1e-3: every weight the gradient reaches moves by about that
    # The same update, to 0.1% of its norm: the gradients' sums differ in their last bits, which Adam's first
    # step (g / sqrt(g^2)) blows up on a near-zero gradient. Adam's step does not see a gradient's scale, so
    # the gradient norm (after FSDP's average over the ranks) is compared too: a wrong loss scale shows there.
    def step_of(weights):
        return torch.cat([(weights[k] - start[k]).flatten() for k in sorted(start)])

    local_weights = {k: v for k, v in model.state_dict().items() if k in start}
    for a, b in ((two, one), (one, local_weights)):
        assert float((step_of(a) - step_of(b)).norm() / step_of(b).norm()) < 1e-3
    for key in ("loss", "kl", "grad_norm", "entropy"):
        assert metrics[2][key] == pytest.approx(metrics[1][key], rel=1e-4, abs=1e-6), key
        assert metrics[1][key] == pytest.approx(local[key], rel=1e-4, abs=1e-6), key
    # The checkpoint is the local backend's: weights, tokenizer and an optimizer state it resumes from
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "ws2").iterdir()}

    # Replicas start on the old weights; after the sync they compute the trainer's log-probs of a fixed completion
    prompt, completion = [[5, 6, 7, 9]], [[12, 17, 25, 11, 20]]
    replicas = cluster.CLUSTER.replicas(cfg[2], policy)
    before = ray.get(replicas[0].logprobs.remote(prompt, completion))
    sampler = cluster.sampler_for(cfg[2], str(tmp_path / "ws2"), 1, policy, tok)
    trainer_logp = ray.get([r.logprobs.remote(prompt, completion) for r in cluster.CLUSTER.trainer])[0]
    assert float((before - trainer_logp).abs().max()) > 1e-3
    for replica in sampler.replicas:
        assert ray.get(replica.serving.remote()) == (str(tmp_path / "ws2"), 1)
        torch.testing.assert_close(ray.get(replica.logprobs.remote(prompt, completion)), trainer_logp,
                                   atol=1e-5, rtol=0)
    cluster.shutdown(cfg[2])


def test_pipeline_on_ray_survives_a_killed_sampler_replica(local_ray, prefect_api, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterTags

    from flows.iterative_grpo import iterative_grpo
    from stages import faults

    monkeypatch.setenv(faults.ENV, "sampler_replica@2")  # replica 0 dies inside step 1's sampling call
    monkeypatch.setattr(faults, "_hits", {})
    cfg = _config(tmp_path, "run_id=on-ray", "loop.iterations=1", "loop.eval_every=100", "loop.eval_samples=0")
    summary = iterative_grpo(cfg)
    assert summary["final_accuracy"] >= 0

    # Prefect's record: step 0's sampling ran once, step 1's twice (the killed try, then the retry)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            tags=TaskRunFilterTags(all_=["run:on-ray"]), name=TaskRunFilterName(like_="sample_groups")))
    assert sorted(r.run_count for r in runs) == [1, 2] and all(r.state.is_completed() for r in runs)

    layout = RunLayout.of(tmp_path, "on-ray")
    files = sorted(p.relative_to(layout.rollouts_dir).as_posix() for p in layout.rollouts_dir.rglob("*.parquet"))
    assert files == ["iteration=0/step=0/part-0.parquet", "iteration=0/step=1/part-0.parquet"]
    table = open_rollouts(layout.rollouts_dir).to_table()
    assert table.num_rows == 2 * 4 * 4  # 2 steps x 4 questions x G=4: nothing doubled by the redone sampling
    for step in (0, 1):
        rows = [r for r in table.to_pylist() if r["step"] == step]
        assert sorted((r["group_index"], r["sample_index"]) for r in rows) == [(g, s) for g in range(4) for s in range(4)]
        assert {r["policy_version"] for r in rows} == {step}
    assert set(table.column("sampler_backend").to_pylist()) == {"ray-hf"}

    # The trainer group's checkpoint is the local backend's: the run goes on in this process, its AdamW
    # state included (iteration 1's first update starts from the moments the ranks saved)
    local = cfg.model_copy(update={"loop": cfg.loop.model_copy(update={"iterations": 2}),
                                   "cluster": cfg.cluster.model_copy(update={"backend": "local"})})
    iterative_grpo(local)
    table = open_rollouts(layout.rollouts_dir).to_table()
    assert table.num_rows == 4 * 4 * 4
    assert set(table.filter(ds.field("iteration") == 1).column("sampler_backend").to_pylist()) == {"hf"}
