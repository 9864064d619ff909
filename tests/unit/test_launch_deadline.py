"""launch() waits for the controller's start within a bound derived from its steps and the weights to persist."""

from __future__ import annotations

import dataclasses

from expertray.api import PERSIST_BYTES_PER_S, random_model, start_deadline_s
from expertray.config import ClusterConfig, MoELayerConfig


def test_deadline_covers_every_step_and_the_weights_to_persist() -> None:
    cfg = ClusterConfig(layer=MoELayerConfig(d_model=32, d_ff=48), num_layers=2, num_routers=2,
                        control_timeout_s=10.0, start_timeout_s=50.0)
    layers = random_model(cfg)
    weight_bytes = sum(m.experts.nbytes for m in layers)
    assert weight_bytes > 0
    assert start_deadline_s(cfg, None) == 50.0 + 4 * 10.0  # a checkpoint: nothing to persist
    assert start_deadline_s(cfg, layers) == 50.0 + 4 * 10.0 + weight_bytes / PERSIST_BYTES_PER_S
    more_routers = dataclasses.replace(cfg, num_routers=3)
    assert start_deadline_s(more_routers, None) == start_deadline_s(cfg, None) + 10.0
