"""A pretrained reward model (a one-label sequence classifier) by path as a reward source: config rules,
loading, scores equal to the model's own logits, weights, errors named and following on_error."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from configs.schema import ConfigError, PipelineConfig, RewardConfig, RewardSource, UserError, build_config
from models.tiny import build_tokenizer
from problems.arithmetic import VOCAB_WORDS
from stages.pretrained_rewards import PretrainedRewardModel, RewardModelLoadError, load_pretrained_reward_model
from stages.rewards import RewardError, score_rollouts
from tasks.workspace import Workspace
from tests.test_reward_models import COMPLETIONS, rollout_rows, rollout_table

pytestmark = pytest.mark.usefixtures("one_thread")


def rm_tokenizer():
    """The tiny word+digit tokenizer without a pad token: loading must pad with EOS."""
    tok = build_tokenizer(VOCAB_WORDS)
    tok.pad_token = None
    return tok


def tiny_classifier(tok, num_labels: int = 1) -> LlamaForSequenceClassification:
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                      num_labels=num_labels, pad_token_id=None, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)  # logits of order 1, not HF's 0.02-scaled init
    return model


@pytest.fixture(scope="module")
def saved_rm(tmp_path_factory):
    """(folder, the in-memory model it was saved from, its tokenizer)."""
    folder = tmp_path_factory.mktemp("rm")
    tok = rm_tokenizer()
    model = tiny_classifier(tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def direct_scores(model, tok, texts):
    """The model's logit for each text alone (no padding): what the source must reproduce in batches."""
    with torch.inference_mode():
        return [model(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]


def test_a_pretrained_source_is_labelled_by_a_plain_identifier():
    cfg = build_config({"reward": {"sources": [{"name": "verifier"},
                                               {"name": "helpfulness", "model": "org/rm", "weight": 0.5}]}})
    assert cfg.reward.sources[1] == RewardSource(name="helpfulness", model="org/rm", weight=0.5)
    assert (cfg.reward.sources[1].trust_remote_code, cfg.reward.sources[1].batch_size) == (False, 16)
    for bad in ("verifier", "overlong", "my_pkg.rewards:f", "help-fulness", "2nd"):
        with pytest.raises(ConfigError, match=rf"^invalid config: reward\.sources\.0\.name: '{bad}': a pretrained "
                                              r"model's label must be a plain identifier"):
            build_config({"reward": {"sources": [{"name": bad, "model": "x"}]}})
    with pytest.raises(ConfigError, match=r"sources\.0\.name: 'helpfulness': not one of verifier, outcome_rm, "
                                          r"process_rm, overlong, nor .* nor the label of a source with a `model`"):
        build_config({"reward": {"sources": [{"name": "helpfulness"}]}})
    with pytest.raises(ConfigError, match=r"reward\.sources: 'rm' is listed twice"):
        build_config({"reward": {"sources": [{"name": "rm", "model": "a"}, {"name": "rm", "model": "b"}]}})


def test_scores_are_the_models_logits_and_add_with_their_weight(tiny, saved_rm):
    _, policy_tok = tiny
    folder, model, tok = saved_rm
    table = rollout_table(rollout_rows(policy_tok, COMPLETIONS))
    # batch_size 3 over 4 rows: a full batch of ragged lengths (padded) and a batch of one
    cfg = RewardConfig(sources=[{"name": "verifier"},
                                {"name": "helpfulness", "model": str(folder), "weight": 0.5, "batch_size": 3}])
    rm = load_pretrained_reward_model(cfg.sources[1])
    assert (rm.tokenizer.pad_token, rm.model.config.pad_token_id, rm.tokenizer.padding_side) == \
        ("<eos>", tok.eos_token_id, "right")
    assert not rm.model.training and not rm.chat
    prompt = table.column("prompt")[0].as_py()
    expected = direct_scores(model, tok, [prompt + c for c in COMPLETIONS])
    assert len({round(x, 3) for x in expected}) == 4  # the rows score differently: a mixed-up row would show

    rows = score_rollouts(table, cfg, tokenizer=policy_tok, pretrained={"helpfulness": rm}).to_pylist()
    assert [r["reward_helpfulness"] for r in rows] == pytest.approx(expected, abs=1e-5)
    verifier = [1.0, 0.0, 0.0, 1.0]
    assert [r["reward"] for r in rows] == pytest.approx([v + 0.5 * s for v, s in zip(verifier, expected)], abs=1e-5)
    # process view: the verifier's step labels, plus the whole score on the last step
    assert rows[1]["step_rewards"] == pytest.approx([1.0, 0.0, 0.5 * expected[1]], abs=1e-5)
    with pytest.raises(RewardError, match="'helpfulness' is configured but its model was not given"):
        score_rollouts(table, cfg, tokenizer=policy_tok)


def test_the_workspace_loads_a_model_once(saved_rm):
    folder, _, _ = saved_rm
    workspace, cfg = Workspace(), PipelineConfig()
    source = RewardSource(name="helpfulness", model=str(folder))
    first = workspace.pretrained_reward_model(source, cfg)
    assert workspace.pretrained_reward_model(RewardSource(name="other_label", model=str(folder)), cfg) is first


def test_a_chat_template_renders_the_prompt_as_the_user_turn():
    tok = build_tokenizer(VOCAB_WORDS)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
    rm = PretrainedRewardModel(model=None, tokenizer=tok)
    assert rm.chat
    assert rm.texts(["Question: 2+2?\nAnswer:\n"], ["#### 4"]) == ["<user>Question: 2+2?\nAnswer:\n|<assistant>#### 4|"]


def test_loading_errors_are_one_line_naming_the_source(tmp_path):
    tok = rm_tokenizer()
    tiny_classifier(tok, num_labels=2).save_pretrained(tmp_path / "two")
    tok.save_pretrained(tmp_path / "two")
    with pytest.raises(RewardModelLoadError) as err:
        load_pretrained_reward_model(RewardSource(name="helpfulness", model=str(tmp_path / "two")))
    assert str(err.value) == (f"reward source 'helpfulness': model '{tmp_path / 'two'}': has 2 labels; a reward "
                              "model gives one score (num_labels: 1)")
    with pytest.raises(UserError) as err:
        load_pretrained_reward_model(RewardSource(name="helpfulness", model=str(tmp_path / "missing")))
    assert str(err.value) == f"reward source 'helpfulness': model: {tmp_path / 'missing'}: no such folder"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "broken" / "tokenizer.json").write_text("{}")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"")
    with pytest.raises(RewardModelLoadError, match=r"^reward source 'helpfulness': model '.*broken': cannot load its "
                                                   r"config \(\w+Error: [^\n]*\)$"):
        load_pretrained_reward_model(RewardSource(name="helpfulness", model=str(tmp_path / "broken")))


