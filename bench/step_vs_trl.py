"""Seconds per GRPO step: this pipeline's update path against TRL's GRPOTrainer, plus the cost of
running the same steps through the Prefect flow with MLflow logging.

    bash scripts/trl_venv.sh                      # once: .venv-trl (torch 2.13.0 CPU, then trl 1.16.0)
    .venv/bin/python bench/step_vs_trl.py         # --threads 1 (default), both parts, writes BENCHMARKS.md

Part 1, the race (one invocation, same machine, same thread setting and OMP_WAIT_POLICY on both sides,
each round runs ours then TRL so a change of machine load hits both), in two precisions per side:
fp32 (ours: no autocast, SDPA attention; TRL: no bf16) and bf16 (ours: `model.autocast: bfloat16` with
eager attention, the demo's setting; TRL: `--bf16`, GRPOConfig's bf16 autocast):
- TRL: /work/shared/peers/trl_cpu_step.py run as a subprocess by .venv-trl/bin/python (GRPOTrainer on a
  randomly initialised Qwen2, hidden 128, 4 layers, 4 heads, intermediate 512, untied, char vocab 99;
  8 prompts x G=8, max 32 new tokens, beta 0.04, loss_type grpo, no gradient checkpointing).
- ours: the SAME model (same Qwen2Config, same seed, same character tokenizer, the peer's code copied
  here), the same additions as prompts (ours "Question: a+b\nAnswer:\n" via plain_prompt, <= 24 tokens;
  TRL "What is a+b? Answer:", <= 22), through this pipeline's stage functions on in-memory tables,
  one step =
    stages.sampling.sample_groups (HFSampler: generate with per-token sampler log-probs -> rollout table)
    -> stages.rewards.score_rollouts (the rule verifier) -> stages.advantages.compute_advantages
    -> the step's one Parquet write (write_atomic, as the flow's RunJournal.save_rollouts)
    -> stages.advantages.update_batch
    -> grpo_update (reference forward, policy forward+backward, clip, AdamW; mu=1, beta 0.04,
       sequence aggregation = TRL's loss_type "grpo", lr 1e-6, weight decay 0).
  No checkpoint is written (TRL's side saves nothing either; the flow's per-step save is in part 2).
  Phases are timed by wrapping, not editing: HFSampler.sample (generation), the trainer's
  frozen_logprobs (reference forward), its completion_logprobs with grad (policy forward), optimizer
  step hooks (AdamW); the rest of grpo_update is loss + backward + grad clip.
  A random-init model emits EOS with probability ~1/99 per token, so some rows end early on both sides,
  but generate runs all 32 decoding steps on both sides and both train on a [64, 32] completion tensor
  (padding masked); mean completion lengths are reported.

Part 2, orchestration overhead, at the demo's shapes (configs/demo.yaml: tiny Llama, 8 questions x G=8,
48 new tokens, beta 0.04, its `model.autocast: auto` (bf16 only where the CPU multiplies it natively)
and eager attention, a checkpoint saved every step; rewards from the verifier alone, since no RM is
trained here; `--flow-set key=value` overrides) on a throwaway artifacts root (tmp dir, SQLite MLflow,
PREFECT_HOME in the tmp dir):
- flow: the real `flows.iterative_grpo.grpo_iteration` Prefect flow for M = steps + 1 steps: its tasks
  sample_groups, score_rollouts, compute_advantages, grpo_update (tables passed in memory, no result
  caching), the step's one Parquet write (RunJournal.save_rollouts), then RunJournal.end_step:
  rollout_metrics, a commit (metrics ledger + state.json), the metrics queued for MLflow, checkpoint
  pruning, the log line. Per-step time = the gap between consecutive returns of end_step (one full loop
  iteration; the first step, which loads the model, is the +1 left out). The Prefect server start is
  excluded (a trivial flow runs first); the iteration's final evaluation is after the last step and not
  timed.
- plain: the same task bodies (`task.fn`: same workspace cache, same stage functions, same checkpoint
  saves) and the same one Parquet write, same questions and seeds, in a plain loop (step 0 left out the
  same way). Both start from the same untrained tiny checkpoint (models.tiny.save_tiny; no SFT needed
  for timing) and are deterministic at 1 thread, so they do identical work (checked: same rewards and
  lengths).
Overhead, two ways: directly, inside the flow, as each step's wall time minus its work (the four task
bodies, wrapped `task.fn`, and the Parquet write), which noise in the work itself does not blur; and as
the A/B flow / plain per step, which on a shared machine moves by more than the overhead between runs.
The commit, MLflow queueing, rollout_metrics and pruning are timed by wrappers; a no-op task with the
step tasks' options and arguments gives the price of one task run. Rounds alternate plain and flow
(default 3), each with the load average before and after, so the spread between rounds is reported.

Part 1 at a real model's shape (`--pretrained DIR`, e.g. artifacts/models/smollm2-135m-instruct; the
orchestration part is then not run): the same race with that pretrained chat model on both sides, float32
(no bf16 matmul units on this CPU: bf16 autocast would be emulated), full fine-tuning, defaults 4 questions
x G=4, 128 new tokens, threads 2, 2 rounds of 4 steps per side (1 warm-up). Questions: the built-in word
problems (1-2 steps, operands <= 20), given to the peer as GSM8K JSONL with `--chat`; ours asks the very
same user message (question + the peer's instruction) through the same chat template, checked token for
token. Ours: the policy, AdamW and reference from the flow's workspace (tasks.workspace.WORKSPACE), its
HFSampler with the '####' stop marker off (both sides stop rows at EOS only), then OurSide.step. TRL: the
unedited peer run through a few wrapper lines (TRL_WRAPPER) that also time its optimizer step.

`--json FILE` keeps every raw timing; `--pretrained DIR --from-json FILE` renders (and writes) the real-model
section again from such a dump without running anything.

Writes the "## GRPO step: this pipeline vs TRL GRPOTrainer" section of BENCHMARKS.md: only the parts that
ran (`--skip-race`: the orchestration part alone; `--skip-flow`: the race alone), the other kept.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import re
import shlex
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PEER = ROOT.parent / "shared" / "peers" / "trl_cpu_step.py"  # ../shared beside the checkout


def shown(cmd: str) -> str:
    """A command as the report shows it: paths relative to the checkout (the peer as ../shared/...)."""
    return cmd.replace(str(ROOT.parent / "shared"), "../shared").replace(str(ROOT) + "/", "")
SECTION = "## GRPO step: this pipeline vs TRL GRPOTrainer"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default=None, metavar="DIR",
                   help="the race at a real model's shape instead: this saved model+tokenizer folder (e.g. "
                        "artifacts/models/smollm2-135m-instruct) on both sides, chat prompts, float32 only; "
                        "the orchestration part is not run (defaults then: --threads 2 --G 4 --prompts-per-step 4 "
                        "--max-new-tokens 128 --steps 4 --warmup 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default 1; 2 with --pretrained)")
    p.add_argument("--sampling-threads", type=int, default=None,
                   help="--pretrained: ours' sampling.threads, the torch threads its sampler decodes on (default: "
                        "--threads); TRL's generate has no such setting")
    p.add_argument("--reference-while-sampling", action="store_true",
                   help="--pretrained: ours' grpo.reference_while_sampling (the reference scores the outputs on a "
                        "thread of its own while ours decodes; pair it with --sampling-threads 1)")
    p.add_argument("--omp-wait-policy", default=None,
                   help="set OMP_WAIT_POLICY (e.g. PASSIVE) for both sides; default: inherit the environment")
    p.add_argument("--steps", type=int, default=None,
                   help="race: steps per round per side (incl. warm-up; default 12, 4 with --pretrained)")
    p.add_argument("--warmup", type=int, default=None,
                   help="race: first steps of each round left out (default 2, 1 with --pretrained)")
    p.add_argument("--rounds", type=int, default=2, help="race: rounds, each ours then TRL")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--G", type=int, default=None, help="default 8 (4 with --pretrained)")
    p.add_argument("--prompts-per-step", type=int, default=None, help="default 8 (4 with --pretrained)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (128 with --pretrained)")
    p.add_argument("--num-prompts", type=int, default=256,
                   help="--pretrained: word problems in the pool both sides draw their questions from")
    p.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    p.add_argument("--flow-steps", type=int, default=12, help="orchestration: timed steps per round")
    p.add_argument("--flow-rounds", type=int, default=3, help="orchestration: rounds, each plain then flow")
    p.add_argument("--flow-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="orchestration: config overrides on top of configs/demo.yaml (e.g. model.autocast=none)")
    p.add_argument("--skip-race", action="store_true")
    p.add_argument("--skip-flow", action="store_true")
    p.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also dump all raw timings here")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="--pretrained: run nothing, render (and write) the section from a previous --json dump of "
                        "the same arguments")
    args = p.parse_args(argv)
    real = args.pretrained is not None
    for name, tiny, real_default in (("threads", 1, 2), ("steps", 12, 4), ("warmup", 2, 1), ("G", 8, 4),
                                     ("prompts_per_step", 8, 4), ("max_new_tokens", 32, 128)):
        if getattr(args, name) is None:
            setattr(args, name, real_default if real else tiny)
    if real:
        args.skip_flow = True  # the orchestration part is the demo's tiny model's
    return args


ARGS = parse_args()
if ARGS.omp_wait_policy:
    os.environ["OMP_WAIT_POLICY"] = ARGS.omp_wait_policy  # before torch / OpenMP start
TMP = Path(tempfile.mkdtemp(prefix="step_vs_trl_"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PREFECT_HOME"] = str(TMP / "prefect")  # throwaway Prefect DB + result storage

import tasks  # noqa: E402,F401  (before prefect: telemetry off, 120 s for the temporary server to start)

import torch  # noqa: E402

torch.set_num_threads(ARGS.threads)

import transformers  # noqa: E402

from configs import load_config  # noqa: E402
from models import trainer as trainer_mod  # noqa: E402
from models.samplers import HFSampler  # noqa: E402
from problems.prompts import encode_prompts  # noqa: E402
from stages import advantages as adv_stage, rewards as reward_stage, sampling as sample_stage  # noqa: E402
from stages.rollout_store import write_atomic  # noqa: E402


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def load_str():
    return "%.2f, %.2f, %.2f" % os.getloadavg()


def children_cpu_s():
    """CPU seconds used so far by this process's child processes (the temporary Prefect server)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # fields[1] = ppid; utime, stime = fields[11], fields[12]
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def cpu_model():
    match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return match.group(1).strip() if match else platform.processor() or "unknown"


