"""Compare loss configurations (reweighters, masking, ...) on any recipe: paired seeds, statistics.

Each (config, seed) is one `mmemb train RECIPE seed=S output_dir=... <overrides>` subprocess on
one thread (`--threads`; the machine is shared and OpenMP threads spin-wait on each other). A seed
fixes the data order and, when the backbone takes a `seed` (random initialisation), the
initial weights, so runs of different configs with the same seed are paired: they differ only by
the config. From each run's eval results and metrics.jsonl it writes

  WORKDIR/summary.md    a markdown table: P@1 per seed (strict, and with VLM2Vec's tie rule when
                        the eval task reports both), mean, std, the paired difference to the
                        baseline config with a 95 % t interval, paired t-test and Wilcoxon
                        signed-rank p-values, final loss, collapsed runs (final loss within 1 %
                        of ln(candidates per row)), runs where the trainer's collapse alarm fired
  WORKDIR/summary.json  every number in the table, per run
  WORKDIR/reweighters.png   per-seed P@1 (paired lines) and loss curves per config

A config is ``NAME=override,override,...`` (recipe `key=value` overrides, comma-separated;
``NAME=`` runs the recipe as it is). Finished runs with the same command are reused, so an
interrupted study resumes where it stopped, and more `--seeds` extend it; `--summarize-only`
tabulates what has finished; `--compare A:B` adds paired comparisons other than the baseline's
(e.g. a reweighter with and without duplicate masking). Each run's model and checkpoints are
deleted after it is read (`--keep-models` keeps them).

    python experiments/reweighters.py --recipe recipes/quickstart.yaml --seeds 0 1 2 3 4 \\
        --parallel 2 --configs none=loss.reweighter=none \\
        "ega=loss.reweighter.name=ega,loss.reweighter.normalize=true" llave=loss.reweighter=llave
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METRIC = "precision@1"
NOT_RUN = "not run"  # --summarize-only and the run has not finished


# ---------------------------------------------------------------------------------------------
# configs


def parse_config(text: str) -> tuple[str, list[str]]:
    """``NAME=k=v,k2=v2`` -> (NAME, ['k=v', 'k2=v2']). A comma only separates overrides when a
    ``key=`` follows it, so YAML list values (``recall_at=[1,5]``) survive."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"config {text!r}: expected NAME=override,override (or NAME=)")
    overrides = [o for o in re.split(r",(?=[\w.]+=)", rest) if o.strip()]
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"config {text!r}: override {o!r} is not key=value")
    return name.strip(), overrides


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "config"


# ---------------------------------------------------------------------------------------------
# statistics (pure functions: tested in tests/test_experiments.py)


