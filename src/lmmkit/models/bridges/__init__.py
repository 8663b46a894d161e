"""Modality bridges: how image features enter the language model."""

from lmmkit.models.bridges.mlp import MLPBridge

__all__ = ["MLPBridge"]
