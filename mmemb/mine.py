"""`mmemb mine`: choose hard negatives for every sample with an embedding model.

For each dataset of the input shards separately (a negative should come from the same task), the
candidate pool is every distinct item (by content hash) that appears there as a positive or a
negative, plus the items of an optional external corpus. Each distinct query (same instruction,
text and image) and the pool are embedded with the model, in batches of similar length
(`mmemb.batching`); the top candidates of each query are found by exact search in chunks
(`mmemb.eval.metrics.topk_search`: bounded memory, faiss when installed); every positive any
sample gives that query is removed from its list; and a `miner` plugin picks the negatives from
the rest. A miner that filters candidates (false negatives) may ask for a deeper list, so a rank
window counts only candidates that survive its filters.

Samples left with fewer than `min_negatives` negatives are dropped, kept, or topped up at random
(`on_short`), counted per dataset and warned about, so the shards' ``negatives.min`` (which
`train.negatives` is checked against) is never a surprise. The result is new shards plus a
mining report in the manifest (model, miner settings, statistics). docs/mining.md compares the
semantics with sentence-transformers' `mine_hard_negatives`.
"""

from __future__ import annotations

import math
import random
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch

from mmemb import plugins
from mmemb.batching import encode_sorted
from mmemb.data.schema import Item, Sample
from mmemb.encoder_io import load_encoder
from mmemb.errors import ConfigError, DataError, MmembError
from mmemb.eval.dataset_embeddings import item_key
from mmemb.eval.metrics import topk_search
from mmemb.fileio import replace_dir
from mmemb.model import Encoder, Side
from mmemb.progress import Progress

if TYPE_CHECKING:
    from mmemb.encoder_io import ModelSource

OnShort = Literal["drop", "keep", "fill"]
ON_SHORT: tuple[str, ...] = ("drop", "keep", "fill")


@dataclass
class Ranked:
    """One distinct query's candidates by decreasing score, its positives already removed."""

    indices: list[int]
    """Pool indices, best first. Never a positive of the query."""
    scores: list[float]
    """Their scores (inner products of the embeddings: cosine for a normalising encoder)."""
    pos_score: float | None
    """The lowest score among the query's positives (the margin reference, as in
    sentence-transformers); None when the miner asked for no similarities."""
    positives: frozenset[int]
    """Pool indices of every positive any sample gives this query."""
    complete: bool
    """True when the list holds every other candidate of the pool: searching deeper finds none."""


@dataclass
class Choice:
    """A miner's answer for one query: negatives best first, their scores, and how many
    candidates each of its filters removed on the way (by filter name)."""

    indices: list[int]
    scores: list[float] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


class Miner(Protocol):
    """What a `miner` plugin builds."""

    num_negatives: int
    """How many negatives it picks per query (the default of `min_negatives`)."""

    search_depth: int
    """How many candidates per query (beyond the positives) to rank first; 0: the miner needs no
    similarities (nothing is embedded)."""

    def choose(self, ranked: Ranked, *, pool_size: int, rng: random.Random) -> Choice | None:
        """The negatives for one query, or None when `ranked` ran out before the miner could
        decide and `ranked.complete` is False: mine then searches twice as deep and asks again.
        Must not draw from `rng` before it decides to return None."""
        ...


@dataclass
class MiningStats:
    """One dataset's counts, reported in the manifest and on the terminal."""

    samples: int = 0
    unique_queries: int = 0
    written: int = 0
    negatives: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    deeper_searches: int = 0
    short: int = 0
    dropped: int = 0
    filled: int = 0
    filled_negatives: int = 0
    kept_short: int = 0
    pos_score_sum: float = 0.0
    pos_scores: int = 0
    neg_score_sum: float = 0.0
    neg_scores: int = 0
    min_written: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "unique_queries": self.unique_queries,
            "written": self.written,
            "negatives_chosen": self.negatives,
            "skipped_false_negatives": dict(sorted(self.skipped.items())),
            "deeper_searches": self.deeper_searches,
            "short": self.short,
            "dropped": self.dropped,
            "filled": self.filled,
            "filled_negatives": self.filled_negatives,
            "kept_short": self.kept_short,
            "negatives_min": self.min_written or 0,
            "mean_positive_score": (self.pos_score_sum / self.pos_scores
                                    if self.pos_scores else None),
            "mean_negative_score": (self.neg_score_sum / self.neg_scores
                                    if self.neg_scores else None),
        }


@dataclass
class MineReport:
    read: int
    written: int
    out: Path
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __str__(self) -> str:
        total = sum(s["negatives_chosen"] for s in self.stats.values())
        fn = sum(sum(s["skipped_false_negatives"].values()) for s in self.stats.values())
        dropped = sum(s["dropped"] for s in self.stats.values())
        tail = f", {dropped} dropped short" if dropped else ""
        return (
            f"mined {self.written} samples ({total} negatives, {fn} likely false negatives "
            f"skipped{tail}) -> {self.out}"
        )


