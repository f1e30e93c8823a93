"""`mmemb mine`: choose hard negatives for every sample with an embedding model.

For each dataset of the input shards separately (a negative should come from the same task), the
candidate pool is every distinct item (by content hash) that appears there as a positive or a
negative. Queries and pool are embedded with the model, the top candidates of each query are found
by exact search in chunks (`mmemb.eval.metrics.topk_search`: bounded memory, faiss when
installed), and a `miner` plugin picks the negatives from that ranked list — skipping the query's
own positive and likely false negatives.
The result is new shards plus a mining report in the manifest (model, miner settings, statistics).
"""

from __future__ import annotations

import random
import shutil
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from mmemb import plugins
from mmemb.data.schema import Item, Sample
from mmemb.encoder_io import load_encoder
from mmemb.errors import DataError, MmembError
from mmemb.eval.metrics import topk_search


@dataclass
class Ranked:
    """One query's search result: pool indices by decreasing similarity, and the similarities."""

    indices: list[int]
    sims: list[float]
    pos_sim: float
    pos_index: int  # the positive's own index in the pool (-1 if absent)


@dataclass
class MiningStats:
    queries: int = 0
    chosen: int = 0
    skipped_false_negatives: int = 0
    short: int = 0  # queries that got fewer negatives than asked
    pos_sim_sum: float = 0.0
    neg_sim_sum: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "negatives_chosen": self.chosen,
            "skipped_false_negatives": self.skipped_false_negatives,
            "queries_with_fewer_negatives": self.short,
            "mean_positive_sim": self.pos_sim_sum / max(1, self.queries),
            "mean_negative_sim": self.neg_sim_sum / max(1, self.chosen),
        }


class Miner(Protocol):
    """What a `miner` plugin builds."""

    search_depth: int
    """How many top candidates per query `choose` needs (0: it does not look at similarities)."""

    def choose(
        self, ranked: Ranked, *, pool_size: int, rng: random.Random, stats: MiningStats
    ) -> list[int]:
        """Pool indices of the negatives for one query (never its positive)."""
        ...


@dataclass
class MineReport:
    read: int
    written: int
    out: Path
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __str__(self) -> str:
        total = sum(s["negatives_chosen"] for s in self.stats.values())
        fn = sum(s["skipped_false_negatives"] for s in self.stats.values())
        return (
            f"mined {self.written} samples ({total} negatives, {fn} likely false negatives "
            f"skipped) -> {self.out}"
        )


def mine(
    model_dir: str | Path,
    data: str | Path | list[str | Path],
    out: str | Path,
    *,
    miner: str | Mapping[str, Any] = "knn",
    mode: Literal["replace", "append"] = "replace",
    batch_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    chunk: int = 4096,
    echo: Callable[[str], None] = print,
) -> MineReport:
    """Mine negatives for the samples in `data` with the encoder in `model_dir`; write `out`."""
    from mmemb.data.shards import ShardWriter, iter_samples, write_json_atomic

    out = Path(out)
    if out.exists() and not overwrite:
        raise MmembError(f"{out} exists. Choose another --out or pass --overwrite.")
    built: Miner = plugins.build_from("miner", miner, where="--miner")
    encoder = load_encoder(model_dir)
    by_dataset: dict[str, list[Sample]] = defaultdict(list)
    for sample in iter_samples(data):
        by_dataset[sample.dataset].append(sample)
    if not by_dataset:
        raise DataError(f"{data}: no samples to mine negatives for.")
    rng = random.Random(seed)
    staging = out.with_name(out.name + ".tmp-mine")
    shutil.rmtree(staging, ignore_errors=True)
    report = MineReport(read=0, written=0, out=out)
    with ShardWriter(staging) as writer:
        for dataset, samples in sorted(by_dataset.items()):
            stats = MiningStats()
            mined = _mine_dataset(encoder, samples, built, mode, rng, stats, batch_size, chunk)
            for s in mined:
                writer.write(s)
            report.read += len(samples)
            report.stats[dataset] = stats.to_json()
            echo(f"{dataset}: {len(samples)} queries, {stats.chosen} negatives chosen")
    report.written = writer.written
    manifest = writer.manifest(
        mining={
            "model": str(model_dir),
            "miner": miner if isinstance(miner, str) else dict(miner),
            "mode": mode,
            "seed": seed,
            "input": [str(p) for p in (data if isinstance(data, list) else [data])],
            "stats": report.stats,
        },
        read=report.read,
        written=report.written,
        rejected={},
    )
    write_json_atomic(staging / "manifest.json", manifest)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return report


def _mine_dataset(
    encoder: Any,
    samples: list[Sample],
    miner: Miner,
    mode: str,
    rng: random.Random,
    stats: MiningStats,
    batch_size: int,
    chunk: int,
) -> list[Sample]:
    pool: list[Item] = []
    index: dict[str, int] = {}
    for s in samples:
        for item in s.candidates:
            index.setdefault(item.content_hash(), len(pool))
            if len(pool) < len(index):
                pool.append(item)
    pos_index = [index[s.pos.content_hash()] for s in samples]
    depth = min(len(pool), miner.search_depth)
    if depth:
        q = encoder.encode([s.query for s in samples], side="query", batch_size=batch_size)
        p = encoder.encode(pool, side="target", batch_size=batch_size)
        # Exact search with bounded memory (query and pool chunks); faiss when installed.
        sims, idx = topk_search(q, p, depth, query_chunk=chunk, backend="auto")
        pos_sims = (q * p[torch.tensor(pos_index)]).sum(-1)
    out = []
    for i, s in enumerate(samples):
        ranked = Ranked(
            indices=idx[i].tolist() if depth else [],
            sims=sims[i].tolist() if depth else [],
            pos_sim=float(pos_sims[i]) if depth else 0.0,
            pos_index=pos_index[i],
        )
        chosen = miner.choose(ranked, pool_size=len(pool), rng=rng, stats=stats)
        if pos_index[i] in chosen:
            raise MmembError(f"miner returned the positive of sample {s.id} as a negative")
        stats.queries += 1
        stats.pos_sim_sum += ranked.pos_sim
        negs = [pool[j] for j in chosen]
        if mode == "append":
            have = {n.content_hash() for n in s.negs}
            negs = s.negs + [n for n in negs if n.content_hash() not in have]
        meta = {**s.meta, "mined": True}
        out.append(
            Sample(id=s.id, dataset=s.dataset, query=s.query, pos=s.pos, negs=negs, meta=meta)
        )
    return out
