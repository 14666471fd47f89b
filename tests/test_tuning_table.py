"""The decision table and the profile on disk: round trips, lookups, and refusing bad files.

A job loads its tuning table at init from a path given in the environment: the file may
be stale, foreign, truncated or hand-edited. `load_tuning` must refuse every bad file with
a `TuningError` that names the file and the field, and `load_for_job` must never raise
(a warning, then the model or the built-in defaults). Profiles get the same treatment.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from topocoll.comm.algorithms import algorithm_names
from topocoll.comm.selection import RememberedChoices, choose, default_choice
from topocoll.comm.tuner import TUNABLE, build_table
from topocoll.comm.tuning import (
    ENV_FILE,
    MAX_RANGES,
    ForeignTableError,
    ModelSelector,
    TuningError,
    TuningTable,
    load_for_job,
    load_tuning,
    table_from_dict,
)
from topocoll.topology import PRESETS, Topology
from topocoll.topology.profile import (
    LinkProfile,
    Profile,
    ProfileError,
    from_preset,
    load_profile,
    profile_from_dict,
)

PRESET = PRESETS["emulated-2x4-1gbit"]
MAX_BUCKET = 20  # 1 MiB: enough buckets to cover every switch point, fast to build
TRANSPORT = "gloo"


@pytest.fixture(scope="module")
def table() -> TuningTable:
    return build_table(PRESET.topology(), TRANSPORT, "shm", from_preset(PRESET),
                       max_bucket=MAX_BUCKET)


@pytest.fixture(scope="module")
def good_dict(table: TuningTable) -> dict[str, Any]:
    return json.loads(json.dumps(table.to_dict()))


@pytest.fixture
def good_file(table: TuningTable, tmp_path: Path) -> Path:
    path = tmp_path / "tuning.json"
    table.save(path)
    return path


def probe_sizes() -> list[int]:
    """Every power of two, its neighbours and the point halfway, past the last bucket."""
    sizes = {0, 1}
    for k in range(1, MAX_BUCKET + 4):
        sizes |= {(1 << k) - 1, 1 << k, (1 << k) + 1, 3 << (k - 1)}
    return sorted(sizes)


# ----- round trip ------------------------------------------------------------------------
@pytest.mark.parametrize("collective", TUNABLE)
def test_round_trip_keeps_every_decision(table: TuningTable, collective: str) -> None:
    again = table_from_dict(json.loads(json.dumps(table.to_dict())), "round-trip")
    before = {n: table.lookup(collective, n) for n in probe_sizes()}
    after = {n: again.lookup(collective, n) for n in probe_sizes()}
    assert after == before, f"{collective}: lookups changed by to_dict -> JSON -> from_dict"
    assert again.fingerprint == table.fingerprint
    assert again.collectives[collective].fallback == table.collectives[collective].fallback


def test_round_trip_is_a_fixed_point(table: TuningTable, tmp_path: Path) -> None:
    """Saved, loaded and saved again: the same content (costs are rounded once, on save).

    Only the embedded profile's `source` differs: loading names the file it was read
    from there (the original provenance, e.g. "preset ...", is not kept)."""
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    table.save(first)
    load_tuning(first).save(second)
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert b["profile"].pop("source") == f"{first} (field 'profile')"
    a["profile"].pop("source")
    assert a == b


def test_table_covers_every_size_once(table: TuningTable) -> None:
    for name, coll in table.collectives.items():
        spans = [(r.lo, r.hi) for r in coll.ranges]
        assert spans[0][0] == 0 and spans[-1][1] is None, f"{name}: {spans[:2]}...{spans[-1:]}"
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), f"{name}: gaps {spans}"


# ----- lookups ---------------------------------------------------------------------------
TOPO = Topology.from_layout([2, 2])


def make_dict(ranges: list[tuple[int, int | None, str]], fallback: str = "ring",
              topology: Topology = TOPO, transport: str = TRANSPORT,
              profile: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "schema": "topocoll.tuning", "version": 1, "created": "",
        "fingerprint": topology.fingerprint, "topology": topology.to_dict(),
        "transport": transport, "intra": "shm", "profile": profile,
        "collectives": {"all_reduce": {"fallback": fallback, "ranges": [
            {"lo": lo, "hi": hi, "algorithm": algo, "source": "model",
             "candidates": {algo: {"predicted_us": 1.0, "measured_us": None}}}
            for lo, hi, algo in ranges]}},
    }


OPEN_ENDED = make_dict([(0, 100, "recursive_doubling"), (100, 4096, "rabenseifner"),
                        (4096, None, "ring")])
BOUNDED = make_dict([(0, 100, "recursive_doubling"), (100, 4096, "rabenseifner")],
                    fallback="hierarchical")


@pytest.mark.parametrize(("data", "nbytes", "want"), [
    (OPEN_ENDED, 0, "recursive_doubling"),
    (OPEN_ENDED, 50, "recursive_doubling"),
    (OPEN_ENDED, 99, "recursive_doubling"),
    (OPEN_ENDED, 100, "rabenseifner"),
    (OPEN_ENDED, 4095, "rabenseifner"),
    (OPEN_ENDED, 4096, "ring"),
    (OPEN_ENDED, 1 << 40, "ring"),
    (BOUNDED, 4095, "rabenseifner"),
    (BOUNDED, 4096, "hierarchical"),
    (BOUNDED, 1 << 40, "hierarchical"),
], ids=["open-0", "open-inside-first", "open-last-of-first", "open-lo-of-second",
        "open-last-of-second", "open-lo-of-last", "open-beyond", "bounded-last-byte",
        "bounded-hi-is-exclusive", "bounded-beyond"])
def test_lookup_uses_half_open_ranges(data: dict, nbytes: int, want: str) -> None:
    t = table_from_dict(copy.deepcopy(data))
    assert t.lookup("all_reduce", nbytes) == want, f"{nbytes} bytes"


class CountingTable:
    """A table that always answers `algorithm` and counts how often it was asked."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm, self.asked = algorithm, 0

    def lookup(self, collective: str, nbytes: int) -> str:
        self.asked += 1
        return self.algorithm


