"""The topology model and its declarations: layouts, hosts, rails, levels, spec strings."""

from __future__ import annotations

import json

import pytest

from topocoll.topology import (
    ENV_VAR,
    INTER,
    INTRA,
    PRESETS,
    SELF,
    Level,
    Topology,
    TopologySpecError,
    parse_layout,
    parse_topology,
    topology_from_env,
)


# ----- construction -------------------------------------------------------------------
def test_from_layout_consecutive_ranks():
    t = Topology.from_layout([2, 3])
    assert t.node_of == (0, 0, 1, 1, 1)
    assert t.world_size == 5
    assert t.num_nodes == 2
    assert t.nodes == ((0, 1), (2, 3, 4))
    assert t.layout == (2, 3)
    assert t.local_rank_of == (0, 1, 0, 1, 2)
    assert not t.is_uniform
    assert t.nodes_are_contiguous
    assert t.rails == 1
    assert t.hostnames == ()
    assert t.node_ranks(3) == (2, 3, 4)
    assert t.node_ranks(0) == (0, 1)


def test_from_hosts_non_contiguous_nodes():
    t = Topology.from_hosts(["a", "b", "a", "b"])
    assert t.node_of == (0, 1, 0, 1)
    assert t.nodes == ((0, 2), (1, 3))
    assert t.hostnames == ("a", "b")
    assert t.local_rank_of == (0, 0, 1, 1)
    assert t.layout == (2, 2)
    assert t.is_uniform
    assert not t.nodes_are_contiguous
    assert t.node_ranks(2) == (0, 2)


def test_from_hosts_first_seen_order_and_uneven():
    t = Topology.from_hosts(["z", "y", "y", "z", "x", "y"])
    assert t.hostnames == ("z", "y", "x")
    assert t.node_of == (0, 1, 1, 0, 2, 1)
    assert t.nodes == ((0, 3), (1, 2, 5), (4,))
    assert t.local_rank_of == (0, 0, 1, 1, 0, 2)
    assert t.layout == (2, 3, 1)


def test_single_node():
    t = Topology.single_node(4)
    assert t == Topology.from_layout([4])
    assert t.num_nodes == 1
    assert t.local_rank_of == (0, 1, 2, 3)


@pytest.mark.parametrize(("rails", "expected"), [
    (1, (0, 0, 0, 0, 0, 0, 0)),
    (2, (0, 1, 0, 0, 1, 0, 1)),
    (3, (0, 1, 2, 0, 1, 2, 0)),
    (8, (0, 1, 2, 0, 1, 2, 3)),
])
def test_rail_of_is_local_rank_mod_rails(rails, expected):
    t = Topology.from_layout([3, 4], rails=rails)
    assert tuple(t.rail_of(r) for r in range(7)) == expected


def test_rails_follow_local_ranks_of_non_contiguous_nodes():
    t = Topology.from_hosts(list("abab"), rails=2)
    assert [t.rail_of(r) for r in range(4)] == [0, 0, 1, 1]


def test_level():
    t = Topology.from_hosts(list("abab"), rails=2)
    assert t.level(1, 1) == Level(SELF)
    assert t.level(0, 2) == Level(INTRA)
    assert t.level(3, 1) == Level(INTRA)
    assert t.level(0, 1) == Level(INTER, 0)
    assert t.level(2, 1) == Level(INTER, 1)  # the sender's rail
    assert t.level(1, 2) == Level(INTER, 0)
    assert t.level(3, 0) == Level(INTER, 1)


def test_level_on_one_node_never_inter():
    t = Topology.from_layout([5], rails=2)
    kinds = {t.level(a, b).kind for a in range(5) for b in range(5)}
    assert kinds == {SELF, INTRA}


