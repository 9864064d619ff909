"""Serving Hugging Face checkpoints: describe a checkpoint directory, read its MoE weights on demand
(WeightSource), and build a transformers model whose MoE blocks run on a cluster (from_pretrained).

files.py (descriptor, tensor index from headers) → families.py (config.json → layer config, tensor names)
→ source.py (WeightSource: experts / router reads) → quant.py (FP8, MXFP4) → pretrained.py (from_pretrained,
backends) → generate.py (the `expertray generate` logic) · synthetic.py (tiny test models) · blocks.py
(transformers blocks ↔ MoELayer) · proxy.py (swap a model's MoE blocks for cluster proxies).
"""

from expertray.models.families import FAMILIES, supported_architectures
from expertray.models.files import CheckpointDescriptor, describe
from expertray.models.pretrained import (
    BACKENDS,
    InProcessCluster,
    checkpoint_cluster_config,
    cluster_config,
    from_pretrained,
)
from expertray.models.source import RouterWeights, WeightSource, cached_source, resolve_dtype

__all__ = ["BACKENDS", "FAMILIES", "CheckpointDescriptor", "InProcessCluster", "RouterWeights", "WeightSource",
           "cached_source", "checkpoint_cluster_config", "cluster_config", "describe", "from_pretrained",
           "resolve_dtype", "supported_architectures"]
