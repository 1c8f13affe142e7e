"""Networks: time embeddings and control / score parametrisations."""

from .control import ControlNetwork, FourierTimeEmbedding

__all__ = ["ControlNetwork", "FourierTimeEmbedding"]
