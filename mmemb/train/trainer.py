"""`mmemb train`: the run around the step — set-up, resume, the loop, metrics, checkpoints,
signals, evaluation and the saved encoder.

The output directory belongs to one run (`mmemb.train.rundir`); signals stop every phase cleanly
(`mmemb.train.preempt`): during steps at the next step boundary, with a checkpoint.

Per step: batch -> backbone -> pooler -> normalise -> gather -> loss (full or tiled, the recipe's
reweighter) -> backward (plain, or GradCache chunks) -> clip -> optimizer step. The engine
(`mmemb.train.engines`) owns the backward, the gradient exchange and the optimizer.
"""

from __future__ import annotations

import logging
import math
import shutil
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
from mmemb.fileio import replace_dir
from mmemb.loss import ContrastiveLoss, build_loss
from mmemb.model import Encoder
from mmemb.progress import Progress
from mmemb.recipe import LoadedRecipe
from mmemb.train import checkpoint as ckpt
from mmemb.train.collapse import CollapseAlarm, Collapsed
from mmemb.train.data import check_shards, ensure_prepared, shard_dir
from mmemb.train.engines import Engine, EngineSetup, build_engine
from mmemb.train.metrics import MetricsWriter, step_statistics
from mmemb.train.preempt import SignalGuard, Stopped, stop_for
from mmemb.train.rundir import RunPlan, apply_plan, fingerprint, mark_finished, plan_run
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
    overwrite: bool = False,
) -> TrainResult:
    """Train the model a recipe describes.

    `max_steps` caps the steps (used by `validate`); `save=False` writes nothing to OUTPUT_DIR
    (no checkpoints, metrics or model). `resume`: ``"auto"`` (the newest compatible checkpoint of
    the run in OUTPUT_DIR, or a fresh start when there is none), ``"latest"`` (the same, but
    there must be one) or a checkpoint directory; `overwrite` allows replacing another run's work
    (see `mmemb.train.rundir`). Raises `Preempted` (SIGTERM/SIGUSR1) or `Interrupted` (SIGINT) in
    any phase — during steps after writing a checkpoint — `RunDirError` when the output
    directory belongs to another run, and `TrainingError` on a non-finite loss.
    """
    r = loaded.recipe
    with SignalGuard() as guard:  # first: a rendezvous of many nodes can take a while
        env = dist_env()
        device = pick_device(r.train.device, env)
        started = init_distributed(env, device)
        # On a CPU, denormal floats (the far tail of a sharpening softmax) cost ~100x a normal
        # operation and carry no signal for training: flush them to zero while training.
        flushed = device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            run = _Run(loaded, env, device, echo=echo if env.is_main else (lambda s: None),
                       max_steps=max_steps, save=save, evaluate=evaluate, guard=guard)
            return run.execute(None if resume is None else str(resume), overwrite=overwrite)
        finally:
            if flushed:
                torch.set_flush_denormal(False)
            shutdown_distributed(started)


