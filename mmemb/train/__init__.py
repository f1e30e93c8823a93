"""Training: the step, the engines, optimisation and the run's outputs."""

from mmemb.train.trainer import TrainingError, TrainResult, build_model, train

__all__ = ["TrainResult", "TrainingError", "build_model", "train"]
