"""The summary of one benchmarks/gpu/run.sh: stage outcomes, the loss tables, the issue's targets.

    python benchmarks/gpu/summary.py OUT_DIR --stage NAME=STATUS ... [--peak-tflops 790]

Reads what the stages wrote under OUT_DIR (env.txt, pytest.log, loss_plain.json, loss_ega.json,
train.jsonl), prints the summary and writes it to OUT_DIR/summary.txt. A missing file is reported
as such: the summary is written whatever failed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _pytest_outcome(path: Path) -> str:
    """The final counts line(s) of each pytest shard in the log, e.g. '120 passed in 80.1s'."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "no log"
    # "===== 3 passed, 1 skipped in 2.1s =====" (-v) or "3 passed, 1 skipped in 2.1s" (-q)
    finals = re.findall(r"^(?:=+ )?((?:\d+ \w+(?:, )?)+ in [\d.]+s(?: \([\d:]+\))?|no tests ran"
                        r".*?)(?: =+)?$", text, re.M)
    return "; ".join(finals) if finals else "no final pytest line (killed by its time cap?)"


def _loss_rows(data: dict[str, Any] | None) -> dict[tuple[int, str], dict[str, Any]]:
    if not data:
        return {}
    return {(int(r["n"]), str(r["impl"])): r for r in data.get("rows", [])}


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def summarise(out: Path, stages: list[tuple[str, str]], peak: float | None) -> str:
    lines = ["# benchmarks/gpu/run.sh summary", ""]
    env = (out / "env.txt")
    if env.is_file():
        head = [ln for ln in env.read_text(errors="replace").splitlines() if ln.startswith("## ")]
        lines += [ln[3:] for ln in head]
        lines.append("")
    lines.append("stages:")
    lines += [f"  {name:<14} {status}" for name, status in stages]
    lines += ["", f"pytest -m gpu: {_pytest_outcome(out / 'pytest.log')}", ""]

    plain = _loss_rows(_load_json(out / "loss_plain.json"))
    ega = _loss_rows(_load_json(out / "loss_ega.json"))
    sizes = sorted({n for n, _ in plain} | {n for n, _ in ega})
    if sizes:
        lines.append("loss forward+backward, best time (s) / peak MiB / TFLOP/s (6·B·M·D per run):")
        lines.append("| B = M | full | tiled | inf-cl (plain) | full + ega | tiled + ega |")
        lines.append("|---|---|---|---|---|---|")
        for n in sizes:
            cells = []
            for table, impl in ((plain, "full"), (plain, "tiled"), (plain, "inf-cl"),
                                (ega, "full"), (ega, "tiled")):
                r = table.get((n, impl))
                if r is None:
                    cells.append("–")
                elif r.get("best_s") is None:
                    cells.append(str(r.get("status", "?")))
                else:
                    cells.append(f"{r['best_s']:.3f} s / {_fmt(r.get('peak_mib'), '.0f')} MiB / "
                                 f"{_fmt(r.get('tflops'), '.0f')}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("targets (issue 15):")
        for n in sizes:
            te, ip = ega.get((n, "tiled"), {}).get("best_s"), plain.get((n, "inf-cl"), {}).get(
                "best_s")
            verdict = ("–" if te is None or ip is None else
                       f"{te / ip:.2f}× inf-cl's plain time: " + ("met" if te <= ip else "NOT met"))
            lines.append(f"  B = M = {n}: tiled + ega no slower than inf-cl plain — {verdict}")
        t64 = plain.get((65536, "tiled"), {}).get("tflops")
        if peak and t64:
            share = t64 / peak
            lines.append(f"  B = M = 65536: tiled at {100 * share:.0f} % of {peak:.0f} TFLOP/s "
                         f"(target ≥ 50 %): " + ("met" if share >= 0.5 else "NOT met"))
        backends = {r.get("backend") for r in list(plain.values()) + list(ega.values())
                    if r.get("impl") == "tiled"}
        lines.append(f"  tiled ran on: {', '.join(sorted(b for b in backends if b)) or '?'}")
        lines.append("")
    else:
        lines += ["loss benchmark: no results", ""]

    train = out / "train.jsonl"
    records = []
    if train.is_file():
        for ln in train.read_text().splitlines():
            try:
                records.append(json.loads(ln))
            except ValueError:
                continue
    if records:
        lines.append("training step (bf16, LoRA, tiled loss + EGA):")
        for r in records:
            lines.append(
                f"  {r['size']} ({r['params'] / 1e6:.1f} M params, {r['trainable'] / 1e6:.2f} M "
                f"trainable) engine {r['engine']}: {r['samples_per_s']:.1f} samples/s, "
                f"{r['median_step_s']:.3f} s/step, peak {r['peak_mib']:.0f} MiB, loss on "
                f"{r['loss_backend']}, {r['batch']} queries × (1 + {r['negatives']})")
    else:
        lines.append("training step: no results")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--stage", action="append", default=[], help="NAME=STATUS, in order")
    p.add_argument("--peak-tflops", type=float, default=None)
    args = p.parse_args(argv)
    stages = [tuple(s.split("=", 1)) if "=" in s else (s, "?") for s in args.stage]
    text = summarise(args.out, stages, args.peak_tflops)  # type: ignore[arg-type]
    (args.out / "summary.txt").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
