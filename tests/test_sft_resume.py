"""A resumable SFT warm start: stopped at a checkpoint and resumed, SFT ends with the same weights, to
the bit, as a run never stopped; in models.sft.train_sft (no I/O: the checkpoint in memory) and in
stages.prepare.initial_policy across a SIGKILL (GRPO_CRASH_AT=sft@n). The SFT control
(continue_sft) is written once, atomically, and a resumed run takes it as it is."""
import copy
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from configs import load_config
from models.loading import load_policy
from models.sft import sft_batches, sft_optimizer, train_sft
from stages import prepare

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

SFT = dict(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, seed=0)
# Small model and data: the test is about bits, not learning.
OVERRIDES = ["data.train_size=40", "data.test_size=8", "sft.steps=6", "sft.checkpoint_every=2", "sft.batch_size=4",
             "sft.warmup_steps=2", "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
             "model.tiny.intermediate_size=64"]


class Stop(Exception):
    pass


def _examples(tok):
    return [(tok(f"Question: {a}+{b}\nAnswer:\n")["input_ids"],
             tok(f"{a}+{b}={a + b}\n#### {a + b}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            for a in range(3) for b in range(3)]


def test_sft_batches_are_shuffled_epochs_and_a_batch_may_straddle_two():
    # random.Random(0) shuffles [0, 1, 2] into [0, 2, 1], then [2, 1, 0]: the second batch takes the
    # first epoch's last index and the second epoch's first.
    assert list(itertools.islice(sft_batches(3, 2, seed=0), 3)) == [[0, 2], [1, 2], [1, 0]]


def test_train_sft_resumed_from_an_in_memory_checkpoint_gives_the_same_weights(tiny_dir):
    model, tok = load_policy(str(tiny_dir))
    examples = _examples(tok)
    calls = []
    full = train_sft(model, examples, pad_id=tok.pad_token_id, checkpoint_every=2,
                     on_checkpoint=lambda step, opt: calls.append(step), **SFT)
    assert calls == [2, 4]  # not after the last step: the caller saves the result then

    stopped, _ = load_policy(str(tiny_dir))
    saved = {}

    def checkpoint_then_die(step, opt):
        if step == 4:
            saved.update(step=step, weights=copy.deepcopy(stopped.state_dict()),
                         optimizer=copy.deepcopy(opt.state_dict()))
            raise Stop

    with pytest.raises(Stop):
        train_sft(stopped, examples, pad_id=tok.pad_token_id, checkpoint_every=2, on_checkpoint=checkpoint_then_die,
                  **SFT)
    resumed, _ = load_policy(str(tiny_dir))
    resumed.load_state_dict(saved["weights"])
    optimizer = sft_optimizer(resumed, SFT["lr"])
    optimizer.load_state_dict(saved["optimizer"])
    rest = train_sft(resumed, examples, pad_id=tok.pad_token_id, optimizer=optimizer, start_step=saved["step"], **SFT)
    assert rest == full[4:]
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.state_dict()["model.norm.weight"], saved["weights"]["model.norm.weight"])


def _run_in_subprocess(code: str, crash_at: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRPO_CRASH_AT": crash_at}
    script = "import sys, torch; torch.set_num_threads(1)\nfrom configs import load_config\n" + code
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_a_killed_warm_start_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    whole = prepare.initial_policy(load_config(None, [f"storage.artifacts_root={tmp_path / 'whole'}", *OVERRIDES]))

    cfg = load_config(None, [f"storage.artifacts_root={tmp_path / 'killed'}", *OVERRIDES])
    killed = _run_in_subprocess("from stages.prepare import initial_policy\n"
                                "initial_policy(load_config(None, sys.argv[1:]))",
                                "sft@2", f"storage.artifacts_root={tmp_path / 'killed'}", *OVERRIDES)
    assert killed.returncode == -9, killed.stderr[-2000:]
    out = prepare._sft_dir(cfg)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists()
    assert [p.name for p in (partial / "checkpoints").iterdir()] == ["step=4"]  # step=2 removed once 4 was in
    progress = json.loads((partial / "checkpoints" / "step=4" / "sft_progress.json").read_text())
    assert progress["step"] == 4 and progress["seconds"] > 0

    resumed = prepare.initial_policy(cfg)
    assert resumed == out and not partial.exists() and not (out / "checkpoints").exists()
    meta = json.loads((out / "sft.json").read_text())
    assert meta["steps"] == 6 and meta["final_loss"] == json.loads((whole / "sft.json").read_text())["final_loss"]
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_sft_control_is_written_once_and_a_resumed_run_keeps_it(tmp_path, monkeypatch):
    cfg = load_config(None, [f"storage.artifacts_root={tmp_path}", *OVERRIDES])
    start = prepare.initial_policy(cfg)
    control = tmp_path / "control"
    killed = _run_in_subprocess("from pathlib import Path\nfrom stages.prepare import continue_sft\n"
                                "continue_sft(load_config(None, sys.argv[3:]), sys.argv[1], 0.5, Path(sys.argv[2]))",
                                "sft_control", str(start), str(control), f"storage.artifacts_root={tmp_path}",
                                *OVERRIDES)
    assert killed.returncode == -9, killed.stderr[-2000:]  # killed just after the control was saved
    assert json.loads((control / "sft.json").read_text())["source"] == str(start)
    assert not control.with_name("control.partial").exists()
    before = _weights(control)

    def train_again(*args, **kwargs):
        raise AssertionError("the control was trained again")

    monkeypatch.setattr(prepare, "train_sft", train_again)
    assert prepare.continue_sft(cfg, start, 0.5, control) == control
    after = _weights(control)
    assert all(torch.equal(before[k], after[k]) for k in before)
