"""A run owns its output directory.

``OUTPUT_DIR/run.json`` names the run's lineage (``run_id``: a fresh start makes a new one; a
resume continues it), its recipe fingerprint, how often it was started and whether it finished.
Every checkpoint records the same ``run_id`` and fingerprint, every metrics line the ``run``.

`plan_run` decides, before anything is written, what a start does:

- fresh (no ``--resume``): refused where another run's checkpoints or model exist, unless
  ``--overwrite`` (which deletes that run's checkpoints, model, metrics and reports first);
- ``--resume auto``: the newest checkpoint of the directory's lineage if its recipe is
  compatible, a fresh start if there is no checkpoint — the one command a scheduler reruns;
- ``--resume latest``: the same, but a missing checkpoint is an error (you meant to continue);
- ``--resume PATH``: that checkpoint; newer checkpoints of its lineage in this directory would be
  replaced by the resumed run, so that needs ``--overwrite``.

Compatible means: the recipe differs from the checkpoint's at most in `ALLOWED_CHANGES`.

``metrics.jsonl`` is only ever appended to. A run that died after its last checkpoint leaves lines
past it; the resumed run writes those steps again, after a ``{"event": "resumed", ...}`` line
listing them. `read_metrics` gives the effective history: one line per step, the last written.
"""

from __future__ import annotations

import datetime
import json
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmemb.errors import MmembError
from mmemb.fileio import atomic_write_text
from mmemb.recipe import LoadedRecipe, Recipe
from mmemb.train import checkpoint as ckpt

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"

ALLOWED_CHANGES: tuple[str, ...] = (
    "output_dir",            # the run was moved, or resumed from a copied checkpoint
    "train.steps",           # train longer (or stop earlier than planned)
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.eval_every",
    "train.tensorboard",
    "train.stop_on_collapse",
    "train.threads",         # how fast, not what: the same steps give the same weights
    "eval.before_training",
    "eval.batch_size",
    "export.dir",
)
"""Recipe keys a resumed run may change: cadence and report outputs, nothing the weights depend
on (except `train.steps`, which stretches the schedule: asked for explicitly)."""

# What a fresh start with --overwrite removes: only what a run writes, nothing else in the folder.
RUN_ARTIFACTS = ("checkpoints", "model", ".tmp-model", METRICS_FILE, RUN_FILE, "recipe.yaml",
                 "tensorboard", "eval_before", "eval_after")


class RunDirError(MmembError):
    """The output directory holds another run, or the checkpoint to resume does not fit."""


# -- recipes ------------------------------------------------------------------------------------


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _allowed(key: str) -> bool:
    return any(key == a or key.startswith(a + ".") for a in ALLOWED_CHANGES)


def recipe_keys(recipe: Recipe) -> dict[str, Any]:
    """The recipe as flat ``{"a.b.c": value}`` (defaults filled in)."""
    return _flatten(recipe.model_dump(mode="json"))


