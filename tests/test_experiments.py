"""The study scripts under experiments/: the runner's statistics and result reading, and the
dataset builders' splitting and cleaning. Fast: nothing here trains or loads a model."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _load(name: str) -> ModuleType:
    # experiments/ is a folder of scripts, not a package: load each by path
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


rw = _load("reweighters")
docs = _load("build_docstrings")
digits = _load("build_digits")
packages = _load("build_docpackages")


# --- runner: configs and statistics ------------------------------------------------------------


def test_parse_config_splits_overrides_but_not_yaml_lists() -> None:
    assert rw.parse_config("none=loss.reweighter=none") == ("none", ["loss.reweighter=none"])
    assert rw.parse_config("ega=loss.reweighter.name=ega,loss.reweighter.normalize=true") == (
        "ega", ["loss.reweighter.name=ega", "loss.reweighter.normalize=true"])
    assert rw.parse_config("r=eval.task.recall_at=[1,5],train.steps=3") == (
        "r", ["eval.task.recall_at=[1,5]", "train.steps=3"])
    assert rw.parse_config("as_is=") == ("as_is", [])
    with pytest.raises(ValueError):
        rw.parse_config("no-equals-sign")


def test_paired_stats_match_scipy_and_a_hand_computed_interval() -> None:
    stats = pytest.importorskip("scipy.stats")  # the `experiments` extra

    diffs = [4.5, 8.0, 1.0, 1.5, 0.0]
    st = rw.paired_stats(diffs)
    mean = sum(diffs) / 5
    sd = float(np.std(diffs, ddof=1))
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t(0.975, df=4)
    assert st.n == 5 and st.wins == 4 and st.losses == 0
    assert st.mean == pytest.approx(mean) and st.std == pytest.approx(sd)
    assert (st.ci_low, st.ci_high) == pytest.approx((mean - half, mean + half))
    # a paired t-test is the one-sample test of the differences
    a = [54.0, 68.0, 66.0, 58.5, 53.0]
    b = [x - d for x, d in zip(a, diffs, strict=True)]
    assert st.t_p == pytest.approx(float(stats.ttest_rel(a, b).pvalue))
    # Wilcoxon drops the zero difference: exact test on the four positive ones, p = 2/16
    assert st.wilcoxon_p == pytest.approx(0.125)


def test_paired_stats_degenerate_cases() -> None:
    pytest.importorskip("scipy")
    same = rw.paired_stats([2.0, 2.0, 2.0])  # no spread: no interval, no t-test to claim
    assert same.mean == 2.0 and math.isnan(same.ci_low) and math.isnan(same.t_p)
    zero = rw.paired_stats([0.0, 0.0, 0.0])
    assert zero.t_p == 1.0 and math.isnan(zero.wilcoxon_p)
    one = rw.paired_stats([1.0])
    assert one.n == 1 and math.isnan(one.ci_low) and math.isnan(one.t_p)
    # five seeds all one way: the smallest two-sided Wilcoxon p there is
    assert rw.paired_stats([1.0, 2.0, 3.0, 4.0, 5.0]).wilcoxon_p == pytest.approx(0.0625)


def test_collapse_flag_and_final_loss() -> None:
    assert rw.collapsed(math.log(64) * 1.005, 64)
    assert rw.collapsed(math.log(64) * 0.995, 64)
    assert not rw.collapsed(math.log(64) * 0.98, 64)
    assert not rw.collapsed(1.3, 64)
    losses = [5.0] * 90 + [1.0] * 10
    assert rw.final_loss(losses) == pytest.approx(1.0)  # the last 10 (5 % of 100 is below 10)
    assert rw.final_loss(list(range(400))) == pytest.approx(sum(range(380, 400)) / 20)
    assert math.isnan(rw.final_loss([]))


def test_effective_candidates_subtracts_masked_copies_per_row() -> None:
    records = [{"step": i, "loss": 1.0, "masked_duplicates": 32.0} for i in range(40)]
    assert rw.effective_candidates(records, 64.0, 16) == pytest.approx(62.0)
    assert rw.effective_candidates([{"step": 1, "loss": 1.0}], 64.0, 16) == 64.0


def _results(ties: str, rows: dict[str, tuple[float, float]]) -> dict[str, object]:
    """A results.json as the mmeb task writes it: (P@1 ties as hit, strict) per dataset."""
    other = "miss" if ties == "hit" else "hit"
    datasets = {}
    for name, (hit, strict) in rows.items():
        own, alt = (hit, strict) if ties == "hit" else (strict, hit)
        datasets[name] = {"metrics": {"precision@1": own},
                          "extra": {f"precision@1 (ties as {other})": alt}}
    return {"primary_metric": "precision@1", "task_config": {"ties": ties}, "datasets": datasets}


@pytest.mark.parametrize("ties", ["hit", "miss"])
def test_read_scores_gives_both_tie_rules_whatever_the_task_setting(ties: str) -> None:
    doc = _results(ties, {"a": (60.0, 50.0), "b": (40.0, 30.0)})
    got = rw.read_scores(doc)
    assert got["p1_ties_hit"] == pytest.approx(50.0)
    assert got["p1_strict"] == pytest.approx(40.0)
    assert got["score"] == pytest.approx(50.0 if ties == "hit" else 40.0)


def test_read_scores_of_another_task_reports_its_primary_metric_only() -> None:
    doc = {"primary_metric": "ndcg@10", "datasets": {"a": {"metrics": {"ndcg@10": 70.0}}}}
    assert rw.read_scores(doc) == {"score": 70.0, "p1_ties_hit": None, "p1_strict": None}


def test_summary_table_pairs_by_seed_and_counts_collapses() -> None:
    pytest.importorskip("scipy")
    def run(config: str, seed: int, p1: float, loss: float = 1.0, coll: bool = False):
        return rw.RunResult(config=config, seed=seed, ok=True, score=p1, p1_ties_hit=p1 + 1,
                            p1_strict=p1, final_loss=loss, candidates=64.0, collapsed=coll)

    results = [run("none", 0, 50.0), run("none", 1, 60.0),
               run("ega", 0, 52.0), run("ega", 1, 61.0, loss=4.16, coll=True),
               rw.RunResult(config="llave", seed=0, ok=False, error="exit 1"),
               run("llave", 1, 59.0)]
    table, summary = rw.summarize(results, ["none", "ega", "llave"], [0, 1], "none")
    lines = table.splitlines()
    assert lines[0].count("|") == lines[1].count("|")
    ega = next(line for line in lines if line.startswith("| ega "))
    assert "+1.5" in ega and "52.0, 61.0" in ega and "| 1/2 | 0/2 |" in ega
    llave = next(line for line in lines if line.startswith("| llave "))
    assert "failed, 59.0" in llave and "(1 failed)" in llave
    assert summary["configs"]["ega"]["paired"]["n"] == 2
    assert summary["configs"]["llave"]["paired"]["n"] == 1  # only seed 1 is paired


# --- docstring retrieval set -------------------------------------------------------------------


DOC = """Return the shortest path between two nodes.

