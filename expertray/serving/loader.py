"""An engine for a checkpoint: the transformers model (dense weights loaded here, MoE blocks as proxies) over
lanes of cluster runners."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from expertray.models.files import CheckpointDescriptor
from expertray.models.pretrained import from_pretrained, in_process_backend
from expertray.serving.engine import Engine, EngineConfig, EngineObserver, Lanes

RunnerFactory = Callable[[CheckpointDescriptor, Any], list[Any]]


def load_engine(path: str, runners: RunnerFactory, cfg: EngineConfig | None = None,
                observer: EngineObserver | None = None, **cluster_options: Any) -> Engine:
    """A started Engine serving checkpoint `path`; `runners(descriptor, cluster_config)` gives one runner per
    lane (`cfg.micro_batches` of them; the same runner may stand for several lanes when it is thread-safe)."""
    cfg = cfg or EngineConfig()

    def backend(descriptor: CheckpointDescriptor, cluster_cfg: Any) -> Lanes:
        made = runners(descriptor, cluster_cfg)
        if len(made) != cfg.micro_batches:
            raise ValueError(f"{len(made)} runners for {cfg.micro_batches} lanes")
        return Lanes(made)

    model, lanes = from_pretrained(path, backend=backend, **cluster_options)
    try:
        return Engine(model, lanes, cfg, observer).start()
    except BaseException:
        lanes.shutdown()
        raise


def in_process_runners(micro_batches: int) -> RunnerFactory:
    """Every lane on one in-process copy of the MoE layers (no Ray; the reference and the tests' path)."""
    def make(descriptor: CheckpointDescriptor, cluster_cfg: Any) -> list[Any]:
        return [in_process_backend(descriptor, cluster_cfg)] * micro_batches
    return make
