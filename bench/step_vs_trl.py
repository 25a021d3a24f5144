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
  here), the same additions as prompts (ours "Question: a+b\nAnswer:\n" via format_prompt, <= 24 tokens;
  TRL "What is a+b? Answer:", <= 22), through this pipeline's stage functions, one step =
    sample_groups (HFSampler: generate with per-token sampler log-probs, Parquet rollout file)
    -> score_rollouts (the rule verifier) -> compute_advantages -> read_update_batch
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
48 new tokens, beta 0.04, bf16 autocast, a checkpoint saved every step; rewards from the verifier alone,
since no RM is trained here) on a throwaway artifacts root (tmp dir, SQLite
MLflow, PREFECT_HOME in the tmp dir):
- flow: the real `flows.iterative_grpo.grpo_iteration` Prefect flow (its tasks sample_groups,
  score_rollouts, compute_advantages, grpo_update; rollout_metrics + tracking.log_metrics to MLflow; state
  file) for M = steps + 1 steps. Per-step time = the gap between consecutive steps' MLflow metric
  timestamps (one full loop iteration; the first step, which loads the model, is the +1 left out).
  The Prefect server start is excluded (a trivial flow runs first); the iteration's final evaluation and
  report are after the last step and not timed.
- plain: the same task bodies (`task.fn`: same workspace cache, same stage functions, same checkpoint
  saves), same questions and seeds, called in a plain loop (step 0 left out the same way).
  Both start from the same untrained tiny checkpoint (models.tiny.save_tiny; no SFT needed for timing)
  and are deterministic at 1 thread, so they do identical work (checked: same rewards and lengths).
Overhead, two ways: directly, inside the flow, as each step's wall time minus its four task bodies'
time (wrapped `task.fn`), which noise in the work itself does not blur; and as the A/B (flow - plain) /
plain per step, which on a shared machine moves by more than the overhead between runs. MLflow logging
and rollout_metrics are timed by wrappers; a no-op task with the step tasks' options gives the price
of one task run.

