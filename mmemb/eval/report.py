"""Reading results: the leaderboard-style markdown table, reference scores, and run comparison.

**Reference scores** come from a small JSON file users supply (numbers copied from a paper or the
MMEB leaderboard), one entry per model, scores in percent keyed by dataset or group name::

    {
      "LLaVE-7B (paper)": {"source": "Lan et al. 2025, Table 1", "scores": {"Overall": 70.3}},
      "my baseline": {"scores": {"ImageNet-1K": 65.2, "N24News": 79.5, "Classification": 61.0}}
    }

Names are matched leniently (case, '-', '_' and spaces ignored) against the datasets evaluated,
the datasets of every group and the group names; an unknown name is an error naming the closest
known one. A group a reference does not give is computed from its per-dataset scores when all of
the group's datasets are there (the same rule as for ours), and left empty otherwise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmemb.errors import ConfigError, DataError, closest
from mmemb.eval.groups import GroupScore

if TYPE_CHECKING:  # a type only: `results` imports this module to render itself
    from mmemb.eval.results import EvalResults

DASH = "—"


@dataclass
class Reference:
    """Published scores of another model, in percent: keys are dataset or group names."""

    name: str
    scores: dict[str, float]
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "scores": dict(self.scores)}


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:.1f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: Sequence[str]) -> list[str]:
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


# --- references ---------------------------------------------------------------------------------


def known_names(results: EvalResults) -> dict[str, str]:
    """Normalised name -> display name, for every dataset and group a reference may score."""
    names: dict[str, str] = {}
    for g in results.groups:
        names.setdefault(_norm(g.name), g.name)
        for d in g.datasets:
            names.setdefault(_norm(d), d)
    for d in results.datasets:
        names.setdefault(_norm(d), d)
    return names


def load_references_doc(path: str | Path) -> Any:
    """The parsed JSON of a reference-scores file (checked by `parse_references`)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--references {p}: no such file. Pass a JSON file of published scores.")
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"--references {p}: not valid JSON ({exc})") from exc


def load_references(path: str | Path, results: EvalResults) -> dict[str, Reference]:
    """Read and check a reference-scores JSON file (format in the module docstring)."""
    return parse_references(load_references_doc(path), known_names(results), where=str(path))


def parse_references(
    doc: Any, names: Mapping[str, str], *, where: str = "references"
) -> dict[str, Reference]:
    """Check a parsed reference document; `names` maps normalised names to display names (see
    `known_names`)."""
    example = '{"LLaVE-7B (paper)": {"source": "...", "scores": {"Overall": 70.3}}}'
    if not isinstance(doc, dict) or not doc:
        raise ConfigError([f"{where}: expected an object of models, e.g. {example}"])
    problems: list[str] = []
    refs: dict[str, Reference] = {}
    for model, entry in doc.items():
        place = f"{where}: {model!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("scores"), dict):
            problems.append(f"{place}: expected {{\"source\": ..., \"scores\": {{name: percent}}}}")
            continue
        unknown_keys = set(entry) - {"source", "scores"}
        if unknown_keys:
            problems.append(
                f"{place}: unknown key(s) {sorted(unknown_keys)}; use 'source' and 'scores'"
            )
        scores: dict[str, float] = {}
        for key, value in entry["scores"].items():
            canon = names.get(_norm(str(key)))
            if canon is None:
                close = closest(str(key), names.values())
                hint = f" Did you mean '{close}'?" if close else ""
                problems.append(f"{place}.scores: unknown dataset or group {key!r}.{hint}")
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not 0 <= value <= 100:
                problems.append(
                    f"{place}.scores.{key}: expected a percentage 0-100 (got {value!r})"
                )
                continue
            if canon in scores:
                problems.append(f"{place}.scores: {key!r} names {canon!r} twice")
                continue
            scores[canon] = float(value)
        refs[str(model)] = Reference(str(model), scores, str(entry.get("source", "")))
    if problems:
        raise ConfigError(
            problems, header=f"{where}: {len(problems)} problem(s) in the reference scores:"
        )
    return refs


def reference_group_score(ref: Reference, group: GroupScore) -> float | None:
    """A reference's score for `group`: given in its file, or the mean of its scores for all of the
    group's datasets, or None."""
    if group.name in ref.scores:
        return ref.scores[group.name]
    if group.datasets and all(d in ref.scores for d in group.datasets):
        return sum(ref.scores[d] for d in group.datasets) / len(group.datasets)
    return None


# --- markdown -----------------------------------------------------------------------------------


def _group_cell(g: GroupScore, metric: str) -> str:
    value = g.metrics.get(metric)
    if value is not None:
        return _fmt(value)
    if metric in g.partial:
        return f"*{_fmt(g.partial[metric])}* ({g.n_present}/{g.n_total})"
    return DASH


