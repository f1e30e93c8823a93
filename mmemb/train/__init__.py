"""Training: the step, the engines, GradCache, checkpoints, the run directory and signals."""

from mmemb.train.preempt import (
    INTERRUPTED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    Interrupted,
    Preempted,
    Stopped,
)
from mmemb.train.rundir import RunDirError, read_metrics
from mmemb.train.setup import build_model
from mmemb.train.trainer import TrainingError, TrainResult, train

__all__ = [
    "INTERRUPTED_EXIT_CODE",
    "PREEMPTED_EXIT_CODE",
    "Interrupted",
    "Preempted",
    "RunDirError",
    "Stopped",
    "TrainResult",
    "TrainingError",
    "build_model",
    "read_metrics",
    "train",
]