Writes/replaces the "## GRPO step: this pipeline vs TRL GRPOTrainer" section of BENCHMARKS.md.
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
PEER = Path("/work/shared/peers/trl_cpu_step.py")
SECTION = "## GRPO step: this pipeline vs TRL GRPOTrainer"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides (default 1)")
    p.add_argument("--omp-wait-policy", default=None,
                   help="set OMP_WAIT_POLICY (e.g. PASSIVE) for both sides; default: inherit the environment")
    p.add_argument("--steps", type=int, default=12, help="race: steps per round per side (incl. warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="race: first steps of each round left out")
    p.add_argument("--rounds", type=int, default=2, help="race: rounds, each ours then TRL")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    p.add_argument("--flow-steps", type=int, default=10, help="orchestration: timed steps per round")
    p.add_argument("--flow-rounds", type=int, default=2, help="orchestration: rounds, each plain then flow")
    p.add_argument("--skip-race", action="store_true")
    p.add_argument("--skip-flow", action="store_true")
    p.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also dump all raw timings here")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.omp_wait_policy:
    os.environ["OMP_WAIT_POLICY"] = ARGS.omp_wait_policy  # before torch / OpenMP start
TMP = Path(tempfile.mkdtemp(prefix="step_vs_trl_"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PREFECT_HOME"] = str(TMP / "prefect")  # throwaway Prefect DB + result storage

import torch  # noqa: E402

torch.set_num_threads(ARGS.threads)

import transformers  # noqa: E402

from configs import load_config  # noqa: E402
from models import trainer as trainer_mod  # noqa: E402
from models.samplers import HFSampler  # noqa: E402
from stages import advantages as adv_stage, rewards as reward_stage, sampling as sample_stage  # noqa: E402


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

        trainer_mod.frozen_logprobs = frozen
        trainer_mod.completion_logprobs = cl
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
        self.prompt_tokens = max(len(x) for x in self.tok(
            [sample_stage.format_prompt(q["question"]) for q in self.questions])["input_ids"])

    def step(self):
        cfg, args, i = self.cfg, self.args, self.step_no
        self.step_no += 1
        qs = [self.questions[(i * args.prompts_per_step + k) % len(self.questions)] for k in range(args.prompts_per_step)]
        out = TMP / "race" / self.precision / f"step={i}.parquet"  # per side: a step file is never redone
        self.timer.cur = defaultdict(float)
        c0, t0 = time.process_time(), time.perf_counter()
        with cfg.model.compute():
            path = sample_stage.sample_groups("race-qwen2", qs, cfg.sampling, seed=i, out_path=out, run_id="race",
                                              sampler=self.sampler)
        t1 = time.perf_counter()
        path = reward_stage.score_rollouts(path, cfg.reward, tokenizer=self.tok)
        t2 = time.perf_counter()
        path = adv_stage.compute_advantages(path, supervision="outcome", group_size=args.G, eps=cfg.grpo.adv_eps,
                                            scale=cfg.grpo.adv_scale)
        batch = adv_stage.read_update_batch(path)
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
            "sample": t1 - t0, "generate": ph.get("generate", 0.0), "score": t2 - t1, "adv_read": t3 - t2,
            "update": t4 - t3, "ref_fwd": ph.get("ref_fwd", 0.0), "policy_fwd": ph.get("policy_fwd", 0.0),
            "adamw": ph.get("adamw", 0.0),
            "mean_len": sum(len(c) for c in batch.completion_ids) / len(batch.completion_ids),
            "width": batch.width, "kl": metrics.get("kl", float("nan")),
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
# Part 2: orchestration overhead at the demo's shapes.
def orchestration(args):
    from prefect import flow

    import flows.iterative_grpo as fl
    import tasks.tracking as tracking
    from models.tiny import save_tiny
    from problems.arithmetic import VOCAB_WORDS
    from stages.checkpoints import copy_checkpoint
    from stages.prepare import prepare_data
    from stages.rollout_store import read_rollouts, rollout_path
    from tasks import step as step_tasks
    from tasks.workspace import WORKSPACE

    root = TMP / "orch"
    M = args.flow_steps + 1
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      [f"storage.artifacts_root={root}", f"threads={args.threads}", f"loop.steps_per_iteration={M}",
                       "loop.iterations=1", f"loop.eval_every={10 * M}", "data.test_size=32",
                       "reward.sources=[{name: verifier}]"])  # no RM to train first; a shorter step, a larger share
    train_path, test_path = (str(p) for p in prepare_data(cfg))
    init = save_tiny(root / "init_policy", VOCAB_WORDS)

    @flow(name="bench-warmup")
    def warmup():
        return 1

    t = time.perf_counter()
    warmup()
    server_start = time.perf_counter() - t

    # timing wrappers on what the flow does beyond the task calls (patched where the flow looks them up)
    extra = defaultdict(list)
    orig_log, orig_rm = tracking.log_metrics, fl.rollout_metrics

    def log_metrics(*a, **k):
        extra["cpu_at_log"].append(time.process_time())
        t0 = time.perf_counter()
        orig_log(*a, **k)
        extra["log_metrics"].append(time.perf_counter() - t0)

    def rollout_metrics(*a, **k):
        t0 = time.perf_counter()
        out = orig_rm(*a, **k)
        extra["rollout_metrics"].append(time.perf_counter() - t0)
        return out

    tracking.log_metrics, fl.rollout_metrics = log_metrics, rollout_metrics

    # The task bodies' own time, so the flow's steps can be split into work and orchestration directly
    # (step wall time - its four bodies), which machine noise in the work itself does not blur.
    stage_tasks = [step_tasks.sample_groups, step_tasks.score_rollouts, step_tasks.compute_advantages,
                   step_tasks.grpo_update]
    orig_fns = [t.fn for t in stage_tasks]

    def timed_body(fn):
        def body(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                extra["body"].append(time.perf_counter() - t0)
        return body

    def plain_round(run_id):
        run_dir = cfg.artifacts() / "runs" / run_id
        ckpt_dir = run_dir / "checkpoints"
        ref = str(copy_checkpoint(str(init), ckpt_dir / "reference" / "iteration=0"))
        policy, times, outcomes, cpus = str(init), [], [], []
        for s in range(M):
            t0, c0 = time.perf_counter(), time.process_time()
            questions = fl.pick_questions(train_path, cfg, s)
            out = rollout_path(cfg.artifacts(), run_id, 0, s)
            path = step_tasks.sample_groups.fn(cfg, run_id, 0, s, policy, questions, str(out))
            path = step_tasks.score_rollouts.fn(cfg, run_id, 0, s, path, {})
            path = step_tasks.compute_advantages.fn(cfg, run_id, 0, s, path)
            save = (s + 1) % cfg.loop.checkpoint_every == 0 or s == M - 1
            policy, _ = step_tasks.grpo_update.fn(cfg, policy, ref, path, str(ckpt_dir / "policy" / f"step={s}"), save)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            t = read_rollouts(path)
            outcomes.append((sum(t.column("reward").to_pylist()), sum(t.column("completion_length").to_pylist())))
        return times[1:], outcomes, cpus[1:]

    def flow_round(run_id):
        mlflow_run_id = tracking.open_run(cfg, run_id)
        state = {"run_id": run_id, "iteration": 0, "step": -1, "policy": str(init), "saved_policy": str(init),
                 "initial_accuracy": 0.0, "reward_models": {}}
        n0 = {k: len(v) for k, v in extra.items()}
        t, srv0 = time.perf_counter(), children_cpu_s()
        for task_, fn in zip(stage_tasks, orig_fns):
            task_.fn = timed_body(fn)
        try:
            fl.grpo_iteration(cfg, run_id, 0, state, train_path, test_path, mlflow_run_id)
        finally:
            for task_, fn in zip(stage_tasks, orig_fns):
                task_.fn = fn
        total, srv = time.perf_counter() - t, children_cpu_s() - srv0
        client = tracking.client_for(cfg)
        hist = sorted(client.get_metric_history(mlflow_run_id, "step_seconds"), key=lambda m: m.step)
        ts = [m.timestamp / 1000 for m in hist]
        times = [b - a for a, b in zip(ts, ts[1:])]
        outcomes = []
        for s in range(M):
            tb = read_rollouts(rollout_path(cfg.artifacts(), run_id, 0, s))
            outcomes.append((sum(tb.column("reward").to_pylist()), sum(tb.column("completion_length").to_pylist())))
        bodies = extra["body"][n0.get("body", 0):]
        ex = {k: v[n0.get(k, 0):][1:M] for k, v in extra.items()}  # the logs of steps 1..M-1
        ex["orchestration"] = [gap - sum(bodies[4 * s:4 * s + 4]) for s, gap in zip(range(1, M), times)]
        c = extra["cpu_at_log"][n0.get("cpu_at_log", 0):][:M]
        ex["cpu"] = [b - a for a, b in zip(c, c[1:])]
        return times, outcomes, total, [m.value for m in hist][1:], ex, srv

    res = {"server_start_s": server_start, "plain": [], "flow": [], "flow_inner": [], "same_work": True,
           "log_metrics": [], "rollout_metrics": [], "flow_total": [], "plain_cpu": [], "flow_cpu": [],
           "server_cpu_per_run": [], "orchestration": [], "load_before": load_str()}
    for r in range(args.flow_rounds):
        WORKSPACE.__init__()  # fresh cache: each round loads the same initial checkpoint
        p_times, p_out, p_cpu = plain_round(f"plain-{r}")
        WORKSPACE.__init__()
        f_times, f_out, f_total, inner, ex, srv = flow_round(f"flow-{r}")
        res["plain_cpu"] += p_cpu
        res["flow_cpu"] += ex["cpu"]
        res["server_cpu_per_run"].append(srv)
        res["plain"] += p_times
        res["flow"] += f_times
        res["flow_inner"] += inner
        res["flow_total"].append(f_total)
        res["log_metrics"] += ex.get("log_metrics", [])
        res["rollout_metrics"] += ex.get("rollout_metrics", [])
        res["orchestration"] += ex["orchestration"]
        res["same_work"] &= p_out == f_out
        print(f"round {r + 1}: plain {med(p_times):.3f} s/step, flow {med(f_times):.3f} s/step, same work "
              f"{p_out == f_out} (load {load_str()})", flush=True)
    res["load_after"] = load_str()
    tracking.log_metrics, fl.rollout_metrics = orig_log, orig_rm
    res["torch_threads"] = torch.get_num_threads()
    res["task_run_ms"] = task_run_cost()
    return res


def task_run_cost(n: int = 40) -> float:
    """In-process milliseconds of one Prefect task run that does nothing, with the step tasks' options
    (run-keyed cache key, JSON-persisted result): the fixed price of making a stage a task."""
    from prefect import flow, task

    from tasks.keys import PERSISTED

    @task(cache_key_fn=lambda ctx, params: f"bench-noop-{os.getpid()}-{params['i']}", **PERSISTED)
    def noop(i: int) -> str:
        return f"step={i}.parquet"

    @flow(name="bench-task-cost")
    def many():
        noop(-1)
        t = time.process_time()
        for i in range(n):
            noop(i)
        return (time.process_time() - t) / n * 1000

    return many()


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
             f"`Question: a+b\\nAnswer:\\n` (problems.datasets.format_prompt, <= {res['prompt_tokens']} tokens), the "
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
        ("rollout bookkeeping: ours Parquet write + verifier + advantages + read back; TRL decode, rewards, "
         "advantages, padding", lambda s: s["sample_rest"] + s["score"] + s["adv_read"], lambda s: s["prepare_other"]),
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
             "halved, 414 -> 229 ms); and the bookkeeping differs (ours writes and reads a Parquet file per step).")
    L.append("")
    L.append("TRL commands run (one per round and precision): `" +
             re.sub(r"/tmp/step_vs_trl_\w+", "$TMP", res["trl_runs"][-1]["cmd"]) + "`")
    return L


def render(args, v, race_res, orch_res, command):
    L = [SECTION, ""]
    L.append(f"`{command}` (bench/step_vs_trl.py; TRL venv: `bash scripts/trl_venv.sh`). One invocation, both sides "
             f"on the same machine, torch threads {args.threads} on both, OMP_WAIT_POLICY="
             f"{os.environ.get('OMP_WAIT_POLICY') or '(unset)'} on both.")
    L.append("")
    L.append(f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), shared with other engineers' jobs; Python {v['python']}; "
             f"ours: torch {v['torch']}, transformers {v['transformers']}, prefect {v['prefect']}, mlflow {v['mlflow']}; "
             f"TRL venv: trl {v['trl']}, torch {v['trl_torch']}, transformers {v['trl_transformers']}")
    if race_res:
        L += race_lines(args, race_res)
    if orch_res:
        pl, fw = orch_res["plain"], orch_res["flow"]
        mp, mf = med(pl), med(fw)
        lm, rm = med(orch_res["log_metrics"]), med(orch_res["rollout_metrics"])
        L += ["", "### Orchestration overhead: Prefect flow + MLflow vs plain loop", ""]
        L.append(f"The demo's shapes (configs/demo.yaml: tiny Llama, 8 questions x G=8, 48 new tokens, beta 0.04, "
                 f"bf16 autocast, a checkpoint saved every step; verifier rewards only; untrained init checkpoint), threads {args.threads}, throwaway "
                 f"artifacts root (SQLite MLflow) and PREFECT_HOME (temporary Prefect server). Flow = the real "
                 f"`grpo_iteration` flow (Prefect tasks + rollout_metrics + tracking.log_metrics + state file); plain = "
                 f"the same task bodies (`task.fn`) in a loop. {args.flow_rounds} rounds of plain then flow, "
                 f"{args.flow_steps} timed steps each (the first, model-loading step left out on both): "
                 f"{len(pl)} steps per side. Both did identical work (same rewards and lengths step by step): "
                 f"{orch_res['same_work']}. Load average {orch_res['load_before']} before, {orch_res['load_after']} "
                 f"after.")
        L.append("")
        ov = mf - mp
        direct = med(orch_res["orchestration"])
        L.append(f"- **measured inside the flow: {direct * 1000:.0f} ms per step outside the four task bodies "
                 f"(Prefect task runs, MLflow logging, rollout metrics, state file, log line) = "
                 f"{100 * direct / mp:.1f}% of the plain step** (median over {len(orch_res['orchestration'])} steps of "
                 f"step wall time - its task bodies' time; mean {statistics.mean(orch_res['orchestration']) * 1000:.0f} ms)")
        L.append(f"- A/B of whole steps: plain {mp:.3f} s/step, flow {mf:.3f} s/step: {ov * 1000:+.0f} ms/step = "
                 f"{100 * ov / mp:+.1f}% (means {statistics.mean(pl):.3f} vs {statistics.mean(fw):.3f}: "
                 f"{100 * (statistics.mean(fw) - statistics.mean(pl)) / statistics.mean(pl):+.1f}%). On this shared "
                 f"2-vCPU machine identical steps vary by +-20% between runs, so this difference moves by more than "
                 f"the overhead itself from one run to the next; the direct split above does not depend on how fast the work itself ran.")
        L.append(f"- of which MLflow `log_metrics` (one log_batch per step, queued for MLflow's logging thread; SQLite) {lm * 1000:.0f} ms, "
                 f"rollout_metrics (re-reads the step's Parquet) {rm * 1000:.0f} ms; Prefect's task machinery "
                 f"(4 task runs per step, cache-key computation, result persistence), the state file, the "
                 f"checkpoint pruning and the log line the rest of the direct figure, ~{(direct - lm - rm) * 1000:.0f} ms")
        L.append(f"- CPU seconds per step of the bench process: plain {med(orch_res['plain_cpu']):.3f}, flow "
                 f"{med(orch_res['flow_cpu']):.3f} ({(med(orch_res['flow_cpu']) - med(orch_res['plain_cpu'])) * 1000:+.0f} ms "
                 f"in-process); the temporary Prefect server process used "
                 f"{', '.join(f'{x:.1f}' for x in orch_res['server_cpu_per_run'])} CPU s per flow run "
                 f"(~{med(orch_res['server_cpu_per_run']) / (args.flow_steps + 1) * 1000:.0f} ms per step, taken from "
                 f"the same {os.cpu_count()} cores)")
        L.append(f"- one Prefect task run that does nothing, with the step tasks' options (run-keyed cache key, "
                 f"JSON-persisted result), costs {orch_res['task_run_ms']:.1f} ms of in-process CPU (measured in this run): "
                 f"~{4 * orch_res['task_run_ms']:.0f} ms per step for the 4 tasks, "
                 f"{100 * 4 * orch_res['task_run_ms'] / 1000 / mp:.1f}% of the plain step, below the step-to-step noise "
                 f"of these medians. With torch on one thread the Prefect server's work lands on the other core; a "
                 f"machine whose cores are all busy pays it in wall time too.")
        L.append(f"- one-time, not in the figures: temporary Prefect server start {orch_res['server_start_s']:.1f} s "
                 f"(the first flow run); per flow run (grpo_iteration incl. its final greedy evaluation on 32 "
                 f"questions and report) total {', '.join(f'{x:.1f}' for x in orch_res['flow_total'])} s")
    L.append("")
    return "\n".join(L) + "\n"  # a blank line before the next section


def write_section(text):
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    doc = pattern.sub(lambda _: text, doc) if pattern.search(doc) else doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


def main():
    args = ARGS
    argv = sys.argv[1:]
    command = ".venv/bin/python bench/step_vs_trl.py" + (" " + shlex.join(argv) if argv else "")
    print(f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}, "
          f"load {load_str()}, tmp {TMP}", flush=True)
    v = versions(args)
    race_res = None if args.skip_race else race(args)
    if race_res:
        for p in PRECISIONS:
            mo, mt = med([s["wall"] for s in race_res[f"ours_{p}"]]), med([s["wall"] for s in race_res[f"trl_{p}"]])
            print(f"RACE {p}: ours {mo:.3f} s/step, TRL {mt:.3f} s/step, ratio {mo / mt:.2f}", flush=True)
    orch_res = None if args.skip_flow else orchestration(args)
    if orch_res:
        mp, mf = med(orch_res["plain"]), med(orch_res["flow"])
        print(f"ORCH plain {mp:.3f} s/step, flow {mf:.3f} s/step, overhead {100 * (mf - mp) / mp:+.1f}%", flush=True)
    text = render(args, v, race_res, orch_res, command)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": v, "race": race_res, "orchestration": orch_res},
                                              indent=1, default=str))
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
