"""Serving Hugging Face checkpoints: describe a checkpoint directory, read its MoE weights on demand
(WeightSource), and build a transformers model whose MoE blocks run on a cluster (from_pretrained)."""

from expertray.checkpoint.families import FAMILIES, supported_architectures
from expertray.checkpoint.files import CheckpointDescriptor, describe
from expertray.checkpoint.source import RouterWeights, WeightSource, cached_source, resolve_dtype

__all__ = ["FAMILIES", "CheckpointDescriptor", "RouterWeights", "WeightSource", "cached_source", "describe",
           "resolve_dtype", "supported_architectures"]
