"""The loss as one object built from the recipe, content keys, duplicate-positive masking in the
full matrix (against an independent float64 reference), and the collapse alarm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mmemb.loss as L
from mmemb import plugins
from mmemb.data.collate import content_key
from mmemb.data.schema import Item
from mmemb.errors import ConfigError
from mmemb.recipe import load_recipe
from mmemb.train.collapse import CollapseAlarm

TAU = 0.05


def _batch(b: int, m: int, d: int, *, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    return q, c, torch.arange(b)


def _grads(fn, q, c):
    q = q.detach().clone().requires_grad_()
    c = c.detach().clone().requires_grad_()
    loss = fn(q, c)
    loss.backward()
    return loss.detach(), q.grad, c.grad


def masked_reference(q, c, t, keys, tau, *, symmetric=False):
    """Plain InfoNCE where row i ignores every column j != t_i with keys[j] == keys[t_i]: written
    with a Python loop over rows and autograd, nothing shared with mmemb's implementation."""
    def one_direction(rows, cols, targets, row_keys, col_keys):
        losses = []
        for i in range(rows.shape[0]):
            keep = [j for j in range(cols.shape[0])
                    if j == int(targets[i]) or int(col_keys[j]) != int(row_keys[i])]
            z = rows[i] @ cols[keep].T / tau
            losses.append(torch.logsumexp(z, 0) - z[keep.index(int(targets[i]))])
        return torch.stack(losses).mean()

    pos_keys = keys[t]
    loss = one_direction(q, c, t, pos_keys, keys)
    if not symmetric:
        return loss
    rev = one_direction(c[t], q, torch.arange(q.shape[0]), pos_keys, pos_keys)
    return 0.5 * (loss + rev)


def _keys_with_duplicates(m: int) -> torch.Tensor:
    keys = torch.arange(100, 100 + m)
    keys[1] = keys[0]  # query 1's positive is a copy of query 0's (label-like data)
    keys[2] = keys[0]
    keys[7] = keys[3]  # a hard negative of some query copies query 3's positive
    return keys


@pytest.mark.parametrize("symmetric", [False, True])
def test_full_matrix_masks_copies_of_the_positive(symmetric):
    q, c, t = _batch(5, 15, 8, seed=3)
    keys = _keys_with_duplicates(15)
    ref = _grads(lambda q, c: masked_reference(q, c, t, keys, TAU, symmetric=symmetric), q, c)
    got = _grads(lambda q, c: L.contrastive_loss(q, c, t, temperature=TAU, keys=keys,
                                                 symmetric=symmetric), q, c)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # without keys, the same batch scores the copies as negatives: a different loss
    plain = L.contrastive_loss(q, c, t, temperature=TAU, symmetric=symmetric)
    assert not torch.isclose(plain, got[0])


@pytest.mark.parametrize(("name", "options"), [("ega", {"alpha": 1.0}),
                                               ("ega", {"alpha": 2.0, "normalize": True}),
                                               ("llave", {}), ("topk_mask", {"k": 2})])