def mine(
    model: str | Path | ModelSource | Encoder,
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    miner: str | Mapping[str, Any] = "knn",
    mode: Literal["replace", "append"] = "replace",
    corpus: str | Path | None = None,
    min_negatives: int | None = None,
    on_short: OnShort = "drop",
    scores: bool = False,
    batch_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    chunk: int = 4096,
    show_progress: bool = False,
    echo: Callable[[str], None] = print,
) -> MineReport:
    """Mine negatives for the samples in `data` with `model` (anything `--model` names, see
    `mmemb.encoder_io.load_encoder`, or a built `Encoder`); write shards to `out`.

    `corpus`: extra candidates for every dataset's pool, a jsonl file of items (as `mmemb encode`
    reads; image paths relative to the file's folder) or a prepared shard directory (its
    positives and negatives). `min_negatives` (default: the miner's `num_negatives`) and
    `on_short` decide what happens to samples with fewer negatives. `scores`: store each
    sample's positive and negative scores in its ``meta["mining"]``.
    """
    from mmemb.data.shards import ShardWriter, iter_samples, write_json_atomic

    out = Path(out)
    if out.exists() and not overwrite:
        raise MmembError(f"{out} exists. Choose another --out or pass --overwrite.")
    if on_short not in ON_SHORT:
        raise ConfigError([f"--on-short: {on_short!r} is not one of {', '.join(ON_SHORT)}"])
    built: Miner = plugins.build_from("miner", miner, where="--miner")
    need = built.num_negatives if min_negatives is None else min_negatives
    if need < 0:
        raise ConfigError([f"--min-negatives: must be 0 or more (got {need})"])
    inputs = [data] if isinstance(data, str | Path) else list(data)
    by_dataset: dict[str, list[Sample]] = defaultdict(list)
    for sample in iter_samples(inputs):
        by_dataset[sample.dataset].append(sample)
    if not by_dataset:
        raise DataError(f"{', '.join(map(str, inputs))}: no samples to mine negatives for.")
    extra = _read_corpus(corpus) if corpus is not None else []
    # The one place a model argument becomes an encoder.
    encoder = model if isinstance(model, Encoder) else load_encoder(model)
    embed = built.search_depth > 0 or scores
    ctx = _Context(encoder, batch_size, chunk, show_progress)
    corpus_emb = ctx.encode(extra, "target", "corpus") if embed and extra else None

    staging = out.with_name(out.name + ".tmp-mine")
    shutil.rmtree(staging, ignore_errors=True)
    report = MineReport(read=0, written=0, out=out)
    try:
        with ShardWriter(staging) as writer:
            for dataset, samples in sorted(by_dataset.items()):
                stats = MiningStats(samples=len(samples))
                job = _Job(dataset, samples, built, mode, need, on_short, scores, seed, stats)
                for s in job.run(ctx, extra, corpus_emb if embed else None, embed):
                    writer.write(s)
                report.read += len(samples)
                report.stats[dataset] = stats.to_json()
                echo(f"{dataset}: {len(samples)} samples, {stats.written} written, "
                     f"{stats.negatives} negatives chosen")
                for line in _warnings(dataset, stats, need, on_short):
                    echo(f"warning: {line}")
        report.written = writer.written
        if report.written == 0:
            raise DataError(
                f"every sample had fewer than {need} negatives and --on-short drop removed them "
                "all: nothing to write. Widen the miner's window (rank_end), loosen its filters, "
                "add candidates (--corpus), or use --on-short fill."
            )
        manifest = writer.manifest(
            mining={
                "model": str(model) if not isinstance(model, Encoder) else "<in-memory encoder>",
                "miner": miner if isinstance(miner, str) else dict(miner),
                "mode": mode,
                "corpus": str(corpus) if corpus is not None else None,
                "corpus_items": len(extra),
                "min_negatives": need,
                "on_short": on_short,
                "scores": scores,
                "seed": seed,
                "input": [str(p) for p in inputs],
                "stats": report.stats,
            },
            read=report.read,
            written=report.written,
            rejected={},
        )
        write_json_atomic(staging / "manifest.json", manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, out)
    return report


