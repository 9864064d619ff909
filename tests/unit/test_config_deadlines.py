"""Deadline fields of ClusterConfig: request_timeout_s follows collective_timeout_s by default; bad values
are named."""

import pytest

from expertray.config import ClusterConfig, from_dict, to_dict
from expertray.errors import ConfigError


def test_request_timeout_defaults_to_a_few_seconds_past_the_collective_timeout() -> None:
    assert ClusterConfig().request_timeout_s == ClusterConfig().collective_timeout_s + 5.0
    assert ClusterConfig(collective_timeout_s=2.0).request_timeout_s == 7.0
    assert ClusterConfig(request_timeout_s=1.5).request_timeout_s == 1.5
    cfg = ClusterConfig(collective_timeout_s=3.0)
    assert from_dict(ClusterConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("field,value", [("request_timeout_s", 0), ("request_timeout_s", float("inf")),
                                         ("request_timeout_s", "5"), ("request_timeout_s", True),
                                         ("control_timeout_s", -1.0), ("ping_timeout_s", float("nan"))])
def test_bad_deadlines_are_named(field: str, value) -> None:
    with pytest.raises(ConfigError, match=f"cluster.{field}"):
        from_dict(ClusterConfig, {field: value}, "cluster")