def test_level_str_and_parse():
    assert str(Level(SELF)) == "self"
    assert str(Level(INTRA)) == "intra"
    assert str(Level(INTER, 3)) == "inter/3"
    assert str(Level(INTER)) == "inter"
    for text in ("self", "intra", "inter", "inter/0", "inter/7"):
        assert str(Level.parse(text)) == text
    with pytest.raises(ValueError, match="unknown topology level"):
        Level.parse("cross")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"node_of": ()}, "at least one rank"),
    ({"node_of": (0, -1)}, "negative node index"),
    ({"node_of": (0, 2)}, r"node indices must be 0..N-1, got \[0, 2\]"),
    ({"node_of": (0, 1), "rails": 0}, "rails must be >= 1"),
    ({"node_of": (0, 1), "hostnames": ("a",)}, "1 hostnames given for 2 nodes"),
])
def test_invalid_topologies(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Topology(**kwargs)


@pytest.mark.parametrize("layout", [[], [2, 0], [-1]])
def test_from_layout_rejects_empty_nodes(layout):
    with pytest.raises(ValueError, match="positive ranks per node"):
        Topology.from_layout(layout)


# ----- identity -----------------------------------------------------------------------
def test_fingerprint_is_stable():
    a, b = Topology.from_layout([2, 2]), Topology.from_layout((2, 2))
    assert a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 16 and int(a.fingerprint, 16) >= 0
    # pinned: tuning tables are keyed by it, so it must not drift between releases
    assert a.fingerprint == "864ed7e9ebcc0e4f"


def test_fingerprint_ignores_hostnames_only():
    layout = Topology.from_layout([2, 2])
    hosts = Topology.from_hosts(["n1", "n1", "n2", "n2"])
    other_hosts = Topology.from_hosts(["x", "x", "y", "y"])
    assert layout.fingerprint == hosts.fingerprint == other_hosts.fingerprint
    assert hosts != other_hosts  # but the topologies themselves differ


def test_fingerprint_differs_for_different_shapes():
    shapes = [
        Topology.from_layout([4]),
        Topology.from_layout([2, 2]),
        Topology.from_layout([1, 3]),
        Topology.from_layout([3, 1]),
        Topology.from_layout([1, 1, 1, 1]),
        Topology.from_layout([2, 2], rails=2),
        Topology.from_hosts(list("abab")),
        Topology.from_layout([2, 2], inter_link="rdma"),
        Topology.from_layout([2, 2], intra_link="nvlink"),
        Topology.from_layout([2, 3]),
    ]
    prints = [t.fingerprint for t in shapes]
    assert len(set(prints)) == len(prints)


@pytest.mark.parametrize("topology", [
    Topology.from_layout([2, 3]),
    Topology.from_layout([4, 4], rails=2, intra_link="nvlink", inter_link="rdma"),
    Topology.from_hosts(list("abcab"), rails=3),
    Topology.from_layout([1]),
], ids=lambda t: t.describe())
def test_to_dict_from_dict_round_trip(topology):
    data = topology.to_dict()
    assert Topology.from_dict(json.loads(json.dumps(data))) == topology
    assert Topology.from_dict(data).fingerprint == topology.fingerprint
    assert data["layout"] == list(topology.layout)
    assert data["node_of"] == list(topology.node_of)
    assert data["rails"] == topology.rails


def test_from_dict_with_layout_only_and_defaults():
    t = Topology.from_dict({"layout": [3, 1]})
    assert t == Topology.from_layout([3, 1])
    assert (t.rails, t.intra_link, t.inter_link) == (1, "shm", "tcp")
    with pytest.raises(ValueError, match="needs 'node_of' or 'layout'"):
        Topology.from_dict({"rails": 2})


def test_describe():
    t = Topology.from_layout([3, 5], rails=2)
    assert t.describe() == "8 ranks on 2 node(s) [3+5], 2 rail(s), intra=shm, inter=tcp"


# ----- spec strings -------------------------------------------------------------------
@pytest.mark.parametrize(("text", "layout"), [
    ("2,3", (2, 3)), ("2+3", (2, 3)), ("2x4", (4, 4)), ("1x1", (1,)), ("4", (4,)),
    (" 2 , 3 ", (2, 3)), ("1+1+1", (1, 1, 1)),
])
def test_parse_layout(text, layout):
    assert parse_layout(text) == layout


@pytest.mark.parametrize(("text", "node_of", "rails"), [
    ("2,3", (0, 0, 1, 1, 1), 1),
    ("2+3", (0, 0, 1, 1, 1), 1),
    ("2x4", (0, 0, 0, 0, 1, 1, 1, 1), 1),
    ("2x4:rails=2", (0, 0, 0, 0, 1, 1, 1, 1), 2),
    ("3:rails=4", (0, 0, 0), 4),
    ("hosts=a,a,b", (0, 0, 1), 1),
    ("hosts=a,b,a,b", (0, 1, 0, 1), 1),
    ("hosts=a,b,a,b:rails=2", (0, 1, 0, 1), 2),
])
def test_parse_topology_forms(text, node_of, rails):
    t = parse_topology(text)
    assert t.node_of == node_of
    assert t.rails == rails
    assert parse_topology(text, world_size=len(node_of)) == t


def test_parse_topology_hosts_keeps_hostnames():
    t = parse_topology("hosts=gpu1, gpu1, gpu2")
    assert t.hostnames == ("gpu1", "gpu2")


def test_parse_topology_json_file(tmp_path):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"layout": [2, 3], "rails": 2, "hostnames": ["x", "y"],
                                "inter_link": "rdma"}))
    t = parse_topology(str(path))
    assert t.node_of == (0, 0, 1, 1, 1)
    assert t.rails == 2
    assert t.hostnames == ("x", "y")
    assert t.inter_link == "rdma"
    assert parse_topology(f"{path}:rails=3").rails == 3


def test_parse_topology_json_file_with_node_of(tmp_path):
    path = tmp_path / "topo.json"
    path.write_text(json.dumps(Topology.from_hosts(list("abab"), rails=2).to_dict()))
    assert parse_topology(str(path)) == Topology.from_hosts(list("abab"), rails=2)


