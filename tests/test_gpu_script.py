"""benchmarks/gpu/run.sh --dry-run: the prepared GPU run, on the CPU with tiny shapes, so it
cannot rot while no GPU is at hand (issue 15). The dry run uses the current environment, runs
the Triton kernel through its interpreter, the tiny LLaVA-OneVision for the training step, and
skips with a reason what needs CUDA (inf-cl) or a first-time JIT build (DeepSpeed on a CPU)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
EXPECTED_FILES = {"env.txt", "pytest.log", "loss.log", "loss_plain.json", "loss_ega.json",
                  "train.log", "train.jsonl", "summary.txt"}

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("bash") is None,
                                reason="needs bash and coreutils' timeout")


def _run(
    out: Path, *, budget: int | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if budget is not None:
        env["MMEMB_GPU_BUDGET_S"] = str(budget)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)


def _stages(summary: str) -> dict[str, str]:
    block = summary.split("stages:\n", 1)[1].split("\n\n", 1)[0]
    return {ln.split()[0]: ln.split(None, 1)[1] for ln in block.splitlines() if ln.strip()}


def test_scripts_parse_and_the_gpu_run_fits_its_budget():
    for script in (SCRIPT, SCRIPT.with_name("wheels.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)
    text = SCRIPT.read_text()
    budget = int(re.search(r"BUDGET=\$\{MMEMB_GPU_BUDGET_S:-(\d+)\}", text).group(1))
    assert budget <= 9 * 60  # the limit for one H200
    # every GPU stage runs under `timeout` through the stage helper
    for needle in ("stage pytest", "stage loss-plain", "stage loss-ega", "stage train-torch",
                   "stage train-zero2", "--device cuda", "--peer", "262144"):
        assert needle in text, needle
    assert "/benchmarks/gpu/wheels/" in (ROOT / ".gitignore").read_text()


def test_dry_run_runs_every_stage_and_summarises(tmp_path: Path):
    out = tmp_path / "out"
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the summary is printed last, and every file stays within what the device tool returns
    tail = proc.stdout.strip().splitlines()
    assert tail[-1].startswith("run.sh:") and "# benchmarks/gpu/run.sh summary" in proc.stdout
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    summary = (out / "summary.txt").read_text()
    stages = _stages(summary)
    assert list(stages) == ["env", "install", "pytest", "loss-plain", "loss-ega", "train-torch",
                            "train-zero2"]
    for name, status in stages.items():
        assert status.startswith(("ok", "skipped")), (name, status, proc.stdout[-3000:])
    assert stages["install"].startswith("skipped") and stages["train-zero2"].startswith("skipped")

    # pytest -m gpu was collected and skipped (no CUDA here), not broken
    assert "skipped" in summary.split("pytest -m gpu:", 1)[1].splitlines()[0]

    # the loss benchmark ran the Triton kernel (interpreter) and the full matrix on one problem:
    # their gradients agree; the peer and the oversized full matrix are skipped with a reason
    plain = json.loads((out / "loss_plain.json").read_text())
    rows = {r["impl"]: r for r in plain["rows"]}
    assert rows["tiled"]["backend"] == "triton" and rows["full"]["backend"] == "full"
    assert math.isclose(rows["tiled"]["grad_norm"], rows["full"]["grad_norm"], rel_tol=1e-4)
    assert rows["tiled"]["tflops"] > 0
    assert any("inf-cl peer skipped" in n for n in plain["notes"])
    ega = {r["impl"]: r for r in json.loads((out / "loss_ega.json").read_text())["rows"]}
    assert ega["full"]["status"] == "skipped" and ega["tiled"]["status"] == "ok"

    # one training step record, finite losses
    (record,) = [json.loads(ln) for ln in (out / "train.jsonl").read_text().splitlines()]
    assert record["engine"] == "torch" and record["samples_per_s"] > 0
    assert record["trainable"] < record["params"]  # LoRA: most weights frozen
    assert all(math.isfinite(x) for x in record["losses"])
    assert "GPU: none" in (out / "env.txt").read_text()


def test_a_spent_budget_skips_stages_and_still_summarises(tmp_path: Path):
    out = tmp_path / "out"
    proc = _run(out, budget=10, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = _stages((out / "summary.txt").read_text())
    assert stages["env"].startswith("skipped: the 10 s budget is spent")
    assert stages["train-torch"].startswith("skipped")
    assert "loss benchmark: no results" in proc.stdout
