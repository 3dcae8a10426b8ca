"""Transformer LM, gating network and the K-expert mixture built on them."""

from moelab.model.gating import MeanPoolGating
from moelab.model.mixture import MixtureLM
from moelab.model.transformer import (
    KVCache,
    ModelConfig,
    Transformer,
    config_from_preset,
)

__all__ = ["KVCache", "MeanPoolGating", "MixtureLM", "ModelConfig", "Transformer",
           "config_from_preset"]