def _dataset_order(results: EvalResults) -> list[str]:
    """Evaluated datasets in group order (the leaderboard's), then the rest in evaluation order.

    Groups list canonical names (MMEB-eval spelling); the evaluated name may be spelled otherwise.
    """
    by_norm = {_norm(d): d for d in results.datasets}
    order: list[str] = []
    for g in results.groups:
        for d in g.present:
            name = by_norm.get(_norm(d))
            if name is not None and name not in order:
                order.append(name)
    order += [d for d in results.datasets if d not in order]
    return order


def to_markdown(results: EvalResults) -> str:
    """The report: summary per group (with references), per-dataset scores and counts, notes."""
    r = results
    metric_keys = list(r.metric_labels)
    primary_label = r.metric_labels.get(r.primary_metric, r.primary_metric)
    lines = [f"# Evaluation results: {r.task}", ""]
    model = r.fingerprint.get("model", {})
    facts = [f"model fingerprint `{str(model.get('id', '?'))[:16]}`"]
    if r.settings.get("model"):
        facts.insert(0, f"model `{r.settings['model']}`")
    facts += [f"{k} {v}" for k, v in r.versions.items() if k in ("mmemb", "torch", "transformers")]
    if r.created:
        facts.append(r.created)
    lines += [" · ".join(facts), ""]

    # Summary
    lines += ["## Summary", ""]
    refs = list(r.references.values())
    any_present = any(g.present for g in r.groups)
    if r.groups and not any_present and not refs:
        names = ", ".join(g.name for g in r.groups)
        lines += [f"No dataset of the {r.task} groups ({names}) was evaluated: there are no "
                  "group averages to report.", ""]
    elif len(metric_keys) == 1:
        header = ["Model"] + [f"{g.name} ({g.n_total})" for g in r.groups]
        rows = [["**this model**"] + [_group_cell(g, r.primary_metric) for g in r.groups]]
        for ref in refs:
            rows.append([ref.name] + [_fmt(reference_group_score(ref, g)) for g in r.groups])
        lines += _table(header, rows, ["l"] + ["r"] * len(r.groups)) + [""]
    else:
        header = ["Model", "Group"] + [r.metric_labels[m] for m in metric_keys]
        rows = [
            ["**this model**", f"{g.name} ({g.n_total})"] + [_group_cell(g, m) for m in metric_keys]
            for g in r.groups
        ]
        for ref in refs:
            for g in r.groups:
                value = reference_group_score(ref, g)
                if value is not None:
                    rows.append([ref.name, g.name] + [
                        _fmt(value) if m == r.primary_metric else DASH for m in metric_keys
                    ])
        lines += _table(header, rows, ["l", "l"] + ["r"] * len(metric_keys)) + [""]
    if r.overall is not None:
        lines += [f"**Overall {primary_label}: {r.overall:.1f}**", ""]
    if any(g.missing and g.present for g in r.groups):
        lines += [
            "*Italic*: mean over the datasets present only (present/total); the benchmark's "
            "average needs all of them, so it is not comparable with published numbers.", "",
        ]
    if any_present:
        # Each missing dataset is named once, under the first group that lists it (meta-tasks
        # come before the IND/OOD/Overall groups that repeat them).
        shown: set[str] = set()
        missing_lines = []
        for g in r.groups:
            new = [d for d in g.missing if d not in shown]
            if not new:
                continue
            if len(new) == g.n_total:
                missing_lines.append(f"- {g.name}: none of its {g.n_total} datasets evaluated")
            else:
                missing_lines.append(f"- missing from {g.name}: {', '.join(new)}")
            shown.update(new)
        if missing_lines:
            lines += missing_lines + [""]
    if r.datasets:
        mean = r.mean_evaluated
        lines += [
            f"Mean {primary_label} over the {len(r.datasets)} evaluated dataset(s): {_fmt(mean)}",
            "",
        ]

    # Per dataset
    lines += ["## Per dataset", ""]
    res = [r.datasets[d] for d in _dataset_order(r)]
    has_task = any(x.meta_task for x in res)
    has_split = any(x.split for x in res)
    has_ties = any("tied" in x.counts for x in res)
    has_corpus = any("corpus" in x.counts for x in res)
    header = (["Meta-task"] if has_task else []) + ["Dataset"] + (["Split"] if has_split else [])
    header += [r.metric_labels[m] for m in metric_keys] + [ref.name for ref in refs]
    header += (["Ties"] if has_ties else []) + ["Queries"]
    header += ["Corpus"] if has_corpus else ["Candidates/query"]
    rows = []
    for x in res:
        row = ([x.meta_task or DASH] if has_task else []) + [x.name]
        row += [x.split or DASH] if has_split else []
        row += [_fmt(x.metrics.get(m)) for m in metric_keys]
        row += [_fmt(_ref_dataset_score(ref, x.name)) for ref in refs]
        row += [str(x.counts.get("tied", 0))] if has_ties else []
        row.append(str(x.counts.get("queries", DASH)))
        if has_corpus:
            row.append(str(x.counts.get("corpus", DASH)))
        else:
            lo, hi = x.counts.get("candidates_min"), x.counts.get("candidates_max")
            row.append(DASH if lo is None else (str(lo) if lo == hi else f"{lo}–{hi}"))
        rows.append(row)
    n_left = len(header) - len(metric_keys) - len(refs) - (1 if has_ties else 0) - 2
    align = ["l"] * n_left + ["r"] * (len(header) - n_left)
    lines += _table(header, rows, align)
    lines.append("")
    if r.ungrouped and r.groups and len(metric_keys) == 1:
        lines += [f"Not part of any {r.task} group (shown, never averaged into one): "
                  + ", ".join(r.ungrouped), ""]

    if r.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in r.notes] + [""]
    if refs:
        lines += ["## References", ""]
        lines += [f"- {ref.name}: {ref.source or 'source not given'}" for ref in refs] + [""]
    return "\n".join(lines)


