"""PlacementTable.migrate refuses a source that does not hold the expert (the CLI's
`migrate --from` such an actor exited 0 and bumped the table version)."""

import pytest

from expertray.errors import ConfigError, UnknownExpertError
from expertray.state.placement_table import PlacementTable


def _table() -> PlacementTable:
    return PlacementTable.balanced(1, 4, ["a", "b"])  # a: 0, 1; b: 2, 3


def test_migrate_moves_the_replica() -> None:
    t = _table().migrate(0, 1, "a", "b")
    assert [s.actor for s in t.replicas(0, 1)] == ["b"] and t.version == 1


@pytest.mark.parametrize("src,dst,err,needle", [
    ("b", "a", UnknownExpertError, "actor 'b' holds no replica of expert 0:1 (held by a)"),
    ("a", "a", ConfigError, "source and destination are both 'a'"),
    ("zz", "b", UnknownExpertError, "actor 'zz' holds no replica of expert 0:1"),
])
def test_migrate_refuses_a_bad_source(src: str, dst: str, err: type, needle: str) -> None:
    with pytest.raises(err) as info:
        _table().migrate(0, 1, src, dst)
    assert needle in str(info.value)
