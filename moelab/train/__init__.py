"""EM objectives, the trainer loop, learning-rate schedules and checkpoints."""

from moelab.train.checkpoint import CheckpointError, load_checkpoint
from moelab.train.command import train
from moelab.train.config import DataConfig, ModelArgs, OptimConfig, RunConfig, TrainConfig
from moelab.train.history import read_history
from moelab.train.trainer import TrainResult, ValidResult

__all__ = ["CheckpointError", "DataConfig", "ModelArgs", "OptimConfig", "RunConfig",
           "TrainConfig", "TrainResult", "ValidResult", "load_checkpoint", "read_history",
           "train"]