Parameters
----------
G : graph
    The graph to search, directed or not, with weights on its edges when given.
source : node
    Where the path starts; it must be a node of the graph.
"""


def test_split_docstring_removes_underlines_and_keeps_the_body() -> None:
    summary, body = docs.split_docstring(DOC)
    assert summary == "Return the shortest path between two nodes."
    assert body.startswith("Parameters G : graph The graph to search")
    assert "---" not in body
    assert docs.usable(summary, body)
    assert docs.split_docstring("Only a summary line.") is None


def test_usable_rejects_short_templated_and_self_repeating_pairs() -> None:
    body = " ".join(["word"] * 20)
    assert not docs.usable("Too short.", body)
    assert not docs.usable("Return the %(klass)s of the frame.", body)
    assert not docs.usable("Compute the mean of the array.", "Compute the mean of the array. "
                           + body)
    assert not docs.usable("Compute the mean of the array.", "few words here")


def _doc(pkg: str, i: int, summary: str | None = None, body: str | None = None):
    return docs.Doc(pkg, f"{pkg}/m.py:{i}", summary or f"Summary number {i} of package {pkg}.",
                    body or f"Body {i} of {pkg} " + "text " * 20)


def test_dedupe_drops_repeated_summaries_and_keeps_one_of_identical_bodies() -> None:
    items = [_doc("a", 1, summary="Return self."), _doc("b", 2, summary="Return self."),
             _doc("a", 3, body="same body " * 10), _doc("b", 4, body="Same  body " * 10),
             _doc("a", 5)]
    kept = docs.dedupe(items)
    assert [d.origin for d in kept] == ["a/m.py:3", "a/m.py:5"]


def test_split_is_by_package_and_eval_lists_are_own_candidates() -> None:
    pool = ([_doc("train1", i) for i in range(30)] + [_doc("train2", i) for i in range(30)]
            + [_doc("held", i) for i in range(40)] + [_doc("held2", i) for i in range(40)])
    train, evals = docs.build_split(pool, ["held", "held2"], n_train=50, n_eval=30,
                                    candidates=10, per_package_cap=25, seed=0)
    assert len(train) == 50 and len(evals) == 30
    assert {r["meta"]["package"] for r in train} == {"train1", "train2"}
    assert {r["meta"]["package"] for r in evals} == {"held", "held2"}
    bodies = {d.body: d.package for d in pool}
    for r in evals:
        assert len(r["neg"]) == 9 and r["pos"] not in r["neg"]
        assert {bodies[b] for b in r["neg"]} == {r["meta"]["package"]}
    train_text = {r["pos"] for r in train} | {r["query"] for r in train}
    assert not train_text & ({r["pos"] for r in evals} | {r["query"] for r in evals})
    again, evals_again = docs.build_split(pool, ["held", "held2"], n_train=50, n_eval=30,
                                          candidates=10, per_package_cap=25, seed=0)
    assert again == train and evals_again == evals  # seeded


def test_package_rows_hold_out_queries_and_rank_every_label() -> None:
    pool = [_doc(pkg, i) for pkg in ("a", "b", "c") for i in range(40)]
    labels = {"a": "a: alpha", "b": "b: beta", "c": "c: gamma"}
    train, evals = packages.build_rows(pool, labels, train_per_class=15, eval_per_class=5, seed=0)
    assert len(evals) == 15 and len(train) == 45
    for r in evals:
        assert r["pos"] == labels[r["meta"]["package"]]
        assert sorted([r["pos"], *r["neg"]]) == sorted(labels.values())  # all labels, once
    assert all(r["pos"] == labels[r["meta"]["package"]] for r in train)
    assert not {r["query"] for r in train} & {r["query"] for r in evals}
    order = [r["meta"]["package"] for r in train]
    assert sum(a != b for a, b in zip(order, order[1:], strict=False)) > 10  # classes interleaved
    again = packages.build_rows(pool, labels, train_per_class=15, eval_per_class=5, seed=0)
    assert again == (train, evals)  # seeded


def test_iter_docstrings_reads_source_without_importing(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "tests").mkdir(parents=True)
    code = f'raise SystemExit("imported")\n\ndef f():\n    """{DOC}"""\n'
    (pkg / "__init__.py").write_text(code)
    (pkg / "tests" / "test_x.py").write_text(code)
    found = list(docs.iter_docstrings("pkg", pkg))
    assert [d.origin for d in found] == ["pkg/__init__.py:3"]


# --- digits -------------------------------------------------------------------------------------


def test_digits_split_is_stratified_and_disjoint() -> None:
    labels = [i % 10 for i in range(300)]
    train, held = digits.stratified_split(labels, 5, seed=0)
    assert len(held) == 50 and len(train) == 250 and not set(train) & set(held)
    assert sorted(labels[i] for i in held) == sorted(list(range(10)) * 5)
    with pytest.raises(ValueError):
        digits.stratified_split(labels, 30, seed=0)


def test_digit_png_is_upscaled_dark_on_white() -> None:
    import io

    from PIL import Image

    image = np.zeros((8, 8))
    image[2:6, 3:5] = 16
    img = Image.open(io.BytesIO(digits.to_png(image, 32)))
    assert img.size == (32, 32) and img.mode == "RGB"
    px = np.asarray(img)
    assert px[0, 0].tolist() == [255, 255, 255]  # background white
    assert px[3 * 4, 3 * 4].tolist() == [0, 0, 0]  # ink black, cells kept sharp


def test_summary_json_is_serialisable() -> None:
    results = [rw.RunResult(config="none", seed=0, ok=True, score=1.0, p1_strict=1.0,
                            p1_ties_hit=1.0, final_loss=1.0, candidates=4.0)]
    _, summary = rw.summarize(results, ["none"], [0], "none")
    json.dumps(summary, default=str)


def test_plot_writes_a_png_with_missing_and_collapsed_runs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = [
        rw.RunResult(config=c, seed=s, ok=True, score=50.0 + s, p1_strict=50.0 + s,
                     p1_ties_hit=51.0 + s, final_loss=1.0, candidates=64.0,
                     steps=list(range(1, 41)), losses=[math.log(64)] * 40)
        for c in ("none", "ega") for s in (0, 1)
    ] + [rw.RunResult(config="llave", seed=0, ok=False, error=rw.NOT_RUN)]
    path = tmp_path / "img" / "study.png"
    rw.plot(results, ["none", "ega", "llave"], [0, 1], path, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_table_pairs_chosen_configs() -> None:
    pytest.importorskip("scipy")
    results = [rw.RunResult(config=c, seed=s, ok=True, score=v, p1_strict=v, p1_ties_hit=v)
               for c, s, v in [("ega", 0, 60.0), ("ega", 1, 70.0), ("ega_nomask", 0, 20.0),
                               ("ega_nomask", 1, 25.0)]]
    table, out = rw.compare_table(results, [("ega", "ega_nomask")], [0, 1])
    assert out["ega - ega_nomask"]["diffs"] == [40.0, 45.0]
    assert "+42.5" in table and "+40.0, +45.0" in table