def fingerprint(recipe: Recipe) -> str:
    """A hash of everything in the recipe but `ALLOWED_CHANGES`."""
    import hashlib

    kept = {k: v for k, v in recipe_keys(recipe).items() if not _allowed(k)}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stored_recipe_keys(path: Path) -> dict[str, Any]:
    """A checkpoint's recipe, flat, with defaults filled in by this version's `Recipe` (so a
    key added since it was written does not count as a change)."""
    try:
        raw = yaml.safe_load((path / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RunDirError(f"{path}: cannot read the checkpoint's recipe.yaml ({exc}).") from None
    try:
        return recipe_keys(Recipe.model_validate(raw))
    except Exception:  # noqa: BLE001 - written by another version: compare what is there
        return _flatten(raw)


def recipe_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"key: checkpoint X, now Y"`` for every key outside the allow-list that differs."""
    out = []
    for key in sorted(set(saved) | set(now)):
        if _allowed(key):
            continue
        a, b = saved.get(key, "(absent)"), now.get(key, "(absent)")
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out


# -- run.json -----------------------------------------------------------------------------------


def read_run(out_dir: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((out_dir / RUN_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RunDirError(
            f"{out_dir / RUN_FILE}: unreadable ({exc}). It records which run owns {out_dir}; "
            "remove it only if no run's checkpoints there matter, or pass --overwrite."
        ) from None
    return dict(doc) if isinstance(doc, dict) else None


def write_run(out_dir: Path, doc: dict[str, Any]) -> None:
    atomic_write_text(out_dir / RUN_FILE, json.dumps(doc, indent=2) + "\n")


def mark_finished(out_dir: Path, step: int) -> None:
    doc = read_run(out_dir) or {}
    doc["finished_step"] = step
    write_run(out_dir, doc)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- the plan -----------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """What a start does (computed read-only by every rank; applied by rank 0)."""

    run_id: str
    fingerprint: str
    resume_from: Path | None = None
    start_step: int = 0
    finished: bool = False
    """The run already ended at the checkpoint's step and its model is saved: nothing to do."""
    attempt: int = 1
    remove: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _describe(out_dir: Path, ckpts: list[Path], has_model: bool) -> str:
    parts = []
    if ckpts:
        parts.append(f"checkpoints up to step {ckpt.checkpoint_step(ckpts[-1])}")
    if has_model:
        parts.append("a trained model")
    return " and ".join(parts)


def _has_model(out_dir: Path) -> bool:
    model = out_dir / "model"
    return model.is_dir() and any(model.iterdir())


def plan_run(
    out_dir: Path, loaded: LoadedRecipe, *, resume: str | None, overwrite: bool
) -> RunPlan:
    """Decide how this start uses `out_dir`; raises `RunDirError` (one line plus the differing
    keys) instead of touching another run's work."""
    recipe = loaded.recipe
    now_keys = recipe_keys(recipe)
    fp = fingerprint(recipe)
    root = ckpt.checkpoint_root(out_dir)
    run = read_run(out_dir)
    all_ckpts = ckpt.list_checkpoints(root)
    has_model = _has_model(out_dir)
    fresh_id = secrets.token_hex(6)

    def replace_all(reason: str) -> RunPlan:
        plan = RunPlan(fresh_id, fp)
        plan.remove = [out_dir / name for name in RUN_ARTIFACTS if (out_dir / name).exists()]
        plan.remove += sorted(out_dir.glob("eval_step*"))
        if plan.remove:
            plan.notes.append(f"--overwrite: {reason}; removing its "
                              f"{', '.join(p.name for p in plan.remove)}")
        return plan

    if resume is None:
        if overwrite:
            return replace_all(f"replacing the run in {out_dir}")
        if all_ckpts or has_model:
            raise RunDirError(
                f"{out_dir} already holds a run ({_describe(out_dir, all_ckpts, has_model)}). "
                "Pass --resume auto to continue it, --overwrite to replace it, or choose another "
                "output_dir=..."
            )
        return RunPlan(fresh_id, fp)

    # Which lineage owns the directory: run.json, else the newest checkpoint (older versions).
    lineage = run.get("run_id") if run else None
    if lineage is None and all_ckpts:
        lineage = ckpt.read_state(all_ckpts[-1]).get("run_id")
    mine = [p for p in all_ckpts if ckpt.read_state(p).get("run_id") == lineage]

    if resume in ("auto", "latest"):
        if not mine:
            if resume == "latest" and not overwrite:
                raise RunDirError(
                    f"--resume latest: {root} holds no checkpoint of this run. Check output_dir "
                    "(were the first run's overrides passed again?), or use --resume auto, which "
                    "starts fresh when there is none."
                )
            if (all_ckpts or has_model) and not overwrite:
                raise RunDirError(
                    f"--resume {resume}: {out_dir} holds another run's work "
                    f"({_describe(out_dir, all_ckpts, has_model)}) and no checkpoint of its own "
                    "to resume. Pass --overwrite to replace it, or choose another output_dir=..."
                )
            if all_ckpts or has_model:
                return replace_all("no checkpoint of this run to resume")
            plan = RunPlan(fresh_id, fp)
            if run is not None and run.get("fingerprint") == fp:  # stopped before a checkpoint
                plan.run_id = str(run["run_id"])
                plan.attempt = int(run.get("attempts", 1)) + 1
                plan.notes.append(f"--resume {resume}: no checkpoint yet; starting fresh")
            else:
                plan.notes.append(f"--resume {resume}: no checkpoint under {root} yet; "
                                  "starting fresh")
            return plan
        target = mine[-1]
    else:
        target = Path(resume)
        ckpt.read_state(target)  # raises when it is not a complete checkpoint
        if ckpt._NAME.match(target.name) is None:
            raise RunDirError(f"--resume {resume}: not a checkpoint directory (step-NNNNNNNN).")

    state = ckpt.read_state(target)
    diffs = recipe_differences(stored_recipe_keys(target), now_keys)
    if diffs:
        if overwrite and resume == "auto":
            return replace_all("the run there has a different recipe")
        raise RunDirError(
            f"--resume {resume}: {target} was trained with a different recipe; resuming it "
            f"would mix two runs. Differences ({len(diffs)}):\n  " + "\n  ".join(diffs) +
            f"\nRerun with the recipe and overrides it was made with (see {target}/recipe.yaml), "
            "choose another output_dir=..., or pass --overwrite to replace it. Keys that may "
            f"change on resume: {', '.join(ALLOWED_CHANGES)}."
        )
    step = int(state["step"])
    if step > recipe.train.steps:
        raise RunDirError(
            f"--resume {resume}: {target} is at step {step}, beyond train.steps="
            f"{recipe.train.steps}. Resume with train.steps={step} or more."
        )
    lineage_id = state.get("run_id") or (run or {}).get("run_id") or fresh_id
    plan = RunPlan(str(lineage_id), fp, resume_from=target, start_step=step)
    plan.attempt = int((run or {}).get("attempts", 1)) + 1 if run else 2

    # Nothing newer than the resumed checkpoint is dropped without --overwrite.
    in_here = target.resolve().parent == root.resolve()
    newer = [p for p in (mine if in_here else all_ckpts) if ckpt.checkpoint_step(p) > step]
    foreign = [] if in_here else [p for p in all_ckpts if p not in newer]
    if (newer or foreign) and not overwrite:
        names = ", ".join(p.name for p in [*newer, *foreign])
        raise RunDirError(
            f"--resume {resume}: {out_dir} holds checkpoints the resumed run would replace "
            f"({names}). Resume the newest with --resume auto, or pass --overwrite to drop them."
        )
    plan.remove += newer + foreign
    if (newer or foreign or not in_here) and has_model:
        if not overwrite:
            raise RunDirError(
                f"--resume {resume}: {out_dir}/model was saved by a later or another run; "
                "resuming would replace it. Pass --overwrite to allow that."
            )
        plan.remove.append(out_dir / "model")
    if plan.remove:
        plan.notes.append("--overwrite: removing " + ", ".join(str(p) for p in plan.remove))
    if (run and run.get("finished_step") == step == recipe.train.steps and has_model
            and in_here and run.get("run_id") == plan.run_id):
        plan.finished = True
    return plan


def apply_plan(plan: RunPlan, out_dir: Path, loaded: LoadedRecipe) -> None:
    """Rank 0: remove what `--overwrite` allowed, write run.json and recipe.yaml, and note a
    resume in metrics.jsonl when it supersedes lines of a run that died after its checkpoint."""
    for path in plan.remove:
        if path.is_dir() and ckpt._NAME.match(path.name):
            ckpt.remove_checkpoint(path)
        elif path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    old = read_run(out_dir) or {}
    doc: dict[str, Any] = {
        "run_id": plan.run_id,
        "fingerprint": plan.fingerprint,
        "created": old.get("created") if old.get("run_id") == plan.run_id else _now(),
        "attempts": plan.attempt,
        "last_start": _now(),
        "resumed_from": str(plan.resume_from) if plan.resume_from else None,
    }
    if old.get("run_id") == plan.run_id and "finished_step" in old and plan.finished:
        doc["finished_step"] = old["finished_step"]
    write_run(out_dir, doc)
    (out_dir / "recipe.yaml").write_text(loaded.dump())
    superseded = [r["step"] for r in _lines(out_dir / METRICS_FILE)
                  if "step" in r and r.get("run") == plan.run_id and r["step"] > plan.start_step]
    if superseded:
        event = {"event": "resumed", "run": plan.run_id, "from_step": plan.start_step,
                 "superseded_steps": superseded, "time": _now()}
        with open(out_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(event) + "\n")


# -- metrics ------------------------------------------------------------------------------------


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill mid-write
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_metrics(out_dir: str | Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """The effective per-step metrics of run `run_id` (default: the run owning `out_dir`): one
    record per step, the last one written (a resumed run's line replaces one written before a
    crash), in step order. Event lines and other runs' lines are left out."""
    out_dir = Path(out_dir)
    if run_id is None:
        run_id = (read_run(out_dir) or {}).get("run_id")
    by_step: dict[int, dict[str, Any]] = {}
    for rec in _lines(out_dir / METRICS_FILE):
        if "step" in rec and "event" not in rec and (run_id is None or rec.get("run") == run_id):
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]
