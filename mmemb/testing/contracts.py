"""Contract checks a plugin author runs in their own tests (also used by mmemb's).

    from mmemb.testing.contracts import check_reweighter

    def test_my_reweighter():
        check_reweighter(MyReweighter(MyConfig(alpha=1.0)), neutral=MyReweighter(MyConfig(alpha=0)))

- `check_reweighter`: tiled = full = float64 reference, α → 0, finite, stateless;
- `check_backbone` (and the checks it is made of: `check_processor`, `check_forward`,
  `check_padding`, `check_appends_eos`, `check_split`, `check_uniform_forward`,
  `check_save_load`): what every backbone must do for the trainer, GradCache, ZeRO-3 and export;
- `check_pooler`: one vector per row, blind to padding (even NaN in padded positions);
- `check_source`: rows in = written + rejected, rejects counted by reason, deterministic output.

Each check raises ``AssertionError`` naming what broke. They need no plugin by name: the loss
implementations compared are every registered ``loss`` component; a source is built by the name
it is registered under.
"""

from __future__ import annotations

import copy
import json
import pickle
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmemb import plugins
from mmemb.data.schema import Item
from mmemb.loss import DirectionalLoss, PlainInfoNCE, Reweighter, contrastive_loss
from mmemb.model import Backbone, BackboneOutput, InputProcessor, ModelInputs, Pooler, Side

__all__ = [
    "check_appends_eos",
    "check_backbone",
    "check_forward",
    "check_padding",
    "check_pooler",
    "check_processor",
    "check_reweighter",
    "check_save_load",
    "check_source",
    "check_split",
    "check_uniform_forward",
    "default_batches",
    "loss_implementations",
]


def _prefixed(text: str) -> Callable[[str], str]:
    """An ``assert_close`` message: `text`, then torch's own account of the mismatch."""
    return lambda message: f"{text}: {message}"


def loss_implementations(tile_sizes: Sequence[int] = (1, 3, 7, 64)) -> dict[str, DirectionalLoss]:
    """Every registered loss component, built once per tile size when it takes one."""
    out: dict[str, DirectionalLoss] = {}
    for name in plugins.available("loss"):
        config = plugins.get("loss", name).config
        if config is not None and "tile_size" in config.model_fields:
            for tile in tile_sizes:
                out[f"{name}(tile_size={tile})"] = plugins.build("loss", name, tile_size=tile)
        else:
            out[name] = plugins.build("loss", name)
    return out