# ------------------------------------------------------------------------------------------------
# Part 1: the race. Model and tokenizer exactly as the peer builds them (its code, copied).
VOCAB_CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def build_char_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(VOCAB_CHARS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_qwen2(tokenizer, seed=0, hidden=128, layers=4, heads=4, max_prompt_len=32, max_new=32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=4 * hidden,
                      max_position_embeddings=max(256, 2 * (max_prompt_len + max_new)), tie_word_embeddings=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return Qwen2ForCausalLM(cfg)


def race_questions(n=256, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append({"id": f"add-{i}", "question": f"{a}+{b}", "solution": f"{a}+{b}={a + b}\n#### {a + b}",
                    "answer": str(a + b)})
    return out


class PhaseTimer:
    """Wraps (not edits) the functions whose time we want per phase."""

    def __init__(self):
        self.cur = defaultdict(float)
        self._orig_frozen = trainer_mod.frozen_logprobs
        self._orig_cl = trainer_mod.completion_logprobs
        self._orig_sample = HFSampler.sample
        self._orig_clip = trainer_mod.clip_and_step
        timer = self

        def frozen(*a, **k):
            t = time.perf_counter()
            try:
                return timer._orig_frozen(*a, **k)
            finally:
                timer.cur["ref_fwd"] += time.perf_counter() - t

        def cl(*a, **k):
            if not k.get("with_grad"):
                return timer._orig_cl(*a, **k)
            t = time.perf_counter()
            try:
                return timer._orig_cl(*a, **k)
            finally:
                timer.cur["policy_fwd"] += time.perf_counter() - t

        def sample(self_, *a, **k):
            t = time.perf_counter()
            try:
                return timer._orig_sample(self_, *a, **k)
            finally:
                timer.cur["generate"] += time.perf_counter() - t

        def clip_step(*a, **k):  # grad-norm clip + the optimizer step (timed on its own by the hooks)
            t = time.perf_counter()
            try:
                return timer._orig_clip(*a, **k)
            finally:
                timer.cur["clip_step"] += time.perf_counter() - t

        trainer_mod.frozen_logprobs = frozen
        trainer_mod.completion_logprobs = cl
        trainer_mod.clip_and_step = clip_step
        HFSampler.sample = sample

    def hook_optimizer(self, opt):
        def pre(*_):
            self._t_opt = time.perf_counter()

        def post(*_):
            self.cur["adamw"] += time.perf_counter() - self._t_opt

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)

    def restore(self):
        trainer_mod.frozen_logprobs = self._orig_frozen
        trainer_mod.completion_logprobs = self._orig_cl
        trainer_mod.clip_and_step = self._orig_clip
        HFSampler.sample = self._orig_sample


PRECISIONS = {  # ours: model.autocast / model.attn_implementation; TRL: its --bf16 flag
    "fp32": (["model.autocast=none", "model.attn_implementation=sdpa"], []),
    "bf16": (["model.autocast=bfloat16", "model.attn_implementation=eager"], ["--bf16"]),
}


class OurSide:
    def __init__(self, args, precision: str, timer: "PhaseTimer"):
        self.args = args
        self.precision = precision
        cfg = load_config(ROOT / "configs" / "demo.yaml", PRECISIONS[precision][0] + 
                          [f"storage.artifacts_root={TMP / 'race'}", f"grpo.beta={args.beta}", "grpo.lr=1e-6",
                           "grpo.weight_decay=0.0", "grpo.mu=1", "grpo.aggregation=sequence",
                           f"sampling.group_size={args.G}", f"sampling.max_new_tokens={args.max_new_tokens}",
                           f"sampling.batch_size={args.G * args.prompts_per_step}", "sampling.temperature=1.0",
                           f"grpo.micro_batch_size={args.G * args.prompts_per_step}",
                           "reward.sources=[{name: verifier}]", "grpo.adv_scale=group"])
        self.cfg = cfg
        self.tok = build_char_tokenizer()
        self.model = build_qwen2(self.tok, max_new=args.max_new_tokens)
        self.model.set_attn_implementation(cfg.model.attn_implementation)
        self.model.eval()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.ref = copy.deepcopy(self.model).eval().requires_grad_(False) if args.beta > 0 else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.grpo.lr, weight_decay=cfg.grpo.weight_decay)
        self.sampler = HFSampler(self.model, self.tok, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                                 max_new_tokens=cfg.sampling.max_new_tokens, batch_size=cfg.sampling.batch_size,
                                 checkpoint="race-qwen2")
        self.timer = timer
        self.timer.hook_optimizer(self.opt)
        self.questions = race_questions()
        self.step_no = 0
        self.prompt_tokens = max(len(x) for x in encode_prompts(self.tok, [q["question"] for q in self.questions],
                                                                cfg.prompt)[1])

    def step(self):
        cfg, args, i = self.cfg, self.args, self.step_no
        self.step_no += 1
        qs = [self.questions[(i * args.prompts_per_step + k) % len(self.questions)] for k in range(args.prompts_per_step)]
        out = TMP / "race" / self.precision / f"iteration=0/step={i}/part-0.parquet"  # per side, written once
        self.timer.cur = defaultdict(float)
        c0, t0 = time.process_time(), time.perf_counter()
        with cfg.model.compute():
            table = sample_stage.sample_groups(self.sampler, qs, cfg.prompt, group_size=args.G, seed=i, run_id="race",
                                               policy_version=i,
                                               reference=self.ref if cfg.grpo.reference_while_sampling else None)
        t1 = time.perf_counter()
        table = reward_stage.score_rollouts(table, cfg.reward, tokenizer=self.tok)
        t2 = time.perf_counter()
        table = adv_stage.compute_advantages(table, supervision="outcome", group_size=args.G, eps=cfg.grpo.adv_eps,
                                             scale=cfg.grpo.adv_scale)
        write_atomic(table, out)  # the step's one write, as the flow's RunJournal.save_rollouts does
        batch = adv_stage.update_batch(table)
        if not bool(batch.advantages.ne(0).any()):
            # A random-init model answers nothing right: every reward is 0 and our update would skip the batch
            # (flat_batch_skipped) while TRL still runs its loss. The update's cost does not depend on the
            # advantages' values, so a flat batch gets seeded noise and both sides do the same work.
            batch.advantages = torch.randn(batch.advantages.shape, generator=torch.Generator().manual_seed(i))
        t3 = time.perf_counter()
        g = cfg.grpo
        with cfg.model.compute():
            metrics = trainer_mod.grpo_update(self.model, self.opt, batch, pad_id=self.tok.pad_token_id,
                                              ref_model=self.ref, beta=g.beta, mu=g.mu, eps_low=g.eps_low,
                                              eps_high=g.eps_high, aggregation=g.aggregation, grad_clip=g.grad_clip,
                                              micro_batch_size=g.micro_batch_size)
        t4 = time.perf_counter()
        ph = dict(self.timer.cur)
        rec = {
            "wall": t4 - t0, "cpu": time.process_time() - c0, "load1": os.getloadavg()[0],
            "sample": t1 - t0, "generate": ph.get("generate", 0.0), "score": t2 - t1, "adv_write": t3 - t2,
            "update": t4 - t3, "ref_fwd": ph.get("ref_fwd", 0.0), "policy_fwd": ph.get("policy_fwd", 0.0),
            "adamw": ph.get("adamw", 0.0), "clip": ph.get("clip_step", 0.0) - ph.get("adamw", 0.0),
            "mean_len": sum(len(c) for c in batch.completion_ids) / len(batch.completion_ids),
            "gen_tokens": sum(len(c) for c in batch.completion_ids),
            "width": batch.width, "kl": metrics.get("kl", float("nan")),
            "flat": metrics.get("flat_batch_skipped", 0.0),
            "truncated": sum(table.column("truncated").to_pylist()) / len(batch.completion_ids),
            "reward": statistics.mean(table.column("reward").to_pylist()),
            "questions": [q["question"] for q in qs],
        }
        rec["sample_rest"] = rec["sample"] - rec["generate"]
        rec["bwd_loss_clip"] = rec["update"] - rec["ref_fwd"] - rec["policy_fwd"] - rec["adamw"]
        return rec


def run_trl(args, round_no, precision):
    js = TMP / f"trl_round{round_no}_{precision}.json"
    cmd = [args.trl_python, str(PEER), "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--beta", str(args.beta), "--G", str(args.G),
           "--prompts-per-step", str(args.prompts_per_step), "--max-new-tokens", str(args.max_new_tokens),
           "--model-dir", str(TMP / "trl_model"), "--out-dir", str(TMP / f"trl_out{round_no}"), "--json", str(js)] + PRECISIONS[precision][1]
    env = dict(os.environ)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"TRL peer failed (rc {proc.returncode}): {shlex.join(cmd)}")
    data = json.loads(js.read_text())
    head = [ln for ln in proc.stdout.splitlines() if ln.startswith(("versions:", "model:", "split:", "trl_step_s"))]
    steps = data["steps"][args.warmup:]
    for s in steps:
        s["bwd_opt"] = s["train"] - s["loss_fwd"]
        s["prepare_other"] = s["prepare"] - s["generate"] - s["ref_fwd"]
    return {"cmd": shlex.join(cmd), "steps": steps, "summary": data["summary"], "stdout_head": head,
            "process_wall": wall}