def _ref_dataset_score(ref: Reference, dataset: str) -> float | None:
    if dataset in ref.scores:
        return ref.scores[dataset]
    by_norm = {_norm(k): v for k, v in ref.scores.items()}
    return by_norm.get(_norm(dataset))


# --- comparison ---------------------------------------------------------------------------------


def compare(a: EvalResults, b: EvalResults, *, labels: tuple[str, str] = ("A", "B")) -> str:
    """Per-dataset and per-group differences (B − A) of the primary metric, as a markdown table,
    with warnings where the two runs are not comparable (task, candidate counts, missing sets)."""
    if a.task != b.task or a.primary_metric != b.primary_metric:
        raise DataError(
            f"cannot compare a {a.task!r} run ({a.primary_metric}) with a {b.task!r} run "
            f"({b.primary_metric}): compare results of the same eval task"
        )
    la, lb = labels
    metric = a.metric_labels.get(a.primary_metric, a.primary_metric)
    lines = [f"{la}: {_describe(a)}", f"{lb}: {_describe(b)}", ""]
    names = [d for d in _dataset_order(a)] + [d for d in _dataset_order(b) if d not in a.datasets]
    rows = []
    for d in names:
        va = a.datasets[d].metrics[a.primary_metric] if d in a.datasets else None
        vb = b.datasets[d].metrics[b.primary_metric] if d in b.datasets else None
        delta = f"{vb - va:+.1f}" if va is not None and vb is not None else DASH
        rows.append([d, _fmt(va), _fmt(vb), delta])
    groups_b = {g.name: g for g in b.groups}
    for ga in a.groups:
        gb = groups_b.get(ga.name)
        if gb is None or (not ga.present and not gb.present):
            continue
        va_s, vb_s = _group_cell(ga, a.primary_metric), _group_cell(gb, b.primary_metric)
        xa, xb = ga.metrics.get(a.primary_metric), gb.metrics.get(b.primary_metric)
        delta = f"{xb - xa:+.1f}" if xa is not None and xb is not None else DASH
        rows.append([f"**{ga.name}**", va_s, vb_s, delta])
    lines += _table(["Dataset", f"{la} {metric}", f"{lb} {metric}", f"Δ ({lb} − {la})"], rows,
                    ["l", "r", "r", "r"])
    warnings = []
    only_a = [d for d in a.datasets if d not in b.datasets]
    only_b = [d for d in b.datasets if d not in a.datasets]
    if only_a:
        warnings.append(f"only in {la}: {', '.join(only_a)}")
    if only_b:
        warnings.append(f"only in {lb}: {', '.join(only_b)}")
    for d in names:
        if d in a.datasets and d in b.datasets:
            ca, cb = _protocol_counts(a.datasets[d].counts), _protocol_counts(b.datasets[d].counts)
            if ca != cb:
                warnings.append(
                    f"{d}: evaluated on different data ({la}: {_fmt_counts(ca)}; "
                    f"{lb}: {_fmt_counts(cb)}), the scores are not directly comparable"
                )
    if a.task_config != b.task_config:
        warnings.append(f"task settings differ ({la}: {a.task_config}; {lb}: {b.task_config})")
    if warnings:
        lines += ["", "Warnings:"] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


_PROTOCOL_KEYS = ("queries", "candidates_total", "candidates_min", "candidates_max", "corpus")


def _protocol_counts(counts: Mapping[str, int]) -> dict[str, int]:
    return {k: counts[k] for k in _PROTOCOL_KEYS if k in counts}


def _fmt_counts(c: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in c.items())


def _describe(r: EvalResults) -> str:
    model = r.settings.get("model") or "in-process model"
    fp = str(r.fingerprint.get("model", {}).get("id", "?"))[:16]
    return f"{model} (task {r.task}, model fingerprint {fp}, {len(r.datasets)} datasets)"