def _batch(b: int, m: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    # a few near-duplicates of the positives, so that "hard" negatives exist
    n = max(0, min(b, m - b))
    c[b : b + n] = F.normalize(c[:n] + 0.3 * c[b : b + n], dim=-1)
    return q, c, torch.arange(b)


def _run(
    q: torch.Tensor, c: torch.Tensor, t: torch.Tensor, rw: Reweighter,
    impl: DirectionalLoss | None, *, symmetric: bool, keys: torch.Tensor | None, tau: float,
) -> tuple[torch.Tensor, ...]:
    qq = q.detach().clone().requires_grad_()
    cc = c.detach().clone().requires_grad_()
    loss = contrastive_loss(qq, cc, t, temperature=tau, reweighter=rw, symmetric=symmetric,
                            keys=keys, impl=impl)
    loss.backward()
    assert qq.grad is not None and cc.grad is not None
    return loss.detach(), qq.grad, cc.grad


def check_reweighter(
    reweighter: Reweighter,
    *,
    neutral: Reweighter | None = None,
    temperature: float = 0.05,
    shapes: Sequence[tuple[int, int]] = ((1, 1), (5, 5), (6, 17), (8, 40)),
    rtol: float = 1e-9,
) -> None:
    """Check a reweighter against mmemb's contract, in float64.

    - every registered loss implementation (each tiled one at several tile sizes) gives the same
      loss and gradients as the full matrix, with and without duplicate-positive keys, in both
      directions of a symmetric loss — so the transforms really are elementwise given the row
      statistics and do not depend on how the matrix is tiled;
    - the loss and the gradients are finite, and the reweighter keeps no state between calls
      (a second call gives bit-identical results);
    - ``transform_logits`` is the identity plus a constant: a reweighter that changes only the
      backward (``transforms_probs`` alone) leaves the loss value equal to plain InfoNCE's;
    - ``neutral``, the same reweighter at its no-op setting (e.g. ``alpha=0``), equals plain
      InfoNCE exactly on the full matrix (the α → 0 limit).
    """
    assert isinstance(reweighter, Reweighter), f"{reweighter!r} is not a mmemb.loss.Reweighter"
    impls = loss_implementations()
    plain = PlainInfoNCE()
    for b, m in shapes:
        q, c, t = _batch(b, m, 6, seed=b * 1000 + m)
        keys = torch.arange(m, dtype=torch.long)
        if m > b + 1:
            keys[b] = keys[0]  # a copy of query 0's positive sits among the negatives
        for symmetric in (False, True) if m >= b else (False,):
            for k in (None, keys):
                ref = _run(q, c, t, reweighter, None, symmetric=symmetric, keys=k, tau=temperature)
                where = f"B={b} M={m} symmetric={symmetric} keys={k is not None}"
                for value in ref:
                    assert torch.isfinite(value).all(), f"{reweighter!r}: non-finite at {where}"
                again = _run(q, c, t, reweighter, None, symmetric=symmetric, keys=k,
                             tau=temperature)
                for a, r in zip(again, ref, strict=True):
                    assert torch.equal(a, r), f"{reweighter!r} keeps state between calls ({where})"
                if reweighter.transforms_probs and not reweighter.transforms_logits:
                    base = _run(q, c, t, plain, None, symmetric=symmetric, keys=k, tau=temperature)
                    torch.testing.assert_close(
                        ref[0], base[0], rtol=rtol, atol=0.0,
                        msg=f"{reweighter!r} changes only the backward but the loss value moved "
                        f"({where})",
                    )
                for name, impl in impls.items():
                    got = _run(q, c, t, reweighter, impl, symmetric=symmetric, keys=k,
                               tau=temperature)
                    for label, g, r in zip(("loss", "dq", "dc"), got, ref, strict=True):
                        scale = max(float(r.abs().max()), 1.0)
                        torch.testing.assert_close(
                            g, r, rtol=rtol, atol=rtol * scale,
                            msg=_prefixed(f"{reweighter!r}: {name} differs from the full "
                                          f"matrix in {label} at {where}"),
                        )
        if neutral is not None:
            for k in (None, keys):  # with copies of a positive masked (−∞) too
                got_neutral = _run(q, c, t, neutral, None, symmetric=False, keys=k,
                                   tau=temperature)
                got_plain = _run(q, c, t, plain, None, symmetric=False, keys=k, tau=temperature)
                for label, x, y in zip(("loss", "dq", "dc"), got_neutral, got_plain, strict=True):
                    torch.testing.assert_close(
                        x, y, rtol=rtol, atol=1e-12,
                        msg=f"{neutral!r} (the no-op setting) is not plain InfoNCE in {label} "
                        f"(keys={k is not None})",
                    )


# --------------------------------------------------------------------------------------------
# backbones

Batches = Mapping[str, Sequence[Item]]
"""Named batches of items a backbone is checked on (e.g. text-only, image-only, mixed)."""


def default_batches(*, images: bool = True) -> dict[str, list[Item]]:
    """Small batches of different lengths: text only, and (with `images`) image only and mixed
    (an item with text, image and instruction; images of several aspect ratios)."""
    from mmemb.testing.images import shape_png

    text = [Item(text="a red circle above a blue square"), Item(text="green"),
            Item(text="a small yellow star", instruction="Represent the given text.")]
    if not images:
        return {"text": text}
    image = [Item(image=shape_png("red", "circle")),
             Item(image=shape_png("blue", "square", size=(40, 64)))]
    mixed = [
        Item(text="a red circle"),
        Item(image=shape_png("green", "triangle")),
        Item(text="What colour is the shape?", image=shape_png("blue", "circle", size=(64, 40)),
             instruction="Represent the given image with the following question:"),
        Item(image=shape_png("yellow", "square", size=(30, 70))),
    ]
    return {"text": text, "image": image, "mixed": mixed}


@contextmanager
def _evaluating(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: outputs must be comparable) and no autograd, restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _forward(backbone: Backbone, inputs: ModelInputs) -> BackboneOutput:
    out = backbone(inputs)
    assert isinstance(out, BackboneOutput), (
        f"{type(backbone).__name__}.forward returned {type(out).__name__}, not a "
        "mmemb.model.BackboneOutput (DeepSpeed finds output tensors only inside tuples)"
    )
    return out


def _rows(out: BackboneOutput) -> list[torch.Tensor]:
    """Each row's hidden states at its real tokens (padding columns dropped), as float32."""
    mask = out.attention_mask.bool()
    return [out.hidden_states[i][mask[i]].float() for i in range(mask.shape[0])]


def _all_items(batches: Batches) -> list[Item]:
    return [item for items in batches.values() for item in items]


ALL = "all items"
"""The batch of every item of every batch together (the most padding, every kind of row)."""


class _Runs:
    """Query-side processor outputs and plain eval forwards, made once per batch and shared by
    the checks `check_backbone` runs (each check alone makes its own)."""

    def __init__(self, backbone: Backbone, batches: Batches) -> None:
        self.backbone = backbone
        self.items = {**batches, ALL: _all_items(batches)}
        self._inputs: dict[str, ModelInputs] = {}
        self._outputs: dict[str, BackboneOutput] = {}

    def inputs(self, label: str) -> ModelInputs:
        if label not in self._inputs:
            self._inputs[label] = self.backbone.processor(self.items[label], side="query")
        return self._inputs[label]

    def plain(self, label: str) -> BackboneOutput:
        if label not in self._outputs:
            with _evaluating(self.backbone):
                self._outputs[label] = _forward(self.backbone, self.inputs(label))
        return self._outputs[label]


def _assert_rows_close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], what: str, *,
                       rtol: float, atol: float) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} rows, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, (
            f"{what}: row {i} has {g.shape[0]} real tokens, expected {w.shape[0]} (the attention "
            "mask depends on the rest of the batch)"
        )
        scale = max(float(w.abs().max()) if w.numel() else 0.0, 1.0)
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol * scale,
                                   msg=_prefixed(f"{what}: row {i}"))