def race(args):
    if not Path(args.trl_python).exists():
        raise SystemExit(f"{args.trl_python} not found: run `bash scripts/trl_venv.sh` first")
    timer = PhaseTimer()
    sides = {p: OurSide(args, p, timer) for p in PRECISIONS}
    ours = sides["fp32"]
    print(f"ours: Qwen2 {ours.n_params / 1e6:.3f}M params, vocab {len(ours.tok)}, longest prompt "
          f"{ours.prompt_tokens} tok", flush=True)
    res = {"trl_runs": [], "load_before": load_str()}
    for r in range(args.rounds):
        for p, side in sides.items():
            kept = [side.step() for _ in range(args.steps)][args.warmup:]
            res.setdefault(f"ours_{p}", []).extend(kept)
            print(f"round {r + 1} ours {p}: median {med([s['wall'] for s in kept]):.3f} s/step (load {load_str()})",
                  flush=True)
        for p in PRECISIONS:
            trl = run_trl(args, r, p)
            res.setdefault(f"trl_{p}", []).extend(trl["steps"])
            res["trl_runs"].append({k: v for k, v in trl.items() if k != "steps"})
            print(f"round {r + 1} TRL {p}:  median {med([s['wall'] for s in trl['steps']]):.3f} s/step "
                  f"(load {load_str()})", flush=True)
    res["load_after"] = load_str()
    timer.restore()
    res["n_params"] = ours.n_params
    res["prompt_tokens"] = ours.prompt_tokens
    return res


# ------------------------------------------------------------------------------------------------
# Part 1, at a real model's shape (--pretrained DIR): a pretrained chat model on word problems.

def load_peer():
    """The TRL peer script as a module (stdlib imports only at its top), for its prompt instruction: both
    sides then ask the very same chat messages."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trl_cpu_step_peer", PEER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def real_questions(n: int, seed: int = 0) -> list[dict]:
    """The built-in word problems of 1-2 steps, operands <= 20 (configs/smollm2-cpu.yaml's difficulty)."""
    from problems.arithmetic import Difficulty, generate_problems

    return generate_problems(n, seed, Difficulty(min_steps=1, max_steps=2, max_operand=20))


class RealSide(OurSide):
    """Our side of the real-model race. The policy, its AdamW and the reference come from the flow's own
    workspace (tasks.workspace.WORKSPACE: policy_at loads the model with the config's load kwargs and builds
    the optimizer; reference_at is a deep copy of the live policy for a full fine-tune; sampler_for wraps the
    live model in an HFSampler), so a change there shows here. One step is OurSide.step: the pipeline's stage
    functions on the step's table in memory."""

    def __init__(self, args, timer: "PhaseTimer", questions: list[dict]):
        from tasks.workspace import WORKSPACE

        self.args, self.precision, self.timer = args, "real_fp32", timer
        self.cfg = cfg = load_config(ROOT / "configs" / "smollm2-cpu.yaml", [
            f"model.policy={args.pretrained}", "model.lora.enabled=false", "model.autocast=none",
            "model.dtype=float32", "model.attn_implementation=sdpa", "model.gradient_checkpointing=false",
            f"storage.artifacts_root={TMP / 'race'}", f"grpo.beta={args.beta}", "grpo.lr=1e-6",
            "grpo.weight_decay=0.0", "grpo.mu=1", "grpo.aggregation=sequence", "grpo.adv_scale=group",
            f"sampling.group_size={args.G}", f"sampling.max_new_tokens={args.max_new_tokens}",
            f"sampling.batch_size={args.G * args.prompts_per_step}", "sampling.temperature=1.0", "sampling.top_p=1.0",
            f"grpo.micro_batch_size={args.G * args.prompts_per_step}", "reward.sources=[{name: verifier}]",
            "prompt.format=chat", "prompt.instruction=null", "prompt.system=null", f"threads={args.threads}",
            f"sampling.threads={args.sampling_threads or 'null'}",
            f"grpo.reference_while_sampling={str(args.reference_while_sampling).lower()}"])
        ckpt = str(Path(args.pretrained).resolve())
        self.model, self.tok, self.opt = WORKSPACE.policy_at(ckpt, cfg)
        self.ref = WORKSPACE.reference_at(ckpt, cfg) if args.beta > 0 else None
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.sampler = WORKSPACE.sampler_for(cfg, self.model, self.tok)
        # both sides stop a row at EOS only: the flow's sampler also ends a row once its '####' answer line has
        # ended (models.generation.AnswerLineStop), which TRL does not do
        self.sampler.stop_marker = None
        self.timer.hook_optimizer(self.opt)
        self.questions = questions
        self.step_no = 0
        ids = encode_prompts(self.tok, [q["question"] for q in questions], cfg.prompt)[1]
        self.prompt_tokens = max(len(x) for x in ids)
        self.prompt_tokens_mean = statistics.mean(len(x) for x in ids)


# Run inside .venv-trl around the peer script (which is not edited): it adds the optimizer's step time to
# the peer's per-step record (global torch optimizer hooks; the outermost step only, in case a wrapper
# optimizer's step is hooked too) and keeps more of TRL's logged completion statistics.
TRL_WRAPPER = r"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("trl_cpu_step", sys.argv[1])
peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer)
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
stack = []
def pre(opt, args, kwargs):
    stack.append(time.perf_counter())
def post(opt, args, kwargs):
    t = stack.pop()
    if not stack:
        peer.TIMINGS.cur["optimizer"] += time.perf_counter() - t
register_optimizer_step_pre_hook(pre)
register_optimizer_step_post_hook(post)
KEYS = ("completions/max_length", "completions/min_length", "completions/clipped_ratio",
        "completions/mean_terminated_length", "reward_std", "frac_reward_zero_std")
make_callback = peer.make_callback
def make_callback_more():
    cb = make_callback()
    on_log = cb.on_log
    def log(args, state, control, logs=None, **kw):
        on_log(args, state, control, logs=logs, **kw)
        if logs and peer.TIMINGS.steps and "step_time" in logs:
            peer.TIMINGS.steps[-1].update({k: logs[k] for k in KEYS if k in logs})
    cb.on_log = log
    return cb
peer.make_callback = make_callback_more
asked = []  # each reward call's questions (the user message of each group's first row): TRL's order, to check
reward = peer.correctness_reward
def correctness_reward_recorded(prompts, completions, answer, **kw):
    asked.append([p[-1]["content"] if isinstance(p, list) else p for p in prompts])
    return reward(prompts, completions, answer, **kw)
peer.correctness_reward = correctness_reward_recorded
peer.main(sys.argv[2:])
if "--json" in sys.argv:
    import json
    path = sys.argv[sys.argv.index("--json") + 1]
    with open(path) as f:
        data = json.load(f)
    data["asked"] = asked
    with open(path, "w") as f:
        json.dump(data, f)