def test_user_override_beats_the_table(monkeypatch) -> None:
    topo = Topology.from_layout([4, 4])
    table = CountingTable("bruck")
    assert choose("all_to_all", 2048, topo, table).algorithm == "bruck"
    monkeypatch.setenv("TOPOCOLL_ALGO_ALL_TO_ALL", "pairwise")
    got = choose("all_to_all", 2048, topo, table)
    assert (got.algorithm, got.reason) == ("pairwise", "forced by TOPOCOLL_ALGO_ALL_TO_ALL")
    monkeypatch.setenv("TOPOCOLL_ALGO_ALL_TO_ALL", "nope")
    with pytest.raises(ValueError, match="'nope' is not an algorithm for all_to_all"):
        choose("all_to_all", 2048, topo, table)


def test_choices_are_remembered_per_call_shape_and_forgotten_with_the_table(
        monkeypatch) -> None:
    """The tuned path asks the table (and the environment) once per collective and byte
    count; a new table is asked again; a bad override is refused on every call."""
    remembered = RememberedChoices(Topology.from_layout([4, 4]))
    first = CountingTable("bruck")
    for _ in range(3):
        assert remembered("all_to_all", 2048, first).algorithm == "bruck"
    assert first.asked == 1
    assert remembered("all_to_all", 4096, first).algorithm == "bruck"
    assert remembered("all_to_all_v", 2048, first).algorithm == "bruck"
    assert first.asked == 3
    second = CountingTable("pairwise")
    assert remembered("all_to_all", 2048, second).algorithm == "pairwise"
    assert second.asked == 1
    monkeypatch.setenv("TOPOCOLL_ALGO_ALL_REDUCE", "ring")
    assert remembered("all_reduce", 2048, second).algorithm == "ring"
    monkeypatch.setenv("TOPOCOLL_ALGO_ALL_REDUCE", "nope")
    for _ in range(2):
        with pytest.raises(ValueError, match="not an algorithm for all_reduce"):
            remembered("all_reduce", 8192, second)
    assert remembered("all_to_all", 2048, None).algorithm == default_choice(
        "all_to_all", 2048, Topology.from_layout([4, 4])).algorithm


def test_lookup_beyond_a_bounded_table_explains_nothing() -> None:
    t = table_from_dict(copy.deepcopy(BOUNDED))
    assert t.explain("all_reduce", 4096) is None
    assert t.explain("all_reduce", 100).algorithm == "rabenseifner"


def test_lookup_of_an_untuned_collective_has_no_opinion() -> None:
    t = table_from_dict(copy.deepcopy(OPEN_ENDED))
    assert t.lookup("all_to_all", 1024) is None
    assert t.explain("all_to_all", 1024) is None


