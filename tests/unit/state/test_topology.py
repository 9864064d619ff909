"""Topology: nodes of devices, slots, and the link model (defaults, validation, lookups)."""

import math

import pytest

from expertray.errors import ConfigError
from expertray.state.topology import Links, Topology


def test_uniform_layout_and_lookups() -> None:
    topo = Topology.uniform(2, 3, 4)
    assert topo.devices == ["dev-0-0", "dev-0-1", "dev-0-2", "dev-1-0", "dev-1-1", "dev-1-2"]
    assert (topo.num_devices, topo.num_nodes, topo.slots_per_device) == (6, 2, 4)
    assert topo.device_nodes == (0, 0, 0, 1, 1, 1)
    assert topo.device_index["dev-1-0"] == 3
    assert topo.node_of("dev-1-2") == 1
    with pytest.raises(ConfigError, match="unknown device 'nope'"):
        topo.node_of("nope")


def test_links_default_to_h100_nvlink_and_400g_ib() -> None:
    links = Topology.uniform(1, 8, 1).links
    assert links.intra_node_bandwidth_bytes_per_s == 450e9  # 900 GB/s bidirectional NVLink 4
    assert links.inter_node_bandwidth_bytes_per_s == 50e9  # 400 Gb/s NDR
    assert 0 < links.intra_node_latency_s < links.inter_node_latency_s


def test_existing_constructors_keep_working_and_take_links() -> None:
    positional = Topology((("a", "b"), ("c",)), 2)
    assert positional.links == Links()
    custom = Links(100.0, 10.0, 1.0, 2.0)
    assert Topology.uniform(2, 2, 1, links=custom).links is custom
    assert Topology.single_node(["x", "y"], 3, links=custom).links is custom
    assert Topology.uniform(2, 2, 1) == Topology.uniform(2, 2, 1)


@pytest.mark.parametrize("field, value", [
    ("intra_node_bandwidth_bytes_per_s", 0.0), ("inter_node_bandwidth_bytes_per_s", -1.0),
    ("inter_node_bandwidth_bytes_per_s", math.inf), ("intra_node_latency_s", -1e-6),
    ("inter_node_latency_s", math.nan)])
def test_bad_links_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"topology.links.{field}"):
        Links(**{field: value})


def test_bad_topologies() -> None:
    with pytest.raises(ConfigError, match="device id appears twice"):
        Topology((("a",), ("a",)), 1)
    with pytest.raises(ConfigError, match="slots_per_device"):
        Topology.uniform(1, 1, 0)
    with pytest.raises(ConfigError, match="need >= 1 node"):
        Topology.uniform(0, 8, 1)