@pytest.mark.parametrize("tile", [2, 4, 64])
def test_tiled_masks_like_the_full_matrix(name, options, tile):
    q, c, t = _batch(5, 15, 8, seed=4)
    keys = _keys_with_duplicates(15)
    rw = plugins.build("reweighter", name, **options)
    tiled = plugins.build("loss", "tiled", tile_size=tile)
    for symmetric in (False, True):
        full = _grads(lambda q, c, s=symmetric: L.contrastive_loss(
            q, c, t, temperature=TAU, reweighter=rw, keys=keys, symmetric=s), q, c)
        got = _grads(lambda q, c, s=symmetric: L.contrastive_loss(
            q, c, t, temperature=TAU, reweighter=rw, keys=keys, symmetric=s, impl=tiled), q, c)
        for g, r in zip(got, full, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_masked_copies_get_no_gradient_from_the_row_they_copy():
    q, c, t = _batch(3, 6, 4, seed=5)
    keys = torch.tensor([10, 10, 12, 13, 14, 10])  # columns 1 and 5 copy row 0's positive
    qq = q.detach().clone().requires_grad_()
    cc = c.detach().clone().requires_grad_()
    # only row 0 in the batch: its copies (columns 1, 5) must get exactly zero gradient
    L.contrastive_loss(qq[:1], cc, t[:1], temperature=TAU, keys=keys).backward()
    assert torch.equal(cc.grad[1], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(cc.grad[5], torch.zeros(4, dtype=torch.float64))
    assert cc.grad[2].abs().sum() > 0


def test_count_duplicates_matches_the_mask():
    t = torch.arange(5)
    keys = _keys_with_duplicates(15)
    dkeys = L.DuplicateKeys.for_candidates(keys, t)
    mask = L.duplicate_mask(dkeys, t, 0, 15)
    assert mask is not None
    assert L.count_duplicates(dkeys) == int(mask.sum()) == 7  # rows 0,1,2: 2 each; row 3: 1
    fn = L.ContrastiveLoss(temperature=TAU, symmetric=False)
    q, c, _ = _batch(5, 15, 8, seed=1)
    fn(q, c, t, keys=keys)
    assert fn.last_masked == 7
    off = L.ContrastiveLoss(temperature=TAU, mask_duplicate_positives=False)
    off(q, c, t, keys=keys)
    assert off.last_masked == 0


def test_content_key_sees_instruction_text_and_image_and_nothing_else():
    a = Item(text="a cat", instruction="Find the caption")
    assert content_key(a) == content_key(Item(text="a cat", instruction="Find the caption"))
    assert content_key(a) != content_key(Item(text="a cat"))
    assert content_key(a) != content_key(Item(text="a cat", instruction="Find the captio"))
    assert content_key(Item(text="ab")) != content_key(Item(text="a", instruction="b"))
    img = Item(image=b"\x89PNG....")
    assert content_key(img) != content_key(Item(image=b"\x89PNG....", text=""))
    assert -(2**63) <= content_key(img) < 2**63


def test_collator_gives_every_candidate_its_key():
    from mmemb.data.collate import Collator
    from mmemb.data.schema import Sample

    class Identity:
        def __call__(self, items, side):
            return {"n": torch.zeros(len(items))}

    samples = [Sample(id=str(i), dataset="d", query=Item(text=f"q{i}"), pos=Item(text=label),
                      negs=[Item(text="dog" if label == "cat" else "cat")])
               for i, label in enumerate(["cat", "dog", "cat"])]
    batch = Collator(Identity(), num_negatives=1)(samples)  # type: ignore[arg-type]
    assert batch.keys is not None and batch.keys.dtype == torch.int64
    k = batch.keys.tolist()
    assert k[0] == k[2] != k[1]  # positives 0 and 2 are both "cat"
    assert k[3] == k[1] and k[4] == k[0]  # negatives: dog, cat
    assert batch.to("cpu").keys is not None


def _recipe(**loss):
    return load_recipe(raw={
        "output_dir": "unused", "data": {"train": [{"shards": "unused"}]},
        "model": {"backbone": {"name": "hf_text", "path": "unused"}},
        "loss": loss, "train": {"steps": 1, "batch_size": 2},
    }, check_components=False)


def test_build_loss_from_recipe_reaches_every_component():
    r = _recipe(name="tiled", tile_size=7, implementation="torch", temperature=0.07,
                reweighter={"name": "ega", "alpha": 2.0}, symmetric=True,
                mask_duplicate_positives=False).recipe
    fn = L.build_loss(r.loss.spec())
    assert fn.impl.tile_size == 7 and fn.impl.config.implementation == "torch"
    assert fn.tau == 0.07 and fn.symmetric and not fn.mask_duplicate_positives
    assert fn.reweighter.config.alpha == 2.0
    default = L.build_loss(_recipe().recipe.loss.spec())
    assert isinstance(default.impl, L.FullMatrixLoss) and default.mask_duplicate_positives
    assert default.reweighter.name == "ega"


@pytest.mark.parametrize(
    ("loss", "needle"),
    [({"tile_size": 64}, "Set loss.name: tiled"),
     ({"name": "tiled", "tile_sise": 64}, "unknown argument for loss 'tiled'"),
     ({"name": "tiled", "implementation": "cuda"}, "implementation"),
     ({"name": "tilde"}, "Did you mean 'tiled'")],
)
def test_bad_loss_sections_are_reported(loss, needle):
    from mmemb.recipe import component_problems

    problems = component_problems(_recipe(**loss))
    assert any(needle in p for p in problems), problems


def test_a_float_temperature_is_checked_once_at_build():
    with pytest.raises(ConfigError, match="loss.temperature"):
        L.ContrastiveLoss(temperature=0.0)


def test_collapse_alarm_fires_once_after_patience_and_names_the_fix():
    ega = plugins.build("reweighter", "ega", normalize=False)
    alarm = CollapseAlarm(warmup_steps=10, loss=L.ContrastiveLoss(temperature=TAU, reweighter=ega))
    flat = math.log(40)
    assert alarm.check(5, loss=flat, candidates_per_row=40, pos_sim=0.1,
                       hardest_neg_sim=0.5) is None  # still warming up
    assert alarm.check(20, loss=flat, candidates_per_row=40, pos_sim=0.1,
                       hardest_neg_sim=0.5) is None
    assert alarm.check(30, loss=1.0, candidates_per_row=40, pos_sim=0.9,
                       hardest_neg_sim=0.5) is None  # the streak breaks
    for step in (40, 50):
        assert alarm.check(step, loss=flat * 1.005, candidates_per_row=40, pos_sim=0.1,
                           hardest_neg_sim=0.5) is None
    line = alarm.check(60, loss=flat, candidates_per_row=40, pos_sim=0.1, hardest_neg_sim=0.5)
    assert line is not None and "step 60" in line and "normalize=true" in line
    assert alarm.check(70, loss=flat, candidates_per_row=40, pos_sim=0.1,
                       hardest_neg_sim=0.5) is None  # once
    sims = CollapseAlarm(warmup_steps=0, loss=L.ContrastiveLoss(temperature=TAU), patience=1)
    line = sims.check(1, loss=0.5, candidates_per_row=40, pos_sim=0.8, hardest_neg_sim=0.8)
    assert line is not None and "train.lr" in line


def test_collapse_alarm_fires_when_queries_are_pushed_away_from_their_positives():
    # un-normalised EGA on a pretrained model: scores still differ, the loss is far from ln(M),
    # but the positive similarity went negative (docs/results.md, docstring -> package study)
    ega = plugins.build("reweighter", "ega", normalize=False)
    alarm = CollapseAlarm(warmup_steps=0, loss=L.ContrastiveLoss(temperature=TAU, reweighter=ega))
    for step in (10, 20):
        assert alarm.check(step, loss=3.5, candidates_per_row=48, pos_sim=-0.52,
                           hardest_neg_sim=-0.47) is None
    line = alarm.check(30, loss=3.5, candidates_per_row=48, pos_sim=-0.52, hardest_neg_sim=-0.47)
    assert line is not None and "-0.5200 < 0" in line and "normalize=true" in line
    healthy = CollapseAlarm(warmup_steps=0, loss=L.ContrastiveLoss(temperature=TAU), patience=1)
    assert healthy.check(1, loss=2.7, candidates_per_row=48, pos_sim=0.12,
                         hardest_neg_sim=0.14) is None  # the lowest healthy value seen: 0.11


def test_collapse_alarm_reads_the_loss_only_where_uniform_scores_give_ln_m():
    # LLaVE offsets the negatives' logits: a healthy run can sit near ln(M); only the sims decide
    llave = L.ContrastiveLoss(temperature=TAU, reweighter=plugins.build("reweighter", "llave"))
    for loss in (llave, L.ContrastiveLoss(temperature=TAU, symmetric=True)):
        alarm = CollapseAlarm(warmup_steps=0, loss=loss, patience=1)
        assert alarm.check(1, loss=math.log(40), candidates_per_row=40, pos_sim=0.6,
                           hardest_neg_sim=0.4) is None
        assert alarm.check(2, loss=1.0, candidates_per_row=40, pos_sim=0.4,
                           hardest_neg_sim=0.4) is not None
    # the default ega (normalize: false) gets the normalize advice, read from the built config
    default = L.ContrastiveLoss(temperature=TAU, reweighter=plugins.build("reweighter", "ega"))
    line = CollapseAlarm(warmup_steps=0, loss=default, patience=1).check(
        1, loss=math.log(40), candidates_per_row=40, pos_sim=0.1, hardest_neg_sim=0.5)
    expected = "normalize=true" if not default.reweighter.config.normalize else "train.lr"
    assert line is not None and expected in line


def test_amplification_of_a_logit_reweighter_is_measured_against_plain_infonce():
    q, c, t = _batch(6, 24, 8, seed=9)
    llave = L.loss_diagnostics(q, c, t, temperature=TAU,
                               reweighter=plugins.build("reweighter", "llave", alpha=9.0))
    # LLaVE adds α·s to every negative's logit: the most similar ones gain the most
    assert llave["amplification"] > 1.0
    z = q @ c.T / TAU
    p = torch.softmax(z, dim=1)
    zt = z + 9.0 * (z * TAU)
    zt[torch.arange(6), t] = z[torch.arange(6), t]
    pbar = torch.softmax(zt, dim=1)
    neg = torch.ones_like(p, dtype=torch.bool)
    neg[torch.arange(6), t] = False
    mass = float(((pbar * neg).sum(1) / (p * neg).sum(1)).mean())
    assert llave["negative_mass"] == pytest.approx(mass, rel=1e-10)
