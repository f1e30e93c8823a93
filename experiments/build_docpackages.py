"""A real classification-style text set for the pretrained study: docstring summary -> its package.

Query: a function's or class's docstring summary (as in `build_docstrings.py`, read with `ast`,
nothing imported); positive: a label text describing the package it comes from, the package's own
one-line summary from its installed metadata ("numpy: Fundamental package for array computing in
Python"). Twenty packages, so a training batch holds many copies of each label: the case
`loss.mask_duplicate_positives` is for, now on a pretrained encoder (all-MiniLM-L6-v2) whose
confusions between related packages (numpy / scipy / pandas, torch / transformers) are the hard
negatives EGA is meant to amplify. Split by docstring, not by package (the labels must be
known): each package gives `--eval-per-class` held-out queries, the rest (at most
`--train-per-class`) train.

Writes, under --out:
  train.jsonl           {query, pos, dataset, meta}: training pairs (no negatives)
  eval/packages.jsonl   {query, pos, neg}: each eval query with all twenty labels (the MMEB
                        classification layout the `mmeb` eval task ranks; chance 5 %)
  manifest.json         packages, versions, labels, counts, settings
and with --prepare (the default):
  pretrained/           the pretrained all-MiniLM-L6-v2 as a saved mmemb encoder
  shards/train, shards/train-mined, shards/eval
                        hard negatives: the labels the pretrained model itself ranks highest
                        among the wrong ones (`mmemb mine`, knn from rank 0, no false-negative
                        filter: the labels are known, so a label above the positive is a
                        confusion to learn from)

    python experiments/build_docpackages.py --out data/experiments/docpackages
"""

from __future__ import annotations

import argparse
import importlib.metadata
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

# the sibling script, also when this one is loaded by path (tests)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_docstrings import (  # noqa: E402
    Doc,
    _mmemb,
    _version,
    _write_jsonl,
    dedupe,
    iter_docstrings,
    package_root,
    save_pretrained_encoder,
    write_manifest,
)

# Top-level import name -> distribution; chosen for at least ~90 usable docstrings each and a
# metadata summary that says what the package is for.
PACKAGES = {
    "numpy": "numpy", "scipy": "scipy", "pandas": "pandas", "sklearn": "scikit-learn",
    "matplotlib": "matplotlib", "sympy": "sympy", "torch": "torch", "transformers": "transformers",
    "peft": "peft", "pydantic": "pydantic", "click": "click", "PIL": "pillow",
    "_pytest": "pytest", "huggingface_hub": "huggingface_hub", "fsspec": "fsspec",
    "webdataset": "webdataset", "networkx": "networkx", "mpmath": "mpmath",
    "pygments": "Pygments", "jinja2": "Jinja2",
}


def label_text(distribution: str) -> str:
    """``name: summary`` from the installed distribution's metadata."""
    summary = importlib.metadata.metadata(distribution)["Summary"]
    if not summary:
        raise SystemExit(f"{distribution}: its metadata has no Summary to use as a label")
    return f"{distribution}: {summary.strip()}"


def build_rows(
    docs: list[Doc], labels: dict[str, str], *, train_per_class: int, eval_per_class: int,
    seed: int,
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Training rows (query -> its package's label) and eval rows (with every other label)."""
    rng = random.Random(seed)
    by_pkg: dict[str, list[Doc]] = defaultdict(list)
    for d in docs:
        by_pkg[d.package].append(d)
    train: list[dict[str, object]] = []
    eval_rows: list[dict[str, object]] = []
    for pkg in sorted(labels):
        group = sorted(by_pkg[pkg], key=lambda d: d.origin)
        rng.shuffle(group)
        if len(group) < eval_per_class + 20:
            raise SystemExit(f"{pkg}: only {len(group)} usable docstrings")
        others = [labels[p] for p in sorted(labels) if p != pkg]
        for j, d in enumerate(group[:eval_per_class]):
            eval_rows.append({"id": f"eval-{pkg}-{j}", "query": d.summary, "pos": labels[pkg],
                              "neg": others, "meta": {"package": pkg, "origin": d.origin}})
        for j, d in enumerate(group[eval_per_class:eval_per_class + train_per_class]):
            train.append({"id": f"train-{pkg}-{j}", "dataset": "docpackages", "query": d.summary,
                          "pos": labels[pkg], "meta": {"package": pkg, "origin": d.origin}})
    rng.shuffle(train)  # interleave the classes (the training stream only shuffles locally)
    return train, eval_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/experiments/docpackages"))
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--eval-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=48,
                        help="tokens per text when mining (as the recipe trains)")
    parser.add_argument("--negatives", type=int, default=3, help="hard negatives to mine")
    parser.add_argument("--no-prepare", action="store_true",
                        help="write the jsonl files only (no encoder, shards or mining)")
    args = parser.parse_args()

    labels, versions, docs = {}, {}, []
    for pkg, dist in PACKAGES.items():
        root = package_root(pkg)
        if root is None:
            raise SystemExit(f"{pkg} is not installed: pip install -e '.[test,experiments]'")
        labels[pkg] = label_text(dist)
        versions[pkg] = _version(pkg)
        docs += iter_docstrings(pkg, root)
    kept = dedupe(docs)
    train, eval_rows = build_rows(kept, labels, train_per_class=args.train_per_class,
                                  eval_per_class=args.eval_per_class, seed=args.seed)
    out: Path = args.out
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "eval" / "packages.jsonl", eval_rows)
    write_manifest(
        out, args, ("train.jsonl", "eval/packages.jsonl"),
        package_versions=versions,
        labels=labels,
        docstrings_after_dedupe=len(kept),
        train_per_package=dict(sorted(Counter(r["meta"]["package"] for r in train).items())),
        eval_queries=len(eval_rows),
    )
    print(f"{len(kept)} docstrings after dedupe; {len(train)} training pairs, "
          f"{len(eval_rows)} eval queries x {len(labels)} labels")
    if args.no_prepare:
        return
    pretrained = save_pretrained_encoder(out, max_length=args.max_length)
    shards = out / "shards"
    _mmemb("prepare", "--source", "jsonl", "--input", str(out / "train.jsonl"),
           "--out", str(shards / "train"), "--overwrite")
    _mmemb("mine", "--model", str(pretrained), "--data", str(shards / "train"),
           "--out", str(shards / "train-mined"), "--arg", f"num_negatives={args.negatives}",
           "--arg", "rank_start=0", "--arg", "relative_margin=null",  # labelled: no false negatives
           "--seed", str(args.seed), "--overwrite")
    _mmemb("prepare", "--source", "jsonl", "--input", str(out / "eval" / "packages.jsonl"),
           "--out", str(shards / "eval"), "--overwrite")


if __name__ == "__main__":
    main()
