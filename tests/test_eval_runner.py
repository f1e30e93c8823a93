"""The eval runner end to end with a small real encoder: in-memory data and prepared shards, the
embedding cache, the CLI, and 2-process sharded encoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_eval_support import (
    EVAL_PLUGINS,
    encoded_items,
    make_encoder,
    make_samples,
    reference_p_at_1,
)

from mmemb.data.schema import Item, Sample
from mmemb.data.shards import MANIFEST_NAME, ShardWriter, write_json_atomic
from mmemb.encoder_io import save_encoder
from mmemb.errors import DataError, MmembError, UnknownComponentError
from mmemb.eval import EvalResults, evaluate
from mmemb.eval.cache import EmbeddingCache
from mmemb.testing import only_plugins
from mmemb.train.testing import run_workers

pytestmark = pytest.mark.only_plugins(*EVAL_PLUGINS)


def _data() -> dict[str, list[Sample]]:
    return {
        "echo": make_samples("echo", 24, dup_positive_every=5),
        "ImageNet-1K": make_samples("ImageNet-1K", 30, shared_labels=6),
    }


def _write_shards(directory: Path, data: dict[str, list[Sample]]) -> Path:
    """A prepared eval directory, written through the data layer (image pool as for MMEB eval)."""
    with ShardWriter(directory, max_samples=10, pool_images=True) as writer:
        for samples in data.values():
            for s in samples:
                writer.write(s)
    write_json_atomic(directory / MANIFEST_NAME, writer.manifest(command="tests"))
    return directory


def test_mmeb_end_to_end_in_memory(tmp_path: Path) -> None:
    enc = make_encoder()
    data = _data()
    res = evaluate(enc, data, out=tmp_path / "out", show_progress=False)
    for name, samples in data.items():
        want, ties = reference_p_at_1(enc, samples)
        assert res.scores[name] == pytest.approx(want)
        assert res.datasets[name].counts["tied"] == ties
    # Every 5th sample repeats its positive: a tie unless another negative beats both copies.
    assert 1 <= res.datasets["echo"].counts["tied"] <= 5
    c = res.datasets["ImageNet-1K"].counts
    sizes = (c["queries"], c["candidates_min"], c["candidates_max"], c["unique_targets"])
    assert sizes == (30, 6, 6, 6)
    assert res.datasets["ImageNet-1K"].meta_task == "Classification"
    assert res.datasets["ImageNet-1K"].split == "IND"
    assert res.ungrouped == ["echo"] and res.overall is None
    assert res.group("Classification").missing[0] == "N24News"
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["datasets"]["echo"]["counts"]["candidates_total"] == sum(
        len(s.candidates) for s in data["echo"])
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["fingerprint"]["model"]["weights"]
    assert "| **this model** |" in (tmp_path / "out" / "results.md").read_text()
    assert EvalResults.load(tmp_path / "out").scores == res.scores


def test_retrieval_task_matches_brute_force() -> None:
    enc = make_encoder(seed=3)
    samples = make_samples("pairs", 20, n_negs=3)
    res = evaluate(enc, {"pairs": samples}, task="retrieval", show_progress=False,
                   task_args={"recall_at": [1, 5]})
    # Brute force: corpus = distinct candidates, full score matrix, stable ranking.
    corpus: dict[tuple[str | None, bytes | None, str | None], int] = {}
    for s in samples:
        for it in s.candidates:
            corpus.setdefault((it.text, it.image, it.instruction), len(corpus))
    by_index: dict[int, Item] = {}
    for s in samples:
        for it in s.candidates:
            by_index[corpus[(it.text, it.image, it.instruction)]] = it
    items = [by_index[i] for i in range(len(corpus))]
    c = enc.encode(items, side="target").numpy()
    q = enc.encode([s.query for s in samples], side="query").numpy()
    ranks = np.argsort(-(q @ c.T), axis=1, kind="stable")
    pos = np.array([corpus[(s.pos.text, s.pos.image, s.pos.instruction)] for s in samples])
    first = np.array([int(np.flatnonzero(r == p)[0]) for r, p in zip(ranks, pos, strict=True)])
    m = res.datasets["pairs"].metrics
    assert m["recall@1"] == pytest.approx(100 * np.mean(first < 1))
    assert m["recall@5"] == pytest.approx(100 * np.mean(first < 5))
    assert m["mrr@10"] == pytest.approx(100 * np.mean(np.where(first < 10, 1 / (first + 1), 0)))
    ndcg = np.where(first < 10, 1 / np.log2(first + 2), 0)
    assert m["ndcg@10"] == pytest.approx(100 * np.mean(ndcg))
    assert res.datasets["pairs"].counts["corpus"] == len(corpus)


def test_cache_hit_skips_encoding_and_model_change_misses(
    tmp_path: Path
) -> None:
    enc = make_encoder()
    data = _data()
    cache = tmp_path / "cache"
    first = evaluate(enc, data, cache_dir=cache, show_progress=False)
    n_first = encoded_items(enc)
    assert n_first > 0 and first.settings["items_encoded"] == n_first
    assert not any(r.cached for r in first.datasets.values())

    second = evaluate(enc, data, cache_dir=cache, show_progress=False)
    assert encoded_items(enc) == n_first  # nothing re-encoded
    assert all(r.cached for r in second.datasets.values())
    assert second.scores == first.scores
    assert second.fingerprint["model"]["id"] == first.fingerprint["model"]["id"]

    bias = dict(enc.named_parameters())["backbone.proj.bias"]
    with torch.no_grad():
        bias.add_(0.5)  # one small weight change is a different model
    third = evaluate(enc, data, cache_dir=cache, show_progress=False)
    assert encoded_items(enc) > n_first
    assert not any(r.cached for r in third.datasets.values())
    assert third.fingerprint["model"]["id"] != first.fingerprint["model"]["id"]
    assert len(list(cache.iterdir())) == 2  # one entry directory per model


def test_interrupted_run_resumes_from_finished_datasets(tmp_path: Path) -> None:
    enc = make_encoder()
    data = _data()
    cache = tmp_path / "cache"
    evaluate(enc, {"echo": data["echo"]}, cache_dir=cache, show_progress=False)  # "finished" part
    before = encoded_items(enc)
    res = evaluate(enc, data, cache_dir=cache, show_progress=False)
    assert res.datasets["echo"].cached and not res.datasets["ImageNet-1K"].cached
    n_imagenet = res.datasets["ImageNet-1K"].counts
    encoded = encoded_items(enc) - before
    assert encoded == n_imagenet["unique_queries"] + n_imagenet["unique_targets"]


def test_shards_end_to_end_match_in_memory(tmp_path: Path) -> None:
    enc = make_encoder()
    data = _data()
    shard_dir = _write_shards(tmp_path / "eval", data)
    from_shards = evaluate(enc, [shard_dir], out=tmp_path / "out", cache_dir=tmp_path / "cache",
                           show_progress=False)
    in_memory = evaluate(enc, data, show_progress=False)
    assert from_shards.scores == pytest.approx(in_memory.scores)
    for name in data:
        assert from_shards.datasets[name].counts == in_memory.datasets[name].counts
    assert from_shards.settings["data"] == [str(shard_dir)]
    # The cache is keyed by the manifest: a second run reads no shard and encodes nothing.
    n = encoded_items(enc)
    again = evaluate(enc, [shard_dir], cache_dir=tmp_path / "cache", show_progress=False,
                     datasets=["echo"])
    assert encoded_items(enc) == n and list(again.datasets) == ["echo"]
    with pytest.raises(UnknownComponentError, match="Did you mean 'echo'"):
        evaluate(enc, [shard_dir], datasets=["ech0"], show_progress=False)


def test_manifest_count_mismatch_is_a_data_error(tmp_path: Path) -> None:
    shard_dir = _write_shards(tmp_path / "eval", {"echo": make_samples("echo", 12)})
    manifest = json.loads((shard_dir / MANIFEST_NAME).read_text())
    manifest["datasets"]["echo"]["samples"] = 13
    (shard_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="manifest lists 13 samples of 'echo'"):
        evaluate(make_encoder(), [shard_dir], show_progress=False)


def test_cli_eval_references_and_compare(tmp_path: Path) -> None:
    from mmemb.cli.eval import command

    model_a = save_encoder(make_encoder(seed=0), tmp_path / "a", backbone={"name": "test_bytes"},
                           pooler={"name": "test_mean"})
    model_b = save_encoder(make_encoder(seed=1), tmp_path / "b", backbone={"name": "test_bytes"},
                           pooler={"name": "test_mean"})
    shard_dir = _write_shards(tmp_path / "eval", _data())
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps(
        {"Paper model": {"source": "a table", "scores": {"ImageNet-1K": 61.5}}}
    ))
    runner = CliRunner()
    out = runner.invoke(command, ["--model", str(model_a), "--data", str(shard_dir), "--out",
                                  str(tmp_path / "ra"), "--references", str(refs), "--no-progress"])
    assert out.exit_code == 0, out.output + repr(out.exception)
    assert "| Paper model |" in out.output
    ra = EvalResults.load(tmp_path / "ra")
    assert ra.references["Paper model"].scores == {"ImageNet-1K": 61.5}
    assert ra.settings["model"] == str(model_a)
    assert (tmp_path / "ra" / "cache").is_dir()  # default cache under --out
    # The CLI's numbers are the in-process ones for the same saved model.
    from mmemb.encoder_io import load_encoder

    direct = evaluate(load_encoder(model_a), [shard_dir], show_progress=False)
    assert ra.scores == pytest.approx(direct.scores)

    out = runner.invoke(command, ["--model", str(model_b), "--data", str(shard_dir), "--out",
                                  str(tmp_path / "rb"), "--no-cache", "--no-progress"])
    assert out.exit_code == 0, out.output
    assert not (tmp_path / "rb" / "cache").exists()
    rb = EvalResults.load(tmp_path / "rb")
    out = runner.invoke(command, ["--compare", str(tmp_path / "ra" / "results.json"),
                                  str(tmp_path / "rb" / "results.json")])
    assert out.exit_code == 0, out.output
    row = next(ln for ln in out.output.splitlines() if ln.startswith("| echo"))
    delta = rb.scores["echo"] - ra.scores["echo"]
    assert f"{delta:+.1f}" in row

    bad = runner.invoke(command, ["--model", str(model_a), "--data", str(shard_dir),
                                  "--task", "mmbe", "--out", str(tmp_path / "rc")])
    assert isinstance(bad.exception, MmembError) and "Did you mean 'mmeb'" in str(bad.exception)
    bad = runner.invoke(command, ["--model", str(model_a), "--data", str(shard_dir),
                                  "--arg", "ties=sometimes", "--out", str(tmp_path / "rc")])
    assert isinstance(bad.exception, MmembError) and "ties" in str(bad.exception)
    help_text = runner.invoke(command, ["--help"]).output
    assert "mmemb eval --model" in help_text and "--compare" in help_text


# --- 2 processes --------------------------------------------------------------------------------


def _worker(rank: int, world: int, out: str) -> None:
    with only_plugins(*EVAL_PLUGINS):  # a spawned process: the test's marker does not reach it
        _evaluate_on_rank(rank, world, out)


def _evaluate_on_rank(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        enc = make_encoder()
        res = evaluate(enc, _data(), out=Path(out) / "results", cache_dir=Path(out) / "cache",
                       show_progress=False)
        record = {"scores": res.scores, "encoded": encoded_items(enc),
                  "world": res.settings["world_size"], "total": res.settings["items_encoded"]}
        if rank == 0:
            # From one rank only, inside a group (as a trainer evaluating on its main rank does):
            # distributed=False must not wait for the other rank.
            alone = evaluate(enc, _data(), distributed=False, show_progress=False)
            record["alone"] = alone.scores
            record["alone_world"] = alone.settings["world_size"]
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_process_sharded_encoding_equals_one_process(
    tmp_path: Path
) -> None:
    run_workers(_worker, 2, str(tmp_path / "two"))
    enc = make_encoder()
    one = evaluate(enc, _data(), cache_dir=tmp_path / "one" / "cache", show_progress=False)
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    for r in ranks:  # every rank returns the same results
        assert r["scores"] == pytest.approx(one.scores)
    assert ranks[0]["alone"] == pytest.approx(one.scores) and ranks[0]["alone_world"] == 1
    # Each rank encoded its half of the distinct items, together exactly what one process did.
    total = encoded_items(enc)
    assert ranks[0]["encoded"] + ranks[1]["encoded"] == total
    assert ranks[0]["total"] == ranks[1]["total"] == total
    assert abs(ranks[0]["encoded"] - ranks[1]["encoded"]) <= 4
    two = EvalResults.load(tmp_path / "two" / "results")
    assert two.scores == pytest.approx(one.scores)
    # The gathered embeddings are the single-process ones, row for row.
    model_id = one.fingerprint["model"]["id"]
    assert two.fingerprint["model"]["id"] == model_id
    for name in one.datasets:
        fp = one.datasets[name].data_fingerprint
        a = EmbeddingCache(tmp_path / "one" / "cache").load(model_id, name, fp)
        b = EmbeddingCache(tmp_path / "two" / "cache").load(model_id, name, fp)
        assert a is not None and b is not None
        np.testing.assert_allclose(a.queries, b.queries, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a.targets, b.targets, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(a.cand_index, b.cand_index)


@pytest.mark.gpu
def test_bf16_on_cuda_is_its_own_cache_entry_and_close_to_fp32(
    tmp_path: Path
) -> None:
    data = _data()
    cpu = evaluate(make_encoder(), data, cache_dir=tmp_path / "cache", show_progress=False)
    gpu = evaluate(make_encoder().cuda(), data, cache_dir=tmp_path / "cache", show_progress=False)
    assert gpu.settings["precision"] == "bf16" and cpu.settings["precision"] == "fp32"
    assert gpu.fingerprint["model"]["id"] != cpu.fingerprint["model"]["id"]
    assert not any(r.cached for r in gpu.datasets.values())
    for name in data:  # bf16 rounding may flip a few close calls, not the picture
        assert abs(gpu.scores[name] - cpu.scores[name]) <= 15.0