def _warnings(dataset: str, stats: MiningStats, need: int, on_short: str) -> Iterator[str]:
    if not stats.short:
        return
    head = f"{dataset}: {stats.short} of {stats.samples} samples got fewer than {need} negatives"
    if on_short == "drop":
        yield f"{head}; dropped (--on-short drop)."
    elif on_short == "fill":
        msg = f"{head}; {stats.filled} topped up at random ({stats.filled_negatives} negatives)"
        if stats.dropped:
            msg += f", {stats.dropped} dropped (the pool is too small to fill them)"
        yield msg + "."
    else:
        yield (f"{head} and were kept (--on-short keep): these shards have negatives.min = "
               f"{stats.min_written or 0}, so train.negatives must be at most that.")


def _read_corpus(path: str | Path) -> list[Item]:
    """Items of an external corpus: a jsonl file of items, or a shard directory's candidates."""
    from mmemb.data.shards import iter_samples
    from mmemb.embed_file import read_items

    p = Path(path)
    if p.is_dir():
        items = [item for s in iter_samples(p) for item in s.candidates]
    elif p.is_file():
        with p.open(encoding="utf-8") as fh:
            items = [item for _, item in read_items(fh, source=str(p), image_root=p.parent)]
    else:
        raise DataError(f"--corpus {p}: no such file or directory. Pass a jsonl file of items "
                        "(text/image/instruction per line) or a prepared shard directory.")
    if not items:
        raise DataError(f"--corpus {p}: holds no items.")
    return items


