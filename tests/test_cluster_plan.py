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
    from topocoll.topology.cluster import rail_route

    assert plan_cluster([2, 2]).quickack is False
    state = plan_cluster([3, 5], rails=2, quickack=True)
    assert state.quickack is True
    node = state.nodes[1]
    assert rail_route(state, node, 1) == [
        "route", "replace", "10.77.1.0/24", "dev", "eth1", "proto", "kernel", "scope",
        "link", "src", "10.77.1.2", "congctl", "cubic", "quickack", "1"]
    data = dataclasses.asdict(state)
    assert ClusterState.from_dict(data).quickack is True
    del data["quickack"]
    assert ClusterState.from_dict(data).quickack is False


def test_congestion_control_is_pinned_on_every_route_a_node_can_take() -> None:
    """Linux's default (cubic) unless told otherwise, on the rail subnets and on the
    local table's routes (own addresses, loopback) that connections inside a node take."""
    from topocoll.topology.cluster import node_routes

    state = plan_cluster([3, 5], rails=2)
    assert state.congestion_control == "cubic"
    routes = node_routes(state, state.nodes[0])
    assert all(route[-2:] == ["congctl", "cubic"] for route in routes), routes
    destinations = [route[route.index("dev") - 1] for route in routes]
    assert destinations == ["10.77.0.0/24", "10.77.1.0/24", "10.77.0.1", "10.77.1.1",
                            "127.0.0.0/8", "127.0.0.1"]
    local = [route for route in routes if "local" in route]
    assert len(local) == 4 and all(route[2:5] == ["table", "local", "local"]
                                   for route in local)
    reno = node_routes(plan_cluster([2, 2], congestion_control="reno"),
                       plan_cluster([2, 2]).nodes[1])
    assert {tuple(route[-2:]) for route in reno} == {("congctl", "reno")}


def test_host_congestion_control_leaves_the_routes_alone() -> None:
    from topocoll.topology.cluster import node_routes

    state = plan_cluster([2, 2], rails=2, congestion_control="host")
    assert node_routes(state, state.nodes[0]) == []
    quick = plan_cluster([2, 2], rails=2, congestion_control="host", quickack=True)
    routes = node_routes(quick, quick.nodes[0])
    assert len(routes) == 2 and all("congctl" not in route and route[-2:] == ["quickack", "1"]
                                    for route in routes), routes


def test_state_written_before_the_congestion_control_field_says_it_was_the_hosts() -> None:
    data = dataclasses.asdict(plan_cluster([2, 2], congestion_control="reno"))
    assert ClusterState.from_dict(data).congestion_control == "reno"
    del data["congestion_control"]
    assert ClusterState.from_dict(data).congestion_control == "host"


@pytest.mark.parametrize("name", ["", "Cubic", "cubic 1", "cubic;reboot", "1x"])
def test_a_congestion_control_that_is_not_a_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="congestion control"):
        plan_cluster([2, 2], congestion_control=name)


def test_an_algorithm_the_kernel_lacks_is_refused_before_anything_is_made() -> None:
    from topocoll.topology.cluster import ClusterError, check_congestion_control

    check_congestion_control("cubic", ["reno", "cubic"])
    check_congestion_control("host", [])
    with pytest.raises(ClusterError, match=r"'dctcp' is not available.*reno cubic.*'host'"):
        check_congestion_control("dctcp", ["reno", "cubic"])