def check_processor(backbone: Backbone, batches: Batches,
                    sides: Sequence[Side] = ("query", "target"), *,
                    _runs: _Runs | None = None) -> None:
    """The processor: a picklable `InputProcessor` (it runs in data-loader workers) whose output
    is a dict of CPU tensors, each with one row per item (so a batch can be split by rows), a
    0/1 ``attention_mask`` (N, L) if any, and the same output every time (and from a pickled
    copy)."""
    proc = backbone.processor
    assert isinstance(proc, InputProcessor), (
        f"{type(backbone).__name__}.processor is not a mmemb.model.InputProcessor"
    )
    runs = _runs or _Runs(backbone, batches)
    for label, items in batches.items():
        for side in sides:
            where = f"processor({label!r} batch, side={side!r})"
            out = runs.inputs(label) if side == "query" else proc(items, side=side)
            assert isinstance(out, dict) and out, f"{where} returned {type(out).__name__}"
            for key, value in out.items():
                assert isinstance(value, torch.Tensor), f"{where}[{key!r}] is not a tensor"
                assert value.device.type == "cpu", f"{where}[{key!r}] is on {value.device}"
                assert value.shape[:1] == (len(items),), (
                    f"{where}[{key!r}] has shape {tuple(value.shape)}: every tensor needs one row "
                    f"per item ({len(items)}), padded where items differ"
                )
            mask = out.get("attention_mask")
            if mask is not None:
                assert mask.dim() == 2, f"{where}: attention_mask is not (N, L)"
                assert bool(((mask == 0) | (mask == 1)).all()), f"{where}: attention_mask not 0/1"
                # (a row may have no real token here: a dual encoder's image-only item has no
                # text; check_forward requires one in the backbone's output mask)
    # repeatable, also from a pickled copy (all items in one batch: one call covers every kind)
    items = runs.items[ALL]
    out = runs.inputs(ALL)
    for name, again in (("a second call", proc(items, side="query")),
                        ("a pickled copy", pickle.loads(pickle.dumps(proc))(items, side="query"))):
        assert again.keys() == out.keys(), f"processor: {name} gives other keys"
        for key in out:
            assert torch.equal(again[key], out[key]), f"processor[{key!r}]: {name} differs"


