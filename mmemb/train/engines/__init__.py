"""Training engines: who owns the optimizer, the backward and the gradient exchange.

`torch` is plain PyTorch (one process, or data parallel over gloo/nccl); `deepspeed` wraps the
encoder in a DeepSpeed engine (ZeRO stage 0-3). The step logic (`mmemb.train.step`) talks only to
the `Engine` interface, so GradCache, checkpoints and preemption work the same with both.
"""

from __future__ import annotations

from mmemb.train.engines.base import Engine, EngineSetup


def build_engine(setup: EngineSetup) -> Engine:
    """The engine the recipe's `train.engine` names."""
    if setup.loaded.recipe.train.engine == "deepspeed":
        from mmemb.train.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(setup)
    from mmemb.train.engines.torch_engine import TorchEngine

    return TorchEngine(setup)


__all__ = ["Engine", "EngineSetup", "build_engine"]
