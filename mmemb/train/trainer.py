"""`mmemb train`: the run around the step — set-up, resume, the loop, metrics, checkpoints,
preemption, evaluation and the saved encoder.

Per step: batch -> backbone -> pooler -> normalise -> gather -> loss (full or tiled, the recipe's
reweighter) -> backward (plain, or GradCache chunks) -> clip -> optimizer step. The engine
(`mmemb.train.engines`) owns the backward, the gradient exchange and the optimizer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmemb.distributed import (
    DistEnv,
    barrier,
    dist_env,
    init_distributed,
    pick_device,
    shutdown_distributed,
)
from mmemb.encoder_io import save_encoder
from mmemb.errors import MmembError
from mmemb.loss import ContrastiveLoss, build_loss
from mmemb.model import Encoder
from mmemb.progress import Progress
from mmemb.recipe import LoadedRecipe
from mmemb.train import checkpoint as ckpt
from mmemb.train.collapse import CollapseAlarm, Collapsed
from mmemb.train.data import ensure_prepared, shard_dir
from mmemb.train.engines import Engine, EngineSetup, build_engine
from mmemb.train.metrics import MetricsWriter, step_statistics
from mmemb.train.preempt import Preempted, PreemptionFlag
from mmemb.train.setup import backbone_spec, build_model, preflight, seed_everything
from mmemb.train.step import compute_step

log = logging.getLogger(__name__)

Echo = Callable[[str], None]


class TrainingError(MmembError):
    """Training cannot go on (non-finite loss, data that ran out)."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    model_dir: Path | None
    scores_before: float | None = None
    scores_after: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None


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
    # Evaluation must not move the training RNG, or a run with evaluation would not match one
    # without (nor a resumed one).
    with torch.random.fork_rng(devices=[]):
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
    save: bool = True, evaluate: bool = True, resume: str | Path | None = None,
) -> TrainResult:
    """Train the model a recipe describes.

    `max_steps` caps the steps (used by `validate`); `save=False` writes neither checkpoints nor
    the final model; `resume` is ``"latest"`` (the newest checkpoint under OUTPUT_DIR, or a fresh
    start if there is none) or a checkpoint directory. Raises `Preempted` after SIGTERM/SIGUSR1
    (a checkpoint was written) and `TrainingError` on a non-finite loss.
    """
    r = loaded.recipe
    env = dist_env()
    device = pick_device(r.train.device, env)
    started = init_distributed(env, device)
    # On a CPU, denormal floats (the far tail of a sharpening softmax) cost ~100x a normal
    # operation and carry no signal for training: flush them to zero while training.
    flushed = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        run = _Run(loaded, env, device, echo=echo if env.is_main else (lambda s: None),
                   max_steps=max_steps, save=save, evaluate=evaluate)
        return run.execute(resume)
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        shutdown_distributed(started)