def check_forward(backbone: Backbone, batches: Batches, *, _runs: _Runs | None = None) -> None:
    """`forward`: a `BackboneOutput` with hidden states (N, L, hidden_size) and attention mask
    (N, L), finite at every real token, bit-identical when run twice, and different for
    different items (the backbone reads its input)."""
    hidden_size = backbone.hidden_size
    assert isinstance(hidden_size, int) and hidden_size > 0, f"hidden_size is {hidden_size!r}"
    runs = _runs or _Runs(backbone, batches)
    with _evaluating(backbone):
        for label, items in batches.items():
            where = f"forward({label!r} batch)"
            inputs = runs.inputs(label)
            out = runs.plain(label)
            h, mask = out.hidden_states, out.attention_mask
            assert h.dim() == 3 and h.shape[0] == len(items) and h.shape[2] == hidden_size, (
                f"{where}: hidden states {tuple(h.shape)}, expected ({len(items)}, L, "
                f"{hidden_size})"
            )
            assert tuple(mask.shape) == tuple(h.shape[:2]), (
                f"{where}: attention mask {tuple(mask.shape)} does not match the hidden states"
            )
            rows = _rows(out)
            assert all(r.shape[0] > 0 for r in rows), f"{where}: a row has no real token"
            assert all(bool(torch.isfinite(r).all()) for r in rows), f"{where}: not finite"
            if label == next(iter(batches)):  # once is enough to catch a random forward
                again = _forward(backbone, inputs)
                assert torch.equal(again.hidden_states, h) and torch.equal(
                    again.attention_mask, mask), f"{where}: two forwards in eval mode differ"
            means = F.normalize(torch.stack([r.mean(dim=0) for r in rows]), dim=-1)
            sims = means @ means.T
            for i in range(len(items)):
                for j in range(i):
                    if items[i] != items[j]:
                        assert float(sims[i, j]) < 0.9999, (
                            f"{where}: items {j} and {i} differ but their hidden states do not"
                        )


def check_padding(backbone: Backbone, batches: Batches, *, expect_padding: bool = False,
                  rtol: float = 1e-5, atol: float = 1e-5, _runs: _Runs | None = None) -> None:
    """An item's hidden states at its real tokens do not depend on the batch it is in: every
    item of all `batches` together equals the item alone (padding, left or right, changes
    nothing; position ids come from the mask). `expect_padding`: also require that the
    processor padded some row of that batch, so the check is not vacuous."""
    runs = _runs or _Runs(backbone, batches)
    items = runs.items[ALL]
    if expect_padding:
        mask = runs.inputs(ALL)["attention_mask"]
        assert bool((mask.sum(1) < mask.shape[1]).any()), "the batch has no padded row"
    batched = _rows(runs.plain(ALL))
    with _evaluating(backbone):
        alone = [_rows(_forward(backbone, backbone.processor([it], side="query")))[0]
                 for it in items]
    _assert_rows_close(batched, alone, "each item batched vs alone", rtol=rtol, atol=atol)