# ----- foreign tables --------------------------------------------------------------------
def test_another_topology_is_refused_naming_both_fingerprints(table: TuningTable) -> None:
    other = Topology.from_layout([4, 4], rails=2)
    with pytest.raises(ForeignTableError) as info:
        table.check_applies(other, TRANSPORT)
    assert table.fingerprint in str(info.value) and other.fingerprint in str(info.value)


def test_another_transport_is_refused_naming_both(table: TuningTable) -> None:
    with pytest.raises(ForeignTableError) as info:
        table.check_applies(table.topology, "mpi")
    assert "'mpi'" in str(info.value) and f"'{TRANSPORT}'" in str(info.value)


@pytest.mark.parametrize("transport", [TRANSPORT, ""], ids=["same", "unknown"])
def test_own_topology_and_transport_apply(table: TuningTable, transport: str) -> None:
    table.check_applies(PRESET.topology(), transport)


# ----- what a job gets -------------------------------------------------------------------
@pytest.fixture
def caplog_warn(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="topocoll")
    return caplog


def test_no_file_configured_means_defaults(monkeypatch: pytest.MonkeyPatch,
                                           caplog_warn: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(ENV_FILE, raising=False)
    assert load_for_job(PRESET.topology(), TRANSPORT) is None
    assert not caplog_warn.records


def test_a_good_file_from_the_environment(good_file: Path, table: TuningTable,
                                          monkeypatch: pytest.MonkeyPatch,
                                          caplog_warn: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(ENV_FILE, str(good_file))
    got = load_for_job(PRESET.topology(), TRANSPORT)
    assert isinstance(got, TuningTable)
    assert {n: got.lookup("all_reduce", n) for n in probe_sizes()} == \
        {n: table.lookup("all_reduce", n) for n in probe_sizes()}
    assert not caplog_warn.records, [r.getMessage() for r in caplog_warn.records]


@pytest.mark.parametrize(("topology", "transport"), [
    (Topology.from_layout([3, 5]), TRANSPORT),
    (PRESET.topology(), "mpi"),
], ids=["other-topology", "other-transport"])
def test_a_foreign_table_with_figures_chooses_with_the_model(
        good_file: Path, table: TuningTable, topology: Topology, transport: str,
        caplog_warn: pytest.LogCaptureFixture) -> None:
    got = load_for_job(topology, transport, str(good_file))
    assert isinstance(got, ModelSelector), got
    assert got.topology == topology
    messages = " ".join(r.getMessage() for r in caplog_warn.records)
    assert str(good_file) in messages and "cost model" in messages, messages
    for collective in TUNABLE:
        picked = got.lookup(collective, 1 << 16)
        assert picked in algorithm_names(collective), f"{collective}: {picked}"


def test_a_foreign_table_without_figures_falls_back_to_defaults(
        tmp_path: Path, good_dict: dict, caplog_warn: pytest.LogCaptureFixture) -> None:
    data = copy.deepcopy(good_dict)
    data["profile"] = None
    path = tmp_path / "no-profile.json"
    path.write_text(json.dumps(data))
    other = Topology.from_layout([3, 5])
    assert load_for_job(other, TRANSPORT, str(path)) is None
    messages = " ".join(r.getMessage() for r in caplog_warn.records)
    assert other.fingerprint in messages and "built-in defaults" in messages, messages


def test_foreign_figures_that_cannot_price_this_job_fall_back_per_call(
        tmp_path: Path, caplog_warn: pytest.LogCaptureFixture) -> None:
    """A one-node table knows only the intra-node link: on a two-node job its figures
    cannot price anything. Every call must then get the built-in default (a ModelSelector
    that raised would make the communicator refuse every collective)."""
    one_node = Topology.from_layout([4])
    figures = Profile(links={"intra": LinkProfile(2.0, 1e-4, 1e-4)}, reduce_us_per_byte=1e-4,
                      copy_us_per_byte=1e-4, overhead_us=1.0, topology=one_node)
    path = tmp_path / "one-node.json"
    build_table(one_node, TRANSPORT, "shm", figures, ("all_reduce",), max_bucket=4).save(path)
    job = Topology.from_layout([2, 2])
    selector = load_for_job(job, TRANSPORT, str(path))
    assert isinstance(selector, ModelSelector)
    for collective in TUNABLE:
        assert selector.lookup(collective, 4096) is None, collective
        assert choose(collective, 4096, job, selector) == default_choice(collective, 4096, job)
    warned = [r.getMessage() for r in caplog_warn.records if "cannot price" in r.getMessage()]
    assert len(warned) == len(TUNABLE), warned
    assert "inter/0" in warned[0], warned[0]


# ----- bad tuning files ------------------------------------------------------------------
Mutation = Callable[[dict[str, Any], str], "str | bytes | None"]


def _edit(change: Callable[[dict[str, Any]], None]) -> Mutation:
    def mutate(data: dict[str, Any], _text: str) -> str:
        data = copy.deepcopy(data)
        change(data)
        return json.dumps(data)
    return mutate


def _setter(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set a dotted path (list indices as numbers): `collectives.all_reduce.fallback`."""
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return change


def _first_candidate(data: dict[str, Any]) -> str:
    return next(iter(data["collectives"]["all_reduce"]["ranges"][0]["candidates"]))


def _negative_cost(data: dict[str, Any]) -> None:
    first = data["collectives"]["all_reduce"]["ranges"][0]
    first["candidates"]["ring"] = {"predicted_us": -3.0, "measured_us": None}


def _gap(data: dict[str, Any]) -> None:
    data["collectives"]["all_reduce"]["ranges"][1]["lo"] += 1


def _huge(data: dict[str, Any]) -> None:
    data["collectives"]["all_reduce"]["ranges"] = [
        {"lo": i, "hi": i + 1, "algorithm": "ring", "source": "model", "candidates": {}}
        for i in range(MAX_RANGES + 1)] + [
        {"lo": MAX_RANGES + 1, "hi": None, "algorithm": "ring", "source": "model"}]


def _edit_fingerprint(data: dict[str, Any]) -> None:
    data["fingerprint"] = "0" * 16


def _nan_cost(_data: dict[str, Any], text: str) -> str:
    # json.loads turns the bare literal NaN into float('nan'): it must not pass as a cost.
    return re.sub(r'"predicted_us": [0-9.e+-]+', '"predicted_us": NaN', text, count=1)


def _infinite_hi(_data: dict[str, Any], text: str) -> str:
    return re.sub(r'"hi": [0-9]+', '"hi": Infinity', text, count=1)


def _huge_integer(_data: dict[str, Any], text: str) -> str:
    # Python refuses to parse integers of more than 4300 digits (a ValueError of its own).
    return re.sub(r'"hi": [0-9]+', '"hi": ' + "9" * 5000, text, count=1)


BAD_TABLES: list[tuple[str, Mutation, list[str]]] = [
    ("corrupted-json", lambda d, t: t[:40] + "}{:" + t[43:], ["not valid JSON"]),
    ("truncated", lambda d, t: t[: len(t) // 2], ["not valid JSON"]),
    ("empty", lambda d, t: "", ["not valid JSON"]),
    ("not-utf8", lambda d, t: b"\xff\xfe" + t.encode()[:50], ["not text"]),
    ("deeply-nested", lambda d, t: "[" * 100_000 + "]" * 100_000, ["not valid JSON"]),
    ("huge-integer", _huge_integer, ["not valid JSON"]),
    ("top-level-list", lambda d, t: "[1, 2]", ["top level"]),
    ("wrong-schema", _edit(_setter("schema", "topocoll.profile")), ["'schema'"]),
    ("wrong-version", _edit(_setter("version", 2)), ["'version'", "2"]),
    ("version-as-string", _edit(_setter("version", "1")), ["'version'"]),
    ("fingerprint-edited", _edit(_edit_fingerprint), ["'fingerprint'"]),
    ("topology-invalid", _edit(_setter("topology.node_of", [0, 2])), ["'topology'"]),
    ("topology-infinite", _edit(_setter("topology.node_of", [float("inf")])),
     ["'topology'"]),
    ("transport-not-string", _edit(_setter("transport", 3)), ["'transport'"]),
    ("unknown-collective", _edit(_setter("collectives.all_reduce_fast", {})),
     ["'collectives.all_reduce_fast'"]),
    ("no-collectives", _edit(_setter("collectives", {})), ["'collectives'"]),
    ("ranges-not-contiguous", _edit(_gap), ["'collectives.all_reduce.ranges[1].lo'"]),
    ("range-empty", _edit(_setter("collectives.all_reduce.ranges.0.hi", 0)),
     ["'collectives.all_reduce.ranges[0].hi'"]),
    ("range-infinite-hi", _infinite_hi, ["ranges[0].hi'"]),
    ("ranges-empty", _edit(_setter("collectives.all_reduce.ranges", [])),
     ["'collectives.all_reduce.ranges'"]),
    ("ranges-huge", _edit(_huge), ["'collectives.all_reduce.ranges'", str(MAX_RANGES)]),
    ("unknown-algorithm", _edit(_setter("collectives.all_reduce.ranges.0.algorithm",
                                        "warp_drive")),
     ["'collectives.all_reduce.ranges[0].algorithm'", "warp_drive"]),
    ("algorithm-of-another-collective",
     _edit(_setter("collectives.all_reduce.ranges.0.algorithm", "bruck")),
     ["'collectives.all_reduce.ranges[0].algorithm'"]),
    ("algorithm-not-string", _edit(_setter("collectives.all_reduce.ranges.0.algorithm",
                                           ["ring"])),
     ["'collectives.all_reduce.ranges[0].algorithm'"]),
    ("unknown-fallback", _edit(_setter("collectives.all_to_all.fallback", "ring")),
     ["'collectives.all_to_all.fallback'"]),
    ("fallback-not-string", _edit(_setter("collectives.all_reduce.fallback", {"a": 1})),
     ["'collectives.all_reduce.fallback'"]),
    ("negative-cost", _edit(_negative_cost),
     ["'collectives.all_reduce.ranges[0].candidates.ring.predicted_us'"]),
    ("nan-cost", _nan_cost, ["collectives.", "predicted_us'", "nan"]),
    ("cost-not-number", _edit(lambda d: _setter(
        f"collectives.all_reduce.ranges.0.candidates.{_first_candidate(d)}.measured_us",
        "fast")(d)), ["measured_us'"]),
    ("profile-negative-alpha", _edit(_setter("profile.links.inter.alpha_us", -1.0)),
     ["field 'profile'", "'links.inter.alpha_us'"]),
]


@pytest.mark.parametrize(("mutate", "fragments"), [(m, f) for _, m, f in BAD_TABLES],
                         ids=[name for name, _, _ in BAD_TABLES])
def test_a_bad_table_is_refused_naming_file_and_field(
        tmp_path: Path, good_dict: dict, table: TuningTable, mutate: Mutation,
        fragments: list[str], caplog_warn: pytest.LogCaptureFixture) -> None:
    text = json.dumps(table.to_dict(), indent=1, sort_keys=True)
    content = mutate(good_dict, text)
    path = tmp_path / "bad-tuning.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(TuningError) as info:
        load_tuning(path)
    message = str(info.value)
    assert str(path) in message, f"the file is not named: {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message[:300]}"
    assert load_for_job(table.topology, TRANSPORT, str(path)) is None
    warned = " ".join(r.getMessage() for r in caplog_warn.records)
    assert str(path) in warned and "built-in defaults" in warned, warned[:300]


@pytest.mark.parametrize("kind", ["directory", "missing"])
def test_an_unreadable_path_is_refused(tmp_path: Path, kind: str,
                                       caplog_warn: pytest.LogCaptureFixture) -> None:
    path = tmp_path if kind == "directory" else tmp_path / "does-not-exist.json"
    with pytest.raises(TuningError, match="cannot read") as info:
        load_tuning(path)
    assert str(path) in str(info.value)
    assert load_for_job(PRESET.topology(), TRANSPORT, str(path)) is None
    assert any(str(path) in r.getMessage() for r in caplog_warn.records)


# ----- profiles --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def profile_dict() -> dict[str, Any]:
    return json.loads(json.dumps(from_preset(PRESETS["8x-nvlink-400g"]).to_dict()))


def test_profile_round_trip(tmp_path: Path) -> None:
    profile = from_preset(PRESETS["8x-nvlink-400g"])
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = load_profile(path)
    assert isinstance(loaded, Profile)
    assert loaded.to_dict() == profile.to_dict()
    assert loaded.source == str(path)
    shaped = replace(profile, links={**profile.links, "inter": replace(
        profile.links["inter"], burst_bytes=262144.0)})
    shaped.save(path)
    assert load_profile(path).links["inter"].burst_bytes == 262144.0


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        del node[last]
    return change


BAD_PROFILES: list[tuple[str, Mutation, list[str]]] = [
    ("not-json", lambda d, t: t[: len(t) // 3], ["not valid JSON"]),
    ("not-utf8", lambda d, t: b"\x80\x81" + t.encode()[:20], ["not text"]),
    ("deeply-nested", lambda d, t: "{\"a\":" * 50_000 + "1" + "}" * 50_000,
     ["not valid JSON"]),
    ("top-level-list", lambda d, t: "[]", ["top level"]),
    ("wrong-schema", _edit(_setter("schema", "topocoll.tuning")), ["'schema'"]),
    ("wrong-version", _edit(_setter("version", 7)), ["'version'"]),
    ("missing-links", _edit(_drop("links")), ["missing field 'links'"]),
    ("empty-links", _edit(_setter("links", {})), ["'links'", "empty"]),
    ("links-a-list", _edit(_setter("links", [1])), ["'links'", "wrong type"]),
    ("missing-alpha", _edit(_drop("links.inter.alpha_us")), ["'links.inter.alpha_us'"]),
    ("missing-beta", _edit(_drop("links.intra.beta_us_per_byte")),
     ["'links.intra.beta_us_per_byte'"]),
    ("missing-compute", _edit(_drop("compute")), ["'compute'"]),
    ("missing-reduce", _edit(_drop("compute.reduce_us_per_byte")),
     ["'compute.reduce_us_per_byte'"]),
    ("missing-overhead", _edit(_drop("overhead_us")), ["'overhead_us'"]),
    ("negative-alpha", _edit(_setter("links.inter.alpha_us", -0.5)),
     ["'links.inter.alpha_us'", "-0.5"]),
    ("nan-alpha", lambda d, t: re.sub(r'"alpha_us": [0-9.e+-]+', '"alpha_us": NaN', t,
                                      count=1), ["alpha_us'", "nan"]),
    ("infinite-beta", _edit(_setter("links.inter.beta_us_per_byte", float("inf"))),
     ["'links.inter.beta_us_per_byte'"]),
    ("alpha-a-string", _edit(_setter("links.inter.alpha_us", "5")),
     ["'links.inter.alpha_us'"]),
    ("alpha-a-bool", _edit(_setter("links.inter.alpha_us", True)),
     ["'links.inter.alpha_us'"]),
    ("link-not-object", _edit(_setter("links.inter", 5.0)), ["'links.inter'"]),
    ("flows-zero", _edit(_setter("links.intra.flows", 0)), ["'links.intra.flows'"]),
    ("r2-a-string", _edit(_setter("links.intra.r2", "good")), ["'links.intra.r2'"]),
    ("unknown-link-class", _edit(_setter("links.wifi", {"alpha_us": 1.0,
                                                        "beta_us_per_byte": 1.0})),
     ["unknown link class", "'wifi'"]),
    ("bad-rail", _edit(_setter("links.inter/x", {"alpha_us": 1.0, "beta_us_per_byte": 1.0})),
     ["unknown link class", "'inter/x'"]),
    ("compute-a-list", _edit(_setter("compute", [1.0])), ["'compute'"]),
    ("overhead-negative", _edit(_setter("overhead_us", -2)), ["'overhead_us'"]),
    ("samples-not-objects", _edit(_setter("samples", [1, 2])), ["'samples'"]),
    ("versions-a-list", _edit(_setter("versions", ["x"])), ["'versions'"]),
    ("burst-negative", _edit(_setter("links.inter.burst_bytes", -1)),
     ["'links.inter.burst_bytes'"]),
    ("topology-invalid", _edit(_setter("topology", {"rails": 1})), ["'topology'"]),
    ("topology-infinite", _edit(_setter("topology.node_of", [float("inf")])),
     ["'topology'"]),
]


@pytest.mark.parametrize(("mutate", "fragments"), [(m, f) for _, m, f in BAD_PROFILES],
                         ids=[name for name, _, _ in BAD_PROFILES])
def test_a_bad_profile_is_refused_naming_file_and_field(
        tmp_path: Path, profile_dict: dict, mutate: Mutation, fragments: list[str]) -> None:
    text = json.dumps(profile_dict, indent=1, sort_keys=True)
    content = mutate(profile_dict, text)
    path = tmp_path / "bad-profile.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message, f"the file is not named: {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message[:300]}"


@pytest.mark.parametrize("kind", ["directory", "missing"])
def test_an_unreadable_profile_path_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path if kind == "directory" else tmp_path / "nope.json"
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(path)


def test_profile_link_falls_back_per_rail_and_refuses_unknown_classes(
        profile_dict: dict) -> None:
    profile = profile_from_dict(profile_dict)
    assert profile.link("inter/3") == profile.links["inter"]
    only_intra = copy.deepcopy(profile_dict)
    del only_intra["links"]["inter"]
    with pytest.raises(ProfileError, match="no figures for link class 'inter/1'"):
        profile_from_dict(only_intra, "only-intra.json").link("inter/1")
