"""Reward models: head positions, losses, metrics, save/load, labels, scoring, Math-Shepherd."""
import math
import types
from datetime import datetime, timezone

import pyarrow as pa
import pytest
import torch
from torch import nn

from configs.schema import RewardConfig, RewardModelConfig
from models.reward_model import (HEAD_FILE, META_FILE, ValueHeadRewardModel, accuracy, bce_loss,
                                 classification_metrics, default_positions, majority_accuracy, roc_auc,
                                 train_value_model)
from models.rewards import (combine_outcome, combine_process, math_shepherd_labels, outcome_from_steps,
                            source_weights, steps_from_outcome)
from stages.reward_training import build_rm_rows, math_shepherd_step_labels, to_examples, train_reward_model
from stages.rewards import RewardError, align_line_labels, score_rollouts
from problems.prompts import plain_prompt
from problems.verify import extract_answer, is_correct
from stages.rollout_store import ROLLOUT_SCHEMA, SCORE_FIELDS
from stages.step_metrics import zeroed_note, zeroed_rows


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- rollout tables by hand, in ROLLOUT_SCHEMA (also used by test_replay) ----
QUESTION = "Mia has 7 apples. She buys 5 more. Then the apples are tripled. How many apples does Mia have now?"
SOLUTION = "7+5=12\n12*3=36\n#### 36"
ANSWER = "36"


def rollout_rows(tok, completions: list[str], *, question_id: str = "q0", question: str = QUESTION,
                 solution: str = SOLUTION, answer: str = ANSWER, finished: bool = True,
                 run_id: str = "test") -> list[dict]:
    prompt = plain_prompt(question)
    prompt_ids = tok(prompt)["input_ids"]
    rows = []
    for i, text in enumerate(completions):
        ids = tok(text)["input_ids"] + ([tok.eos_token_id] if finished else [])
        rows.append({
            "run_id": run_id, "question_id": question_id, "group_index": 0, "sample_index": i,
            "prompt": prompt, "completion": text, "prompt_ids": prompt_ids, "completion_ids": ids,
            "old_logprobs": [0.0] * len(ids), "completion_length": len(ids), "truncated": not finished,
            "finish_reason": "eos" if finished else "length", "answer": answer, "solution": solution,
            "extracted_answer": extract_answer(text), "correct": is_correct(text, answer),
            "policy_version": 0, "sampler_backend": "hf", "seed": 0,
            "sampled_at": datetime(2024, 1, 1, tzinfo=timezone.utc),
        })
    return rows


def rollout_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)


