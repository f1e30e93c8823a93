"""MMEB grouping and averaging against a hand-built table; the report, references and comparison."""

from __future__ import annotations

import json

import pytest
from mmemb_eval.mmeb_table import (
    GROUPS,
    IND_DATASETS,
    META_TASKS,
    MMEB_DATASETS,
    OOD_DATASETS,
    canonical_dataset,
    mmeb_groups,
    split_of,
)
from test_eval_support import EVAL_PLUGINS

from mmemb.errors import ConfigError, DataError
from mmemb.eval.report import compare, known_names, parse_references
from mmemb.eval.results import EvalResults
from mmemb.eval.task import DatasetResult

# Hand-built table: every dataset of a meta-task gets the same score, so each mean is easy to
# work out by hand; the Overall value tells a mean over datasets from a mean over meta-tasks.
BY_TASK = {"Classification": 10.0, "VQA": 20.0, "Retrieval": 30.0, "Grounding": 40.0}
TABLE = {d: {"precision@1": BY_TASK[t]} for t, ds in META_TASKS.items() for d in ds}
OVERALL = (10 * 10 + 10 * 20 + 12 * 30 + 4 * 40) / 36  # 22.78, not (10+20+30+40)/4 = 25
IND = (5 * 10 + 6 * 20 + 8 * 30 + 1 * 40) / 20  # 22.5
OOD = (5 * 10 + 4 * 20 + 4 * 30 + 3 * 40) / 16  # 23.125


def test_benchmark_table_shape() -> None:
    assert [len(v) for v in META_TASKS.values()] == [10, 10, 12, 4]
    assert len(MMEB_DATASETS) == len(set(MMEB_DATASETS)) == 36
    assert len(IND_DATASETS) == 20 and len(OOD_DATASETS) == 16
    assert set(IND_DATASETS) <= set(MMEB_DATASETS)
    ind_per_task = {t: sum(d in IND_DATASETS for d in ds) for t, ds in META_TASKS.items()}
    assert ind_per_task == {"Classification": 5, "VQA": 6, "Retrieval": 8, "Grounding": 1}
    assert list(GROUPS) == [
        "Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD", "Overall"
    ]


def test_group_means_over_datasets_hand_computed() -> None:
    groups, others = mmeb_groups(TABLE)
    got = {g.name: g.metrics["precision@1"] for g in groups}
    assert got == pytest.approx({**BY_TASK, "IND": IND, "OOD": OOD, "Overall": OVERALL})
    assert others == []
    assert all(g.complete for g in groups)


def test_missing_dataset_is_reported_never_averaged_over() -> None:
    table = {d: v for d, v in TABLE.items() if d != "ImageNet-A"}
    table["my-own-set"] = {"precision@1": 99.0}
    groups, others = mmeb_groups(table)
    g = {x.name: x for x in groups}
    assert g["Classification"].metrics["precision@1"] is None
    assert g["Classification"].missing == ["ImageNet-A"]
    assert g["Classification"].partial["precision@1"] == pytest.approx(10.0)
    assert (g["Classification"].n_present, g["Classification"].n_total) == (9, 10)
    assert g["OOD"].metrics["precision@1"] is None  # ImageNet-A is OOD
    assert g["IND"].metrics["precision@1"] == pytest.approx(IND)  # untouched
    assert g["Overall"].metrics["precision@1"] is None
    assert g["VQA"].metrics["precision@1"] == pytest.approx(20.0)
    assert others == ["my-own-set"]  # reported apart, folded into no group


def test_dataset_name_spellings() -> None:
    assert canonical_dataset("ImageNet_1K") == "ImageNet-1K"  # MMEB-train spelling
    assert canonical_dataset("visualnews_i2t") == "VisualNews_i2t"
    assert canonical_dataset("MSCOCO") == "MSCOCO"
    assert canonical_dataset("mscoco_t2i") == "MSCOCO_t2i"
    assert canonical_dataset("refcoco-matching") == "RefCOCO-Matching"
    assert canonical_dataset("synthetic") is None
    assert split_of("wiki-ss-nq") == "OOD" and split_of("N24News") == "IND"
    with pytest.raises(DataError, match="both MMEB's 'ImageNet-1K'"):
        mmeb_groups({"ImageNet-1K": {"precision@1": 1.0}, "imagenet_1k": {"precision@1": 2.0}})


