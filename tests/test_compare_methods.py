"""The unified paradigm's methods as pipeline updates (models/method_update.py) and the compare flow.

Unit: PPO updates its value model and uses GAE; DPO builds one (correct, wrong) pair per mixed group;
RFT with no correct output leaves the policy unchanged. End to end: flows/compare_methods.py with three
methods x 2 steps on a barely-trained tiny model, on the real Prefect API (ephemeral) and MLflow SQLite.
"""
import copy
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from models import method_update as mu
from models.method_update import method_update, token_values
from models.reward_model import ValueHeadRewardModel
from models.trainer import UpdateBatch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second torch thread only waits on a shared 2-core machine (BENCHMARKS.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(tok, correct, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = len(tok)
    prompt = tok(["Q: Tom has 3 apples and buys 4 more. How many?\nA:"])["input_ids"][0]
    comps = [torch.randint(5, vocab, (int(n),), generator=g).tolist() + [tok.eos_token_id]
             for n in torch.randint(2, 9, (len(correct),), generator=g)]
    c = torch.tensor(correct, dtype=torch.bool)
    return UpdateBatch([list(prompt)] * len(correct), comps, c, c.float(), group_size)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _changed(before, model):
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_ppo_updates_the_value_model_with_gae(tiny, monkeypatch):
    model, tok = tiny
    policy, ref = copy.deepcopy(model), copy.deepcopy(model)
    vm = ValueHeadRewardModel.from_policy(policy, "process", score_mode="logit")
    vopt = torch.optim.AdamW(vm.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    batch = _batch(tok, [True, False, True, False, False, True], 3)
    calls = []
    real_gae = mu.gae_advantages

    def spy(rewards, values, mask, gamma, lam, **kw):
        calls.append((rewards.clone(), gamma, lam, kw))
        return real_gae(rewards, values, mask, gamma, lam, **kw)

    monkeypatch.setattr(mu, "gae_advantages", spy)
    v_before, p_before = _params(vm), _params(policy)
    m = method_update(policy, opt, batch, "ppo", pad_id=tok.pad_token_id, ref_model=ref, value_model=vm,
                      value_optimizer=vopt, beta=0.04, gamma=0.99, lam=0.9, micro_batch_size=4)
    assert len(calls) == 1 and calls[0][1:3] == (0.99, 0.9)
    rewards = calls[0][0]
    lens = [len(c) for c in batch.completion_ids]
    # The outcome reward sits on the last token of each output (ref == policy: the KL part is 0).
    for i, n in enumerate(lens):
        assert rewards[i, n - 1].item() == pytest.approx(float(batch.correct[i]), abs=1e-5)
        assert rewards[i, : n - 1].abs().max().item() < 1e-5
    assert _changed(v_before, vm) and _changed(p_before, policy)
    assert not torch.equal(vm.head.weight, torch.zeros_like(vm.head.weight))  # the zero-initialised head learned
    for key in ("vf_loss", "vf_clip_frac", "gae_advantage_abs_mean", "returns_mean", "value_grad_norm", "grad_norm"):
        assert key in m, key
    # Per-token values: one per completion token, 0 past each output.
    vals = token_values(vm, batch.prompt_ids, batch.completion_ids, width=max(lens))
    assert vals.shape == (6, max(lens))
    for i, n in enumerate(lens):
        assert torch.all(vals[i, n:] == 0)


def test_ppo_needs_a_value_model(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="value model"):
        method_update(copy.deepcopy(model), torch.optim.AdamW(model.parameters()), _batch(tok, [True, False], 2),
                      "ppo", pad_id=tok.pad_token_id, ref_model=model)


def test_dpo_builds_one_pair_per_mixed_group(tiny, monkeypatch):
    model, tok = tiny
    policy = copy.deepcopy(model)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    # groups of 3: mixed, all right (no pair), mixed, all wrong (no pair)
    correct = [True, False, False, True, True, True, False, True, False, False, False, False]
    batch = _batch(tok, correct, 3)
    seen = []
    real_pairs = mu.dpo_pairs

    def spy(flags, group_size, seed=0):
        out = real_pairs(flags, group_size, seed)
        seen.append(out)
        return out

    monkeypatch.setattr(mu, "dpo_pairs", spy)
    before = _params(policy)
    m = method_update(policy, opt, batch, "dpo", pad_id=tok.pad_token_id, ref_model=model, dpo_beta=0.1,
                      micro_batch_size=2)
    pairs = seen[0]
    assert len(pairs) == 2 and m["pairs"] == 2.0
    for chosen, rejected in pairs:
        assert correct[chosen] and not correct[rejected] and chosen // 3 == rejected // 3
    # policy == reference at the start: the implicit rewards are 0, the loss is log 2
    assert m["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert _changed(before, policy)


def test_dpo_without_pairs_and_rft_without_correct_outputs_leave_the_policy(tiny):
    model, tok = tiny
    for method, kw in (("dpo", {"ref_model": model}), ("rft", {}), ("online_rft", {})):
        policy = copy.deepcopy(model)
        before = _params(policy)
        method_update(policy, torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0), _batch(tok, [False] * 4, 2),
                      method, pad_id=tok.pad_token_id, **kw)
        assert not _changed(before, policy), method


def test_sft_is_rft_on_all_correct_rows(tiny):
    model, tok = tiny
    batch = _batch(tok, [True] * 4, 2)
    out = []
    for method in ("sft", "rft"):
        policy = copy.deepcopy(model)
        method_update(policy, torch.optim.SGD(policy.parameters(), lr=0.1), batch, method, pad_id=tok.pad_token_id,
                      micro_batch_size=3)
        out.append(_params(policy))
    assert all(torch.allclose(a, b) for a, b in zip(*out))


def test_method_data_tables(tiny):
    """SFT's ground-truth rows and a pool's slices, as tables, make the update's batch."""
    from configs.schema import PromptConfig
    from stages import method_data

    _, tok = tiny
    qs = [{"id": i, "question": f"Tom has {i} apples and buys 2 more. How many?", "solution": f"{i} + 2 = {i + 2}\n"
           f"#### {i + 2}", "answer": str(i + 2)} for i in range(3)]
    sft = method_data.sft_rollouts(qs, tok, PromptConfig(), run_id="r")
    assert sft.column("group_index").to_pylist() == [0, 1, 2] and all(sft.column("correct").to_pylist())
    assert sft.column("policy_version").null_count == 3  # no policy sampled them
    batch = method_data.method_batch(sft, 1)
    assert all(c[-1] == tok.eos_token_id for c in batch.completion_ids) and batch.rewards.tolist() == [1.0] * 3
    assert method_data.batch_metrics(sft)["accuracy"] == 1.0
    pool = sft.set_column(sft.schema.get_field_index("correct"), "correct", pa.array([True, False, True]))
    part = method_data.pool_slice(pool, 1, 2)
    assert part.column("group_index").to_pylist() == [0, 1]
    assert part.column("question_id").to_pylist() == ["1", "2"] and part.column("correct").to_pylist() == [False, True]
    assert method_data.batch_metrics(part)["accuracy"] == 0.5


# ---- end to end --------------------------------------------------------------------------------
TINY = ["sft.steps=30", "data.train_size=300", "data.test_size=16", "loop.steps_per_iteration=2",
        "loop.questions_per_step=2", "loop.eval_every=1", "sampling.group_size=4", "sampling.max_new_tokens=16",
        "loop.eval_samples=4", "loop.eval_sample_questions=4", "threads=1"]



@pytest.fixture(scope="module")
def compared(prefect_api, tmp_path_factory):
    from configs import load_config
    from flows.compare_methods import compare_methods

    root = tmp_path_factory.mktemp("compare")
    cfg = load_config(ROOT / "configs/demo.yaml", [f"storage.artifacts_root={root}", *TINY])
    out = compare_methods(cfg, ["grpo", "ppo", "dpo"], compare_id="cmp")
    return cfg, out


@pytest.mark.slow
def test_compare_flow_nested_runs_plot_and_metrics(compared):
    from tasks.tracking import client_for

    cfg, out = compared
    client = client_for(cfg)
    parent = client.get_run(out["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["method"] for r in children) == ["dpo", "grpo", "ppo"]
    samples = 2 * 2 * 4
    for r in children:
        rid = r.info.run_id
        acc = client.get_metric_history(rid, "eval/accuracy")
        assert sorted(m.step for m in acc) == [0, 8, 16], r.data.tags["method"]
        for key in ("eval/pass_at_4", "eval/maj_at_4", "step_seconds", "update_seconds", "reward_mean"):
            assert client.get_metric_history(rid, key), (r.data.tags["method"], key)
        assert r.info.status == "FINISHED" and r.data.params["algorithm"] == r.data.tags["method"]
    ppo = next(r for r in children if r.data.tags["method"] == "ppo")
    for key in ("vf_loss", "gae_advantage_abs_mean", "value_params"):
        assert client.get_metric_history(ppo.info.run_id, key), key
    dpo = next(r for r in children if r.data.tags["method"] == "dpo")
    assert client.get_metric_history(dpo.info.run_id, "pairs")
    # The parent: the plot and the table as artifacts, each method's final numbers as metrics.
    names = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "accuracy_vs_samples.png" in names and "results.md" in names
    png = Path(out["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for m in ("grpo", "ppo", "dpo"):
        assert client.get_metric_history(parent.info.run_id, f"{m}/accuracy")[0].step == samples
        assert client.get_metric_history(parent.info.run_id, f"{m}/wall_seconds")
    assert all(f"| {m} |" in out["table"] for m in ("grpo", "ppo", "dpo"))


@pytest.mark.slow
def test_compare_flow_markdown_artifact_and_offline_pool(compared):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from stages.rollout_store import open_rollouts
    from stages.run_layout import RunLayout

    cfg, out = compared
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["methods-compared"])))
    assert arts and "| grpo |" in arts[0].data
    # DPO trained on a pool sampled once (one seed) from the SFT model (policy_version 0), sliced per
    # step; GRPO on the live policy's samples, one sampling per step.
    for method, versions, seeds in (("dpo", [0, 0], 1), ("grpo", [0, 1], 2)):
        layout = RunLayout.of(cfg.artifacts(), f"cmp-{method}")
        assert [layout.rollouts(0, s).exists() for s in range(3)] == [True, True, False], method
        rows = open_rollouts(layout.rollouts_dir).to_table().sort_by("step")
        steps = rows.column("step").to_pylist()
        assert sorted(set(steps)) == [0, 1] and rows.num_rows == 2 * 2 * 4, method
        assert [rows.column("policy_version")[steps.index(s)].as_py() for s in (0, 1)] == versions, method
        assert len(set(rows.column("policy_version").to_pylist())) == len(set(versions)), method
        assert len(set(rows.column("seed").to_pylist())) == seeds, method
        assert set(rows.column("group_index").to_pylist()) == {0, 1}, method  # slices renumbered from 0
    assert layout.policy_iteration(0).is_dir()  # the final policy is saved
