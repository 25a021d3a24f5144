"""GPU scale-out probe: FSDP2 update MFU and trainer->engine weight-sync seconds for a Qwen2.5-0.5B-shaped model.

Self-contained: imports only torch, transformers (and safetensors, which transformers itself requires) and
the standard library. The model is built locally with random weights (no hub access needed):
Qwen2Config(hidden 896, 24 layers, 14 heads, 2 kv heads, intermediate 4864, vocab 151936, tied embeddings).

    python bench/gpu_scale_out.py                    # one GPU (H100/H200), bf16
    python bench/gpu_scale_out.py --world-size 8     # FSDP2 over 8 GPUs (weight sync still uses GPU 0)
    python bench/gpu_scale_out.py --smoke            # tiny shapes on CPU (gloo), also with --world-size 2

What it measures:
1. FSDP2 update: the script spawns --world-size ranks (torch.multiprocessing.spawn; NCCL on cuda, gloo on
   cpu). Each rank fully_shards every decoder layer, then the root, with bf16 params / fp32 reduce and fp32
   master weights, AdamW(lr 1e-6). A step = forward on random tokens + GRPO-like token loss (mean -logp of
   the sampled tokens, log_softmax in fp32) + backward + clip_grad_norm_(1.0) + optimizer.step.
   MFU = 6 * N_params * tokens_per_s / (peak_flops * world_size)  (6N ignores attention FLOPs, so it
   slightly understates the true utilisation at long sequences). Also peak GPU memory per rank.
2. Weight sync of the bf16 weights (the trainer's fp32->bf16 cast is not timed), on one device:
   (a) safetensors save to /dev/shm by the "trainer" + load + load_state_dict into a second model
       instance by the "engine" -- both IN ONE PROCESS (the file round trip is what is being measured);
   (b) CUDA IPC: a spawned child process ("engine") receives the tensors through a torch.multiprocessing
       queue (CUDA tensors travel as IPC handles, no host copy), load_state_dicts them and acks; timed from
       the handoff to the ack. Skipped on CPU.
   After each, a sha256 over every weight's bytes must match the trainer's (bitwise equality).
Results: a Markdown table on stdout and JSON at --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

FULL = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, vocab_size=151936)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000)


def build_model(smoke: bool, device: torch.device, seed: int, dtype=torch.float32) -> Qwen2ForCausalLM:
    config = Qwen2Config(**(TINY if smoke else FULL), max_position_embeddings=32768, tie_word_embeddings=True,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(seed)  # same seed on every rank: fully_shard keeps each rank's chunk of identical weights
    with device:  # initialise directly on the device (random init of 0.5B params on CPU is slow)
        model = Qwen2ForCausalLM(config)
    return model.to(dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weights(model) -> dict[str, torch.Tensor]:
    # named_parameters() drops the tied lm_head.weight duplicate; Qwen2 has no persistent buffers, so this is
    # the whole state dict minus the alias (load_state_dict(strict=False) re-fills the tie through the alias).
    return {n: p.detach() for n, p in model.named_parameters()}


def digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(weights(model).items()):
        h.update(name.encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # raw bytes: bitwise check
    return h.hexdigest()


def load_into(engine, sd: dict[str, torch.Tensor]) -> None:
    res = engine.load_state_dict(sd, strict=False)
    assert not res.unexpected_keys and set(res.missing_keys) <= {"lm_head.weight"}, res


# ----------------------------------------------------------------------------------------------- FSDP2
def fsdp_worker(rank: int, world: int, args, queue) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # do not oversubscribe the cores
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            device_id=device if cuda else None)
    mesh = init_device_mesh(device.type, (world,))

    model = build_model(args.smoke, device, seed=0)  # fp32 = the master weights the optimizer updates
    n_params = sum(p.numel() for p in model.parameters())  # counted before sharding, tied weight once
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # Per-layer units: each layer's all-gather overlaps the previous layer's compute, and only one layer's
    # unsharded params live at a time. The root unit takes the embeddings / tied lm_head / final norm.
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    gen = torch.Generator(device=device).manual_seed(1234 + rank)  # different data on every rank

    def step() -> float:
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=device, generator=gen)
        logits = model(input_ids=ids).logits[:, :-1]
        # GRPO-like token loss: -logp of the "sampled" (next) tokens, log_softmax in fp32 like real losses do
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        loss = -logp.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    queue.put(dict(rank=rank, n_params=n_params, step_s=times, peak_mem_gib=peak))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fsdp(args) -> dict:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(fsdp_worker, args=(args.world_size, args, queue), nprocs=args.world_size, join=True)
    ranks = sorted((queue.get() for _ in range(args.world_size)), key=lambda r: r["rank"])
    # A step ends when the slowest rank finishes: use the per-step max over ranks.
    step_s = [max(r["step_s"][i] for r in ranks) for i in range(args.steps)]
    tokens = args.batch * args.seq_len * args.world_size  # global tokens per step
    tok_s = tokens / statistics.mean(step_s)
    n = ranks[0]["n_params"]
    mfu = 6 * n * tok_s / (args.peak_tflops * 1e12 * args.world_size)
    return dict(n_params=n, step_s=step_s, mean_step_s=statistics.mean(step_s), tokens_per_step=tokens,
                tokens_per_s=tok_s, mfu=mfu, peak_mem_gib_per_rank=[r["peak_mem_gib"] for r in ranks])


# ----------------------------------------------------------------------------------------- weight sync
def sync_shm(trainer, engine, device, reps: int) -> dict:
    from safetensors.torch import load_file, save_file  # a hard dependency of transformers

    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    path = shm / f"gpu_scale_out_{os.getpid()}.safetensors"
    sd, out = weights(trainer), []
    try:
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            save_file(sd, str(path))  # trainer side: device -> host -> shm file
            t1 = time.perf_counter()
            load_into(engine, load_file(str(path), device=str(device)))  # engine side: file -> device
            sync(device)
            out.append((time.perf_counter() - t0, t1 - t0))
            path.unlink()
    finally:
        path.unlink(missing_ok=True)
    return dict(dir=str(shm), seconds=[o[0] for o in out], save_seconds=[o[1] for o in out],
                bitwise_equal=digest(engine) == digest(trainer))


def ipc_engine(smoke: bool, device: str, inbox, outbox) -> None:
    device = torch.device(device)  # cuda:0 for real; a CPU device only when the logic is tested without a GPU
    engine = build_model(smoke, device, seed=1, dtype=torch.bfloat16)  # different weights until synced
    outbox.put("ready")
    while (sd := inbox.get()) is not None:  # the dict's CUDA tensors arrive as IPC handles (zero-copy)
        load_into(engine, sd)  # one device-to-device copy into the engine's own parameters
        sync(device)
        del sd  # release the handles promptly so the producer's refcounts can drop
        outbox.put("ack")
    outbox.put(digest(engine))


def sync_ipc(trainer, device, smoke: bool, reps: int) -> dict:
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=ipc_engine, args=(smoke, str(device), inbox, outbox))
    child.start()
    assert outbox.get() == "ready"
    sd, out = weights(trainer), []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        inbox.put(sd)  # the trainer keeps sd alive, as CUDA IPC requires of the producer
        assert outbox.get() == "ack"
        out.append(time.perf_counter() - t0)
    inbox.put(None)
    equal = outbox.get() == digest(trainer)
    child.join()
    return dict(seconds=out, bitwise_equal=equal)


def run_sync(args) -> dict:
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    trainer = build_model(args.smoke, device, seed=0, dtype=torch.bfloat16)
    engine = build_model(args.smoke, device, seed=1, dtype=torch.bfloat16)
    nbytes = sum(t.numel() * t.element_size() for t in weights(trainer).values())
    res = dict(bytes=nbytes, shm=sync_shm(trainer, engine, device, args.sync_reps))
    del engine
    res["ipc"] = sync_ipc(trainer, device, args.smoke, args.sync_reps) if cuda else "skipped: no CUDA (CPU smoke)"
    for r in (r for r in (res["shm"], res["ipc"]) if isinstance(r, dict)):
        r["first_s"], r["median_s"] = r["seconds"][0], statistics.median(r["seconds"])
        r["median_gb_s"] = nbytes / r["median_s"] / 1e9
    return res


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU (gloo)")
    p.add_argument("--world-size", type=int, default=1)
    for flag in ("--batch", "--seq-len", "--steps"):  # defaults: 16 x 1024, 5 steps (smoke: 2 x 32, 2 steps)
        p.add_argument(flag, type=int)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sync-reps", type=int, default=3, help="weight-sync repetitions (first = cold)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-device dense bf16 peak (H100/H200)")
    p.add_argument("--out", help="JSON path (default bench/figures/gpu_scale_out.json; a temp file with --smoke)")
    args = p.parse_args()
    # Smoke results must not overwrite the GPU figures, so they go to the temp dir unless --out says otherwise.
    args.out = args.out or str(Path(tempfile.gettempdir()) / "gpu_scale_out_smoke.json" if args.smoke
                               else Path(__file__).resolve().parent / "figures" / "gpu_scale_out.json")
    d = (2, 32, 2) if args.smoke else (16, 1024, 5)
    args.batch, args.seq_len, args.steps = args.batch or d[0], args.seq_len or d[1], args.steps or d[2]
    if not args.smoke:
        assert torch.cuda.device_count() >= args.world_size, "need one GPU per rank (or use --smoke)"

    fsdp = run_fsdp(args)
    ws = run_sync(args)
    cuda = torch.cuda.is_available() and not args.smoke
    result = dict(
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        device=torch.cuda.get_device_name(0) if cuda else "cpu (smoke)", world_size=args.world_size,
        smoke=args.smoke, model=TINY if args.smoke else FULL, batch=args.batch, seq_len=args.seq_len,
        warmup=args.warmup, steps=args.steps, peak_tflops=args.peak_tflops,
        mfu_formula="6 * N_params * tokens_per_s / (peak_tflops * 1e12 * world_size); N counts the tied "
                    "embedding once; attention FLOPs not counted",
        fsdp=fsdp, weight_sync=ws)
    gib = lambda v: "n/a (cpu)" if v is None else f"{v:.2f}"
    rows = [("device", result["device"]), ("world size", args.world_size),
            ("params", f"{fsdp['n_params'] / 1e6:.1f} M"),
            ("batch x seq (per rank)", f"{args.batch} x {args.seq_len}"),
            ("FSDP2 step s (mean)", f"{fsdp['mean_step_s']:.4f}"),
            ("tokens/s (global)", f"{fsdp['tokens_per_s']:.0f}"),
            (f"MFU (peak {args.peak_tflops:g} TFLOPS/dev)", f"{100 * fsdp['mfu']:.2f} %"),
            ("peak mem GiB per rank", ", ".join(gib(v) for v in fsdp["peak_mem_gib_per_rank"])),
            ("sync bytes (bf16)", f"{ws['bytes'] / 1e6:.1f} MB")]
    for key, label in (("shm", f"safetensors via {ws['shm']['dir']} (in-process)"), ("ipc", "CUDA IPC (child)")):
        r = ws[key]
        rows += [(f"{label}: first / median s", f"{r['first_s']:.4f} / {r['median_s']:.4f}"),
                 (f"{label}: GB/s (median), bitwise equal", f"{r['median_gb_s']:.2f}, {r['bitwise_equal']}")
                 ] if isinstance(r, dict) else [(label, r)]
    print("| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    assert ws["shm"]["bitwise_equal"] and (not isinstance(ws["ipc"], dict) or ws["ipc"]["bitwise_equal"])


if __name__ == "__main__":
    main()