def _results(scores: dict[str, float], counts: int = 1000) -> EvalResults:
    from mmemb import plugins

    task = plugins.build("eval_task", "mmeb")
    datasets = {
        n: DatasetResult(n, {"precision@1": v},
                         counts={"queries": counts, "candidates_min": 1000, "candidates_max": 1000,
                                 "candidates_total": counts * 1000, "tied": 2},
                         meta_task="Classification" if canonical_dataset(n) else None)
        for n, v in scores.items()
    }
    summary = task.summarize(datasets)
    return EvalResults(
        task="mmeb", primary_metric="precision@1", metric_labels={"precision@1": "P@1"},
        datasets=datasets, groups=summary.groups, overall=summary.overall,
        ungrouped=summary.ungrouped, notes=task.notes(),
    )


pytestmark = pytest.mark.only_plugins(*EVAL_PLUGINS)  # the report tests build the mmeb task


def test_markdown_table_shows_partial_groups_and_references() -> None:
    res = _results({"ImageNet-1K": 50.0, "N24News": 70.0, "synthetic": 33.3})
    refs = parse_references(
        {"Model X (paper)": {"source": "a paper", "scores": {
            "imagenet_1k": 60.0, "Overall": 70.3,
            **{d: 20.0 for d in META_TASKS["VQA"]},  # VQA complete -> its mean is computed
        }}},
        known_names(res),
    )
    res.references = refs
    md = res.to_markdown()
    lines = md.splitlines()
    header = next(ln for ln in lines if ln.startswith("| Model |"))
    assert "Classification (10)" in header and "Overall (36)" in header
    ours = next(ln for ln in lines if ln.startswith("| **this model**"))
    assert "*60.0* (2/10)" in ours  # partial mean of the two present, marked as such
    ref_row = next(ln for ln in lines if ln.startswith("| Model X (paper)"))
    cells = [c.strip() for c in ref_row.strip("|").split("|")]
    assert cells[2] == "20.0"  # VQA computed from its ten dataset scores
    assert cells[-1] == "70.3"  # Overall as given
    assert cells[1] == "—"  # Classification: only one dataset given
    imagenet_row = next(ln for ln in lines if "| ImageNet-1K |" in ln)
    assert "| 50.0 | 60.0 |" in imagenet_row and "| 1000 |" in imagenet_row
    assert "synthetic" in md and "never averaged" in md
    assert "Ties" in md and "reference implementation" in md


def test_references_with_unknown_names_fail_with_a_suggestion() -> None:
    res = _results({"ImageNet-1K": 50.0})
    with pytest.raises(ConfigError, match="Did you mean 'ImageNet-1K'") as err:
        parse_references({"M": {"scores": {"ImageNet1000": 1.0, "VQA": 150}}}, known_names(res))
    assert "expected a percentage 0-100" in str(err.value)


def test_results_roundtrip_and_compare(tmp_path) -> None:
    a = _results({"ImageNet-1K": 50.0, "N24News": 70.0})
    b = _results({"ImageNet-1K": 55.5, "HatefulMemes": 60.0}, counts=900)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    a2 = EvalResults.load(tmp_path / "a" / "results.json")
    assert a2.scores == a.scores
    assert a2.group("Classification").partial == a.group("Classification").partial
    text = compare(a2, EvalResults.load(tmp_path / "b"), labels=("a", "b"))
    row = next(ln for ln in text.splitlines() if ln.startswith("| ImageNet-1K"))
    assert "| 50.0 | 55.5 | +5.5 |" in row
    assert "only in a: N24News" in text and "only in b: HatefulMemes" in text
    assert "ImageNet-1K: evaluated on different data" in text
    bad = json.loads((tmp_path / "a" / "results.json").read_text())
    bad["format"] = "something-else"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="not an mmemb eval results file"):
        EvalResults.load(tmp_path / "bad.json")