def check_appends_eos(backbone: Backbone, batches: Batches, *,
                      eos_token_id: int | None = None, _runs: _Runs | None = None) -> None:
    """`appends_eos` is honest: True means every row (both sides) ends with the EOS token at its
    last real position, False that none does; None claims nothing. The EOS id defaults to the
    processor's ``tokenizer.eos_token_id`` (none there: only True needs checking, and fails)."""
    claim = backbone.appends_eos
    if claim is None:
        return
    proc = backbone.processor
    if eos_token_id is None:
        eos_token_id = getattr(getattr(proc, "tokenizer", None), "eos_token_id", None)
    if eos_token_id is None:
        # no EOS token at all: no row can end with one, so only a True claim is dishonest
        assert not claim, "appends_eos=True but the EOS id is unknown: pass eos_token_id=..."
        return
    runs = _runs or _Runs(backbone, batches)
    for label, items in batches.items():
        for side in ("query", "target"):
            inputs = runs.inputs(label) if side == "query" else proc(items, side=side)
            assert "input_ids" in inputs, "appends_eos is set but the processor has no input_ids"
            ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
            # the last real position of each row, whatever the padding side
            cols = torch.arange(mask.shape[1]).expand_as(mask)
            last = torch.where(mask, cols, -1).max(dim=1).values
            ends = ids[torch.arange(ids.shape[0]), last] == eos_token_id
            if claim:
                assert bool(ends.all()), (
                    f"appends_eos=True but rows {ends.logical_not().nonzero().flatten().tolist()} "
                    f"of the {label!r} batch ({side}) do not end with EOS {eos_token_id}"
                )
            else:
                assert not bool(ends.any()), (
                    f"appends_eos=False but rows {ends.nonzero().flatten().tolist()} of the "
                    f"{label!r} batch ({side}) end with EOS {eos_token_id}: say True"
                )


def check_split(backbone: Backbone, batches: Batches, *, sizes: Sequence[int] = (2,),
                rtol: float = 1e-5, atol: float = 1e-5, _runs: _Runs | None = None) -> None:
    """`processor.split` (GradCache's chunks): chunks of at most `size` rows that cover the batch
    in order, and whose forwards (padding trimmed or not) give each row the hidden states the
    unsplit forward gives it."""
    runs = _runs or _Runs(backbone, batches)
    items, inputs = runs.items[ALL], runs.inputs(ALL)
    whole = _rows(runs.plain(ALL))
    proc = backbone.processor
    with _evaluating(backbone):
        for size in sizes:
            chunks = proc.split(inputs, size)
            counts = [len(next(iter(c.values()))) for c in chunks]
            assert sum(counts) == len(items) and all(0 < n <= size for n in counts), (
                f"split(size={size}) gives chunks of {counts} rows for {len(items)} items"
            )
            parts = [row for c in chunks for row in _rows(_forward(backbone, c))]
            _assert_rows_close(parts, whole, f"split(size={size}) vs the whole batch",
                               rtol=rtol, atol=atol)


def check_uniform_forward(backbone: Backbone, batches: Batches, *,
                          _runs: _Runs | None = None) -> None:
    """`require_uniform_forward` (ZeRO-3): on a copy of the backbone, it marks it uniform and
    returns parameters of the backbone; the placeholders it runs for absent modalities add
    exactly zero: hidden states and mask equal the plain forward's bit for bit (with autograd
    too, on the first batch)."""
    uniform = copy.deepcopy(backbone)
    extra = uniform.require_uniform_forward()
    assert uniform.uniform_forward, (
        "require_uniform_forward did not set uniform_forward "
        "(call super().require_uniform_forward())"
    )
    own = {id(p) for p in uniform.parameters()}
    assert isinstance(extra, list) and all(
        isinstance(p, torch.nn.Parameter) and id(p) in own for p in extra
    ), "require_uniform_forward must return a list of the backbone's own parameters"
    runs = _runs or _Runs(backbone, batches)
    for label in batches:
        inputs, plain = runs.inputs(label), runs.plain(label)
        # autograd on (placeholders also run for trainable towers): once is enough
        for grad in (False, True) if label == next(iter(batches)) else (False,):
            uniform.eval()
            with torch.set_grad_enabled(grad):
                out = _forward(uniform, inputs)
            where = f"uniform forward ({label!r} batch, autograd {'on' if grad else 'off'})"
            assert torch.equal(out.attention_mask, plain.attention_mask), f"{where}: mask differs"
            torch.testing.assert_close(out.hidden_states.detach(), plain.hidden_states,
                                       rtol=0, atol=0, equal_nan=True,
                                       msg=_prefixed(where))