"""


def run_trl_real(args, round_no, jsonl: Path):
    js = TMP / f"trl_real_round{round_no}.json"
    peer_args = ["--pretrained", str(args.pretrained), "--prompts-jsonl", str(jsonl), "--chat",
                 "--num-prompts", str(args.num_prompts), "--max-prompt-len", "1024", "--threads", str(args.threads),
                 "--steps", str(args.steps), "--warmup", str(args.warmup), "--beta", str(args.beta), "--G", str(args.G),
                 "--prompts-per-step", str(args.prompts_per_step), "--max-new-tokens", str(args.max_new_tokens),
                 "--lr", "1e-6", "--loss-type", "grpo", "--out-dir", str(TMP / f"trl_real_out{round_no}"),
                 "--json", str(js)]
    cmd = [args.trl_python, "-c", TRL_WRAPPER, str(PEER)] + peer_args
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"TRL peer failed (rc {proc.returncode}): {shlex.join([args.trl_python, str(PEER)] + peer_args)}")
    data = json.loads(js.read_text())
    head = [ln for ln in proc.stdout.splitlines() if ln.startswith(("versions:", "model:", "ref_model:", "split:"))]
    steps = data["steps"][args.warmup:]
    for s, rows in zip(steps, data.get("asked", [])[args.warmup:]):
        s["questions"] = list(dict.fromkeys(rows))  # the step's questions, each group's once, in order
    for s in steps:
        s["prepare_other"] = s["prepare"] - s["generate"] - s["ref_fwd"]
        s["optimizer"] = s.get("optimizer", 0.0)
        s["bwd_clip"] = s["train"] - s["loss_fwd"] - s["optimizer"]  # backward, grad clip, zero_grad, scheduler
        s["mean_len"] = s.get("completions/mean_length", float("nan"))
        s["max_len"] = s.get("completions/max_length", float("nan"))
    return {"cmd": shlex.join([".venv-trl/bin/python", "-c", "<TRL_WRAPPER>", str(PEER)] + peer_args),
            "steps": steps, "summary": data["summary"], "stdout_head": head, "process_wall": wall}


def race_real(args):
    if not Path(args.trl_python).exists():
        raise SystemExit(f"{args.trl_python} not found: run `bash scripts/trl_venv.sh` first")
    peer = load_peer()
    problems = real_questions(args.num_prompts)
    jsonl = TMP / "word_problems.jsonl"  # GSM8K format: the peer reads `question` and the '#### N' line
    jsonl.write_text("".join(json.dumps({"question": q["question"], "answer": q["solution"]}) + "\n"
                             for q in problems))
    # ours asks exactly the user message the peer builds (question, newline, its instruction), through the
    # model's chat template with no system message of ours (SmolLM2's template adds its default one on both)
    questions = [{**q, "question": f"{q['question']}\n{peer.INSTRUCTION}"} for q in problems]
    # ours asks TRL's questions in TRL's order, so the two sides' steps are the same work but for what is sampled:
    # GRPOTrainer's RepeatSampler shuffles the pool by torch.randperm under GRPOConfig's seed (the peer's --seed,
    # 0), prompts_per_step a step, and each round's fresh TRL process starts that order again (checked below
    # against the questions TRL's reward function received)
    order = torch.randperm(len(questions), generator=torch.Generator().manual_seed(0)).tolist()
    timer = PhaseTimer()
    ours = RealSide(args, timer, [questions[j] for j in order[:args.steps * args.prompts_per_step]])
    # the same prompt tokens as TRL's (apply_chat_template(..., tokenize=True), as GRPOTrainer tokenizes)
    ours_ids = encode_prompts(ours.tok, [q["question"] for q in questions[:8]], ours.cfg.prompt)[1]
    trl_ids = [ours.tok.apply_chat_template([{"role": "user", "content": q["question"]}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"] for q in questions[:8]]
    same_prompts = ours_ids == trl_ids
    print(f"ours: {type(ours.model).__name__} {ours.n_params / 1e6:.1f}M params, vocab {len(ours.tok)}, prompts "
          f"{ours.prompt_tokens_mean:.0f} tok mean / {ours.prompt_tokens} max, same prompt tokens as TRL's: "
          f"{same_prompts}", flush=True)
    res = {"trl_runs": [], "load_before": load_str(), "same_prompts": same_prompts, "rounds": []}
    for r in range(args.rounds):
        load0 = load_str()
        kept = [ours.step() for _ in range(args.steps)][args.warmup:]
        res.setdefault("ours", []).extend(kept)
        print(f"round {r + 1} ours: median {med([s['wall'] for s in kept]):.2f} s/step, mean length "
              f"{statistics.mean(s['mean_len'] for s in kept):.1f} (load {load_str()})", flush=True)
        trl = run_trl_real(args, r, jsonl)
        res.setdefault("trl", []).extend(trl["steps"])
        res["trl_runs"].append({k: v for k, v in trl.items() if k != "steps"})
        print(f"round {r + 1} TRL:  median {med([s['wall'] for s in trl['steps']]):.2f} s/step, mean length "
              f"{statistics.mean(s['mean_len'] for s in trl['steps']):.1f} (load {load_str()})", flush=True)
        res["rounds"].append({"ours": med([s["wall"] for s in kept]), "trl": med([s["wall"] for s in trl["steps"]]),
                              "load_before": load0, "load_after": load_str()})
    res["load_after"] = load_str()
    res["same_questions"] = (len(res["ours"]) == len(res["trl"])
                             and all(o["questions"] == t.get("questions") for o, t in zip(res["ours"], res["trl"])))
    timer.restore()
    res.update(n_params=ours.n_params, prompt_tokens=ours.prompt_tokens, prompt_tokens_mean=ours.prompt_tokens_mean,
               model_type=type(ours.model).__name__, vocab=len(ours.tok),
               layers=ours.model.config.num_hidden_layers, hidden=ours.model.config.hidden_size,
               instruction=peer.INSTRUCTION, example_question=problems[0]["question"],
               ours_optim=f"{type(ours.opt).__name__}(foreach={ours.opt.defaults.get('foreach')}, "
                          f"fused={ours.opt.defaults.get('fused')})")
    return res


def real_race_lines(args, res, v, command):
    ours, trl = res["ours"], res["trl"]
    ok = [s for s in ours if not s["flat"]]  # a flat batch (all advantages 0) skips our update: not a like step
    wall_o, wall_t = med([s["wall"] for s in ok]), med([s["wall"] for s in trl])
    cpu_o, cpu_t = med([s["cpu"] for s in ok]), med([s["cpu"] for s in trl])
    ratio = wall_o / wall_t
    n = args.steps - args.warmup
    model = Path(args.pretrained).name
    L = [f"### The race at a real model's shape: {model}, chat prompts, float32, seconds per GRPO step", ""]
    L.append(f"`flock /tmp/cpu.lock {command}`" + (" (written here by the same command with `--from-json FILE`)"
                                                      if args.from_json else "") +
             f" (TRL venv: `bash scripts/trl_venv.sh`; the model: `make smollm2-model`). One invocation, both sides "
             f"on the same machine, torch threads {args.threads} on both"
             + (f" (ours decodes on {args.sampling_threads}: sampling.threads)" if args.sampling_threads else "")
             + (" (ours' reference scores the outputs on a thread of its own while ours decodes: "
                "grpo.reference_while_sampling; its last chunk's scoring is in ours' generation figure, and its "
                "reference forward figure is 0)" if args.reference_while_sampling else "") +
             f", OMP_WAIT_POLICY="
             f"{os.environ.get('OMP_WAIT_POLICY') or '(unset)'} on both; under the machine's lock for timed runs "
             f"(jobs that do not take it can still run beside it).")
    L.append("")
    L.append(machine_line(v, with_trl=True))
    L.append(f"- model: {model} ({res['model_type']}, {res['layers']} layers, hidden {res['hidden']}, vocabulary "
             f"{res['vocab']}, tied embeddings, {res['n_params'] / 1e6:.1f}M parameters), loaded from the same folder on "
             f"both sides in float32 with SDPA attention; full fine-tuning (no LoRA), no gradient checkpointing. "
             f"Precision float32 on both: this CPU has no bf16 matmul units (avx512_bf16/AMX), so bf16 autocast is "
             f"emulated here and several times slower than float32 (models.loading.native_bf16)")
    L.append(f"- batch: {args.prompts_per_step} questions x G={args.G} = {args.prompts_per_step * args.G} rows, at most "
             f"{args.max_new_tokens} new tokens, temperature 1, top-p 1, no top-k, rows stop at EOS only (ours: "
             f"HFSampler with no '####' stop marker, which the flow's sampler adds), beta {args.beta} (reference "
             f"forward included), mu 1, sequence-mean loss (TRL loss_type grpo), group-std scaled advantages, AdamW "
             f"lr 1e-6, weight decay 0, grad clip 1.0, the whole batch in one forward/backward on both sides "
             f"(ours micro_batch_size {args.prompts_per_step * args.G}; TRL per_device_train_batch_size "
             f"{args.prompts_per_step * args.G}, no accumulation)")
    L.append(f"- questions: {args.num_prompts} built-in word problems (problems.arithmetic.generate_problems, seed 0, "
             f"1-2 steps, operands <= 20), written as GSM8K JSONL for the peer (`--prompts-jsonl ... --chat`); "
             f"both sides send the same user message, the question then `{res['instruction']}` on the next line, "
             f"through the model's chat template (its default system line included): the prompts "
             f"{'ours asked' if 'same_questions' in res else 'of the pool'} "
             f"{res['prompt_tokens_mean']:.0f} tokens on average, at most {res['prompt_tokens']}; the token ids are "
             f"identical on both sides: {res['same_prompts']}. "
             + ("Both sides ask the same questions in the same order, TRL's: its RepeatSampler's shuffle "
                "(torch.randperm under GRPOConfig's seed 0), which each round's fresh TRL process starts again, so "
                "ours asks those questions again in each round; step by step the same as the questions TRL's reward "
                f"function received: {res['same_questions']}. "
                if "same_questions" in res else
                "Ours takes the questions in order, TRL's sampler draws them at random from the same pool. ")
             + f"Rewards: ours the rule verifier (`reward.verifier.last_number`), TRL "
             f"the peer's (answer string in the completion); rewards decide no time except that ours skips the "
             f"update of a batch whose advantages are all 0 ({sum(1 for s in ours if s['flat'])} of {len(ours)} "
             f"measured steps here; left out of the medians)")
    L.append(f"- protocol: {args.rounds} rounds, each ours then TRL (a fresh TRL process per round; its model loading "
             f"untimed), {args.steps} steps per side per round, the first {args.warmup} left out: {len(ok)} steps "
             f"ours, {len(trl)} TRL; medians. Load average {res['load_before']} before, {res['load_after']} after "
             f"(1, 5, 15 min)")
    L.append("")
    verdict = "target met" if ratio <= 0.6 else "target (<= 0.6) missed"
    L.append(f"- **ours {wall_o:.2f} s/step vs TRL GRPOTrainer {wall_t:.2f} s/step: ours/TRL = {ratio:.2f}** "
             f"({verdict}); CPU seconds per step {cpu_o:.2f} vs {cpu_t:.2f} ({cpu_o / cpu_t:.2f})")
    L.append("- per round (median ours vs TRL, ratio): " + "; ".join(
        f"round {i + 1}: {r['ours']:.2f} vs {r['trl']:.2f} ({r['ours'] / r['trl']:.2f}; load {r['load_before']} -> "
        f"{r['load_after']})" for i, r in enumerate(res["rounds"])))
    ml_o, ml_t = statistics.mean(s["mean_len"] for s in ours), statistics.mean(s["mean_len"] for s in trl)
    mx_o, mx_t = statistics.mean(s["width"] for s in ours), statistics.mean(s["max_len"] for s in trl)
    rows = args.prompts_per_step * args.G
    tps_o = med([s["gen_tokens"] / s["generate"] for s in ours])
    tps_t = med([s["mean_len"] * rows / s["generate"] for s in trl])
    dec_o = med([s["generate"] / s["width"] for s in ours]) * 1000
    dec_t = med([s["generate"] / s["max_len"] for s in trl]) * 1000
    L.append(f"- completions: mean length ours {ml_o:.1f}, TRL {ml_t:.1f} tokens; longest of the batch (= generate's "
             f"decoding steps and the width of the update's tensors) ours {mx_o:.1f}, TRL {mx_t:.1f} on average "
             f"(per-step means over the measured steps)")
    cap = args.max_new_tokens
    L.append(f"- rows that reached {cap} tokens without EOS: ours "
             f"{100 * statistics.mean(s['truncated'] for s in ours):.0f}%, TRL "
             f"{100 * statistics.mean(s.get('completions/clipped_ratio', float('nan')) for s in trl):.0f}%; steps "
             f"whose longest row ran to {cap}: ours {sum(s['width'] >= cap for s in ours)} of {len(ours)}, TRL "
             f"{sum(s['max_len'] >= cap for s in trl)} of {len(trl)} (in those both sides ran all {cap} decoding "
             f"steps and trained on [{rows}, {cap}] completion tensors: the same shapes)")
    L.append("- each measured step in order, wall s (CPU s): ours " +
             ", ".join(f"{s['wall']:.1f} ({s['cpu']:.0f})" for s in ours) + "; TRL " +
             ", ".join(f"{s['wall']:.1f} ({s['cpu']:.0f})" for s in trl) +
             f". Each round's TRL steps are steps {args.warmup + 1}-{args.steps} of a fresh process; ours run in "
             f"one process and one model throughout, so its round-{args.rounds} steps are steps "
             f"{(args.rounds - 1) * args.steps + args.warmup + 1}-{args.rounds * args.steps} of that model")
    L.append(f"- generation speed: ours {tps_o:.0f} completion tokens/s, {dec_o:.0f} ms per decoding step of "
             f"{rows} rows; TRL {tps_t:.0f} tokens/s, {dec_t:.0f} ms per decoding step (medians). Both sides run "
             f"generate until the batch's longest row ends, so the generation phase scales with the longest row and "
             f"the update with the padded width; medians over several steps of the same sampling settings and "
             f"rounds that alternate the sides are how the comparison is kept fair; the per-decoding-step and "
             f"per-token figures are the length-free comparison")
    L += ["", "Where the time goes (medians of each phase over the measured steps, s; % of that side's median step):",
          "", "| phase | ours | TRL |", "|---|---|---|"]
    phases = [
        ("generation (ours: HFSampler.sample, prefill shared by the G samples, inverse-CDF draw, per-token sampler "
         "log-probs; TRL: transformers.generate)", lambda s: s["generate"], lambda s: s["generate"]),
        ("rollout bookkeeping (ours: rollout table, decode, verifier, advantages, one Parquet write, update batch; "
         "TRL: tokenising, decode, rewards, advantages, padding)",
         lambda s: s["sample_rest"] + s["score"] + s["adv_write"], lambda s: s["prepare_other"]),
        ("reference forward (no grad)", lambda s: s["ref_fwd"], lambda s: s["ref_fwd"]),
        ("policy forward (ours: completion_logprobs with grad + entropy, each group's prompt once; TRL: "
         "compute_loss, loss included)",
         lambda s: s["policy_fwd"], lambda s: s["loss_fwd"]),
        ("backward + grad clip: the rest of the update (ours: + the loss; TRL: + zero_grad, scheduler, callbacks)",
         lambda s: s["bwd_loss_clip"], lambda s: s["bwd_clip"]),
        (f"AdamW step (ours: the workspace's {res['ours_optim']}; TRL: transformers' default optim "
         f"adamw_torch_fused)",
         lambda s: s["adamw"], lambda s: s["optimizer"]),
    ]
    for name, of_o, of_t in phases:
        a, b = med([of_o(s) for s in ok]), med([of_t(s) for s in trl])
        L.append(f"| {name} | {a:.2f} ({pct(a, wall_o)}) | {b:.2f} ({pct(b, wall_t)}) |")
    L.append(f"| whole step | {wall_o:.2f} | {wall_t:.2f} |")
    L.append("")
    L += real_race_reading(args, res, ok, trl, wall_o, wall_t)
    L.append("")
    L.append("TRL command run (one per round; `<TRL_WRAPPER>` is this bench's few lines that load the unedited peer "
             "script, add the optimizer step's time to its per-step record and keep more of TRL's logged completion "
             "statistics): `" + re.sub(r"\S*/step_vs_trl_[A-Za-z0-9_]+", "$TMP", shown(res["trl_runs"][-1]["cmd"])) + "`")
    return L


def real_race_reading(args, res, ours, trl, wall_o, wall_t):
    """The reading of the real-model race: what differs between the sides, and what would close the gap."""
    rows, cap = args.prompts_per_step * args.G, args.max_new_tokens
    m = {k: (med([f(s) for s in ours]), med([g(s) for s in trl])) for k, f, g in (
        ("gen", lambda s: s["generate"], lambda s: s["generate"]),
        ("ref", lambda s: s["ref_fwd"], lambda s: s["ref_fwd"]),
        ("fwd", lambda s: s["policy_fwd"], lambda s: s["loss_fwd"]),
        ("bwd", lambda s: s["bwd_loss_clip"], lambda s: s["bwd_clip"]))}
    upd_o = m["ref"][0] + m["fwd"][0] + m["bwd"][0]
    upd_t = m["ref"][1] + m["fwd"][1] + m["bwd"][1]
    full = all(s["width"] >= cap for s in ours) and all(s["max_len"] >= cap for s in trl)
    p_len = res["prompt_tokens_mean"]
    width = res["prompt_tokens"] + cap  # positions per row of the update's left-padded [prompt + completion]
    share_prefix = (args.G - 1) / args.G * p_len / width
    target = 0.6 * wall_t
    rounds = res["rounds"]
    L = ["Reading:", ""]
    L.append(f"- the work is alike: the same prompt tokens, the same sampling settings, mean completion lengths within "
             f"{abs(statistics.mean(s['mean_len'] for s in ours) - statistics.mean(s['mean_len'] for s in trl)):.1f} "
             f"tokens" + (f", and in every measured step of both sides one row ran to {cap} tokens, so both ran "
                          f"{cap} decoding steps and trained on [{rows}, {cap}] completion tensors" if full else "") +
             (". Ours is faster in every phase of the model arithmetic" if all(o < t for o, t in m.values()) else "")
             + "; the ratio is "
             f"{wall_o / wall_t:.2f} over all measured steps, {rounds[0]['ours'] / rounds[0]['trl']:.2f} in round 1 "
             f"(steps {args.warmup + 1}-{args.steps} of a freshly loaded model on both sides) and "
             + ", ".join(f"{r['ours'] / r['trl']:.2f}" for r in rounds[1:]) + " later"
             + (": ours got faster through its run (CPU seconds per step in order above) while TRL's fresh "
                "processes did not; this run does not tell whether that was the machine's other jobs or the age of "
                "ours' process" if rounds[-1]["ours"] / rounds[-1]["trl"] < rounds[0]["ours"] / rounds[0]["trl"] - 0.03
                else ""))
    L.append(f"- generation, {m['gen'][0]:.1f} vs {m['gen'][1]:.1f} s ({100 * m['gen'][0] / wall_o:.0f}% of ours): "
             f"the same generate loop on both sides; ours prefills each of the {args.prompts_per_step} prompts once "
             f"and shares its KV cache with its G={args.G} samples (models.generation.shared_prompt_cache), TRL "
             f"prefills all {rows} rows; ours draws each token by the inverse CDF (models.generation._DrawToken: "
             f"1.4 ms a step for [{rows}, {res['vocab']}]) where generate's torch.multinomial draws an exponential "
             f"per vocabulary entry (22 ms a step on this CPU), and ours also records each token's log-prob (one "
             f"log_softmax per decoding step). Ours' KV cache is a buffer allocated once per generate call and "
             f"written in place (models.kv_cache): transformers' DynamicLayer copies the whole cache with torch.cat "
             f"every decoding step (~15% of a step in an earlier profile of ours), and its pre-allocated "
             f"StaticCache was slower here (338 vs 287 ms a step for 16 rows and 128 new tokens: attention then "
             f"spans the whole allocated length every step). What is left is the model's arithmetic (~70% of a "
             f"decoding step in matrix multiplies, which at {rows} rows stream the weights from memory: measured "
             f"here, a step's products take as long at 4 rows as at 16, and on 1 thread as on 2) and "
             f"transformers' per-step work")
    L.append(f"- the update (reference forward + policy forward + backward), {upd_o:.1f} vs {upd_t:.1f} s "
             f"({upd_o / upd_t:.2f}): ours runs each group's prompt once, with or without a graph, and its "
             f"{args.G} rows continue from the shared KV cache (models.policy.completion_logprobs: prompts are "
             f"~{p_len:.0f} of the {width} positions of a row, so ~{100 * share_prefix:.0f}% fewer positions "
             f"through the {res['layers']} layers), in up to four runs of similar completion length, cut where the "
             f"padded positions plus each run's fixed cost (32 positions: the weights read again, another weight-"
             f"gradient product) add up least (models.policy.length_runs: for 7 rows at 128 tokens and 9 shorter, "
             f"reference forward + policy forward + backward took 22.0 s against 25.0 s in one run, medians of 3 "
             f"alternating A/B pairs), and asks for the completion positions' logits only. TRL 1.16 runs every "
             f"row's whole left-padded [prompt + completion] and gets log-probs from its fused LM head "
             f"(trl.trainer.utils.add_fused_lm_head), which off Triton devices scores every position, prompt and "
             f"padding included, through the {res['vocab']}-wide head in chunks and recomputes each chunk's "
             f"logits in backward")
    L.append(f"- the AdamW step: {med([s['adamw'] for s in ours]):.2f} vs {med([s['optimizer'] for s in trl]):.2f} s; "
             f"the rollout bookkeeping (table, verifier, advantages, the Parquet write) is tens of "
             f"milliseconds on both")
    if wall_o > target:
        L.append(f"- not reached: ours <= {target:.1f} s/step at TRL's {wall_t:.1f} needs {wall_o - target:.1f} s "
                 f"less. Tried on this CPU (2026-11-29, one process at a time under the lock) and not worth it: "
                 f"torch.compile of the decoding step (171 s to compile, then no faster: 182-218 ms a step compiled, "
                 f"181-214 eager); attention at one query as matmuls per key group (0.59-0.90 ms a layer against SDPA's "
                 f"0.49-0.57); generate's own overhead (a hand-written decoding loop was no faster); MKL's packed "
                 f"weights (torch.ops.mkl._mkl_linear) and oneDNN's for the decoding step's products; transparent "
                 f"huge pages and malloc thresholds for the update's page faults. What a decoding step is made of: "
                 f"its 211 matrix products (~65% of the step) stream 538 MB of float32 weights for 16 rows at 36 "
                 f"GFLOP/s, where this CPU reads 34 GB/s and multiplies at ~150 GFLOP/s in large products; under "
                 f"OMP_WAIT_POLICY=PASSIVE each product also wakes the second thread (the same 211 products took "
                 f"126-224 ms passive against 92-124 ms spinning, over three runs). The update's products already run at 120-140 "
                 f"GFLOP/s")
    return L


# ------------------------------------------------------------------------------------------------
# Part 2: orchestration overhead at the demo's shapes.

# The code before the redesign of 2026-11-28 (one Prefect-cached, JSON-persisted task per stage, each
# rewriting the step's Parquet file), measured by its own version of this bench on the machine of the
# current figures, with the same settings (fp32), minutes before them. Re-measure on another machine:
#   git archive 5869dfb | tar -x -C /tmp/old; set `autocast: none` in /tmp/old/configs/demo.yaml;
#   cd /tmp/old && /work/main/.venv/bin/python bench/step_vs_trl.py --skip-race --flow-steps 12 --flow-rounds 3 --no-write
PREVIOUS_CODE = (
    "- the same measurement of the code before the redesign (commit 5869dfb and its own version of this bench, "
    "`model.autocast: none`, 3 rounds x 12 steps, on this machine on 2026-11-28, load average 1.9-2.6): **144 ms "
    "per step = 6.6% of its 2.188 s plain step** (rounds 127, 149, 151 ms), A/B +9.8%, Prefect server 4.5 CPU s per "
    "flow run, a no-op task run (its options: cache key, JSON-persisted result) 14.3 ms of CPU. The figure "
    "published before, 40 ms = 4.2% of a 0.961 s step, came from another machine (bf16 autocast on a CPU with "
    "avx512_bf16, where that no-op task run cost 4.6 ms of CPU): the milliseconds depend on the machine and its "
    "load, the share on the step's length too")
def orchestration(args):
    """Plain loop vs the real `grpo_iteration` flow, `args.flow_rounds` rounds of each (plain first)."""
    from prefect import flow

    import flows.iterative_grpo as fl
    import tasks.journal as journal_mod
    import tasks.tracking as tracking
    from models.loading import native_bf16
    from models.tiny import save_tiny
    from problems.arithmetic import VOCAB_WORDS
    from stages.checkpoints import copy_checkpoint
    from stages.evaluation import Evaluation
    from stages.prepare import prepare_data
    from stages.rollout_store import read_rollouts, write_atomic
    from stages.run_layout import RunLayout
    from stages.run_state import RunState, commit
    from tasks import step as step_tasks
    from tasks.journal import RunJournal
    from tasks.workspace import WORKSPACE

    root = TMP / "orch"
    M = args.flow_steps + 1
    base = load_config(ROOT / "configs" / "demo.yaml",
                       [f"storage.artifacts_root={root}", f"threads={args.threads}", f"loop.steps_per_iteration={M}",
                        "loop.iterations=1", f"loop.eval_every={10 * M}", "data.test_size=32", "loop.eval_samples=0",
                        "reward.sources=[{name: verifier}]", *args.flow_set])  # no RM: a shorter step, a larger share
    train_path, test_path = (str(p) for p in prepare_data(base))
    init = save_tiny(root / "init_policy", VOCAB_WORDS)
    autocast = base.model.autocast
    resolved = ("bfloat16" if native_bf16(base.model.device) else "none") if autocast == "auto" else autocast

    @flow(name="bench-warmup")
    def warmup():
        return 1

    t = time.perf_counter()
    warmup()  # starts the temporary Prefect server: one-time, left out of every figure
    server_start = time.perf_counter() - t

    # Timing wrappers, patched where the flow and its journal look the functions up. Work (the same in
    # the plain loop): the four task bodies and the step's one Parquet write. Everything else a flow
    # step does is orchestration: Prefect task runs, rollout_metrics, the commit (ledger + state.json),
    # queueing the metrics for MLflow, the checkpoint pruning, the log line, the resume checks.
    extra = defaultdict(list)

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                extra[key].append(time.perf_counter() - t0)
        return wrapper

    def end_step(self, *a, **k):
        orig_end_step(self, *a, **k)
        extra["step_end"].append((time.perf_counter(), time.process_time()))

    originals = [(journal_mod, "rollout_metrics"), (journal_mod, "commit"), (tracking, "log_records"),
                 (RunLayout, "prune_checkpoints"), (RunJournal, "save_rollouts"), (RunJournal, "end_step")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in originals]
    orig_end_step = RunJournal.end_step
    stage_tasks = [step_tasks.sample_groups, step_tasks.score_rollouts, step_tasks.compute_advantages,
                   step_tasks.grpo_update]
    assert all(getattr(fl, t.name) is t for t in stage_tasks), "the flow calls the step tasks by these names"
    orig_fns = [t.fn for t in stage_tasks]

    def new_run(run_id):
        cfg = base.model_copy(update={"run_id": run_id})
        layout = RunLayout.of(cfg.artifacts(), run_id)
        ref = copy_checkpoint(str(init), layout.reference(0), with_optimizer=False)  # as start_run does
        return cfg, layout, ref

    def saves(cfg, s):  # RunJournal.checkpoint's rule
        return (s + 1) % cfg.loop.checkpoint_every == 0 or (s + 1) % cfg.loop.steps_per_iteration == 0

    def outcome(table):
        return sum(table.column("reward").to_pylist()), sum(table.column("completion_length").to_pylist())

    def plain_round(run_id):
        cfg, layout, ref = new_run(run_id)
        policy = reference = str(ref)
        times, outcomes, cpus, writes = [], [], [], []
        for s in range(M):
            t0, c0 = time.perf_counter(), time.process_time()
            questions = fl.pick_questions(train_path, cfg, s)
            table = step_tasks.sample_groups.fn(cfg, policy, questions, s)
            table = step_tasks.score_rollouts.fn(cfg, table, policy, {})
            table = step_tasks.compute_advantages.fn(cfg, table)
            tw = time.perf_counter()
            write_atomic(table, layout.rollouts(0, s))
            writes.append(time.perf_counter() - tw)
            policy, _ = step_tasks.grpo_update.fn(cfg, policy, reference, table, str(layout.policy_step(s)),
                                                  saves(cfg, s))
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            outcomes.append(outcome(table))
        return times[1:], outcomes, cpus[1:], writes[1:]

    def flow_round(run_id):
        cfg, layout, ref = new_run(run_id)
        mlflow_run_id = tracking.open_run(cfg, run_id)
        state = commit(layout, RunState(run_id=run_id, policy=layout.ref(ref), reference=layout.ref(ref),
                                        reference_iteration=0,
                                        initial_eval=Evaluation(accuracy=0.0, answered=0.0, mean_length=0.0, n=0)))
        extra.clear()
        for obj, name, fn in saved:
            setattr(obj, name, end_step if name == "end_step" else timed(name, fn))
        for task_, fn in zip(stage_tasks, orig_fns):
            task_.fn = timed("body", fn)
            setattr(fl, task_.name, timed("task_call", task_))  # the flow's call: the task run, body included
        t, srv0 = time.perf_counter(), children_cpu_s()
        try:
            fl.grpo_iteration(cfg, state, 0, train_path, test_path, mlflow_run_id)
        finally:
            for obj, name, fn in saved:
                setattr(obj, name, fn)
            for task_, fn in zip(stage_tasks, orig_fns):
                task_.fn = fn
                setattr(fl, task_.name, task_)
        total, srv = time.perf_counter() - t, children_cpu_s() - srv0
        tracking.finish_run(cfg, mlflow_run_id)  # waits for the queued metric batches
        logged = len(tracking.client_for(cfg).get_metric_history(mlflow_run_id, "step_seconds"))
        outcomes = [outcome(read_rollouts(layout.rollouts(0, s))) for s in range(M)]
        ends = extra["step_end"]
        if len(ends) != M or len(extra["body"]) != 4 * M:
            raise RuntimeError(f"expected {M} steps of 4 task bodies, saw {len(ends)} steps, "
                               f"{len(extra['body'])} bodies (a task retried?)")
        times = [b[0] - a[0] for a, b in zip(ends, ends[1:])]  # steps 1..M-1, one full loop iteration each
        cpus = [b[1] - a[1] for a, b in zip(ends, ends[1:])]
        ex = {k: extra[k][1:M] for k in ("rollout_metrics", "commit", "log_records", "prune_checkpoints",
                                           "save_rollouts")}
        bodies = extra["body"]
        calls = extra["task_call"]
        ex["work"] = [sum(bodies[4 * s:4 * s + 4]) + ex["save_rollouts"][s - 1] for s in range(1, M)]
        ex["task_runs"] = [sum(calls[4 * s:4 * s + 4]) - sum(bodies[4 * s:4 * s + 4]) for s in range(1, M)]
        for i, task_ in enumerate(stage_tasks):
            ex[f"body_{task_.name}"] = [bodies[4 * s + i] for s in range(1, M)]
        ex["orchestration"] = [gap - w for gap, w in zip(times, ex["work"])]
        return times, outcomes, cpus, total, ex, srv, logged, read_rollouts(layout.rollouts(0, 0))

    res = {"server_start_s": server_start, "plain": [], "flow": [], "same_work": True, "flow_total": [],
           "plain_cpu": [], "flow_cpu": [], "server_cpu_per_run": [], "orchestration": [], "work": [],
           "plain_write": [], "rounds": [], "mlflow_steps_logged": [], "load_before": load_str(),
           "autocast": autocast, "autocast_resolved": resolved, "attn": base.model.attn_implementation,
           "checkpoint_every": base.loop.checkpoint_every, "steps_per_run": M,
           **{k: [] for k in ("rollout_metrics", "commit", "log_records", "prune_checkpoints", "save_rollouts",
                              "task_runs")}}
    table = None
    for r in range(args.flow_rounds):
        load0 = load_str()
        WORKSPACE.__init__()  # fresh cache: each round loads the same initial checkpoint
        p_times, p_out, p_cpu, p_write = plain_round(f"plain-{r}")
        WORKSPACE.__init__()
        f_times, f_out, f_cpu, f_total, ex, srv, logged, table = flow_round(f"flow-{r}")
        res["plain"] += p_times
        res["flow"] += f_times
        res["plain_cpu"] += p_cpu
        res["flow_cpu"] += f_cpu
        res["plain_write"] += p_write
        res["server_cpu_per_run"].append(srv)
        res["flow_total"].append(f_total)
        res["mlflow_steps_logged"].append(logged)
        for k in ("rollout_metrics", "commit", "log_records", "prune_checkpoints", "save_rollouts",
                  "orchestration", "work", "task_runs", *(f"body_{t.name}" for t in stage_tasks)):
            res.setdefault(k, []).extend(ex[k])
        same = p_out == f_out
        res["same_work"] &= same
        rnd = {"plain": med(p_times), "flow": med(f_times), "orchestration": med(ex["orchestration"]),
               "plain_cpu": med(p_cpu), "flow_cpu": med(f_cpu), "load_before": load0, "load_after": load_str(),
               "same_work": same}
        res["rounds"].append(rnd)
        print(f"round {r + 1}: plain {rnd['plain']:.3f} s/step, flow {rnd['flow']:.3f} s/step "
              f"({100 * (rnd['flow'] - rnd['plain']) / rnd['plain']:+.1f}%), orchestration inside the flow "
              f"{rnd['orchestration'] * 1000:.1f} ms/step ({100 * rnd['orchestration'] / rnd['plain']:.1f}%), same work "
              f"{same}, load {load0} -> {rnd['load_after']}", flush=True)
    res["load_after"] = load_str()
    res["torch_threads"] = torch.get_num_threads()
    res["task_run_ms"] = task_run_cost(base, table)
    return res


def task_run_cost(cfg, table, n: int = 40, rounds: int = 3) -> dict:
    """Milliseconds (in-process CPU and wall, medians of `rounds` x `n` runs) of one Prefect task run that
    does nothing, with the step tasks' options (no cache, the retry policy) and arguments (the config and
    a step's table): the fixed price of making a stage a task. "quoted": the same arguments passed
    through prefect's `quote`, which spares Prefect visiting them (the body still gets them as they are)."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.utilities.annotations import quote

    from tasks.retries import RETRY

    @task(cache_policy=NO_CACHE, **RETRY)
    def noop(cfg, rollouts):
        return rollouts

    def runs(args):
        c, t = time.process_time(), time.perf_counter()
        for _ in range(n):
            noop(*args)
        return (time.process_time() - c) / n * 1000, (time.perf_counter() - t) / n * 1000

    @flow(name="bench-task-cost")
    def many():
        noop(cfg, table)
        out = defaultdict(list)
        for _ in range(rounds):
            for name, args in (("plain", (cfg, table)), ("quoted", (quote(cfg), quote(table)))):
                out[name].append(runs(args))
        return {name: {"cpu": med([c for c, _ in v]), "wall": med([w for _, w in v])} for name, v in out.items()}

    res = many()
    return {**res["plain"], "quoted": res["quoted"]}