def test_parse_topology_file_without_json_suffix(tmp_path):
    path = tmp_path / "cluster.topo"
    path.write_text('{"node_of": [0, 1, 1]}')
    assert parse_topology(str(path)).node_of == (0, 1, 1)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parse_topology_presets(name):
    preset = PRESETS[name]
    t = parse_topology(name)
    assert t == preset.topology()
    assert t.layout == (preset.ranks_per_node,) * preset.nodes
    assert t.rails == preset.rails
    assert (t.intra_link, t.inter_link) == (preset.intra_link, preset.inter_link)
    assert preset.topology(nodes=3).num_nodes == 3
    assert preset.intra.bandwidth_gbs > 0 and preset.inter.alpha_us > 0
    overridden = parse_topology(f"{name}:rails=1")
    assert overridden.rails == 1
    assert overridden.node_of == t.node_of
    assert (overridden.intra_link, overridden.inter_link) == (t.intra_link, t.inter_link)


def test_presets_include_the_documented_shapes():
    assert {"8x-nvlink-400g", "emulated-2x4-1gbit"} <= set(PRESETS)
    assert parse_topology("emulated-2x4-1gbit").layout == (4, 4)


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty layout"),
    ("   ", "empty layout"),
    (",", "empty layout"),
    ("0,2", "every node needs at least one rank"),
    ("2,-1", "every node needs at least one rank"),
    ("abc", "expected ranks per node like '2,3' or '2x4'"),
    ("2,three", "expected ranks per node"),
    ("2x0", "nodes and ranks must be >= 1"),
    ("0x4", "nodes and ranks must be >= 1"),
    ("2x4:rails=two", "rails must be an integer"),
    ("/nonexistent/dir/cluster.json", "does not exist"),
    ("missing.json", "does not exist"),
])
def test_parse_topology_errors(text, message):
    with pytest.raises(TopologySpecError, match=message):
        parse_topology(text)


@pytest.mark.parametrize("text", ["hosts=", "2x4:rails=0", "2x4:rails="])
def test_parse_topology_errors_are_spec_errors(text):
    with pytest.raises(TopologySpecError):
        parse_topology(text)


def test_topology_spec_error_is_a_value_error():
    assert issubclass(TopologySpecError, ValueError)


def test_parse_topology_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{layout: [2, 3")
    with pytest.raises(TopologySpecError, match=r"broken.json is not valid JSON"):
        parse_topology(str(path))


@pytest.mark.parametrize(("content", "message"), [
    ("[2, 3]", "expected a JSON object"),
    ('{"rails": 2}', "needs 'node_of' or 'layout'"),
    ('{"node_of": [0, 2]}', "node indices must be 0..N-1"),
    ('{"layout": [2, 0]}', "positive ranks per node"),
    ('{"layout": [2], "rails": 0}', "rails must be >= 1"),
])
def test_parse_topology_bad_file_content(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TopologySpecError, match=message) as info:
        parse_topology(str(path))
    assert "bad.json" in str(info.value)


@pytest.mark.parametrize(("text", "declared"), [("2x4", 8), ("2,3", 5), ("hosts=a,b", 2),
                                                ("8x-nvlink-400g", 16)])
def test_parse_topology_world_size_mismatch(text, declared):
    with pytest.raises(TopologySpecError,
                       match=f"declares {declared} ranks but the job has {declared + 1}"):
        parse_topology(text, world_size=declared + 1)


def test_parse_topology_world_size_mismatch_for_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"layout": [2, 2]}')
    assert parse_topology(str(path), world_size=4).world_size == 4
    with pytest.raises(TopologySpecError, match="declares 4 ranks but the job has 3"):
        parse_topology(str(path), world_size=3)


# ----- environment --------------------------------------------------------------------
def test_env_var_name():
    assert ENV_VAR == "TOPOCOLL_TOPOLOGY"


@pytest.mark.parametrize("value", [None, "", "   "])
def test_topology_from_env_unset(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, value)
    assert topology_from_env() is None
    assert topology_from_env(world_size=4) is None


def test_topology_from_env_set(monkeypatch):
    monkeypatch.setenv("TOPOCOLL_TOPOLOGY", "2x4:rails=2")
    t = topology_from_env(world_size=8)
    assert t == Topology.from_layout([4, 4], rails=2)
    monkeypatch.setenv("TOPOCOLL_TOPOLOGY", " hosts=a,b,a,b ")
    assert topology_from_env().node_of == (0, 1, 0, 1)
    monkeypatch.setenv("TOPOCOLL_TOPOLOGY", "emulated-2x4-1gbit")
    assert topology_from_env(8) == PRESETS["emulated-2x4-1gbit"].topology()


def test_topology_from_env_file(monkeypatch, tmp_path):
    path = tmp_path / "env.json"
    path.write_text('{"node_of": [0, 0, 1]}')
    monkeypatch.setenv(ENV_VAR, str(path))
    assert topology_from_env(3).node_of == (0, 0, 1)


def test_topology_from_env_errors(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "2x4")
    with pytest.raises(TopologySpecError, match="declares 8 ranks but the job has 6"):
        topology_from_env(world_size=6)
    monkeypatch.setenv(ENV_VAR, "abc")
    with pytest.raises(TopologySpecError, match="expected ranks per node"):
        topology_from_env()