class _Run:
    """One training run on one rank."""

    def __init__(
        self, loaded: LoadedRecipe, env: DistEnv, device: torch.device, *, echo: Echo,
        max_steps: int | None, save: bool, evaluate: bool,
    ) -> None:
        self.loaded = loaded
        self.r = loaded.recipe
        self.env = env
        self.device = device
        self.echo = echo
        self.save = save
        self.evaluate = evaluate
        self.steps = min(self.r.train.steps, max_steps) if max_steps else self.r.train.steps
        self.out_dir = Path(self.r.output_dir)
        self.ckpt_root = ckpt.checkpoint_root(self.out_dir)
        self.last_checkpoint: Path | None = None
        self.global_loss = math.nan
        self.preempt_agreed = False
        self.alarm = CollapseAlarm(self.r.train.warmup_steps, dict(self.r.loss.reweighter))
        self.collapsed: str | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def execute(self, resume: str | Path | None) -> TrainResult:
        from mmemb.data.collate import Collator
        from mmemb.data.stream import make_train_loader

        r, env = self.r, self.env
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "recipe.yaml").write_text(self.loaded.dump())
        seed_everything(r.seed)
        ensure_prepared(self.loaded, env, echo=self.echo)
        resume_from = ckpt.resolve_resume(str(resume), self.out_dir) if resume else None
        if resume == "latest" and resume_from is None:
            self.echo(f"--resume latest: no checkpoint under {self.ckpt_root} yet; starting fresh")

        encoder = build_model(self.loaded).to(self.device)
        preflight(self.loaded, encoder, env)
        self.loss: ContrastiveLoss = build_loss(r.loss.spec(), where="loss")
        self.loader = make_train_loader(
            [(shard_dir(self.loaded, e), e.weight) for e in r.data.train],
            batch_size=r.train.batch_size,
            collate=Collator(encoder.processor, num_negatives=r.train.negatives),
            seed=r.seed, rank=env.rank, world_size=env.world_size,
            num_workers=r.data.num_workers, shuffle_buffer=r.data.shuffle_buffer,
            resample=r.data.resample, task_homogeneous=r.data.task_homogeneous,
        )
        start = 0
        rng_state = None
        if resume_from is not None:
            state = ckpt.read_trainer_state(resume_from, env)
            rng_state, data_state = ckpt.load_rank_state(resume_from, env)
            self.loader.load_state_dict(data_state)
            start = int(state["step"])
            self.last_checkpoint = resume_from
            self.echo(f"resumed from {resume_from} at step {start}")
        before = None
        if self.evaluate and env.is_main and r.eval.before_training and resume_from is None:
            # before the engine exists: ZeRO-3 would partition the weights across ranks
            before = evaluate_encoder(self.loaded, encoder, self.out_dir / "eval_before",
                                      echo=self.echo)
            if before is not None:
                self.echo(f"P@1 before: {before:.1f}")
        barrier()
        engine = build_engine(EngineSetup(self.loaded, encoder, env, self.device))
        if resume_from is not None:
            engine.load(resume_from)
        self._log_start(encoder, engine)
        if rng_state is not None:  # last, so nothing in the set-up draws from the restored state
            ckpt.set_rng_state(rng_state)
        try:
            history = self._loop(engine, encoder, start)
            return self._finish(engine, history, before)
        finally:
            engine.close()

    def _log_start(self, encoder: Encoder, engine: Engine) -> None:
        r, t = self.r, self.r.train
        n_trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in encoder.parameters())
        global_batch = t.batch_size * self.env.world_size
        candidates = global_batch * (1 + t.negatives)
        self.echo(
            f"engine={engine.name} world_size={self.env.world_size} device={self.device} "
            f"precision={engine.precision} trainable={n_trainable:,}/{n_total:,} params"
        )
        self.echo(
            f"global batch {global_batch} queries x (1 positive + {t.negatives} hard negatives) "
            f"= {candidates} candidates: {candidates - 1} negatives per query "
            f"(loss={r.loss.name}, reweighter={r.loss.reweighter['name']}, "
            f"temperature={r.loss.temperature}, mask_duplicate_positives="
            f"{str(r.loss.mask_duplicate_positives).lower()})"
        )
        gc = t.grad_cache
        self.echo(
            "grad_cache: off" if gc is None else
            f"grad_cache: query_chunk={gc.query_chunk} candidate_chunk={gc.candidate_chunk} "
            f"({-(-t.batch_size // gc.query_chunk)} + "
            f"{-(-t.batch_size * (1 + t.negatives) // gc.candidate_chunk)} chunks per device)"
        )

    # -- the loop -------------------------------------------------------------------------------
    def _check_loss(self, flag: PreemptionFlag, step: int) -> Callable[[torch.Tensor], None]:
        def check(loss: torch.Tensor) -> None:
            # One small all-reduce per step: every rank learns the global loss (all stop on a
            # NaN anywhere, before it reaches the weights) and whether any rank was signalled.
            t = torch.tensor([float(loss.detach()), float(flag.requested)],
                             dtype=torch.float64, device=self.device)
            if self.env.world_size > 1 and dist.is_initialized():
                dist.all_reduce(t)
            self.global_loss = float(t[0]) / self.env.world_size
            self.preempt_agreed = bool(t[1] > 0)
            if not math.isfinite(self.global_loss):
                kept = self.last_checkpoint or "none written yet"
                raise TrainingError(
                    f"step {step}: the loss is {self.global_loss} (not finite); training stopped "
                    f"before updating the weights. Last good checkpoint: {kept}. Lower train.lr, "
                    "use fp32 or bf16 instead of fp16, or check the data for empty items; then "
                    "resume with `--resume latest`."
                )
        return check

    def _loop(self, engine: Engine, encoder: Encoder, start: int) -> list[dict[str, Any]]:
        t = self.r.train
        if self.env.is_main and self.save:
            _truncate_metrics(self.out_dir / "metrics.jsonl", start)
        metrics = MetricsWriter(self.out_dir, enabled=self.env.is_main and self.save,
                                tensorboard=t.tensorboard)
        history: list[dict[str, Any]] = []
        encoder.train()
        batches: Iterator[Any] = iter(self.loader)
        t_start = time.perf_counter()
        with PreemptionFlag() as flag, Progress(
            self.steps - start, desc="train", log_every=t.log_every, enabled=self.env.is_main
        ) as bar:
            for step in range(start + 1, self.steps + 1):
                t0 = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    raise TrainingError(
                        f"the training data ran out after {step - 1} steps of {self.steps}. Set "
                        "data.resample: true (an endless stream) or lower train.steps."
                    ) from None
                batch = batch.to(self.device)
                out = compute_step(engine, batch, self.loss, t,
                                   check_loss=self._check_loss(flag, step))
                grad_norm = engine.step()
                elapsed = time.perf_counter() - t0
                record = {
                    "step": step, "loss": self.global_loss, "lr": engine.lr,
                    "grad_norm": grad_norm,
                    "samples_per_s": len(batch) * self.env.world_size / max(elapsed, 1e-9),
                    "masked_duplicates": self.loss.last_masked,
                }
                if step % t.log_every == 0 or step in (start + 1, self.steps):
                    record.update(step_statistics(out.q, out.c, batch.targets,
                                                  negatives=t.negatives, loss=self.loss,
                                                  keys=batch.keys))
                    self._check_collapse(step, record, out.c.shape[0], len(batch))
                history.append(record)
                metrics.write(record)
                if self.collapsed is not None:
                    metrics.close()
                    raise Collapsed(
                        f"{self.collapsed} Stopped (train.stop_on_collapse); no model was saved."
                    )
                bar.update(1, loss=record["loss"], lr=record["lr"],
                           samples_per_s=round(record["samples_per_s"], 1))
                if self.save and t.save_every and step % t.save_every == 0 and step < self.steps:
                    self._checkpoint(engine, step, record)
                if t.eval_every and step % t.eval_every == 0 and step < self.steps:
                    self._periodic_eval(encoder, step, metrics)
                if self.preempt_agreed:
                    path = self._checkpoint(engine, step, record)
                    metrics.close()
                    raise Preempted(step, str(path), flag.signum or 15)
        metrics.close()
        self.echo(f"trained {self.steps - start} steps in {time.perf_counter() - t_start:.1f}s, "
                  f"final loss {self.global_loss:.4f}")
        if self.save and history:
            self._checkpoint(engine, self.steps, history[-1])
        return history

    def _check_collapse(
        self, step: int, record: dict[str, Any], local_candidates: int, local_rows: int
    ) -> None:
        # candidates a row is scored against: every rank's (equal batches), less its masked copies
        values = torch.tensor(
            [record["pos_sim"], record["hardest_neg_sim"],
             local_candidates - self.loss.last_masked / max(local_rows, 1)],
            dtype=torch.float64, device=self.device,
        )
        if self.env.world_size > 1 and dist.is_initialized():
            dist.all_reduce(values)  # every rank must reach the same verdict (stop_on_collapse)
            values /= self.env.world_size
        pos_sim, hardest, per_row = values.tolist()
        warning = self.alarm.check(
            step, loss=record["loss"], candidates_per_row=per_row * self.env.world_size,
            pos_sim=pos_sim, hardest_neg_sim=hardest,
        )
        if warning is None:
            return
        record["collapse"] = warning
        log.warning("%s", warning)
        self.echo(f"warning: {warning}")
        if self.r.train.stop_on_collapse:
            self.collapsed = warning

    def _checkpoint(self, engine: Engine, step: int, record: dict[str, Any]) -> Path:
        if self.last_checkpoint is not None and self.last_checkpoint.name == f"step-{step:08d}":
            return self.last_checkpoint
        path = ckpt.save_checkpoint(
            self.ckpt_root, step, self.env, engine=engine, data_state=self.loader.state_dict(),
            trainer_state={"engine": engine.name, "metrics": record},
            recipe_yaml=self.loaded.dump(), keep_last=self.r.train.keep_last,
        )
        self.last_checkpoint = path
        self.echo(f"checkpoint: {path}")
        return path

    def _periodic_eval(self, encoder: Encoder, step: int, metrics: MetricsWriter) -> None:
        if self.env.is_main:
            score = evaluate_encoder(self.loaded, encoder, self.out_dir / f"eval_step{step}",
                                     echo=self.echo)
            encoder.train()
            if score is not None:
                self.echo(f"step {step}: eval {score:.1f}")
                if metrics.tb is not None:
                    metrics.tb.add_scalar("eval/score", score, step)
        barrier()

    # -- the end --------------------------------------------------------------------------------
    def _finish(
        self, engine: Engine, history: list[dict[str, Any]], before: float | None,
    ) -> TrainResult:
        r = self.r
        # collective under ZeRO-3: every rank takes part; `validate` needs no final model
        encoder = engine.final_encoder() if (self.evaluate or self.save) else None
        after = None
        model_dir = None
        if encoder is not None:
            if self.evaluate:
                after = evaluate_encoder(self.loaded, encoder, self.out_dir / "eval_after",
                                         echo=self.echo)
                if after is not None:
                    if before is not None:
                        self.echo(f"P@1 before: {before:.1f}")
                    self.echo(f"P@1 after: {after:.1f}")
            if self.save:
                if r.model.lora is not None:
                    # Training is over: fold the adapters in so the saved encoder is a plain model
                    # that any mmemb command (and transformers) loads without peft.
                    from mmemb.lora import merge_lora

                    merge_lora(encoder.backbone)
                model_dir = save_encoder(
                    encoder, self.out_dir / "model", backbone=backbone_spec(self.loaded),
                    pooler=r.model.pooler,
                )
                self.echo(f"saved the trained encoder to {model_dir}")
        barrier()
        return TrainResult(self.steps, self.global_loss, model_dir, before, after, history,
                           self.last_checkpoint)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines past `step` (left by a run that died after its last checkpoint)."""
    import json

    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))
