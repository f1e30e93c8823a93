"""Training-step throughput and peak memory on the tiny LLaVA-OneVision model.

Two comparisons, each measured side by side in one run:

1. mmemb's step (the torch engine: `compute_step` + `engine.step()`, and the diagnostics the
   trainer logs every `log_every` steps; `--stats-every 1` adds them to every step) against a
   minimal hand-written PyTorch loop doing the same computation (encode queries and candidates,
   EGA contrastive loss, backward, clip, AdamW, lr schedule). Target: at most 5% overhead.
2. GradCache against no GradCache at the same global batch (the price of the extra forward, and
   the activation memory it saves).

Timing alternates the variants step by step in one process (so background load hits all alike)
and reports the median. Peak memory is measured per variant in a fresh subprocess: the CUDA
allocator's peak on a GPU, the process's peak RSS on a CPU (which includes the interpreter and
the model, so differences are what matter).

    python benchmarks/train_step.py [--batch 8] [--negatives 1] [--steps 20] [--threads 2]
        [--stats-every N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny" / "llava-onevision")


def _setup(args: argparse.Namespace, grad_cache: dict[str, int] | None) -> dict[str, Any]:
    from mmemb import plugins
    from mmemb.data.collate import Collator
    from mmemb.distributed import DistEnv
    from mmemb.loss import build_loss
    from mmemb.train.engines.base import EngineSetup
    from mmemb.train.engines.torch_engine import TorchEngine
    from mmemb.train.setup import build_model, seed_everything
    from mmemb.train.testing import tiny_recipe

    train: dict[str, Any] = {"batch_size": args.batch, "negatives": args.negatives,
                             "steps": 10_000, "warmup_steps": 10, "lr": 1e-5}
    if grad_cache:
        train["grad_cache"] = grad_cache
    loaded = tiny_recipe(TINY, "unused", "unused", check=False, **train)
    seed_everything(0)
    encoder = build_model(loaded).to(args.device)
    src = plugins.build("source", "synthetic", n=args.batch, seed=1, negatives=args.negatives)
    batch = Collator(encoder.processor, num_negatives=args.negatives)(
        [src.sample(i) for i in range(args.batch)]).to(args.device)
    device = torch.device(args.device)
    engine = TorchEngine(EngineSetup(loaded, encoder, DistEnv(0, 1, 0), device))
    loss = build_loss(loaded.recipe.loss.spec())
    return {"loaded": loaded, "encoder": encoder, "batch": batch, "engine": engine, "loss": loss,
            "stats_every": args.stats_every or loaded.recipe.train.log_every}


def mmemb_step(s: dict[str, Any]) -> None:
    """What the trainer does per step besides loading data and writing logs."""
    from mmemb.train.metrics import step_statistics
    from mmemb.train.step import compute_step

    def check_loss(loss: torch.Tensor) -> None:
        float(loss.detach())  # the trainer reads the loss for its NaN check

    r = s["loaded"].recipe
    out = compute_step(s["engine"], s["batch"], s["loss"], r.train, check_loss=check_loss)
    s["engine"].step()
    s["steps"] = s.get("steps", 0) + 1
    # the trainer's diagnostics (which recompute every logit) run every train.log_every steps;
    # --stats-every 1 measures the worst case, every step
    if s["steps"] % s["stats_every"] == 0:
        step_statistics(out.q, out.c, s["batch"].targets, negatives=r.train.negatives,
                        loss=s["loss"], keys=s["batch"].keys)


def hand_step(s: dict[str, Any]) -> None:
    """The same computation written directly."""
    from mmemb.loss import contrastive_loss

    r, enc, batch, engine = s["loaded"].recipe, s["encoder"], s["batch"], s["engine"]
    q = enc(batch.query)
    c = enc(batch.candidates)
    loss = contrastive_loss(q, c, batch.targets, temperature=r.loss.temperature,
                            reweighter=s["loss"].reweighter, keys=batch.keys)
    float(loss.detach())  # the trainer's NaN check reads the loss too
    engine.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(engine.params, r.train.grad_clip)
    engine.optimizer.step()
    engine.scheduler.step()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_side_by_side(
    args: argparse.Namespace, variants: dict[str, tuple[Any, Any]]
) -> dict[str, float]:
    """Median seconds per step of each (step function, state), alternating."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.warmup):
        for fn, state in variants.values():
            fn(state)
    for _ in range(args.steps):
        for name, (fn, state) in variants.items():
            _sync(args.device)
            t0 = time.perf_counter()
            fn(state)
            _sync(args.device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(args: argparse.Namespace, variant: str) -> float:
    """Peak memory (MiB) of `variant` run alone for a few steps in a fresh process."""
    cmd = [sys.executable, __file__, "--worker", variant, "--batch", str(args.batch),
           "--negatives", str(args.negatives), "--threads", str(args.threads),
           "--device", args.device, "--chunk", str(args.chunk),
           "--stats-every", str(args.stats_every)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def _worker(args: argparse.Namespace) -> None:
    gc = {"query_chunk": args.chunk, "candidate_chunk": args.chunk}
    state = _setup(args, gc if args.worker == "mmemb_gradcache" else None)
    fn = hand_step if args.worker == "hand" else mmemb_step
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        fn(state)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mib": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="queries per step")
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--chunk", type=int, default=4, help="GradCache chunk (queries and candidates)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--stats-every", type=int, default=0,
                   help="mmemb's diagnostics every N steps (default: the recipe's log_every, as "
                        "the trainer does; 1 = every step, the worst case)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # The same batch again and again drives the softmax of a tiny model towards denormal
    # numbers, which are ~100x slower on a CPU and would swamp what is measured.
    torch.set_flush_denormal(True)
    if args.worker:
        _worker(args)
        return
    gc = {"query_chunk": args.chunk, "candidate_chunk": args.chunk}
    plain, cached = _setup(args, None), _setup(args, gc)
    hand = _setup(args, None)
    t = time_side_by_side(args, {"hand": (hand_step, hand), "mmemb": (mmemb_step, plain),
                                 "mmemb_gradcache": (mmemb_step, cached)})
    mem = {k: peak_memory(args, k) for k in ("hand", "mmemb", "mmemb_gradcache")}
    n = args.batch
    print(f"tiny LLaVA-OneVision, {n} queries x (1 + {args.negatives}) candidates per step, "
          f"device {args.device}, {args.threads} threads, median of {args.steps} steps, "
          f"diagnostics every {plain['stats_every']} steps")
    print(f"{'variant':<28}{'samples/s':>12}{'s/step':>10}{'peak MiB':>11}")
    for name, label in (("hand", "hand-written PyTorch loop"), ("mmemb", "mmemb (torch engine)"),
                        ("mmemb_gradcache", f"mmemb + GradCache (chunk {args.chunk})")):
        print(f"{label:<28}{n / t[name]:>12.1f}{t[name]:>10.4f}{mem[name]:>11.0f}")
    print(f"mmemb overhead vs hand-written: {100 * (t['mmemb'] / t['hand'] - 1):+.1f}% time")
    print(f"GradCache vs none (same batch): {t['mmemb_gradcache'] / t['mmemb']:.2f}x time, "
          f"{mem['mmemb_gradcache'] - mem['mmemb']:+.0f} MiB peak")


if __name__ == "__main__":
    main()