# ------------------------------------------------------------------------------------------------
def versions(args):
    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for mod in ("prefect", "mlflow"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            v[mod] = "?"
    try:
        out = subprocess.run([args.trl_python, "-c", "import trl, torch, transformers; print(trl.__version__, "
                              "torch.__version__, transformers.__version__)"], capture_output=True, text=True,
                             timeout=120).stdout.split()
        v["trl"], v["trl_torch"], v["trl_transformers"] = out
    except Exception:  # noqa: BLE001
        v["trl"] = v["trl_torch"] = v["trl_transformers"] = "?"
    return v


def pct(part, whole):
    return f"{100 * part / whole:.0f}%" if whole else "-"


def race_lines(args, res):
    """The race's markdown: both precision-matched pairs, then where each side's time goes."""
    sides = {f"{who}_{p}": res[f"{who}_{p}"] for p in PRECISIONS for who in ("ours", "trl")}
    wall = {k: med([s["wall"] for s in v]) for k, v in sides.items()}
    cpu = {k: med([s["cpu"] for s in v]) for k, v in sides.items()}
    L = ["", "### The race: seconds per GRPO step", ""]
    L.append(f"Model: Qwen2 hidden 128, 4 layers, 4 heads (4 kv), intermediate 512, untied, character vocabulary "
             f"99, {res['n_params'] / 1e6:.3f}M parameters, random init (seed 0), built identically on both "
             f"sides. Batch: {args.prompts_per_step} prompts x G={args.G}, max {args.max_new_tokens} new tokens, "
             f"temperature 1, beta {args.beta} (reference forward included), mu 1, sequence-mean loss (TRL "
             f"loss_type grpo), AdamW, grad clip 1.0, no gradient checkpointing. Two precisions per side: fp32 (ours: "
             f"no autocast, SDPA attention; TRL: the peer's default, bf16=False) and bf16 (ours: `model.autocast: "
             f"bfloat16` + `model.attn_implementation: eager`, the demo's setting; TRL: `--bf16`, GRPOConfig's "
             f"bf16=True autocast). Prompts: TRL `What is a+b? Answer:` (<= 22 tokens); ours "
             f"`Question: a+b\\nAnswer:\\n` (problems.prompts.plain_prompt, <= {res['prompt_tokens']} tokens), the "
             f"same a, b. {args.rounds} rounds, each: ours fp32, ours bf16, TRL fp32, TRL bf16, {args.steps} steps "
             f"each, the first {args.warmup} of each left out: {len(sides['ours_fp32'])} steps per side. Load "
             f"average {res['load_before']} before, {res['load_after']} after.")
    L.append("")
    for p in PRECISIONS:
        o, t = f"ours_{p}", f"trl_{p}"
        L.append(f"- **{p}: ours {wall[o]:.3f} s/step vs TRL GRPOTrainer {wall[t]:.3f} s/step: ratio ours/TRL = "
                 f"{wall[o] / wall[t]:.2f}** (CPU seconds/step {cpu[o]:.3f} vs {cpu[t]:.3f}: "
                 f"{cpu[o] / cpu[t]:.2f})")
    L.append(f"- across precisions: ours bf16 vs TRL fp32 (the peer script's default) "
             f"{wall['ours_bf16'] / wall['trl_fp32']:.2f}; ours fp32 vs TRL bf16 "
             f"{wall['ours_fp32'] / wall['trl_bf16']:.2f}")
    infl = max(wall[k] / cpu[k] for k in sides)
    if infl > 1.2:
        L.append(f"- CAUTION: wall time is up to {infl:.1f}x the CPU time on one side (machine load); the CPU "
                 f"seconds/step ratios are the steadier comparison")
    n = args.steps - args.warmup
    for p in PRECISIONS:
        rounds = []
        for r in range(args.rounds):
            a = med([s["wall"] for s in sides[f"ours_{p}"][r * n:(r + 1) * n]])
            b = med([s["wall"] for s in sides[f"trl_{p}"][r * n:(r + 1) * n]])
            rounds.append(f"round {r + 1}: {a:.3f} vs {b:.3f} ({a / b:.2f})")
        L.append(f"- {p} per round (median ours vs TRL, ratio): " + "; ".join(rounds))
    L.append(f"- mean completion length: ours {statistics.mean(s['mean_len'] for s in sides['ours_fp32']):.1f}, TRL "
             f"{statistics.mean(s.get('completions/mean_length', float('nan')) for s in sides['trl_fp32']):.1f} "
             f"tokens (EOS has ~1% chance per token at random init on both; generate runs all {args.max_new_tokens} "
             f"steps and the update tensors are {args.max_new_tokens} wide on both sides)")
    L += ["", "Where the time goes (medians of each phase, s; % of that side's median step):", "",
          "| phase | ours fp32 | TRL fp32 | ours bf16 | TRL bf16 |", "|---|---|---|---|---|"]
    phases = [  # (name, ours' value of a step, TRL's value of a step)
        ("generation (generate + sampler log-probs)", lambda s: s["generate"], lambda s: s["generate"]),
        ("rollout bookkeeping: ours rollout table + verifier + advantages + one Parquet write + update batch; TRL "
         "decode, rewards, advantages, padding", lambda s: s["sample_rest"] + s["score"] + s["adv_write"],
         lambda s: s["prepare_other"]),
        ("reference forward (no grad)", lambda s: s["ref_fwd"], lambda s: s["ref_fwd"]),
        ("policy forward (+ loss for TRL: compute_loss)", lambda s: s["policy_fwd"], lambda s: s["loss_fwd"]),
        ("backward + grad clip + AdamW", lambda s: s["bwd_loss_clip"] + s["adamw"], lambda s: s["bwd_opt"]),
    ]
    for name, of_ours, of_trl in phases:
        cells = []
        for p in PRECISIONS:
            for who, of in (("ours", of_ours), ("trl", of_trl)):
                x = med([of(s) for s in sides[f"{who}_{p}"]])
                cells.append(f"{x:.3f} ({pct(x, wall[f'{who}_{p}'])})")
        L.append(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    L.append("")
    L.append("Reading: ours does the same model arithmetic as TRL (one generation, one reference forward, one policy "
             "forward and backward per step) with three differences: each prompt is prefilled once and its KV cache "
             "shared by its G samples (`models.generation.shared_prompt_cache`; TRL's generate prefills all G copies); "
             "under bf16 autocast our attention is the eager (matmul) kernel, because PyTorch's CPU flash-attention "
             "kernel is slower in bfloat16 than in float32 at these shapes (a profile of one bf16 step with SDPA: "
             "attention forward 153 ms + backward 125 ms vs 58 + 28 ms in float32, while the linear layers' matmuls "
             "halved, 414 -> 229 ms); and the bookkeeping differs (ours writes the step's rollouts to a Parquet file once).")
    L.append("")
    L.append("TRL commands run (one per round and precision): `" +
             shown(res["trl_runs"][-1]["cmd"].replace(str(TMP), "$TMP")) + "`")
    return L


def machine_line(v, with_trl: bool):
    line = (f"- machine: {os.cpu_count()} CPUs ({cpu_model()}; bf16 matmul units (avx512_bf16/AMX): "
            f"{'yes' if native_bf16_cpu() else 'no'}), shared with other engineers' jobs; Python {v['python']}; "
            f"ours: torch {v['torch']}, transformers {v['transformers']}, prefect {v['prefect']}, mlflow {v['mlflow']}")
    if with_trl:
        line += f"; TRL venv: trl {v['trl']}, torch {v['trl_torch']}, transformers {v['trl_transformers']}"
    return line


def native_bf16_cpu() -> bool:
    from models.loading import native_bf16

    return native_bf16("cpu")


def orchestration_lines(args, v, res, command):
    pl, fw, orch = res["plain"], res["flow"], res["orchestration"]
    mp, mf, direct = med(pl), med(fw), med(orch)
    rounds = res["rounds"]
    parts = {k: med(res[k]) for k in ("rollout_metrics", "commit", "log_records", "prune_checkpoints")}
    rest = direct - sum(parts.values())
    r_dir = [100 * r["orchestration"] / r["plain"] for r in rounds]
    r_ab = [100 * (r["flow"] - r["plain"]) / r["plain"] for r in rounds]
    precision = ("float32: `model.autocast: auto` resolves to none here (no bf16 matmul units: bf16 autocast is "
                 "emulated on this CPU and ~10x slower)" if res["autocast_resolved"] == "none" else
                 f"`model.autocast: {res['autocast']}` ({res['autocast_resolved']})")
    L = ["### Orchestration overhead: Prefect flow + MLflow vs plain loop", ""]
    L.append(f"`{command}`. The demo's shapes (configs/demo.yaml: tiny Llama, 8 questions x G=8, 48 new tokens, beta "
             f"0.04, {res['attn']} attention, a checkpoint saved every "
             f"{'step' if res['checkpoint_every'] == 1 else str(res['checkpoint_every']) + ' steps'}; verifier rewards "
             f"only; untrained init checkpoint) in {precision}; torch threads {res['torch_threads']}; throwaway "
             f"artifacts root (SQLite MLflow) and PREFECT_HOME (temporary Prefect server). Flow = the real "
             f"`grpo_iteration` flow: the four Prefect tasks passing the step's table in memory, its one Parquet "
             f"write (`RunJournal.save_rollouts`), rollout_metrics, a commit per step (metrics ledger + state.json, "
             f"fsynced), the metrics queued for MLflow, checkpoint pruning, the log line. Plain = the same four task "
             f"bodies (`task.fn`) and the same one write in a loop. {len(rounds)} rounds of plain then flow, "
             f"{res['steps_per_run'] - 1} timed steps each (the first, model-loading step left out on both): {len(pl)} steps "
             f"per side. Both did identical work (same rewards and lengths step by step): {res['same_work']}; "
             f"every step's metrics reached MLflow: "
             f"{all(n == res['steps_per_run'] for n in res['mlflow_steps_logged'])}. Load average "
             f"{res['load_before']} before, {res['load_after']} after (1, 5, 15 min).")
    L.append("")
    L.append(machine_line(v, with_trl=False))
    L.append(f"- **measured inside the flow: {direct * 1000:.0f} ms per step outside the work (the four task "
             f"bodies and the one Parquet write) = {100 * direct / mp:.1f}% of the plain step** (median over "
             f"{len(orch)} steps of loop-iteration wall time - its work; mean {statistics.mean(orch) * 1000:.0f} ms); "
             f"per round " + ", ".join(f"{r['orchestration'] * 1000:.0f} ms = {x:.1f}%" for r, x in zip(rounds, r_dir)) +
             f" (spread {min(r_dir):.1f}-{max(r_dir):.1f}%)")
    L.append(PREVIOUS_CODE)
    L.append(f"- A/B of whole steps, flow / plain (the baseline, same run): plain {mp:.3f} s/step, flow {mf:.3f} "
             f"s/step: ratio {mf / mp:.3f} ({1000 * (mf - mp):+.0f} ms/step; means {statistics.mean(pl):.3f} vs "
             f"{statistics.mean(fw):.3f}); per round " +
             ", ".join(f"{r['plain']:.3f} vs {r['flow']:.3f} ({x:+.1f}%, load {r['load_before']} -> "
                       f"{r['load_after']})" for r, x in zip(rounds, r_ab)) +
             f": spread {min(r_ab):+.1f} to {max(r_ab):+.1f}%. The A/B also counts what the flow's other threads and "
             f"the Prefect server process (below) take from the step when the 2 cores are busy with other jobs, and "
             f"it moves with the machine's load from round to round; the direct split above does not depend on how "
             f"fast the work ran")
    L.append(f"- of the direct figure: Prefect's four task runs around their bodies (the flow's calls - the bodies) "
             f"{med(res['task_runs']) * 1000:.1f} ms, commit (metrics ledger + state.json, two fsyncs) "
             f"{parts['commit'] * 1000:.1f} ms, queueing the step's metrics for MLflow's logging thread "
             f"(`tracking.log_records`, SQLite) {parts['log_records'] * 1000:.1f} ms, rollout_metrics (the table in "
             f"memory) {parts['rollout_metrics'] * 1000:.1f} ms, checkpoint pruning "
             f"{parts['prune_checkpoints'] * 1000:.1f} ms; the log line, the resume check and the loop the rest, "
             f"~{(rest - med(res['task_runs'])) * 1000:.0f} ms (medians)")
    L.append("- the work, medians per step inside the flow: " + ", ".join(
        f"{name} {med(res[f'body_{name}']):.3f} s" for name in ("sample_groups", "score_rollouts",
                                                                 "compute_advantages", "grpo_update")) +
             " (grpo_update includes the checkpoint save)")
    L.append(f"- the step's one Parquet write (work, in both loops, not in the overhead): "
             f"{med(res['save_rollouts']) * 1000:.1f} ms in the flow, {med(res['plain_write']) * 1000:.1f} ms "
             f"plain (before the redesign sampling, scoring and advantages each rewrote the file inside the task "
             f"bodies, and rollout_metrics read it back)")
    tr = res["task_run_ms"]
    L.append(f"- one Prefect task run that does nothing, with the step tasks' options (no cache, the retry policy) "
             f"and arguments (the config and a step's table): {tr['cpu']:.1f} ms of in-process CPU, {tr['wall']:.1f} "
             f"ms wall (measured in this run): ~{4 * tr['wall']:.0f} ms per step for the 4 tasks" +
             (f"; with both arguments passed through `prefect.utilities.annotations.quote` (Prefect then does not "
              f"walk the nested config and the table; the body gets them unchanged) {tr['quoted']['cpu']:.1f} ms "
              f"CPU, {tr['quoted']['wall']:.1f} ms wall" if "quoted" in tr else ""))
    L.append(f"- CPU seconds per step of the bench process (all its threads: MLflow's logging thread and "
             f"Prefect's clients included): plain {med(res['plain_cpu']):.3f}, flow {med(res['flow_cpu']):.3f} "
             f"({(med(res['flow_cpu']) - med(res['plain_cpu'])) * 1000:+.0f} ms); the temporary Prefect server "
             f"process used {', '.join(f'{x:.1f}' for x in res['server_cpu_per_run'])} CPU s per flow run "
             f"(~{med(res['server_cpu_per_run']) / res['steps_per_run'] * 1000:.0f} ms per step, on the other core "
             f"while torch uses one thread; a machine whose cores are all busy pays it in wall time too)")
    L.append(f"- one-time, not in the figures: temporary Prefect server start {res['server_start_s']:.1f} s; per "
             f"flow run (grpo_iteration with {res['steps_per_run']} steps and its final greedy evaluation on 32 "
             f"questions) total {', '.join(f'{x:.1f}' for x in res['flow_total'])} s")
    return L


def render_race(args, v, race_res, command):
    L = ["### The race: seconds per GRPO step", ""]
    L.append(f"`{command}` (TRL venv: `bash scripts/trl_venv.sh`). One invocation, both sides on the same machine, "
             f"torch threads {args.threads} on both, OMP_WAIT_POLICY="
             f"{os.environ.get('OMP_WAIT_POLICY') or '(unset)'} on both.")
    L.append("")
    L.append(machine_line(v, with_trl=True))
    L += race_lines(args, race_res)[3:]  # race_lines starts with its own heading
    return L


INTRO = ("bench/step_vs_trl.py, three parts, each with its own command and machine: the race against TRL on a tiny "
         "model (`--skip-flow` runs it alone), the race at a real model's shape (`--pretrained DIR`) and the "
         "orchestration overhead (`--skip-race`); a part a run skips keeps its previous text here.")


def render(args, v, race_res, orch_res, command):
    """{subsection heading: text} for the parts that ran."""
    out = {}
    if race_res and args.pretrained:
        out["### The race at a real model's shape"] = "\n".join(real_race_lines(args, race_res, v, command)) + "\n"
    elif race_res:
        out["### The race"] = "\n".join(render_race(args, v, race_res, command)) + "\n"
    if orch_res:
        out["### Orchestration overhead"] = "\n".join(orchestration_lines(args, v, orch_res, command)) + "\n"
    return out


def write_section(parts: dict[str, str]) -> str:
    """Replace, inside this bench's section of BENCHMARKS.md, the subsections that ran; keep the others."""
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(doc)
    old = found.group(0) if found else ""
    subsections = {m.group(1): m.group(0).rstrip("\n") + "\n"
                   for m in re.finditer(r"^(### [^\n:]*)[^\n]*\n.*?(?=^### |\Z)", old, re.S | re.M)}
    order = ["### The race", "### The race at a real model's shape", "### Orchestration overhead"]
    body = [parts.get(k) or subsections.get(k) for k in order]
    text = "\n".join([SECTION, "", INTRO, ""] + [b for b in body if b]) + "\n"
    doc = pattern.sub(lambda _: text, doc) if found else doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)
    return text


def main():
    args = ARGS
    argv = sys.argv[1:]
    command = ".venv/bin/python bench/step_vs_trl.py" + (" " + shlex.join(argv) if argv else "")
    print(f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}, "
          f"load {load_str()}, tmp {TMP}", flush=True)
    if args.from_json:
        if not args.pretrained:
            raise SystemExit("--from-json: only with --pretrained")
        dump = json.loads(Path(args.from_json).read_text())
        v, race_res, command = dump["versions"], dump["race"], dump["command"]
    else:
        v = versions(args)
        race_res = None if args.skip_race else race_real(args) if args.pretrained else race(args)
    if race_res and args.pretrained:
        mo = med([s["wall"] for s in race_res["ours"] if not s["flat"]])
        mt = med([s["wall"] for s in race_res["trl"]])
        print(f"RACE {Path(args.pretrained).name}: ours {mo:.2f} s/step, TRL {mt:.2f} s/step, ratio {mo / mt:.2f}",
              flush=True)
    elif race_res:
        for p in PRECISIONS:
            mo, mt = med([s["wall"] for s in race_res[f"ours_{p}"]]), med([s["wall"] for s in race_res[f"trl_{p}"]])
            print(f"RACE {p}: ours {mo:.3f} s/step, TRL {mt:.3f} s/step, ratio {mo / mt:.2f}", flush=True)
    orch_res = None if args.skip_flow or args.from_json else orchestration(args)
    if orch_res:
        mp, mf, d = med(orch_res["plain"]), med(orch_res["flow"]), med(orch_res["orchestration"])
        print(f"ORCH plain {mp:.3f} s/step, flow {mf:.3f} s/step ({100 * (mf - mp) / mp:+.1f}%), orchestration "
              f"inside the flow {d * 1000:.1f} ms/step = {100 * d / mp:.1f}% of the plain step", flush=True)
    if args.json:  # before rendering: a rendering fault loses no measurement (re-render with --from-json)
        Path(args.json).write_text(json.dumps({"versions": v, "race": race_res, "orchestration": orch_res,
                                               "command": command},
                                              indent=1, default=str))
    parts = render(args, v, race_res, orch_res, command)
    print("\n".join(parts.values()))
    if not args.no_write:
        write_section(parts)


if __name__ == "__main__":
    main()
