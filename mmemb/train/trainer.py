"""`mmemb train`: batch -> encoder -> gather -> contrastive loss (with the recipe's reweighter)
-> backward -> clip -> step, with evaluation before and after and the trained model saved.

This is the plain PyTorch engine: one process, or several under torchrun / srun / the deepspeed
launcher with gradients averaged across ranks (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmemb import plugins
from mmemb.distributed import DistEnv, dist_env, init_distributed, pick_device, shutdown_distributed
from mmemb.encoder_io import build_encoder, save_encoder
from mmemb.errors import MmembError
from mmemb.model import Encoder
from mmemb.progress import Progress
from mmemb.recipe import LoadedRecipe
from mmemb.train.data import ensure_prepared, shard_dir
from mmemb.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

Echo = Callable[[str], None]


class TrainingError(MmembError):
    """Training cannot go on (non-finite loss, a setting that would do nothing)."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    model_dir: Path | None
    scores_before: float | None = None
    scores_after: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def backbone_spec(loaded: LoadedRecipe) -> dict[str, Any]:
    """The recipe's backbone spec with a local `path` resolved against the recipe's folder."""
    spec = dict(loaded.recipe.model.backbone)
    if isinstance(spec.get("path"), str):
        spec["path"] = loaded.resolve_path(spec["path"])
    return spec


def build_model(loaded: LoadedRecipe) -> Encoder:
    """The encoder a recipe describes, with LoRA adapters when `model.lora` is set."""
    r = loaded.recipe
    encoder = build_encoder(backbone_spec(loaded), r.model.pooler, normalize=r.model.normalize)
    if r.model.lora is not None:
        from mmemb.lora import apply_lora

        apply_lora(encoder.backbone, r.model.lora)
    return encoder


