"""What SFT learns from: the first `sft.examples` worked solutions of the train split."""
from pathlib import Path

from configs import load_config
from models.loading import load_tokenizer
from problems.datasets import read_problems
from stages.prepare import prepare_data, sft_examples

ROOT = Path(__file__).resolve().parents[1]


def test_sft_examples_are_the_first_n_solutions_and_all_by_default(tiny_dir, tmp_path):
    tok = load_tokenizer(str(tiny_dir))
    cfg = load_config(ROOT / "configs/demo.yaml", [f"storage.artifacts_root={tmp_path}", "data.train_size=40",
                                                   "data.test_size=8", "sft.examples=7", "sft.answer_only_fraction=0"])
    train = read_problems(prepare_data(cfg)[0])
    some = sft_examples(cfg, tok)
    assert len(some) == 7
    for (prompt, target), problem in zip(some, train):
        assert tok.decode(target[:-1]) == problem["solution"] and target[-1] == tok.eos_token_id
        assert tok.decode(prompt).endswith("\nAnswer:\n")
    every = sft_examples(cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"examples": None})}), tok)
    assert len(every) == len(train) == 40


def test_answer_only_fraction_cuts_that_share_of_solutions_to_their_answer_line_the_same_way_each_time(tiny_dir,
                                                                                                       tmp_path):
    tok = load_tokenizer(str(tiny_dir))
    cfg = load_config(ROOT / "configs/demo.yaml", [f"storage.artifacts_root={tmp_path}", "data.train_size=400",
                                                   "data.test_size=8", "sft.answer_only_fraction=0.6"])
    train = read_problems(prepare_data(cfg)[0])
    targets = [tok.decode(t[:-1]) for _, t in sft_examples(cfg, tok)]
    terse = [t == f"#### {p['answer']}" for t, p in zip(targets, train)]
    assert all(t == p["solution"] for t, p, short in zip(targets, train, terse) if not short)
    assert 0.5 < sum(terse) / len(terse) < 0.7  # 240 expected of 400, binomial sd ~10
    assert targets == [tok.decode(t[:-1]) for _, t in sft_examples(cfg, tok)]
