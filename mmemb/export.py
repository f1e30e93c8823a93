"""`mmemb export`: turn an encoder into a publishable artefact via an exporter plugin.

`export_model` resolves ``--model`` like every verb (a saved encoder, a training output
directory, a sentence-transformers model, a Hugging Face model with --backbone/--pooler), gathers
the model's provenance -- the training recipe, fingerprints of the data manifests it names, and
evaluation results -- from around the model directory, and hands all of it to the exporter.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from mmemb import plugins
from mmemb.data.schema import Item
from mmemb.encoder_io import ModelSource, ResolvedModel, load_encoder, resolve_model
from mmemb.errors import DataError, MmembError
from mmemb.model import Encoder

FORMATS: dict[str, str] = {"hf": "hf", "sentence-transformers": "sentence-transformers"}
"""``--format`` value -> exporter plugin name (any other registered exporter also works)."""


class Exporter(Protocol):
    """What an `exporter` plugin builds: `export` writes `out` and returns it.

    `spec` is the encoder's ``mmemb.json`` content (backbone, pooler, normalize, extras); under
    ``provenance`` it carries what `collect_provenance` found (recipe, data, eval results)."""

    def export(self, encoder: Encoder, *, spec: Mapping[str, Any], out: Path) -> Path: ...


def precheck(exporter: Any, spec: Mapping[str, Any]) -> None:
    """Call the exporter's optional ``check(spec)``, which refuses a model it cannot write before
    the (slow) model load."""
    check = getattr(exporter, "check", None)
    if callable(check):
        check(spec)


def probe_items() -> list[Item]:
    """A few text, image and image+text items to compare embeddings before and after export."""
    from PIL import Image, ImageDraw

    images = []
    for i, colour in enumerate([(220, 40, 40), (40, 90, 220)]):
        img = Image.new("RGB", (48, 48), (250, 250, 250))
        ImageDraw.Draw(img).rectangle([6 + 4 * i, 8, 30 + 6 * i, 36], fill=colour)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        images.append(buf.getvalue())
    return [
        Item(text="a red square on a white background"),
        Item(text="two birds over the sea", instruction="Find an image that matches the caption."),
        Item(image=images[0]),
        Item(
            image=images[1],
            text="what colour is the shape?",
            instruction="Represent the given image with the following question:",
        ),
    ]


def reads_images(encoder: Encoder) -> bool:
    """Whether the encoder's processor accepts image items (a text-only backbone raises
    `DataError` for them, as `hf_text` does)."""
    image_item = next(it for it in probe_items() if it.image is not None and it.text is None)
    try:
        encoder.processor([image_item], side="query")
    except DataError:
        return False
    return True


def accepted_probe_items(encoder: Encoder) -> list[Item]:
    """The probe items this encoder can embed: all of them, or the text-only ones."""
    items = probe_items()
    return items if reads_images(encoder) else [it for it in items if it.image is None]


# --- provenance --------------------------------------------------------------------------------


def manifest_fingerprint(manifest: Mapping[str, Any]) -> str:
    """sha256 over a shard manifest's shard checksums and counts: equal for byte-identical data."""
    shards = sorted((str(s.get("path")), str(s.get("sha256"))) for s in manifest.get("shards", []))
    payload = {"shards": shards, "datasets": manifest.get("datasets", {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _find_dir(value: str, bases: Sequence[Path]) -> Path | None:
    p = Path(value).expanduser()
    for cand in ([p] if p.is_absolute() else [p, *(b / p for b in bases)]):
        if (cand / "manifest.json").is_file():
            return cand
    return None


def collect_provenance(
    location: Path, *, recipe: str | Path | None = None, results: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """What is known about how the model at `location` was made: the recipe (`recipe`, else the
    ``recipe.yaml`` that `mmemb train` writes next to ``model/``), the data manifests it lists
    (path, fingerprint, samples per dataset) and eval results (`results`, else the training
    run's ``eval_after/results.json``). Empty when nothing is found."""
    out: dict[str, Any] = {}
    candidates = [Path(recipe)] if recipe else [location / "recipe.yaml",
                                                 location.parent / "recipe.yaml"]
    recipe_path = next((c for c in candidates if c.is_file()), None)
    if recipe and recipe_path is None:
        raise MmembError(f"--arg recipe={recipe}: no such file.")
    if recipe_path is not None:
        import yaml

        text = recipe_path.read_text()
        out["recipe"] = {"path": str(recipe_path), "text": text}
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError:
            doc = {}
        data: list[dict[str, Any]] = []
        for split in ("train", "eval"):
            for entry in (doc.get("data") or {}).get(split) or []:
                shards = entry.get("shards") if isinstance(entry, dict) else entry
                if not isinstance(shards, str):
                    continue
                found = _find_dir(shards, [recipe_path.parent])
                row: dict[str, Any] = {"split": split, "shards": shards}
                if found is not None:
                    manifest = json.loads((found / "manifest.json").read_text())
                    row["fingerprint"] = manifest_fingerprint(manifest)
                    row["samples"] = {name: ds.get("samples") for name, ds in
                                      (manifest.get("datasets") or {}).items()}
                data.append(row)
        if data:
            out["data"] = data
    result_paths = [Path(r) for r in results] or [
        c for c in (location.parent / "eval_after" / "results.json",
                    location / "results.json") if c.is_file()]
    evals = []
    for rp in result_paths:
        if not rp.is_file():
            raise MmembError(f"--arg results={rp}: no such file.")
        from mmemb.eval.results import EvalResults

        res = EvalResults.load(rp)
        evals.append({"path": str(rp), "task": res.task, "overall": res.overall,
                      "markdown": res.to_markdown()})
    if evals:
        out["eval"] = evals
    return out


def export_model(
    model: str | Path | ModelSource,
    out: str | Path,
    *,
    exporter: str | Mapping[str, Any] = "hf",
) -> Path:
    """Load the encoder `model` names and write it with the named exporter to `out`.

    Exporter arguments ``recipe`` and ``results`` (paths) are read here: they point at the
    provenance to record when it is not next to the model (see `collect_provenance`)."""
    spec_in: dict[str, Any] = (
        {"name": exporter} if isinstance(exporter, str) else dict(exporter)
    )
    recipe = spec_in.pop("recipe", None)
    results = spec_in.pop("results", None) or []
    results = [results] if isinstance(results, (str, Path)) else list(results)
    resolved: ResolvedModel = resolve_model(model)
    built: Exporter = plugins.build_from("exporter", spec_in, where="--format")
    spec = resolved.spec()
    precheck(built, spec)
    encoder = load_encoder(model)
    found = collect_provenance(Path(resolved.location), recipe=recipe, results=results) if (
        Path(resolved.location).is_dir()) else {}
    provenance = {**dict(spec.get("provenance") or {}), **found}
    if resolved.kind != "mmemb":
        provenance.setdefault("imported_from", {"kind": resolved.kind,
                                                "location": resolved.location})
    if provenance:
        spec["provenance"] = provenance
    return built.export(encoder, spec=spec, out=Path(out))
