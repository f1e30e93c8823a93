"""Training: the step, the engines, GradCache, checkpoints and preemption."""

from mmemb.train.preempt import PREEMPTED_EXIT_CODE, Preempted
from mmemb.train.setup import build_model
from mmemb.train.trainer import TrainingError, TrainResult, train

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "Preempted",
    "TrainResult",
    "TrainingError",
    "build_model",
    "train",
]
