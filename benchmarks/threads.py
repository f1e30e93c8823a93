"""Quickstart training throughput on an idle machine and beside one busy 2-thread process, with
the CLI's thread defaults (mmemb.threads) against the settings before them, side by side in one run.

Each measurement is a fresh process training the quickstart recipe (tiny LLaVA-OneVision, batch
16 x 3 hard negatives, EGA) on synthetic shards prepared once; it runs for a fixed wall-clock
budget and its throughput is counted from the step lines it logs after a warm-up. Settings:

- old: what `mmemb` did before: nothing (torch's default of one thread per core, GNU OpenMP's
  default spin-then-sleep wait);
- default: what `mmemb` does now (`mmemb.threads.prime_environment()`, called before torch is
  imported: OMP_WAIT_POLICY=PASSIVE, OMP_NUM_THREADS = the CPUs this process may use);
- default, --threads 1: the same wait policy with one thread.

"Busy" is another torch process doing 256x256 matmuls on 2 threads with the old settings (what a
second training run or a test suite looks like to the scheduler), started before and stopped
after the measurement. Load averages are printed: on a shared machine "idle" is relative.

    python benchmarks/threads.py [--budget 15] [--warmup-steps 3]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
OMP_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT",
            "MMEMB_THREADS")
SETTINGS: dict[str, dict[str, str]] = {
    "old (torch/OpenMP defaults)": {},
    "default (PASSIVE, all CPUs)": {"BENCH_PRIME": "1"},
    "default, --threads 1": {"BENCH_PRIME": "1", "MMEMB_THREADS": "1"},
}
BUSY = (
    "import torch\n"
    "torch.set_num_threads(2)\n"
    "a = torch.randn(256, 256)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a)\n"
)
STEP = re.compile(r"^(?P<t>[\d.]+) train (?P<step>\d+)/")


class _Stamped:
    """A stderr that writes each line to stdout with the time it was written."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                sys.stdout.write(f"{time.perf_counter():.3f} {line}\n")
        sys.stdout.flush()
        return len(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        return False


def worker(shards: str, out: str) -> None:
    """One training run that never ends on its own; every log line is stamped with the time."""
    if os.environ.get("BENCH_PRIME") == "1":
        from mmemb import threads  # what `mmemb`'s entry point does before importing torch

        threads.prime_environment()
        if os.environ.get("MMEMB_THREADS"):
            threads.use_cli_threads(int(os.environ["MMEMB_THREADS"]))
    import torch

    from mmemb.recipe import load_recipe
    from mmemb.train import train

    print(f"{time.perf_counter():.3f} threads={torch.get_num_threads()} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}", flush=True)
    sys.stderr = _Stamped()  # the trainer's progress lines go to stderr
    loaded = load_recipe(RECIPE, [
        f"data.train=[{{shards: {shards}}}]", "data.eval=[]", f"output_dir={out}",
        "train.steps=100000", "train.warmup_steps=10", "train.log_every=1",
        "eval.before_training=false", "train.tensorboard=false",
    ])
    train(loaded, echo=lambda line: print(f"{time.perf_counter():.3f} {line}", flush=True),
          save=False, evaluate=False)


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra})
    return env


def measure(shards: Path, extra: dict[str, str], budget: float, warmup: int,
            batch: int) -> tuple[float, str]:
    """(samples/s after `warmup` steps over `budget` seconds of training, the thread line)."""
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(shards), out],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_clean_env(extra),
        )
        # However slow the steps come, a run ends: budget plus generous start-up time.
        watchdog = threading.Timer(budget + 240, proc.terminate)
        watchdog.start()
        assert proc.stdout is not None
        first: tuple[float, int] | None = None
        last: tuple[float, int] | None = None
        info = ""
        deadline: float | None = None
        try:
            for line in proc.stdout:
                if "threads=" in line and not info:
                    info = line.split(" ", 1)[1].strip()
                m = STEP.match(line)
                if m is None:
                    continue
                t, step = float(m["t"]), int(m["step"])
                if step >= warmup and first is None:
                    first = (t, step)
                    deadline = time.monotonic() + budget
                last = (t, step)
                if deadline is not None and time.monotonic() > deadline:
                    break
        finally:
            watchdog.cancel()
            proc.terminate()
            proc.wait()
    if first is None or last is None or last[1] == first[1]:
        return float("nan"), info
    return (last[1] - first[1]) * batch / (last[0] - first[0]), info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=15.0, help="seconds of timed training per run")
    p.add_argument("--warmup-steps", type=int, default=3)
    args = p.parse_args()
    # A SIGTERM (e.g. from `timeout`) unwinds through the `finally`s: no busy process is left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from mmemb.recipe import load_recipe
    from mmemb.train.testing import prepare_synthetic

    batch = load_recipe(RECIPE, check_components=False).recipe.train.batch_size
    print(f"machine: {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; "
          f"python {sys.version.split()[0]}; budget {args.budget:.0f} s per run", flush=True)
    results: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-threads-data-") as tmp:
        shards = prepare_synthetic(Path(tmp) / "train", n=800, negatives=3)
        for load in ("idle", "busy"):
            for name, extra in SETTINGS.items():
                busy = None
                if load == "busy":
                    busy = subprocess.Popen([sys.executable, "-c", BUSY],
                                            env=_clean_env({"OMP_NUM_THREADS": "2"}))
                    time.sleep(2)  # let it reach its loop
                try:
                    before = os.getloadavg()[0]
                    rate, info = measure(shards, extra, args.budget, args.warmup_steps, batch)
                finally:
                    if busy is not None:
                        busy.terminate()
                        busy.wait()
                results[(name, load)] = rate
                print(f"  {load:4s}  {name:30s} {rate:6.1f} samples/s   [{info}; "
                      f"load avg {before:.1f}]", flush=True)

    print("\n| setting | idle samples/s | busy samples/s | busy slowdown |")
    print("|---|---|---|---|")
    for name in SETTINGS:
        idle, busy = results[(name, "idle")], results[(name, "busy")]
        print(f"| {name} | {idle:.1f} | {busy:.1f} | {idle / busy:.1f}x |")
    old = next(iter(SETTINGS))
    for name in list(SETTINGS)[1:]:
        print(f"{name} vs old: idle {results[(name, 'idle')] / results[(old, 'idle')]:.2f}x, "
              f"busy {results[(name, 'busy')] / results[(old, 'busy')]:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
