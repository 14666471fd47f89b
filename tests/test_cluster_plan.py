"""The emulated cluster's plan (pure: names, addresses, link settings), no root needed."""

from __future__ import annotations

import dataclasses

import pytest

from topocoll.topology.cluster import DEFAULT_MTU, ClusterState, plan_cluster


def test_plan_uses_jumbo_frames_by_default() -> None:
    state = plan_cluster([3, 5], rails=2)
    assert state.mtu == DEFAULT_MTU == 9000
    assert [n.addresses for n in state.nodes] == [["10.77.0.1", "10.77.1.1"],
                                                  ["10.77.0.2", "10.77.1.2"]]


@pytest.mark.parametrize("mtu", [0, 576, 1279, 65536])
def test_plan_rejects_an_impossible_mtu(mtu: int) -> None:
    with pytest.raises(ValueError, match=f"mtu must be .* not {mtu}"):
        plan_cluster([2, 2], mtu=mtu)


def test_plan_rejects_a_burst_smaller_than_one_packet() -> None:
    with pytest.raises(ValueError, match="below one 9000-byte packet"):
        plan_cluster([2, 2], burst="4kb")
    assert plan_cluster([2, 2], burst="4kb", mtu=1500).burst_bytes == 4096


def test_state_written_before_the_mtu_field_loads_with_the_old_links() -> None:
    data = dataclasses.asdict(plan_cluster([2, 2], mtu=1500))
    assert ClusterState.from_dict(data).mtu == 1500
    del data["mtu"]
    assert ClusterState.from_dict(data).mtu == 1500  # what the kernel gave those links