def _autocast(device: torch.device, precision: str):  # type: ignore[no-untyped-def]
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _all_reduce_mean(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average gradients across ranks (what DDP does), one flat buffer to keep calls few."""
    grads = [p.grad for p in params if p.grad is not None]
    if world_size <= 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def similarity_stats(q: torch.Tensor, c: torch.Tensor, batch_size: int, negatives: int) -> dict[str, float]:
    """Mean cosine of each query with its positive and with its own hard negatives (local batch)."""
    with torch.no_grad():
        qn = torch.nn.functional.normalize(q.float(), dim=-1)
        cn = torch.nn.functional.normalize(c.float(), dim=-1)
        stats = {"pos_sim": float((qn * cn[:batch_size]).sum(-1).mean())}
        if negatives:
            negs = cn[batch_size:].view(batch_size, negatives, -1)
            stats["hard_neg_sim"] = float(torch.einsum("bd,bkd->bk", qn, negs).mean())
    return stats


def evaluate_encoder(
    loaded: LoadedRecipe, encoder: Encoder, out: Path, *, echo: Echo
) -> float | None:
    """Run the recipe's eval task on its eval data; returns the overall score (None if no data)."""
    r = loaded.recipe
    if not r.data.eval:
        return None
    from mmemb.eval import evaluate

    paths = [shard_dir(loaded, e) for e in r.data.eval]
    task = dict(r.eval.task)
    results = evaluate(
        encoder, paths, task=task.pop("name"), task_args=task, out=out,
        batch_size=r.eval.batch_size, show_progress=False, distributed=False,
    )
    per_dataset = ", ".join(f"{name} {score:.1f}" for name, score in sorted(results.scores.items()))
    echo(f"eval ({results.primary_metric}, %): {per_dataset}  [details: {out}/results.md]")
    # MMEB's overall needs all 36 datasets; otherwise the mean over the evaluated ones.
    headline = results.overall if results.overall is not None else results.mean_evaluated
    return None if headline is None else float(headline)


def train(
    loaded: LoadedRecipe, *, echo: Echo = print, max_steps: int | None = None,
    save: bool = True, evaluate: bool = True,
) -> TrainResult:
    """Train the model a recipe describes. `max_steps` caps the steps (used by `validate`)."""
    r = loaded.recipe
    env = dist_env()
    device = pick_device(r.train.device, env)
    started = init_distributed(env, device)
    try:
        return _train(loaded, env, device, echo=echo if env.is_main else (lambda s: None),
                      max_steps=max_steps, save=save and env.is_main, evaluate=evaluate)
    finally:
        shutdown_distributed(started)


def _train(
    loaded: LoadedRecipe, env: DistEnv, device: torch.device, *, echo: Echo,
    max_steps: int | None, save: bool, evaluate: bool,
) -> TrainResult:
    from mmemb.data.collate import Collator
    from mmemb.data.stream import make_train_loader
    from mmemb.loss import gathered_contrastive_loss

    r = loaded.recipe
    out_dir = Path(r.output_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.yaml").write_text(loaded.dump())
    seed_everything(r.seed)
    ensure_prepared(loaded, env, echo=echo)

    encoder = build_model(loaded).to(device)
    reweighter = plugins.build_from("reweighter", r.loss.reweighter, where="loss.reweighter")
    params = [p for p in encoder.parameters() if p.requires_grad]
    if not params:
        raise TrainingError(
            f"{loaded.path}: the model has no trainable parameters (everything is frozen). "
            "Unfreeze a part (model.backbone.freeze) or add LoRA (model.lora)."
        )
    steps = min(r.train.steps, max_steps) if max_steps else r.train.steps
    negatives = r.train.negatives
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in encoder.parameters())
    global_batch = r.train.batch_size * env.world_size
    echo(
        f"engine=torch world_size={env.world_size} device={device} precision={r.train.precision} "
        f"trainable={n_trainable:,}/{n_total:,} params"
    )
    echo(
        f"global batch {global_batch} queries x (1 positive + {negatives} hard negatives): "
        f"{global_batch * (1 + negatives) - 1} negatives per query "
        f"(reweighter={r.loss.reweighter['name']}, temperature={r.loss.temperature})"
    )

    before = None
    if evaluate and env.is_main and r.eval.before_training:
        before = evaluate_encoder(loaded, encoder, out_dir / "eval_before", echo=echo)
        if before is not None:
            echo(f"P@1 before: {before:.1f}")

    collator = Collator(encoder.processor, num_negatives=negatives)
    loader = make_train_loader(
        [(shard_dir(loaded, e), e.weight) for e in r.data.train],
        batch_size=r.train.batch_size, collate=collator, seed=r.seed, rank=env.rank,
        world_size=env.world_size, num_workers=r.data.num_workers,
        shuffle_buffer=r.data.shuffle_buffer, resample=r.data.resample,
        task_homogeneous=r.data.task_homogeneous,
    )
    optimizer = build_optimizer(params, r.train)
    scheduler = build_scheduler(optimizer, r.train)
    metrics_file = (out_dir / "metrics.jsonl").open("a") if env.is_main else None
    history: list[dict[str, Any]] = []
    encoder.train()
    batches: Iterator[Any] = iter(loader)
    loss_value = float("nan")
    t_start = time.perf_counter()
    with Progress(steps, desc="train", log_every=r.train.log_every, enabled=env.is_main) as bar:
        for step in range(steps):
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                raise TrainingError(
                    f"the training data ran out after {step} steps of {steps}. Set "
                    "data.resample: true (an endless stream) or lower train.steps."
                ) from None
            batch = batch.to(device)
            with _autocast(device, r.train.precision):
                q = encoder(batch.query)
                c = encoder(batch.candidates)
            loss = gathered_contrastive_loss(
                q.float(), c.float(), batch.targets, temperature=r.loss.temperature,
                reweighter=reweighter, tile_size=r.loss.tile_size, symmetric=r.loss.symmetric,
            )
            loss_value = float(loss.detach())
            if not np.isfinite(loss_value):
                raise TrainingError(
                    f"step {step}: the loss is {loss_value}. Lower train.lr, use fp32/bf16 "
                    "instead of fp16, or check the data for empty items."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _all_reduce_mean(params, env.world_size)
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(params, r.train.grad_clip or float("inf"))
            )
            optimizer.step()
            scheduler.step()
            n_samples = len(batch.ids) * env.world_size
            record = {
                "step": step + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "samples_per_s": n_samples / max(1e-9, time.perf_counter() - t0),
                **similarity_stats(q, c, len(batch.ids), negatives),
            }
            history.append(record)
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
            bar.update(1, loss=loss_value, lr=record["lr"])
    if metrics_file is not None:
        metrics_file.close()
    echo(f"trained {steps} steps in {time.perf_counter() - t_start:.1f}s, final loss {loss_value:.4f}")

    after = None
    if evaluate and env.is_main:
        after = evaluate_encoder(loaded, encoder, out_dir / "eval_after", echo=echo)
        if after is not None:
            if before is not None:
                echo(f"P@1 before: {before:.1f}")
            echo(f"P@1 after: {after:.1f}")
    model_dir = None
    if save:
        if r.model.lora is not None:
            # Training is over: fold the adapters in so the saved encoder is a plain model that
            # any mmemb command (and transformers) loads without peft.
            from mmemb.lora import merge_lora

            merge_lora(encoder.backbone)
        model_dir = save_encoder(
            encoder, out_dir / "model", backbone=backbone_spec(loaded), pooler=r.model.pooler
        )
        echo(f"saved the trained encoder to {model_dir}")
    return TrainResult(steps, loss_value, model_dir, before, after, history)
