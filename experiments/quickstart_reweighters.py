"""Does the reweighter matter on the quickstart? P@1 after training, per reweighter and seed.

Runs `mmemb train recipes/quickstart.yaml` once per (reweighter, seed) with the recipe's other
settings, reads each run's eval results, and prints a markdown table (mean and per-seed P@1 on the
held-out split, plus whether the run collapsed: final loss at ln(candidates), i.e. uniform scores).

    python experiments/quickstart_reweighters.py --seeds 0 1 --parallel 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"

CONFIGS: dict[str, list[str]] = {
    "none": ["loss.reweighter=none"],
    "ega (normalize: false)": ["loss.reweighter.name=ega", "loss.reweighter.normalize=false"],
    "ega (normalize: true)": ["loss.reweighter.name=ega", "loss.reweighter.normalize=true"],
    "llave (alpha 9)": ["loss.reweighter=llave"],
}


def run(name: str, seed: int, workdir: Path) -> dict[str, float]:
    out = workdir / f"{list(CONFIGS).index(name)}-{name.split()[0]}-seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "mmemb",
        "train",
        str(RECIPE),
        *CONFIGS[name],
        f"seed={seed}",
        f"model.backbone.seed={seed}",
        f"output_dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if not (out / "eval_after" / "results.json").is_file():  # finished runs are reused
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} seed {seed} failed:\n{proc.stderr[-2000:]}")
    after = json.loads((out / "eval_after" / "results.json").read_text())
    before = json.loads((out / "eval_before" / "results.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [m["loss"] for m in metrics[-20:]]
    candidates = 16 * 4  # batch 16 x (1 positive + 3 negatives) on one process

    def mean_p1(doc: dict) -> float:
        scores = [d["metrics"]["precision@1"] for d in doc["datasets"].values()]
        return sum(scores) / len(scores)

    return {
        "before": mean_p1(before),
        "after": mean_p1(after),
        "final_loss": sum(last) / len(last),
        "collapsed": float(abs(sum(last) / len(last) - math.log(candidates)) < 0.02),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    # Prepare the recipe's data once, here: parallel runs would race to create the same shards.
    from mmemb.distributed import dist_env
    from mmemb.recipe import load_recipe
    from mmemb.train.data import ensure_prepared

    cwd = os.getcwd()
    os.chdir(args.workdir)
    try:
        ensure_prepared(load_recipe(RECIPE), dist_env())
    finally:
        os.chdir(cwd)
    jobs = [(name, seed) for name in args.configs for seed in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda job: run(*job, args.workdir.resolve()), jobs))
    table = dict(zip(jobs, results, strict=True))
    print("| reweighter | P@1 after (mean) | per seed | final loss | collapsed runs |")
    print("|---|---:|---|---:|---:|")
    for name in args.configs:
        rows = [table[(name, s)] for s in args.seeds]
        per_seed = ", ".join(f"{r['after']:.1f}" for r in rows)
        mean = sum(r["after"] for r in rows) / len(rows)
        loss = sum(r["final_loss"] for r in rows) / len(rows)
        collapsed = int(sum(r["collapsed"] for r in rows))
        print(f"| {name} | {mean:.1f} | {per_seed} | {loss:.3f} | {collapsed}/{len(rows)} |")
    befores = {round(r["before"], 1) for r in results}
    print(f"\nP@1 before training (untrained model): {', '.join(map(str, sorted(befores)))}")


if __name__ == "__main__":
    main()
