"""A restarted controller's resume without Ray: from the snapshot, else from the running routers and actor
names; unusable weights are reported, not raised."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertray.config import GateConfig, MoELayerConfig
from expertray.layer.reference import MoELayer
from expertray.runtime import restore
from expertray.runtime.snapshot import ControllerState, SnapshotError, save_snapshot
from expertray.runtime.weights import save_weights
from expertray.state.placement_table import PlacementTable


class Running:
    """Named actors; routers answer with their table unless listed in `silent`."""

    def __init__(self, names: list[str], tables: dict[str, PlacementTable], silent: frozenset[str] = frozenset()):
        self.names = names
        self.tables = tables
        self.silent = silent

    def named_actors(self) -> list[str]:
        return self.names

    def lookup(self, name: str):
        return name if name in self.names else None

    def router_table(self, handle):
        if handle is None or handle in self.silent:
            raise TimeoutError(f"{handle}: no answer")
        return self.tables[handle].to_dict()

    def router_transport(self, handle) -> str:
        return "collective"


def _table(version: int) -> PlacementTable:
    return PlacementTable.balanced(1, 4, ["expert-0", "expert-3"]).bump(version)


def test_a_good_snapshot_is_resumed_and_its_routers_re_attached(tmp_path: Path) -> None:
    state = ControllerState(next_actor=4, routers=("router-0", "router-2"), next_router=3, transport="objects",
                            history=({"version": 2, "reason": "x"},), autoscaler={"on": True},
                            checkpoint={})
    save_snapshot(tmp_path / "s.msgpack", _table(2), state)
    resumed = restore.resume(tmp_path / "s.msgpack", Running(["expertray-router-0"], {}))
    assert resumed.table.version == 2 and resumed.snapshot_error is None
    assert resumed.routers == {"router-0": "expertray-router-0", "router-2": None}
    assert (resumed.next_actor, resumed.next_router, resumed.transport) == (4, 3, "objects")
    assert resumed.history == [{"version": 2, "reason": "x"}] and resumed.autoscaler == {"on": True}


def test_a_bad_snapshot_is_rebuilt_from_the_newest_table_a_router_tells(tmp_path: Path, caplog) -> None:
    (tmp_path / "s.msgpack").write_bytes(b"not msgpack")
    names = ["expertray-router-1", "expertray-router-4", "expertray-router-5", "expertray-expert-0",
             "expertray-expert-3", "expertray-controller", "other-router-9"]
    running = Running(names, {"expertray-router-1": _table(3), "expertray-router-4": _table(5)},
                      silent=frozenset({"expertray-router-5"}))
    resumed = restore.resume(tmp_path / "s.msgpack", running)
    assert "SNAPSHOT UNUSABLE" in caplog.text and "router router-5 did not answer" in caplog.text
    assert resumed.snapshot_error and resumed.table.version == 5
    assert list(resumed.routers) == ["router-1", "router-4", "router-5"]
    assert (resumed.next_actor, resumed.next_router, resumed.transport) == (4, 6, "collective")
    assert resumed.history == [] and resumed.checkpoint == {}


def test_no_router_to_tell_the_table_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="no running router could tell its table: relaunch the cluster"):
        restore.resume(tmp_path / "missing.msgpack", Running(["expertray-expert-0"], {}))


def test_the_weight_store_is_loaded_or_its_error_reported(tmp_path: Path) -> None:
    cfg = MoELayerConfig(d_model=8, d_ff=4, gate=GateConfig(num_experts=4, top_k=2))
    save_weights(tmp_path / "w.safetensors", [MoELayer.random(cfg, seed=0)])
    layers, error = restore.weight_store(tmp_path / "w.safetensors", cfg, 1)
    assert error is None and len(layers) == 1
    layers, error = restore.weight_store(tmp_path / "none.safetensors", cfg, 1)
    assert layers is None and error


def test_a_changed_checkpoint_is_reported_not_served(tmp_path: Path) -> None:
    from expertray.models.files import describe
    from expertray.models.synthetic import write_tiny_checkpoint

    path = write_tiny_checkpoint("mixtral", tmp_path / "mx", seed=1)
    descriptor = describe(path).to_dict()
    assert restore.checkpoint(descriptor, str(path)) == (descriptor, None)
    assert restore.checkpoint({}, str(path))[0] == descriptor  # no descriptor saved: described again
    shard = next(path.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8])
    checkpoint, error = restore.checkpoint(descriptor, str(path))
    assert checkpoint == {} and error
