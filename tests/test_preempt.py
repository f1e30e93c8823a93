"""Preemption with a real signal to a real `mmemb train` subprocess: it finishes the step, writes a
checkpoint, exits with PREEMPTED_EXIT_CODE, and `--resume auto` continues from there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmemb.train import PREEMPTED_EXIT_CODE
from mmemb.train.checkpoint import list_checkpoints
from mmemb.train.testing import prepare_synthetic, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny" / "llava-onevision")


def _metrics_steps(out: Path) -> list[int]:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(x)["step"] for x in f.read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_and_exits_for_requeue(tmp_path: Path, signum: int) -> None:
    data = prepare_synthetic(tmp_path / "data", n=24, negatives=1)
    out = tmp_path / "run"
    loaded = tiny_recipe(TINY, data, out, steps=10_000, batch_size=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(loaded.recipe.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mmemb", "train", str(recipe)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 180
        while len(_metrics_steps(out)) < 2:  # training is under way
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, output
    assert signal.Signals(signum).name in output
    assert output.strip().splitlines()[-1].endswith(f"train {recipe} --resume auto")
    stopped = _metrics_steps(out)[-1]
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == [f"step-{stopped:08d}"]  # the step it was in, finished
    if signum == signal.SIGTERM:  # resume once (the same path for both signals)
        more = subprocess.run([*cmd, f"train.steps={stopped + 2}", "--resume", "auto"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert more.returncode == 0, more.stdout + more.stderr
        assert f"resumed from {ckpts[0]} at step {stopped}" in more.stdout
        assert _metrics_steps(out) == list(range(1, stopped + 3))
