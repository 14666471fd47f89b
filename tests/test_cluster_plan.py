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


def test_quickack_is_off_unless_asked_and_names_every_rail_route() -> None:
    """Linux delays ACKs by default, and the committed runs measure that cluster: the
    option must be asked for, and state files written before it load with it off."""
    from topocoll.topology.cluster import quickack_route

    assert plan_cluster([2, 2]).quickack is False
    state = plan_cluster([3, 5], rails=2, quickack=True)
    assert state.quickack is True
    node = state.nodes[1]
    assert quickack_route(state, node, 1) == [
        "route", "replace", "10.77.1.0/24", "dev", "eth1", "proto", "kernel", "scope",
        "link", "src", "10.77.1.2", "quickack", "1"]
    data = dataclasses.asdict(state)
    assert ClusterState.from_dict(data).quickack is True
    del data["quickack"]
    assert ClusterState.from_dict(data).quickack is False