class FailsOn39(PretrainedRewardModel):
    """Raises on any batch holding the completion that answers 39; NaN for the one that answers 35."""

    def score(self, texts):
        if any("39" in t for t in texts):
            raise RuntimeError("sequence too long")
        return [float("nan") if "35" in t else s for t, s in zip(texts, super().score(texts))]


def test_a_failing_row_is_named_and_follows_on_error(tiny, saved_rm):
    _, policy_tok = tiny
    folder, model, tok = saved_rm
    table = rollout_table(rollout_rows(policy_tok, COMPLETIONS, question_id="q7"))
    source = {"name": "helpfulness", "model": str(folder), "batch_size": 4}
    rm = load_pretrained_reward_model(RewardSource(**source))
    flaky = {"helpfulness": FailsOn39(rm.model, rm.tokenizer)}
    with pytest.raises(RewardError, match=r"^reward source 'helpfulness' failed on question_id='q7' sample_index=1: "
                                          r"non-finite score nan \(and 1 more rows\)$"):
        score_rollouts(table, RewardConfig(sources=[source]), tokenizer=policy_tok, pretrained=flaky)
    rows = score_rollouts(table, RewardConfig(sources=[{"name": "verifier"}, source], on_error="zero"),
                          tokenizer=policy_tok, pretrained=flaky).to_pylist()
    prompt = rows[0]["prompt"]
    expected = direct_scores(model, tok, [prompt + COMPLETIONS[0], prompt + COMPLETIONS[3]])
    assert [r["reward_helpfulness"] for r in rows] == pytest.approx([expected[0], 0.0, 0.0, expected[1]], abs=1e-5)
    assert [r["reward_errors"] for r in rows] == [[], ["helpfulness"], ["helpfulness"], []]
