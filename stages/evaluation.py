"""Held-out evaluation: greedy accuracy, plus Pass@K and Maj@K from K samples per question.

    evaluate(model, tokenizer, problems, prompt_cfg, max_new_tokens=..., k=8, temperature=1.0, sample_questions=64,
             last_number=False, batch_size=256) -> Evaluation

Greedy accuracy is `stages.prepare.greedy_accuracy` on all `problems`. Pass@K (`pass_at_<K>`: some sample is
right) and Maj@K (`maj_at_<K>`: the majority-vote final answer is right, self-consistency) use K samples at
`temperature` for each of the first `sample_questions` problems (a fixed subset, so numbers from
different checkpoints are comparable), seeded. Answers are the verifier's normalised final
answers (`problems.verify.extract_answer`); samples without one do not vote. The result is an
`Evaluation`; `Evaluation.metrics()` is its MLflow view (`accuracy`, `maj_at_<K>`, `pass_at_<K>`, ...).
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from models.eval_metrics import maj_at_k, mean_pass_at_k_unbiased, pass_at_k
from models.generation import sample_completions
from problems.prompts import encode_prompts, stop_marker
from problems.verify import canonical_answer, extract_answer
from stages.prepare import greedy_accuracy


@torch.no_grad()
def sampled_metrics(model, tokenizer, problems: list[dict], prompt_cfg, *, k: int, max_new_tokens: int,
                    temperature: float = 1.0, seed: int = 0, batch_size: int = 256, last_number: bool = False) -> dict:
    """Pass@K, Maj@K, pass@1 (unbiased, from the same K samples) and the mean sample accuracy."""
    was_training = model.training
    model.eval()
    _, prompts = encode_prompts(tokenizer, [p["question"] for p in problems], prompt_cfg)
    outs = sample_completions(model, tokenizer, prompts, n=k, max_new_tokens=max_new_tokens, temperature=temperature,
                              batch_size=batch_size, seed=seed,
                              stop_marker=stop_marker(tokenizer, prompt_cfg))
    model.train(was_training)
    texts = tokenizer.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
    answers = [[extract_answer(t, last_number=last_number) for t in texts[i * k:(i + 1) * k]]
               for i in range(len(problems))]
    truth = [canonical_answer(str(p["answer"])) for p in problems]
    correct = [[a is not None and a == t for a in row] for row, t in zip(answers, truth)]
    return {
        f"pass_at_{k}": pass_at_k(correct),
        f"maj_at_{k}": maj_at_k(answers, truth),
        "pass_at_1": mean_pass_at_k_unbiased(correct, 1),
        "sample_k": float(k),
        "sample_questions": float(len(problems)),
    }


class Evaluation(BaseModel):
    """One held-out evaluation. `k` is 0 (and the sampled scores None) when nothing was sampled."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    accuracy: float       # greedy, on all n questions
    answered: float       # share of greedy answers with an answer line
    mean_length: float    # greedy completion tokens
    n: int
    k: int = 0
    sample_questions: int = 0
    maj_at_k: float | None = None
    pass_at_k: float | None = None
    pass_at_1: float | None = None

    def metrics(self) -> dict[str, float]:
        """The MLflow view: greedy keys, plus maj_at_<K>, pass_at_<K>, pass_at_1 when sampled."""
        out = {"accuracy": self.accuracy, "answered": self.answered, "mean_length": self.mean_length, "n": float(self.n)}
        if self.k:
            out.update({f"maj_at_{self.k}": self.maj_at_k, f"pass_at_{self.k}": self.pass_at_k,
                        "pass_at_1": self.pass_at_1, "sample_k": float(self.k),
                        "sample_questions": float(self.sample_questions)})
        return out

    def describe(self) -> str:
        """One evaluation in words, for the log."""
        sampled = (f"; Maj@{self.k} {self.maj_at_k:.3f}, Pass@{self.k} {self.pass_at_k:.3f} on the first "
                   f"{self.sample_questions}") if self.k else ""
        return f"greedy accuracy {self.accuracy:.3f} on {self.n} held-out questions{sampled}"


def evaluate(model, tokenizer, problems: list[dict], prompt_cfg, *, max_new_tokens: int, k: int = 8,
             temperature: float = 1.0, sample_questions: int = 64, seed: int = 0, last_number: bool = False,
             batch_size: int = 256) -> Evaluation:
    """Greedy accuracy on `problems`, Pass@K / Maj@K on the first `sample_questions` of them.
    `prompt_cfg`: a `PromptConfig`; `batch_size`: rows per generate call."""
    greedy = greedy_accuracy(model, tokenizer, problems, prompt_cfg, max_new_tokens=max_new_tokens,
                             last_number=last_number, batch_size=batch_size)
    if k == 0 or sample_questions == 0:
        return Evaluation(**greedy)
    s = sampled_metrics(model, tokenizer, problems[:sample_questions], prompt_cfg, k=k, max_new_tokens=max_new_tokens,
                        temperature=temperature, seed=seed, batch_size=batch_size, last_number=last_number)
    return Evaluation(**greedy, k=k, sample_questions=int(s["sample_questions"]), maj_at_k=s[f"maj_at_{k}"],
                      pass_at_k=s[f"pass_at_{k}"], pass_at_1=s["pass_at_1"])