@dataclass
class _Context:
    encoder: Encoder
    batch_size: int
    chunk: int
    show_progress: bool

    def encode(self, items: Sequence[Item], side: Side, what: str) -> torch.Tensor:
        total = len(items)
        with Progress(total, desc=f"mine: embed {what}", log_every=max(1, total // 10),
                      enabled=self.show_progress) as bar:
            return encode_sorted(self.encoder, items, side=side, batch_size=self.batch_size,
                                 progress=bar.update)


@dataclass
class _Job:
    """Mining one dataset."""

    dataset: str
    samples: list[Sample]
    miner: Miner
    mode: str
    need: int
    on_short: str
    scores: bool
    seed: int
    stats: MiningStats

    def run(
        self, ctx: _Context, extra: list[Item], corpus_emb: torch.Tensor | None, embed: bool
    ) -> Iterator[Sample]:
        pool: list[Item] = []
        where: dict[str, int] = {}
        for s in self.samples:
            for item in s.candidates:
                if where.setdefault(item.content_hash(), len(pool)) == len(pool):
                    pool.append(item)
        own = len(pool)
        corpus_rows: list[int] = []  # rows of the corpus embedding that join this pool
        for j, item in enumerate(extra):
            if where.setdefault(item.content_hash(), len(pool)) == len(pool):
                pool.append(item)
                corpus_rows.append(j)
        # Distinct queries: the same query content gets one embedding and one set of negatives,
        # and none of its positives (from any sample) is ever its negative.
        qkeys: dict[bytes, int] = {}
        queries: list[Item] = []
        sample_query: list[int] = []
        for s in self.samples:
            u = qkeys.setdefault(item_key(s.query), len(queries))
            if u == len(queries):
                queries.append(s.query)
            sample_query.append(u)
        positives: list[set[int]] = [set() for _ in queries]
        for s, u in zip(self.samples, sample_query, strict=True):
            positives[u].add(where[s.pos.content_hash()])
        self.stats.unique_queries = len(queries)

        q_emb = p_emb = None
        pos_score: list[float | None] = [None] * len(queries)
        if embed:
            q_emb = ctx.encode(queries, "query", f"{self.dataset} queries")
            p_own = ctx.encode(pool[:own], "target", f"{self.dataset} pool")
            p_emb = p_own
            if corpus_rows:
                assert corpus_emb is not None
                p_emb = torch.cat([p_own, corpus_emb[torch.tensor(corpus_rows)]])
            for u, pos in enumerate(positives):
                pos_score[u] = float((p_emb[sorted(pos)] @ q_emb[u]).min())
        choices = self._choose_all(q_emb, p_emb, pool, positives, pos_score, ctx.chunk)
        yield from self._samples(pool, where, sample_query, positives, choices, q_emb, p_emb)

    def _rng(self, kind: str, n: int) -> random.Random:
        # A stream per query (or sample), so results do not depend on how deep each search went
        # or in which order queries were decided.
        return random.Random(f"{self.seed}/{self.dataset}/{kind}/{n}")

    def _choose_all(
        self, q_emb: torch.Tensor | None, p_emb: torch.Tensor | None, pool: list[Item],
        positives: list[set[int]], pos_score: list[float | None], chunk: int,
    ) -> list[Choice]:
        n_pool = len(pool)
        decided: list[Choice | None] = [None] * len(positives)
        if q_emb is None or p_emb is None or self.miner.search_depth == 0:
            for u, pos in enumerate(positives):
                ranked = Ranked([], [], pos_score[u], frozenset(pos), complete=False)
                decided[u] = self._ask(u, ranked, n_pool)
            return [c for c in decided if c is not None]
        max_pos = max(len(p) for p in positives)
        depth = min(n_pool, self.miner.search_depth + max_pos)
        todo = np.arange(len(positives))
        first = True
        while len(todo):
            sims, idx = topk_search(q_emb[torch.from_numpy(todo)], p_emb, depth,
                                    query_chunk=chunk, backend="auto")
            complete = depth >= n_pool
            retry = []
            for row, u in enumerate(todo.tolist()):
                pos = positives[u]
                keep = [k for k, j in enumerate(idx[row].tolist()) if j not in pos]
                ranked = Ranked(
                    indices=idx[row][keep].tolist(), scores=sims[row][keep].tolist(),
                    pos_score=pos_score[u], positives=frozenset(pos), complete=complete,
                )
                choice = self._ask(u, ranked, n_pool)
                if choice is None:
                    retry.append(u)
                else:
                    decided[u] = choice
            if not first:
                self.stats.deeper_searches += len(todo)
            first = False
            todo = np.asarray(retry, dtype=np.int64)
            depth = min(n_pool, depth * 2)
        return [c for c in decided if c is not None]

    def _ask(self, u: int, ranked: Ranked, n_pool: int) -> Choice | None:
        choice = self.miner.choose(ranked, pool_size=n_pool, rng=self._rng("query", u))
        if choice is None:
            if ranked.complete or self.miner.search_depth == 0:
                raise MmembError(f"miner {type(self.miner).__name__} asked for a deeper search "
                                 "on a complete ranking (a bug in the miner plugin)")
            return None
        bad = [j for j in choice.indices if j in ranked.positives or not 0 <= j < n_pool]
        if bad or len(set(choice.indices)) != len(choice.indices):
            raise MmembError(f"miner {type(self.miner).__name__} returned pool indices "
                             f"{choice.indices} for a query whose positives are "
                             f"{sorted(ranked.positives)} (a bug in the miner plugin)")
        return choice

    def _samples(
        self, pool: list[Item], where: dict[str, int], sample_query: list[int],
        positives: list[set[int]], choices: list[Choice], q_emb: torch.Tensor | None,
        p_emb: torch.Tensor | None,
    ) -> Iterator[Sample]:
        st = self.stats
        for choice in choices:
            st.skipped.update(choice.skipped)
        for i, (s, u) in enumerate(zip(self.samples, sample_query, strict=True)):
            new = choices[u].indices
            if self.mode == "append":
                have = {n.content_hash() for n in s.negs}
                negs = list(s.negs) + [pool[j] for j in new if pool[j].content_hash() not in have]
            else:
                negs = [pool[j] for j in new]
            mined = len(negs) - (len(s.negs) if self.mode == "append" else 0)
            if len(negs) < self.need:
                st.short += 1
                if self.on_short == "fill":
                    added = self._fill(i, negs, positives[u], pool)
                    if len(negs) + len(added) < self.need:
                        st.dropped += 1
                        continue
                    st.filled += 1
                    st.filled_negatives += len(added)
                    negs += added
                elif self.on_short == "drop":
                    st.dropped += 1
                    continue
                else:
                    st.kept_short += 1
            meta: dict[str, Any] = {**s.meta, "mined": True}
            if q_emb is not None and p_emb is not None:
                q = q_emb[u]
                pos_s = float(p_emb[where[s.pos.content_hash()]] @ q)
                neg_s = [float(p_emb[where[n.content_hash()]] @ q) for n in negs]
                st.pos_score_sum += pos_s
                st.pos_scores += 1
                # the mean over the negatives the miner chose (not the kept or filled ones)
                start = len(s.negs) if self.mode == "append" else 0
                chosen_s = neg_s[start : start + mined]
                st.neg_score_sum += math.fsum(chosen_s)
                st.neg_scores += len(chosen_s)
                if self.scores:
                    meta["mining"] = {"pos_score": pos_s, "neg_scores": neg_s}
            st.negatives += mined
            st.written += 1
            st.min_written = len(negs) if st.min_written is None else min(st.min_written,
                                                                          len(negs))
            yield Sample(id=s.id, dataset=s.dataset, query=s.query, pos=s.pos, negs=negs,
                         meta=meta)

    def _fill(self, i: int, negs: list[Item], pos: set[int], pool: list[Item]) -> list[Item]:
        """Random pool items (not a positive of the query, not already a negative) up to
        `need`: easy negatives, like the `random` miner's."""
        taken = {n.content_hash() for n in negs}
        free = [j for j, item in enumerate(pool)
                if j not in pos and item.content_hash() not in taken]
        k = min(self.need - len(negs), len(free))
        return [pool[j] for j in self._rng("fill", i).sample(free, k)]