class _Run:
    """One training run on one rank."""

    def __init__(
        self, loaded: LoadedRecipe, env: DistEnv, device: torch.device, *, echo: Echo,
        max_steps: int | None, save: bool, evaluate: bool, guard: SignalGuard,
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
        self.alarm: CollapseAlarm | None = None  # built with the loss (it reads its reweighter)
        self.collapsed: str | None = None
        self.guard = guard
        self.run_id = ""
        self.fingerprint = fingerprint(self.r)
        self._unreadable = 0  # shards/samples the stream could not read, seen so far

    # -- set-up ---------------------------------------------------------------------------------
    def execute(self, resume: str | None, *, overwrite: bool) -> TrainResult:
        from mmemb.data.collate import Collator
        from mmemb.data.stream import TrainStream

        r, env, guard = self.r, self.env, self.guard
        plan = self._plan(resume, overwrite)
        if plan.finished:
            state = ckpt.read_state(plan.resume_from) if plan.resume_from else {}
            loss = float(state.get("metrics", {}).get("loss", math.nan))
            self.echo(f"{self.out_dir}: this run already finished at step {plan.start_step} "
                      f"(model: {self.out_dir / 'model'}); nothing to do. Raise train.steps to "
                      "train further, or pass --overwrite to start over.")
            return TrainResult(plan.start_step, loss, self.out_dir / "model",
                               checkpoint=plan.resume_from)
        seed_everything(r.seed)
        with guard.phase("preparing data"):
            ensure_prepared(self.loaded, env, echo=self.echo)
        resume_from = plan.resume_from
        with guard.phase("building the model"):
            check_shards(self.loaded, when="before training",
                         checkpoint=str(resume_from) if resume_from else None)
            encoder = build_model(self.loaded).to(self.device)
            preflight(self.loaded, encoder, env)
            self.loss: ContrastiveLoss = build_loss(r.loss.spec(), where="loss")
            self.loader = TrainStream(
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
                guard.last_checkpoint = str(resume_from)
                self.global_loss = float(state.get("metrics", {}).get("loss", math.nan))
                self._unreadable = self._unreadable_count()
                self.echo(f"resumed from {resume_from} at step {start}")
        before = None
        if self.evaluate and env.is_main and r.eval.before_training and resume_from is None:
            # before the engine exists: ZeRO-3 would partition the weights across ranks
            with guard.phase("evaluating before training"):
                before = evaluate_encoder(self.loaded, encoder, self.out_dir / "eval_before",
                                          echo=self.echo)
            if before is not None:
                self.echo(f"P@1 before: {before:.1f}")
        barrier()
        with guard.phase("building the engine"):
            engine = build_engine(EngineSetup(self.loaded, encoder, env, self.device))
        try:
            if resume_from is not None:
                with guard.phase("loading the checkpoint"):
                    engine.load(resume_from)
            self._log_start(encoder, engine)
            if rng_state is not None:  # last: nothing in the set-up draws from the restored state
                ckpt.set_rng_state(rng_state)
            history = self._loop(engine, encoder, start)
            return self._finish(engine, history, before)
        finally:
            engine.close()

    def _plan(self, resume: str | None, overwrite: bool) -> RunPlan:
        """Who owns OUTPUT_DIR and where to start (every rank reads; rank 0 writes)."""
        if not self.save:  # validate: writes nothing, so owns nothing
            plan = (plan_run(self.out_dir, self.loaded, resume=resume, overwrite=overwrite)
                    if resume is not None else RunPlan("unsaved", self.fingerprint))
            self.run_id = plan.run_id
            return plan
        plan = plan_run(self.out_dir, self.loaded, resume=resume, overwrite=overwrite)
        barrier()  # every rank has read the directory before rank 0 changes it
        if self.env.is_main:
            for note in plan.notes:
                self.echo(note)
            if not plan.finished:
                apply_plan(plan, self.out_dir, self.loaded)
        barrier()
        self.run_id = plan.run_id
        return plan

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
    def _check_loss(self, flag: SignalGuard, step: int) -> Callable[[torch.Tensor], None]:
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
                    "rerun the same command with `--resume auto`."
                )
        return check

    def _loop(self, engine: Engine, encoder: Encoder, start: int) -> list[dict[str, Any]]:
        t = self.r.train
        # metrics.jsonl is only appended to (see mmemb.train.rundir: resumed lines supersede)
        metrics = MetricsWriter(self.out_dir, enabled=self.env.is_main and self.save,
                                tensorboard=t.tensorboard)
        history: list[dict[str, Any]] = []
        encoder.train()
        batches: Iterator[Any] = iter(self.loader)
        t_start = time.perf_counter()
        with self.guard.steps() as flag, Progress(
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
                self._check_data(step)
                batch = batch.to(self.device)
                out = compute_step(engine, batch, self.loss, t,
                                   check_loss=self._check_loss(flag, step))
                grad_norm = engine.step()
                elapsed = time.perf_counter() - t0
                record: dict[str, Any] = {
                    "step": step, "run": self.run_id, "loss": self.global_loss, "lr": engine.lr,
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
                    self.preempt_agreed = self._agree(flag.requested)
                if self.preempt_agreed:
                    signum = flag.signum or 15  # another rank's signal: a preemption
                    flag.signum = None
                    path = self._checkpoint(engine, step, record) if self.save else None
                    metrics.close()
                    raise stop_for(signum, phase="training", step=step,
                                   checkpoint=str(path) if path else None)
            # Still inside the signal guard: a signal that arrived after the last step's check
            # finds the final checkpoint written, and every rank agrees to stop here (exit 75/130)
            # rather than one rank leaving the others in the evals' and the save's collectives.
            if self.save and history:
                self._checkpoint(engine, self.steps, history[-1])
            if self._agree(flag.requested):
                signum = flag.signum or 15
                flag.signum = None
                metrics.close()
                kept = self.last_checkpoint
                raise stop_for(signum, phase="finishing training", step=self.steps,
                               checkpoint=str(kept) if kept else None)
        metrics.close()
        self.echo(f"trained {self.steps - start} steps in {time.perf_counter() - t_start:.1f}s, "
                  f"final loss {self.global_loss:.4f}")
        return history

    def _agree(self, local: bool) -> bool:
        """True on every rank when any rank has it true (one small all-reduce)."""
        if self.env.world_size > 1 and dist.is_initialized():
            t = torch.tensor([float(local)], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            return bool(t.item() > 0)
        return local

    def _unreadable_count(self) -> int:
        stats = self.loader.total_stats
        return int(stats.get("bad_shard", 0)) + int(stats.get("bad_sample", 0))

    def _check_data(self, step: int) -> None:
        """When the stream met a shard or sample it could not read, check the shard files against
        the manifests: a damaged shard stops training with its name (the stream alone would skip
        its tail with a warning, silently training on less data)."""
        n = self._unreadable_count()
        if n > self._unreadable:
            self._unreadable = n
            last = str(self.last_checkpoint) if self.last_checkpoint else None
            check_shards(self.loaded, when=f"step {step}", checkpoint=last)

    def _check_collapse(
        self, step: int, record: dict[str, Any], local_candidates: int, local_rows: int
    ) -> None:
        if self.alarm is None:
            self.alarm = CollapseAlarm(self.r.train.warmup_steps, self.loss)
        # Summed over ranks: the candidates (every rank's are each row's columns), the similarities
        # and the masked copies per row (each rank's rows already count every rank's columns), so
        # every rank reaches the same verdict (stop_on_collapse) from the whole batch's values.
        values = torch.tensor(
            [local_candidates, record["pos_sim"], record["hardest_neg_sim"],
             self.loss.last_masked / max(local_rows, 1)],
            dtype=torch.float64, device=self.device,
        )
        if self.env.world_size > 1 and dist.is_initialized():
            dist.all_reduce(values)
            values[1:] /= self.env.world_size
        candidates, pos_sim, hardest, masked_per_row = values.tolist()
        warning = self.alarm.check(
            step, loss=record["loss"], candidates_per_row=candidates - masked_per_row,
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
            trainer_state={"engine": engine.name, "fingerprint": self.fingerprint,
                           "metrics": record},
            recipe_yaml=self.loaded.dump(), keep_last=self.r.train.keep_last,
            run_id=self.run_id,
        )
        self.last_checkpoint = path
        self.guard.last_checkpoint = str(path)
        self.echo(f"checkpoint: {path}")
        return path

    def _periodic_eval(self, encoder: Encoder, step: int, metrics: MetricsWriter) -> None:
        if self.env.is_main and not self.guard.requested:
            score = None
            try:
                # A signal stops the evaluation at once (it may take long; a scheduler's grace
                # period is short). The training state is untouched by it, so the loop then
                # writes this step's checkpoint as after any step.
                with self.guard.interruptible(f"evaluating at step {step}"):
                    score = evaluate_encoder(self.loaded, encoder,
                                             self.out_dir / f"eval_step{step}", echo=self.echo)
            except Stopped as stop:
                self.guard.signum = stop.signum
            encoder.train()
            if score is not None:
                self.echo(f"step {step}: eval {score:.1f}")
                if metrics.tb is not None:
                    metrics.tb.add_scalar("eval/score", score, step)
        barrier()

    # -- the end --------------------------------------------------------------------------------
    def _save_model(self, encoder: Encoder) -> Path:
        """Save into a staging directory and swap it in: a stop or crash mid-save leaves the
        previous model (or none), never a half-written one that looks finished."""
        final = self.out_dir / "model"
        staging = self.out_dir / ".tmp-model"
        shutil.rmtree(staging, ignore_errors=True)
        save_encoder(encoder, staging, backbone=backbone_spec(self.loaded),
                     pooler=self.r.model.pooler)
        replace_dir(staging, final, old=self.out_dir / ".old-model")
        return final

    def _finish(
        self, engine: Engine, history: list[dict[str, Any]], before: float | None,
    ) -> TrainResult:
        r = self.r
        # collective under ZeRO-3: every rank takes part; `validate` needs no final model
        with self.guard.phase("gathering the final model"):
            encoder = engine.final_encoder() if (self.evaluate or self.save) else None
        after = None
        model_dir = None
        if encoder is not None:
            if self.evaluate:
                with self.guard.phase("evaluating after training"):
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
                with self.guard.phase("saving the model"):
                    model_dir = self._save_model(encoder)
                self.echo(f"saved the trained encoder to {model_dir}")
        barrier()
        if self.save and self.env.is_main and model_dir is not None:
            mark_finished(self.out_dir, self.steps)
        return TrainResult(self.steps, self.global_loss, model_dir, before, after, history,
                           self.last_checkpoint)
