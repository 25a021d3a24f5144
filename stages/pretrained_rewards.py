"""A pretrained reward model as a reward source: `reward.sources: [{name: helpfulness, model: <path or hub id>}]`.

The model is any `AutoModelForSequenceClassification` with one label (a Bradley-Terry reward model,
e.g. Skywork-Reward, or one trained with TRL's RewardTrainer); its raw logit is the score. What it reads
is the rollout table's rendered policy prompt followed by the completion:
- the RM's tokenizer has a chat template: the conversation [user: the prompt text, assistant: the
  completion] rendered with it (the table keeps no raw question, so under a chat policy the user turn is
  the policy's rendered prompt, its template markup included);
- no template: the prompt text and the completion text, joined as they were sampled.
Texts are padded on the right, so a row scores the same alone or in a batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from configs.schema import RewardSource, UserError
from models.loading import DTYPES, check_model_source


class RewardModelLoadError(UserError):
    """A pretrained reward source's model cannot be loaded or is not a one-label classifier."""


class PretrainedRewardModel:
    """A loaded sequence-classification reward model and its tokenizer, scoring (prompt, completion) texts."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def texts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
        """What the model reads for each row (module docstring)."""
        if not self.chat:
            return [p + c for p, c in zip(prompts, completions)]
        return [self.tokenizer.apply_chat_template([{"role": "user", "content": p},
                                                    {"role": "assistant", "content": c}], tokenize=False)
                for p, c in zip(prompts, completions)]

    @torch.inference_mode()
    def score(self, texts: Sequence[str]) -> list[float]:
        """One raw logit per text, in one forward pass. A rendered chat text already holds the template's
        special tokens, so the tokenizer adds none (as problems.prompts does for chat prompts)."""
        batch = self.tokenizer(list(texts), padding=True, return_tensors="pt", add_special_tokens=not self.chat)
        logits = self.model(**batch.to(self.model.device)).logits
        return logits[:, 0].float().tolist()


def load_pretrained_reward_model(source: RewardSource, *, device: str = "cpu",
                                 dtype: str = "float32") -> PretrainedRewardModel:
    """The model of `source` (a source with `model` set), in eval mode on `device`, its weights in `dtype`.
    Every failure is one line naming the source and the model."""
    where = f"reward source {source.name!r}: model {source.model!r}"
    check_model_source(source.model, field=f"reward source {source.name!r}: model")
    try:
        config = AutoConfig.from_pretrained(source.model, trust_remote_code=source.trust_remote_code)
    except Exception as err:  # noqa: BLE001 -- any loading failure is the source's problem to the user
        raise RewardModelLoadError(f"{where}: cannot load its config ({_first_line(err)})") from err
    if config.num_labels != 1:
        raise RewardModelLoadError(f"{where}: has {config.num_labels} labels; a reward model gives one score "
                                   "(num_labels: 1)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.model, trust_remote_code=source.trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            source.model, config=config, dtype=DTYPES[dtype], trust_remote_code=source.trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise RewardModelLoadError(f"{where}: cannot load ({_first_line(err)})") from err
    if tokenizer.pad_token is None:  # as TRL does: pad with EOS, which the right padding puts after the text
        if tokenizer.eos_token is None:
            raise RewardModelLoadError(f"{where}: its tokenizer has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    # The model finds each row's last token as the last one that is not pad_token_id: it must be the
    # tokenizer's pad, or a batch pads with a token the model reads as text.
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"  # positions of the text's tokens do not depend on the batch's longest row
    return PretrainedRewardModel(model.to(device).eval(), tokenizer)


def pretrained_scores(rm: PretrainedRewardModel, prompts: Sequence[str], completions: Sequence[str],
                      batch_size: int) -> tuple[list[float], dict[int, str]]:
    """Per-row scores (0.0 where the row failed) and {row: error message}; a failing batch is retried row by
    row so the failure is pinned to a row, and a non-finite score is an error of its row."""
    texts = rm.texts(prompts, completions)
    scores = [0.0] * len(texts)
    errors: dict[int, str] = {}
    for s in range(0, len(texts), batch_size):
        idx = list(range(s, min(s + batch_size, len(texts))))
        try:
            for i, v in zip(idx, rm.score([texts[i] for i in idx]), strict=True):
                scores[i] = v
        except Exception:  # noqa: BLE001 -- attribute to a row below
            for i in idx:
                try:
                    scores[i] = rm.score([texts[i]])[0]
                except Exception as err:  # noqa: BLE001
                    errors[i] = f"{type(err).__name__}: {err}"
    for i, v in enumerate(scores):
        if i not in errors and not math.isfinite(v):
            errors[i], scores[i] = f"non-finite score {v}", 0.0
    return scores, errors


def _first_line(err: Exception) -> str:
    """`err` on one line: transformers' loading errors run over several."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"
