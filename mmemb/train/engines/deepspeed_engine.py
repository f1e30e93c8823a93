"""The DeepSpeed engine: ZeRO stage 0-3, bf16/fp16, DeepSpeed's or mmemb's optimizer/scheduler.

GradCache under ZeRO: every chunk's backward except the last runs with the gradient-accumulation
boundary off, so ZeRO 1/2 accumulate locally and reduce once (reducing twice per step is what
makes GradCache fail under ZeRO elsewhere); ZeRO-3 reduce-scatters each backward into its
partitioned gradients, which accumulate like micro-steps. Checkpoints are DeepSpeed's own (each
rank writes its partitions) plus the gathered trainable weights as safetensors; they are read back
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from mmemb.model import Backbone, Encoder
from mmemb.train.engines.base import Engine, EngineSetup
from mmemb.train.engines.deepspeed_config import resolve_ds_config
from mmemb.train.engines.torch_engine import WEIGHTS_FILE, trainable_named
from mmemb.train.optim import build_optimizer, build_scheduler

DS_DIR = "deepspeed"
DS_TAG = "state"


def _deepspeed_data_classes() -> list[Any]:
    """The plain-data DeepSpeed classes its checkpoints pickle (loss-scaler settings, the ZeRO
    stage enum, fragment addresses): allowed, nothing else is."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _safe_checkpoint_engine(engine: Any) -> None:
    """Make DeepSpeed read its checkpoint files with ``weights_only=True`` (it uses False)."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not hasattr(ce, "load"):
        return
    allowed = _deepspeed_data_classes()

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load


def uniform_forward(encoder: Encoder) -> None:
    """Make every rank run the same modules in the same order (ZeRO-3 gathers a module's weights
    when a rank enters it): see `Backbone.require_uniform_forward`."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for module in encoder.modules():
        if isinstance(module, Backbone):
            for param in module.require_uniform_forward():
                register_external_parameter(module, param)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, setup: EngineSetup) -> None:
        super().__init__(setup)
        import deepspeed

        cfg = setup.loaded.recipe.train
        self.cfg = cfg
        self._started_dist = False
        if not dist.is_initialized():
            # One process without a launcher: give DeepSpeed a group of one (otherwise it goes
            # looking for MPI).
            from mmemb.distributed import free_port

            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            deepspeed.init_distributed(dist_backend=backend)
            self._started_dist = True
        self.config = resolve_ds_config(cfg, setup.env.world_size, setup.loaded.base_dir,
                                        cpu=self.device.type == "cpu")
        if int(self.config.get("zero_optimization", {}).get("stage", 0)) == 3:
            uniform_forward(setup.encoder)
        params = list(self.trainable_parameters())
        optimizer = None if "optimizer" in self.config else build_optimizer(params, cfg)
        scheduler = None
        if "scheduler" not in self.config:
            scheduler = (build_scheduler(optimizer, cfg) if optimizer is not None
                         else (lambda opt: build_scheduler(opt, cfg)))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=setup.encoder, model_parameters=params, optimizer=optimizer,
            lr_scheduler=scheduler, config=self.config,
        )
        _safe_checkpoint_engine(self.ds)
        self.stage = int(self.ds.zero_optimization_stage())
        if self.stage == 3 and cfg.eval_every:
            from mmemb.errors import ConfigError

            raise ConfigError([
                "train.eval_every: periodic evaluation runs on rank 0 alone, which ZeRO-3 "
                "cannot do (every rank holds a part of each weight). Drop train.eval_every (the "
                "final evaluation still runs) or use ZeRO stage 2."
            ])
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def precision(self) -> str:
        if self.ds.bfloat16_enabled():
            return "bf16"
        return "fp16" if self.ds.fp16_enabled() else "fp32"

    def forward(self, inputs: Mapping[str, torch.Tensor], *, sync: bool = True) -> torch.Tensor:
        # `sync` needs nothing here: `backward(last=...)` sets the accumulation boundary.
        if self._dtype is not None:  # the weights are 16-bit: so must the pixels be
            inputs = {k: v.to(self._dtype) if v.is_floating_point() else v
                      for k, v in inputs.items()}
        return self.ds(inputs).float()

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        self.ds.set_gradient_accumulation_boundary(last)
        self.ds.backward(loss)

    def step(self) -> float:
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def trainable_state(self) -> dict[str, torch.Tensor]:
        named = trainable_named(self.encoder)
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None):
                return {n: p.detach().float().cpu().clone() for n, p in named.items()}
        return {n: p.detach().float().cpu().clone() for n, p in named.items()}

    def save(self, directory: Path) -> None:
        state = self.trainable_state()  # collective under ZeRO-3
        if self.env.is_main:
            save_file(state, str(directory / WEIGHTS_FILE))
        self.ds.save_checkpoint(str(directory / DS_DIR), tag=DS_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.ds.load_checkpoint(
            str(directory / DS_DIR), tag=DS_TAG, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            from mmemb.train.checkpoint import CheckpointError

            raise CheckpointError(f"{directory}: DeepSpeed found no checkpoint in {DS_DIR}/.")

    def final_encoder(self) -> Encoder | None:
        state = self.trainable_state()  # every rank takes part
        if not self.env.is_main:
            return None
        if self.stage < 3 and self._dtype is None:
            return self.encoder  # the module holds full fp32 weights
        # ZeRO-3 partitions the weights (and hooks the modules); 16-bit runs hold rounded copies:
        # rank 0 builds a fresh encoder and loads the full fp32 trainable weights into it.
        from mmemb.train.setup import build_model, seed_everything

        seed_everything(self.setup.loaded.recipe.seed)
        encoder = build_model(self.setup.loaded)
        params = trainable_named(encoder)
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        return encoder.to(self.device)

    def close(self) -> None:
        if self._started_dist and dist.is_initialized():
            from mmemb.distributed import destroy_process_group

            dist.barrier()
            destroy_process_group()