def check_save_load(backbone: Backbone, batches: Batches,
                    reload: Callable[[Path], Backbone], *, directory: Path | None = None,
                    _runs: _Runs | None = None) -> None:
    """`save_pretrained(dir)` writes safetensors weights and the processor files, and
    `reload(dir)` (building the backbone with ``path=dir``) gives the same processor output and
    bit-identical hidden states."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(directory) if directory is not None else Path(tmp)
        backbone.save_pretrained(path)
        assert any(path.rglob("*.safetensors")), f"save_pretrained wrote no safetensors in {path}"
        again = reload(path)
        assert isinstance(again, Backbone), f"reload returned {type(again).__name__}"
        runs = _runs or _Runs(backbone, batches)
        a, x = runs.inputs(ALL), runs.plain(ALL)  # one batch holding every kind of item
        with _evaluating(again):
            b = again.processor(runs.items[ALL], side="query")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (
                "the reloaded processor gives other inputs"
            )
            y = _forward(again, a)
            assert torch.equal(x.attention_mask, y.attention_mask)
            torch.testing.assert_close(y.hidden_states, x.hidden_states, rtol=0, atol=0,
                                       equal_nan=True, msg=_prefixed("reloaded backbone"))


def check_backbone(
    backbone: Backbone,
    *,
    batches: Batches | None = None,
    images: bool = True,
    reload: Callable[[Path], Backbone] | None = None,
    eos_token_id: int | None = None,
    expect_padding: bool = False,
    split_sizes: Sequence[int] = (2,),
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> None:
    """Check a backbone against mmemb's contract (docs/backbones.md, "Writing a backbone
    plugin"): `check_processor`, `check_forward`, `check_padding`, `check_appends_eos`,
    `check_split`, `check_uniform_forward` and, given `reload` (path -> backbone built from that
    directory, e.g. ``lambda p: plugins.build("backbone", "mine", path=str(p))``),
    `check_save_load`.

    `batches` default to `default_batches(images=images)`; `rtol`/`atol` (atol scaled by the
    largest hidden state) bound the differences padding and chunking may make; the
    backbone's train/eval mode is restored afterwards.
    """
    assert isinstance(backbone, Backbone), f"{backbone!r} is not a mmemb.model.Backbone"
    batches = default_batches(images=images) if batches is None else batches
    runs = _Runs(backbone, batches)  # each batch processed and run once for all the checks
    check_processor(backbone, batches, _runs=runs)
    check_forward(backbone, batches, _runs=runs)
    check_padding(backbone, batches, expect_padding=expect_padding, rtol=rtol, atol=atol,
                  _runs=runs)
    check_appends_eos(backbone, batches, eos_token_id=eos_token_id, _runs=runs)
    check_split(backbone, batches, sizes=split_sizes, rtol=rtol, atol=atol, _runs=runs)
    check_uniform_forward(backbone, batches, _runs=runs)
    if reload is not None:
        check_save_load(backbone, batches, reload, _runs=runs)


# --------------------------------------------------------------------------------------------
# poolers


def check_pooler(pooler: Pooler, *, hidden_size: int = 8, seed: int = 0) -> None:
    """A pooler gives one finite vector (N, H) per row, locating tokens through the mask only:
    the same rows padded left, right or not at all give the same vectors, padded positions are
    never read (they hold NaN here) and get zero gradient."""
    assert isinstance(pooler, Pooler), f"{pooler!r} is not a mmemb.model.Pooler"
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 1]
    rows = [torch.randn(n, hidden_size, generator=g) for n in lengths]
    width = max(lengths)
    alone = torch.cat([pooler(r[None], torch.ones(1, len(r), dtype=torch.long)) for r in rows])
    assert alone.shape == (len(rows), hidden_size), f"pooler output {tuple(alone.shape)}"
    assert bool(torch.isfinite(alone).all()), "pooler output is not finite"
    for side in ("left", "right"):
        h = torch.full((len(rows), width, hidden_size), float("nan"))
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            h[i, cols], mask[i, cols] = r, 1
        h.requires_grad_()
        out = pooler(h, mask)
        torch.testing.assert_close(out, alone, rtol=1e-6, atol=1e-6,
                                   msg=_prefixed(f"{side}-padded rows vs alone"))
        out.float().sum().backward()
        assert h.grad is not None and bool(torch.isfinite(h.grad).all()), (
            f"{side}-padded: the gradient is not finite (a padded position was read)"
        )
        assert float(h.grad[mask == 0].abs().max()) == 0.0, (
            f"{side}-padded: padded positions get a gradient"
        )


# --------------------------------------------------------------------------------------------
# sources


def check_source(source: str, args: Mapping[str, Any], *, rows: int,
                 rejects: Mapping[str, int] | None = None,
                 directory: Path | None = None) -> Any:
    """Check the source registered as `source` on a small input of `rows` input rows (built with
    `args`): `prepare` conserves rows and counts rejects by reason; the output is deterministic.

    - the source yields exactly one `Sample` or `Reject` per input row, the same ones on a
      second read (deterministic order and content);
    - ``prepare(..., on_error='skip')``: read = `rows` = written + rejected (also in the
      manifest), ``rejects.jsonl`` holds one line per rejected row with its reason, file and
      detail, counted by reason as in the report (and equal to `rejects` when given);
    - preparing again gives the same samples and byte-identical shards (same checksums);
    - with rejects, ``on_error='fail'`` stops with a `DataError` naming the first one's reason
      and leaves no output; with ``limit`` the counts still add up.

    Returns the `PrepareReport` of the first run.
    """
    from collections import Counter

    from mmemb.data.prepare import prepare
    from mmemb.data.schema import Sample
    from mmemb.data.shards import REJECTS_NAME, iter_samples, read_manifest
    from mmemb.data.sources import REJECT_REASONS, Reject
    from mmemb.errors import DataError

    first = list(plugins.build("source", source, **args))
    second = list(plugins.build("source", source, **args))
    assert len(first) == rows, (
        f"source {source!r} yielded {len(first)} records for {rows} input rows: one Sample or "
        "Reject per row, never a silent drop"
    )
    bad = [type(r).__name__ for r in first if not isinstance(r, (Sample, Reject))]
    assert not bad, f"source {source!r} yielded {bad[:3]}; yield Sample or Reject"
    assert first == second, f"source {source!r}: a second read yields other records"

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(directory) if directory is not None else Path(tmp)
        report = prepare(source, args, root / "a", on_error="skip")
        total = sum(report.rejected.values())
        assert report.read == rows and report.written + total == rows, (
            f"source {source!r}: read {report.read}, written {report.written}, rejected {total} "
            f"for {rows} input rows"
        )
        manifest = read_manifest(root / "a")
        assert (manifest["read"], manifest["written"], manifest["rejected"]) == (
            report.read, report.written, report.rejected), "the manifest's counts differ"
        samples = list(iter_samples(root / "a"))
        assert len(samples) == report.written, "the shards hold another number of samples"
        lines: list[dict[str, Any]] = []
        if total:
            with open(root / "a" / REJECTS_NAME, encoding="utf-8") as f:
                lines = [json.loads(line) for line in f]
        assert len(lines) == total, f"{REJECTS_NAME} has {len(lines)} lines for {total} rejects"
        for line in lines:
            assert line["reason"] in REJECT_REASONS and line["file"] and line["detail"], line
        assert dict(Counter(line["reason"] for line in lines)) == report.rejected
        if rejects is not None:
            assert report.rejected == dict(rejects), (
                f"source {source!r}: rejected {report.rejected}, expected {dict(rejects)}"
            )

        again = prepare(source, args, root / "b", on_error="skip")
        assert list(iter_samples(root / "b")) == samples, "a second prepare wrote other samples"
        assert [s.get("sha256") for s in read_manifest(root / "b")["shards"]] == [
            s.get("sha256") for s in manifest["shards"]], "a second prepare wrote other shards"
        assert again.rejected == report.rejected

        if lines:
            try:
                prepare(source, args, root / "fail", on_error="fail")
            except DataError as exc:
                assert lines[0]["reason"] in str(exc), f"the error names another reason: {exc}"
            else:
                raise AssertionError("on_error='fail' wrote an output despite rejects")
            assert not (root / "fail").exists(), "on_error='fail' left an output directory"
        if rows > 1:
            limit = rows // 2
            part = prepare(source, args, root / "limit", on_error="skip", limit=limit)
            assert part.read == limit == part.written + sum(part.rejected.values()), (
                f"limit={limit}: read {part.read}, written {part.written}, rejected "
                f"{part.rejected}"
            )
    return report