@dataclass
class Paired:
    """Paired comparison of a config against the baseline over the seeds both have."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    t_p: float
    wilcoxon_p: float
    wins: int
    losses: int


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; nan for fewer than two values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n < 2:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def paired_stats(diffs: Sequence[float], *, confidence: float = 0.95) -> Paired:
    """Mean paired difference with its t interval, the paired t-test p (= one-sample t on the
    differences) and the two-sided Wilcoxon signed-rank p (exact for small n; zero differences
    dropped, as Wilcoxon's original rule; nan when every difference is zero). With 5 seeds the
    smallest possible Wilcoxon p is 0.0625, so it can only ever say "not significant at 5 %"."""
    from scipy import stats

    n = len(diffs)
    m, s = mean_std(diffs)
    wins = sum(d > 0 for d in diffs)
    losses = sum(d < 0 for d in diffs)
    if n < 2:
        return Paired(n, m, s, math.nan, math.nan, math.nan, math.nan, wins, losses)
    if s == 0:
        # every seed moved by exactly the same amount (likely with few seeds and a discrete
        # metric: one query is 1/N): the t statistic is undefined, not infinitely significant
        t_p = 1.0 if m == 0 else math.nan
        low = high = m if m == 0 else math.nan
    else:
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * s / math.sqrt(n)
        low, high = m - half, m + half
        t_p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    nonzero = [d for d in diffs if d != 0]
    w_p = (float(stats.wilcoxon(nonzero, zero_method="wilcox").pvalue)
           if nonzero else math.nan)
    return Paired(n, m, s, low, high, t_p, w_p, wins, losses)


def collapsed(final_loss: float, candidates: float, *, tolerance: float = 0.01) -> bool:
    """Whether the loss sits at ln(candidates), the value of uniform scores over a row's
    candidates (within `tolerance`, relative): the model stopped separating anything."""
    ref = math.log(candidates)
    return abs(final_loss - ref) <= tolerance * ref


def final_loss(losses: Sequence[float], *, share: float = 0.05, minimum: int = 10) -> float:
    """Mean loss over the last `share` of the steps (at least `minimum` steps): one step's loss
    is noisy."""
    if not losses:
        return math.nan
    k = min(len(losses), max(minimum, int(len(losses) * share)))
    tail = losses[-k:]
    return sum(tail) / len(tail)


# ---------------------------------------------------------------------------------------------
# one run


@dataclass
class RunResult:
    config: str
    seed: int
    ok: bool
    score: float = math.nan  # the eval task's primary metric, mean over datasets
    p1_ties_hit: float | None = None  # VLM2Vec's rule: a tie with the positive is a hit
    p1_strict: float | None = None  # a tie is a miss
    before: float | None = None
    final_loss: float = math.nan
    candidates: float = math.nan  # per row, for the collapse test
    collapsed: bool = False
    alarm: bool = False  # the trainer's collapse alarm fired (a "collapse" record in metrics)
    losses: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    seconds: float = math.nan
    error: str = ""


def read_scores(results: Mapping[str, Any]) -> dict[str, float | None]:
    """Mean over datasets of an eval results.json: the primary metric, and for the `mmeb` task
    P@1 under both tie rules (what it reports in `metrics` follows its `ties` setting, the other
    rule is in `extra`)."""
    datasets = list(results["datasets"].values())
    if not datasets:
        raise ValueError("the results list no datasets")
    primary = results["primary_metric"]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    out: dict[str, float | None] = {
        "score": mean([d["metrics"][primary] for d in datasets]),
        "p1_ties_hit": None, "p1_strict": None,
    }
    if primary == METRIC:
        ties = results.get("task_config", {}).get("ties", "hit")
        other = "miss" if ties == "hit" else "hit"
        own = mean([d["metrics"][METRIC] for d in datasets])
        alt_key = f"{METRIC} (ties as {other})"
        alt = (mean([d["extra"][alt_key] for d in datasets])
               if all(alt_key in d.get("extra", {}) for d in datasets) else None)
        out["p1_ties_hit"], out["p1_strict"] = (own, alt) if ties == "hit" else (alt, own)
    return out


def candidates_per_row(recipe: Path, overrides: Sequence[str]) -> float:
    """Candidates each query is scored against: the global batch's positives and hard
    negatives (one process here)."""
    from mmemb.recipe import load_recipe

    t = load_recipe(recipe, list(overrides), check_components=False).recipe.train
    return float(t.batch_size * (1 + t.negatives))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def effective_candidates(records: Sequence[Mapping[str, Any]], candidates: float,
                         batch_size: int) -> float:
    """Candidates per row after duplicate-positive masking, when the trainer logs how many
    entries it masked (a ``masked...`` count per step): uniform scores over the unmasked
    candidates give ln of that, not ln of all."""
    keys = [k for k in (records[-1] if records else {}) if k.startswith("masked")]
    if not keys:
        return candidates
    tail = records[-max(1, len(records) // 20):]
    masked = sum(float(r[keys[0]]) for r in tail) / len(tail)
    return max(1.0, candidates - masked / batch_size)


def run_one(
    *, recipe: Path, name: str, overrides: Sequence[str], seed: int, seed_keys: Sequence[str],
    common: Sequence[str], out: Path, threads: int, keep_models: bool,
    summarize_only: bool = False,
) -> RunResult:
    """Train one (config, seed) unless an identical finished run is there; read its results."""
    all_overrides = [*common, *overrides]
    cmd = [sys.executable, "-m", "mmemb", "train", str(recipe),
           *(f"{k}={seed}" for k in seed_keys), f"output_dir={out}", *all_overrides]
    stamp = {"cmd": cmd[1:], "recipe_sha256": hashlib.sha256(recipe.read_bytes()).hexdigest()}
    marker = out / "experiment.json"
    done = (out / "eval_after" / "results.json").is_file() and marker.is_file() and (
        json.loads(marker.read_text()).get("stamp") == stamp)
    result = RunResult(config=name, seed=seed, ok=False)
    if not done and summarize_only:
        result.error = NOT_RUN
        return result
    if not done:
        if out.exists():  # an unfinished or different earlier run of this study: start over
            shutil.rmtree(out)
        out.mkdir(parents=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.perf_counter()
        with (out / "train.log").open("w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = (out / "train.log").read_text()[-1500:]
            result.error = f"exit {proc.returncode}: {tail}"
            return result
        marker.write_text(json.dumps({"stamp": stamp, "seconds": seconds}, indent=2))
        if not keep_models:  # tens of MB to GB each; the study needs only the numbers
            for sub in ("model", "checkpoints"):
                shutil.rmtree(out / sub, ignore_errors=True)
    result.seconds = float(json.loads(marker.read_text()).get("seconds", math.nan))
    scores = read_scores(json.loads((out / "eval_after" / "results.json").read_text()))
    result.score = float(scores["score"] or math.nan)
    result.p1_ties_hit, result.p1_strict = scores["p1_ties_hit"], scores["p1_strict"]
    before = out / "eval_before" / "results.json"
    if before.is_file():
        result.before = read_scores(json.loads(before.read_text()))["score"]
    records = read_metrics(out / "metrics.jsonl")
    result.steps = [int(r["step"]) for r in records]
    result.losses = [float(r["loss"]) for r in records]
    result.final_loss = final_loss(result.losses)
    from mmemb.recipe import load_recipe

    batch = load_recipe(recipe, all_overrides, check_components=False).recipe.train.batch_size
    result.candidates = effective_candidates(
        records, candidates_per_row(recipe, all_overrides), batch)
    result.collapsed = collapsed(result.final_loss, result.candidates)
    result.alarm = any(r.get("collapse") for r in records)
    result.ok = True
    return result


# ---------------------------------------------------------------------------------------------
# the table and the plot


def _fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    return "—" if math.isnan(x) else (f"{x:.3f}" if x >= 0.001 else "<0.001")


def compare_table(results: Sequence[RunResult], pairs: Sequence[tuple[str, str]],
                  seeds: Sequence[int]) -> tuple[str, dict[str, Any]]:
    """Paired differences ``A − B`` for chosen pairs of configs (e.g. with and without a mask),
    on strict P@1 when the task reports it, else the primary metric."""
    by = {(r.config, r.seed): r for r in results if r.ok}
    metric = "p1_strict" if any(r.p1_strict is not None for r in by.values()) else "score"
    lines = ["| A − B | Δ mean [95 % CI] | per seed | paired t p | Wilcoxon p | wins/losses |",
             "|---|---|---|---|---|---|"]
    out: dict[str, Any] = {}
    for a, b in pairs:
        diffs = [getattr(by[(a, s)], metric) - getattr(by[(b, s)], metric)
                 for s in seeds if (a, s) in by and (b, s) in by]
        if not diffs:
            lines.append(f"| {a} − {b} | — | — | — | — | — |")
            continue
        st = paired_stats(diffs)
        out[f"{a} - {b}"] = asdict(st) | {"diffs": diffs}
        ci = "" if math.isnan(st.ci_low) else f" [{st.ci_low:+.1f}, {st.ci_high:+.1f}]"
        lines.append(f"| {a} − {b} | {st.mean:+.1f}{ci} | "
                     f"{', '.join(f'{d:+.1f}' for d in diffs)} | {_p(st.t_p)} | "
                     f"{_p(st.wilcoxon_p)} | {st.wins}/{st.losses} |")
    return "\n".join(lines), out


def summarize(
    results: Sequence[RunResult], configs: Sequence[str], seeds: Sequence[int], baseline: str,
) -> tuple[str, dict[str, Any]]:
    """The markdown table and a JSON-able summary."""
    by = {(r.config, r.seed): r for r in results}
    have_strict = any(r.p1_strict is not None for r in results)
    metrics = ["p1_strict", "p1_ties_hit"] if have_strict else ["score"]
    labels = {"p1_strict": "P@1 strict", "p1_ties_hit": "P@1 ties=hit", "score": "score"}
    lines = []
    summary: dict[str, Any] = {"baseline": baseline, "seeds": list(seeds), "configs": {}}
    head = "| config | " + " | ".join(
        f"{labels[m]} mean ± std | per seed ({', '.join(map(str, seeds))})" for m in metrics)
    head += f" | Δ vs {baseline} (mean [95 % CI]) | paired t p | Wilcoxon p | wins/losses"
    head += " | final loss | collapsed | alarm |"
    lines.append(head)
    lines.append("|" + "---|" * (head.count("|") - 1))
    primary = metrics[0]
    for name in configs:
        runs = [by.get((name, s)) for s in seeds]
        ok = [r for r in runs if r is not None and r.ok]
        cells = [name]
        entry: dict[str, Any] = {"runs": [asdict(r) | {"losses": None, "steps": None}
                                          for r in runs if r is not None]}
        for m in metrics:
            vals = [getattr(r, m) for r in ok if getattr(r, m) is not None]
            mu, sd = mean_std(vals)
            cells.append(f"{_fmt(mu)} ± {_fmt(sd)}")
            cells.append(", ".join(
                _fmt(getattr(r, m)) if r is not None and r.ok
                else ("not run" if r is not None and r.error == NOT_RUN else "failed")
                for r in runs))
            entry[m] = {"mean": mu, "std": sd}
        base = [by.get((baseline, s)) for s in seeds]
        diffs = [getattr(r, primary) - getattr(b, primary) for r, b in zip(runs, base, strict=True)
                 if r is not None and b is not None and r.ok and b.ok
                 and getattr(r, primary) is not None and getattr(b, primary) is not None]
        if name == baseline or not diffs:
            cells += ["—", "—", "—", "—"]
        else:
            st = paired_stats(diffs)
            entry["paired"] = asdict(st)
            ci = ("" if math.isnan(st.ci_low)
                  else f" [{st.ci_low:+.1f}, {st.ci_high:+.1f}]")
            cells += [f"{st.mean:+.1f}{ci}", _p(st.t_p),
                      _p(st.wilcoxon_p), f"{st.wins}/{st.losses}"]
        fl = mean_std([r.final_loss for r in ok])[0]
        n_coll = sum(r.collapsed for r in ok)
        n_alarm = sum(r.alarm for r in ok)
        n_failed = sum(r is None or (not r.ok and r.error != NOT_RUN) for r in runs)
        failed_note = f" ({n_failed} failed)" if n_failed else ""
        cells += [_fmt(fl, 3), f"{n_coll}/{len(ok)}{failed_note}", f"{n_alarm}/{len(ok)}"]
        entry["final_loss"], entry["collapsed"], entry["alarm"] = fl, n_coll, n_alarm
        summary["configs"][name] = entry
        lines.append("| " + " | ".join(cells) + " |")
    befores = sorted({round(r.before, 1) for r in results if r.ok and r.before is not None})
    if befores:
        lines.append("")
        lines.append(f"Before training ({labels['score']} as the eval task reports it): "
                     + ", ".join(map(str, befores)))
    return "\n".join(lines), summary


def plot(results: Sequence[RunResult], configs: Sequence[str], seeds: Sequence[int],
         path: Path, *, title: str) -> None:
    """Panel 1: P@1 per seed, a line per seed across configs (pairing), the mean as a bar.
    Then one panel per config: each seed's loss (faint) with its moving mean, and
    ln(candidates per row) dashed: a curve on that line has collapsed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r.config, r.seed): r for r in results if r.ok}
    metric = "p1_strict" if any(r.p1_strict is not None for r in by.values()) else "score"
    n = len(configs) + 1
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    flat = list(axes.flat)
    ax = flat[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, s in enumerate(seeds):
        ys = [getattr(by[(c, s)], metric) if (c, s) in by else math.nan for c in configs]
        ax.plot(range(len(configs)), ys, "o-", color=colors[k % len(colors)], lw=0.8, ms=3,
                alpha=0.8, label=f"seed {s}")
    means = [mean_std([getattr(by[(c, s)], metric) for s in seeds if (c, s) in by])[0]
             for c in configs]
    ax.bar(range(len(configs)), means, color="0.85", zorder=0)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(configs, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("P@1 strict (%)" if metric == "p1_strict" else "score")
    if by:
        lo = min(getattr(r, metric) for r in by.values())
        ax.set_ylim(max(0.0, lo - 5), min(100.0, max(getattr(r, metric) for r in by.values()) + 5))
    ax.set_title("eval per seed (bar: mean)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    for i, c in enumerate(configs, start=1):
        ax = flat[i]
        refs = set()
        for k, s in enumerate(seeds):
            r = by.get((c, s))
            if r is None:
                continue
            color = colors[k % len(colors)]
            ax.plot(r.steps, r.losses, lw=0.4, color=color, alpha=0.25)
            w = max(1, len(r.losses) // 20)  # per-step losses are noisy: a moving mean on top
            windows = [r.losses[max(0, i - w + 1):i + 1] for i in range(len(r.losses))]
            smooth = [sum(win) / len(win) for win in windows]
            ax.plot(r.steps, smooth, lw=1.0, color=color)
            refs.add(round(math.log(r.candidates), 3))
        for ref in refs:
            ax.axhline(ref, ls="--", color="k", lw=0.7)
        ax.set_title(f"{c}: loss", fontsize=9)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def default_seed_keys(recipe: Path) -> list[str]:
    """`seed` (data order, dropout), plus `model.backbone.seed` when the backbone is randomly
    initialised, so the same seed gives the same initial weights in every config."""
    from mmemb.recipe import load_recipe

    loaded = load_recipe(recipe, check_components=False)
    backbone = loaded.recipe.model.backbone
    return ["seed", "model.backbone.seed"] if backbone.get("init") == "random" else ["seed"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--configs", nargs="+", required=True, metavar="NAME=OVERRIDES")
    parser.add_argument("--baseline", default=None,
                        help="config the others are compared with (default: 'none' if given, "
                             "else the first)")
    parser.add_argument("--compare", nargs="*", default=[], metavar="A:B",
                        help="extra paired comparisons A − B beside the baseline's (e.g. "
                             "ega:ega_nomask), in a second table")
    parser.add_argument("--set", dest="common", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every config (e.g. train.steps=100)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="default: runs/experiments/<recipe name>")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG path (default: WORKDIR/reweighters.png)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--summarize-only", action="store_true",
                        help="train nothing: tabulate and plot the runs already finished")
    parser.add_argument("--keep-models", action="store_true",
                        help="keep each run's model/ and checkpoints/ (deleted by default)")
    args = parser.parse_args(argv)

    recipe = args.recipe.resolve()
    parsed = [parse_config(c) for c in args.configs]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        parser.error(f"config names repeat: {names}")
    baseline = args.baseline or ("none" if "none" in names else names[0])
    pairs = [tuple(p.split(":", 1)) for p in args.compare]
    for pair in pairs:
        if len(pair) != 2 or not set(pair) <= set(names):
            parser.error(f"--compare {':'.join(pair)}: expected A:B with A and B in {names}")
    if baseline not in names:
        parser.error(f"--baseline {baseline!r} is not one of {names}")
    workdir = (args.workdir or ROOT / "runs" / "experiments" / recipe.stem).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    # Validate every config before any run (a typo should not cost an hour), and prepare the
    # recipe's data here once: parallel runs would race to write the same shards.
    from mmemb.distributed import dist_env
    from mmemb.recipe import load_recipe
    from mmemb.train.data import ensure_prepared

    for _, overrides in parsed:
        load_recipe(recipe, [*args.common, *overrides])
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        ensure_prepared(load_recipe(recipe, list(args.common)), dist_env())
    finally:
        os.chdir(cwd)
    seed_keys = default_seed_keys(recipe)

    # Seed-major order: paired comparisons are complete early if the study is cut short.
    jobs = [(name, overrides, seed) for seed in args.seeds for name, overrides in parsed]
    t0 = time.perf_counter()

    def work(job: tuple[str, list[str], int]) -> RunResult:
        name, overrides, seed = job
        r = run_one(recipe=recipe, name=name, overrides=overrides, seed=seed,
                    seed_keys=seed_keys, common=args.common,
                    out=workdir / _slug(name) / f"seed{seed}", threads=args.threads,
                    keep_models=args.keep_models, summarize_only=args.summarize_only)
        if r.ok:
            status = (f"P@1 {_fmt(r.score)} loss {_fmt(r.final_loss, 3)}"
                      f"{' COLLAPSED' if r.collapsed else ''} ({_fmt(r.seconds, 0)} s)")
        else:
            status = r.error if r.error == NOT_RUN else f"FAILED {r.error.splitlines()[0]}"
        print(f"[{time.perf_counter() - t0:7.0f} s] {name} seed {seed}: {status}", flush=True)
        return r

    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(work, jobs))
    table, summary = summarize(results, names, args.seeds, baseline)
    if pairs:
        extra, summary["compare"] = compare_table(results, pairs, args.seeds)
        table += "\n\n" + extra
    cmd = "python experiments/reweighters.py " + " ".join(
        f'"{a}"' if (" " in a or "," in a) else a for a in (argv or sys.argv[1:]))
    run_seconds = [r.seconds for r in results if r.ok and not math.isnan(r.seconds)]
    summary.update(command=cmd, recipe=str(args.recipe), common=args.common,
                   configs_overrides=dict(parsed), seed_keys=seed_keys,
                   run_seconds_total=sum(run_seconds),
                   wall_seconds=time.perf_counter() - t0)
    (workdir / "summary.md").write_text(f"```bash\n{cmd}\n```\n\n{table}\n")
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    png = args.plot or workdir / "reweighters.png"
    plot(results, names, args.seeds, png, title=args.title or recipe.stem)
    print(table)
    print(f"\n{len(run_seconds)} runs, {sum(run_seconds) / 60:.1f} min of run time, "
          f"{(time.perf_counter() - t0) / 60:.1f} min wall; table: {workdir / 'summary.md'}; "
          f"plot: {png}")
    failed = [r for r in results if not r.ok and r.error != NOT_RUN]
    for r in failed:
        print(f"FAILED {r.config} seed {r.seed}: {r.error}", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