class TokenIdBackbone(nn.Module):
    """Hidden state = the input token id (hidden size 1), so a unit head's logit names the token read."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.config = types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace(hidden_size=1))

    def forward(self, input_ids, attention_mask, position_ids):
        return types.SimpleNamespace(last_hidden_state=input_ids.float().unsqueeze(-1) + 0 * self.dummy)


def unit_head():
    head = nn.Linear(1, 1)
    nn.init.ones_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def test_value_head_reads_given_positions_with_padding_on_both_sides():
    rm = ValueHeadRewardModel(TokenIdBackbone(), "process", pad_id=0, head=unit_head())
    # Ragged prompts and completions: rows get left padding (pack) and the completions are ragged
    # on the right in the [B, T] layout. Token ids are unique so a logit names its position.
    prompts = [[11, 12, 13], [21], [31, 32]]
    completions = [[101, 102], [201, 202, 203, 204, 205], [301]]
    positions = [[0, 1], [1, 4], [0]]
    logits, row = rm.logits_at(prompts, completions, positions)
    assert logits.tolist() == [101, 102, 202, 205, 301]
    assert row.tolist() == [0, 0, 1, 1, 2]
    # Outcome RM: the last completion token; an empty completion reads the prompt's last token.
    out = ValueHeadRewardModel(TokenIdBackbone(), "outcome", pad_id=0, head=unit_head())
    comps = completions + [[]]
    pos = [default_positions("outcome", c) for c in comps]
    logits, _ = out.logits_at(prompts + [[41, 42]], comps, pos)
    assert logits.tolist() == [102, 205, 301, 42]
    with pytest.raises(ValueError, match="outside the completion"):
        rm.logits_at(prompts, completions, [[2], [0], [0]])


def test_value_head_batched_equals_unbatched_on_tiny(tiny):
    model, tok = tiny
    rm = ValueHeadRewardModel.from_policy(model, "process", pad_id=tok.pad_token_id)
    torch.nn.init.normal_(rm.head.weight, std=0.1)
    prompts = [[10, 75, 8], [10], [75, 8, 83, 4, 5]]
    completions = [[98, 67, 4], [5, 6, 7, 8, 9, 10, 11], [12]]
    positions = [[0, 2], [3, 6], [0]]
    with torch.no_grad():
        batched, _ = rm.logits_at(prompts, completions, positions)
        single = torch.cat([rm.logits_at([p], [c], [q])[0] for p, c, q in zip(prompts, completions, positions)])
        # By hand: unpadded forward, hidden state at prompt length + t.
        by_hand = []
        for p, c, q in zip(prompts, completions, positions):
            h = rm.backbone(input_ids=torch.tensor([p + c])).last_hidden_state[0]
            by_hand += [rm.head(h[len(p) + t]).item() for t in q]
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched, torch.tensor(by_hand), atol=1e-5, rtol=1e-4)
    # from_policy copies the backbone: training the RM never touches the policy.
    assert rm.backbone is not model.base_model


def test_bce_loss_and_metrics_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5])
    labels = [1.0, 0.0, 0.25]
    expected = -sum(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z)))
                    for z, y in zip(logits.tolist(), labels)) / 3
    assert bce_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    # AUC = fraction of (pos, neg) pairs ordered right, ties half. Positives 0.9, 0.8 against negatives
    # 0.8, 0.3, 0.1: 0.9 wins 3, 0.8 ties 0.8 and wins 2 -> 5.5 / 6. Labels >= 0.5 are positives.
    assert roc_auc([0.9, 0.8, 0.8, 0.3, 0.1], [1, 0, 1, 0, 0]) == pytest.approx(5.5 / 6)
    assert roc_auc([0.9, 0.8, 0.8, 0.3, 0.1], [0.5, 0.25, 1.0, 0.0, 0.4]) == pytest.approx(5.5 / 6)
    # One class (or none): undefined, NaN rather than an error (a held-out set may be all correct).
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1])) and math.isnan(roc_auc([0.1, 0.2], [0.0, 0.2]))
    assert math.isnan(roc_auc([], []))
    assert accuracy([1.0, -1.0, 0.2], [1, 1, 0]) == pytest.approx(1 / 3)
    assert majority_accuracy([1, 0, 0, 0]) == 0.75
    m = classification_metrics([3.0, -3.0], [1.0, 0.0])
    assert m["auc"] == 1.0 and m["accuracy"] == 1.0 and m["majority_accuracy"] == 0.5 and m["n"] == 2


def test_training_learns_and_save_load_round_trip(tiny, tmp_path):
    model, tok = tiny
    torch.manual_seed(0)
    # Label = "the completion ends in token 5": a one-token rule the RM must learn.
    examples = []
    for i in range(32):
        comp = [int(x) for x in torch.randint(4, 20, (4,))] + [5 if i % 2 else 6]
        examples.append(([10, 75], comp, [len(comp) - 1], [float(i % 2)]))
    rm = ValueHeadRewardModel.from_policy(model, "outcome", pad_id=tok.pad_token_id)
    losses = train_value_model(rm, examples, epochs=8, batch_size=16, lr=3e-3, head_lr=3e-2, seed=0)
    assert sum(losses[-3:]) / 3 < 0.3 < losses[0]
    saved = rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    names = {p.name for p in saved.iterdir()}
    assert {HEAD_FILE, META_FILE, "model.safetensors", "config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth"))]
    loaded = ValueHeadRewardModel.from_pretrained(saved)
    assert loaded.kind == "outcome" and loaded.score_mode == "probability"
    p, c, q = [e[0] for e in examples], [e[1] for e in examples], [e[2] for e in examples]
    torch.testing.assert_close(torch.tensor(loaded.score(p, c, q)), torch.tensor(rm.score(p, c, q)))
    logit = loaded.score(p[:1], c[:1], q[:1], score_mode="logit")[0][0]
    assert loaded.score(p[:1], c[:1], q[:1])[0][0] == pytest.approx(1 / (1 + math.exp(-logit)), rel=1e-5)


def test_frozen_backbone_trains_only_the_head(tiny):
    model, tok = tiny
    rm = ValueHeadRewardModel.from_policy(model, "process", pad_id=tok.pad_token_id)
    before = {k: v.clone() for k, v in rm.backbone.state_dict().items()}
    examples = [([10], [4, 98, 5], [1, 2], [1.0, 0.0]), ([10, 11], [6, 7], [1], [1.0])]
    train_value_model(rm, examples, epochs=2, batch_size=2, lr=1e-2, seed=0, freeze_backbone=True)
    assert all(torch.equal(before[k], v) for k, v in rm.backbone.state_dict().items())
    assert rm.head.weight.abs().sum() > 0


def test_combining_sources():
    assert source_weights([("verifier", 1.0), ("outcome_rm", 0.5), ("verifier", 0.5)]) == {"verifier": 1.5,
                                                                                       "outcome_rm": 0.5}
    w = {"verifier": 1.0, "outcome_rm": 0.5}
    assert combine_outcome({"verifier": [1.0, 0.0], "outcome_rm": [0.8, 0.2]}, w) == pytest.approx([1.4, 0.1])
    got = combine_process({"verifier": [[1.0, 0.0], []], "outcome_rm": [steps_from_outcome(0.8, 2), []]}, w)
    assert got == [pytest.approx([1.0, 0.4]), []]
    assert outcome_from_steps([0.9, 0.2, 0.7]) == 0.2 and outcome_from_steps([]) == 0.0
    with pytest.raises(ValueError, match="different step counts"):
        combine_process({"verifier": [[1.0]], "outcome_rm": [[1.0, 2.0]]}, w)


COMPLETIONS = [
    "7+5=12\n12*3=36\n#### 36",     # right
    "7+5=12\n12*3=35\n#### 35",     # arithmetic slip in step 2
    "7+5=13\n13*3=39\n#### 39",     # wrong from step 1 (step 2 is a true equation on a wrong result)
    "7+5=12\n12*3=36\n#### 36\n",   # right, trailing newline: the EOS is a step of its own
]


def test_label_construction_outcome_and_process(tiny, tmp_path):
    _, tok = tiny
    table = rollout_table(rollout_rows(tok, COMPLETIONS))
    rows = build_rm_rows(table, tok).to_pylist()
    assert [r["outcome_label"] for r in rows] == [1.0, 0.0, 0.0, 1.0]
    assert [r["step_labels"] for r in rows] == [[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 1, 1]]
    nl = tok.convert_tokens_to_ids("\n")
    for r in rows:
        ids = r["completion_ids"]
        assert r["step_ends"] == [t for t, x in enumerate(ids) if x == nl] + ([len(ids) - 1] if ids[-1] != nl else [])
        assert len(r["step_ends"]) == len(r["step_labels"])
    ex_o, ex_p = to_examples(build_rm_rows(table, tok), "outcome"), to_examples(build_rm_rows(table, tok), "process")
    assert [e[2] for e in ex_o] == [[len(r["completion_ids"]) - 1] for r in rows]
    assert [e[3] for e in ex_p] == [r["step_labels"] for r in rows]
    # A line split over steps in an odd way: the step inherits / ANDs line labels.
    assert align_line_labels(["a\n", "b\n", ""], [True, False]) == [True, False, False]


class FakeRM(ValueHeadRewardModel):
    """Scores by rule, or fails on one row: to test scoring without training."""

    def __init__(self, kind, value=0.5, fail_on=None, nan_on=None):
        super().__init__(TokenIdBackbone(), kind, pad_id=0, head=unit_head())
        self.value, self.fail_on, self.nan_on = value, fail_on, nan_on

    def score(self, prompt_ids, completion_ids, positions=None, **kw):
        out = []
        for c, pos in zip(completion_ids, positions):
            if self.fail_on is not None and list(c) == self.fail_on:
                raise RuntimeError("boom")
            v = math.nan if self.nan_on is not None and list(c) == self.nan_on else self.value
            out.append([v] * len(pos))
        return out


class FailingRM(FakeRM):
    def score(self, *args, **kw):
        raise RuntimeError("boom")


def test_score_rollouts_columns_and_weights(tiny, tmp_path):
    _, tok = tiny
    table = rollout_table(rollout_rows(tok, COMPLETIONS))
    cfg = RewardConfig(supervision="process", sources=[{"name": "verifier", "weight": 1.0},
                                                       {"name": "process_rm", "weight": 0.5},
                                                       {"name": "outcome_rm", "weight": 2.0}])
    t = score_rollouts(table, cfg, tokenizer=tok, reward_models={"process_rm": FakeRM("process", 0.4),
                                                                "outcome_rm": FakeRM("outcome", 0.25)})
    for f in SCORE_FIELDS:
        assert t.schema.field(f.name).type == f.type
    rows = t.to_pylist()
    assert [r["reward_verifier"] for r in rows] == [1.0, 0.0, 0.0, 1.0]
    assert [r["reward"] for r in rows] == pytest.approx([1 + 0.5 * 0.4 + 2 * 0.25, 0.7, 0.7, 1.7])
    assert rows[1]["step_labels"] == [True, False, False]
    assert rows[1]["step_rewards"] == pytest.approx([1 + 0.2, 0 + 0.2, 0 + 0.2 + 0.5])
    assert all(r["reward_errors"] == [] for r in rows)


def test_score_rollouts_error_policy_names_item_and_source(tiny, tmp_path):
    _, tok = tiny
    rows = rollout_rows(tok, COMPLETIONS, question_id="q7")
    table = rollout_table(rows)
    bad = rows[2]["completion_ids"]
    cfg = RewardConfig(sources=[{"name": "verifier"}, {"name": "outcome_rm"}])
    with pytest.raises(RewardError, match=r"'outcome_rm'.*question_id='q7' sample_index=2.*boom"):
        score_rollouts(table, cfg, tokenizer=tok, reward_models={"outcome_rm": FakeRM("outcome", fail_on=bad)})
    with pytest.raises(RewardError, match=r"'outcome_rm'.*sample_index=2.*non-finite"):
        score_rollouts(table, cfg, tokenizer=tok, reward_models={"outcome_rm": FakeRM("outcome", nan_on=bad)})
    zero = RewardConfig(sources=[{"name": "verifier"}, {"name": "outcome_rm"}], on_error="zero")
    t = score_rollouts(table, zero, tokenizer=tok,
                       reward_models={"outcome_rm": FakeRM("outcome", 0.5, fail_on=bad)}).to_pylist()
    assert [r["reward_outcome_rm"] for r in t] == [0.5, 0.5, 0.0, 0.5]
    assert [r["reward_errors"] for r in t] == [[], [], ["outcome_rm"], []]
    assert zeroed_rows(pa.Table.from_pylist(t)) == {"reward_zeroed_rows": 1.0, "reward_zeroed_rows/outcome_rm": 1.0}
    assert zeroed_note({"reward_zeroed_rows": 1.0, "reward_zeroed_rows/outcome_rm": 1.0}) == \
        " | rows scored 0 for a failing reward source: outcome_rm 1"
    assert zeroed_note({"reward_zeroed_rows": 0.0}) == ""
    with pytest.raises(RewardError, match=r"'outcome_rm' failed on every row of the step \(4\), e\.g\. "
                                          r"question_id='q7' sample_index=0: RuntimeError: boom"):
        score_rollouts(table, zero, tokenizer=tok, reward_models={"outcome_rm": FailingRM("outcome")})
    with pytest.raises(RewardError, match="needs a outcome reward model"):
        score_rollouts(table, cfg, tokenizer=tok, reward_models={"outcome_rm": FakeRM("process")})


def test_math_shepherd_labels_pure_and_on_a_tiny_case(tiny):
    assert math_shepherd_labels([[True, False], [False, False], [True, True, True]], "hard") == [1.0, 0.0, 1.0]
    assert math_shepherd_labels([[True, False], [False, False], [True, True, True]], "soft") == [0.5, 0.0, 1.0]
    with pytest.raises(ValueError, match="no rollouts"):
        math_shepherd_labels([[]])
    _, tok = tiny
    # Completion "7+5=12\n12*3=35\n#### 35": from after step 1 a completer can still finish right; from
    # after the slip in step 2 it cannot (it always writes the answer of the prefix it was given).
    row = rollout_rows(tok, ["7+5=12\n12*3=35\n#### 35"])[0]
    nl = tok.convert_tokens_to_ids("\n")
    ends = [t for t, x in enumerate(row["completion_ids"]) if x == nl] + [len(row["completion_ids"]) - 1]
    calls = []

    def complete(prefixes, k):
        calls.append(len(prefixes))
        out = []
        for p in prefixes:
            text = tok.decode(p, skip_special_tokens=True)
            good = "12*3=36\n#### 36" if text.endswith("=12\n") else "#### 35"
            out += [tok(good)["input_ids"] + [tok.eos_token_id]] * (k - 1) + [tok("#### 1")["input_ids"]]
        return out

    item = {"prompt_ids": row["prompt_ids"], "completion_ids": row["completion_ids"], "step_ends": ends,
            "answer": ANSWER}
    hard = math_shepherd_step_labels(None, tok, [item], k=3, mode="hard", complete=complete)
    soft = math_shepherd_step_labels(None, tok, [item], k=3, mode="soft", complete=complete)
    assert hard == [[1.0, 0.0, 0.0]]
    assert soft == [[pytest.approx(2 / 3), 0.0, 0.0]]
    assert calls == [2, 2]  # the finished completion's last step is labelled without sampling


def test_train_reward_model_from_policy_path(tiny, tiny_dir, tmp_path):
    _, tok = tiny
    table = rollout_table(rollout_rows(tok, COMPLETIONS * 2))
    rows = build_rm_rows(table, tok)
    cfg = RewardModelConfig(epochs=1, batch_size=4, lr=1e-3)
    out, metrics = train_reward_model(str(tiny_dir), "process", rows, tmp_path / "prm", cfg, seed=0,
                                      eval_rows=rows, pad_id=tok.pad_token_id)
    assert (out / HEAD_FILE).exists() and metrics["train_steps"] == 2
    assert metrics["eval_n"] == 26 and 0 <= metrics["eval_accuracy"] <= 1


def test_build_rm_rows_with_math_shepherd_labels(tiny, tmp_path):
    model, tok = tiny
    table = rollout_table(rollout_rows(tok, COMPLETIONS[:2]))
    rows = build_rm_rows(table, tok, step_labels="math_shepherd", policy=model, k=2, ms_mode="soft",
                         max_new_tokens=4).to_pylist()
    for r in rows:
        assert r["step_label_method"] == "math_shepherd_soft"
        assert len(r["step_labels"]) == len(r["step_ends"]) == 3
        assert all(x in (0.0, 0.5, 1.0) for x in r["step_labels"])
    # The finished completions' last steps are their own correctness; a random tiny model never
    # completes a prefix correctly in 4 tokens.
    assert [r["step_labels"] for r in rows] == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
