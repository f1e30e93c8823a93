"""Helpers for tests that run `python -m mmemb train` as a real subprocess (signals, kills, limits).

`stalled(...)` runs the same CLI through a small wrapper that makes one function write a
ready-file and sleep on its n-th call: a deterministic moment to send a signal (a phase such as
"saving the model" lasts milliseconds on the tiny model). The code under test is unchanged; only
the stalled function waits.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mmemb.train.testing import prepare_synthetic, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny" / "llava-onevision")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

_WRAPPER = '''
import importlib, pathlib, sys, time
target, ready, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
del sys.argv[1:4]
module, _, attr = target.partition(":")
owner = importlib.import_module(module)
cls, _, meth = attr.partition(".")
holder = getattr(owner, cls) if meth else owner
name = meth or attr
original = getattr(holder, name)
calls = [0]
def stalled(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        pathlib.Path(ready).write_text("ready")
        time.sleep(600)  # the test signals or kills the process here
    return original(*args, **kwargs)
setattr(holder, name, stalled)
sys.argv[0] = "mmemb/__main__.py"  # so the printed command reads `python -m mmemb`
from mmemb.cli import main
main()
'''


def write_recipe(tmp: Path, *, n: int = 24, shard_size: int = 16, prepared: bool = True,
                 **train: Any) -> Path:
    """A recipe file for the tiny model, output in ``tmp/run``; `prepared=False` leaves the
    data to the trainer's automatic prepare (a `source:` entry)."""
    data = tmp / "data"
    if prepared:
        prepare_synthetic(data, n=n, negatives=1, shard_size=shard_size)
    loaded = tiny_recipe(TINY, data, tmp / "run", check=prepared,
                         **{"steps": 6, "batch_size": 2, **train})
    raw = loaded.recipe.model_dump(mode="json")
    if not prepared:
        raw["data"]["train"] = [{"shards": str(data), "source": "synthetic",
                                 "args": {"n": n, "seed": 1, "negatives": 1}}]
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def command(recipe: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mmemb", "train", str(recipe), *args]


def run(cmd: Sequence[str], *, timeout: float = 300,
        preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), env=ENV, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def start(cmd: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(list(cmd), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def stalled(target: str, ready: Path, cmd: Sequence[str], *, nth: int = 1
            ) -> subprocess.Popen[str]:
    """`cmd` (a `command(...)`) with `target` ("module:function" or "module:Class.method")
    stalled on its `nth` call, after writing `ready`."""
    wrapped = [sys.executable, "-c", _WRAPPER, target, str(ready), str(nth), *cmd[3:]]
    return start(wrapped)


def metrics_steps(out: Path) -> list[int]:
    """The `step` of every step line in metrics.jsonl, as written (event lines left out)."""
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return [r["step"] for r in lines if "step" in r and "event" not in r]


def wait_until(proc: subprocess.Popen[str], ready: Callable[[], bool], *,
               timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"exited with {proc.returncode} before it was ready:\n{out}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the process")
        time.sleep(0.05)


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return out


def printed_resume_command(output: str) -> list[str]:
    """The command the stop message says to run (its last line), ready for subprocess."""
    line = output.strip().splitlines()[-1].strip()
    words = shlex.split(line)
    assert words[:3] == ["python", "-m", "mmemb"], line
    return [sys.executable, *words[1:]]
