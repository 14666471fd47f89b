"""Fuzzing the loaders: whatever a tuning table or profile file holds, the only exception
that may escape is TuningError / ProfileError (which `load_for_job` turns into a warning).

(a) random edits of a valid table or profile, at a random depth: delete a key or item,
    replace a value by a random JSON value of another type, rename a key;
(b) random bytes and random text written to a file;
each bounded to a few seconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topocoll.comm.tuner import TUNABLE, build_table
from topocoll.comm.tuning import TuningError, TuningTable, load_tuning, table_from_dict
from topocoll.topology import PRESETS
from topocoll.topology.profile import (
    Machine,
    Profile,
    ProfileError,
    from_preset,
    load_profile,
    profile_from_dict,
)

PRESET = PRESETS["emulated-2x4-1gbit"]
SETTINGS = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

TABLE = json.loads(json.dumps(build_table(PRESET.topology(), "gloo", "shm",
                                          from_preset(PRESET), max_bucket=3).to_dict()))
PROFILE = json.loads(json.dumps(replace(from_preset(PRESETS["8x-nvlink-400g"]), machines=(
    Machine((0, 1, 2), 2), Machine((3,), 1))).to_dict()))

# JSON values as Python's json module reads them: NaN and +-Infinity included (it accepts
# the bare literals), big integers, nested containers.
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["ring", "pairwise", "all_reduce", "inter", "intra", "inter/1",
                              "topocoll.tuning", "topocoll.profile", "", "-1"]))
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a key or item inside `node` (not the root itself)."""
    items = node.items() if isinstance(node, dict) else (
        enumerate(node) if isinstance(node, list) else ())
    out = []
    for key, child in items:
        out.append((*prefix, key))
        out += _paths(child, (*prefix, key))
    return out


@st.composite
def mutated(draw: st.DrawFn, original: Any) -> tuple[Any, list[str]]:
    """A deep copy of `original` with 1-3 random edits; returns it and what was done.

    The depth is drawn first, then a path of that depth, so a shallow field such as a
    collective's `fallback` is hit as often as the many deep candidate costs.
    """
    data = json.loads(json.dumps(original))
    done: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        depth = draw(st.sampled_from(sorted({len(p) for p in paths})))
        path = draw(st.sampled_from([p for p in paths if len(p) == depth]))
        *parents, key = path
        node = data
        for k in parents:
            node = node[k]
        action = draw(st.sampled_from(["delete", "replace", "replace", "rename"]))
        if action == "delete":
            del node[key]
        elif action == "rename" and isinstance(node, dict):
            new_key = draw(st.text(max_size=8) | st.sampled_from(["ring", "inter/x", "lo"]))
            node[new_key] = node.pop(key)
        else:
            old = node[key]
            node[key] = draw(JSON_VALUES.filter(
                lambda v, old=old: _type_name(v) != _type_name(old)))
        done.append(f"{action} {'.'.join(map(str, path))}")
    return data, done


def _exercise_table(table: TuningTable) -> None:
    """An accepted table must also be usable: lookups and saving never raise."""
    for collective in TUNABLE:
        for nbytes in (0, 1, 4096, 1 << 30):
            picked = table.lookup(collective, nbytes)
            assert picked is None or isinstance(picked, str)
    json.dumps(table.to_dict())


@SETTINGS
@given(case=mutated(TABLE))
def test_mutated_table_is_accepted_or_refused_cleanly(case: tuple[Any, list[str]]) -> None:
    data, done = case
    try:
        table = table_from_dict(data, "fuzz.json")
    except TuningError as exc:
        assert "fuzz.json" in str(exc), (done, str(exc))
        return
    _exercise_table(table)


@SETTINGS
@given(case=mutated(PROFILE))
def test_mutated_profile_is_accepted_or_refused_cleanly(case: tuple[Any, list[str]]) -> None:
    data, done = case
    try:
        profile = profile_from_dict(data, "fuzz-profile.json")
    except ProfileError as exc:
        assert "fuzz-profile.json" in str(exc), (done, str(exc))
        return
    assert isinstance(profile, Profile)
    for link in profile.links.values():
        assert math.isfinite(link.alpha_us) and link.alpha_us >= 0, (done, link)
    json.dumps(profile.to_dict())


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


TABLE_TEXT = json.dumps(TABLE, indent=1)
PROFILE_TEXT = json.dumps(PROFILE, indent=1)

CONTENTS = (
    st.binary(max_size=300)
    | st.text(max_size=300)
    # Almost-valid files: a real file cut anywhere, or with a stretch overwritten.
    | st.integers(0, len(TABLE_TEXT)).map(lambda i: TABLE_TEXT[:i])
    | st.tuples(st.integers(0, len(TABLE_TEXT)), st.text(min_size=1, max_size=4)).map(
        lambda t: TABLE_TEXT[:t[0]] + t[1] + TABLE_TEXT[t[0] + len(t[1]):])
)


@SETTINGS
@given(content=CONTENTS)
def test_random_file_is_a_tuning_error(fuzz_dir: Path, content: str | bytes) -> None:
    path = fuzz_dir / "table.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    try:
        load_tuning(path)
    except TuningError as exc:
        assert str(path) in str(exc)


PROFILE_CONTENTS = (
    st.binary(max_size=300)
    | st.text(max_size=300)
    | st.integers(0, len(PROFILE_TEXT)).map(lambda i: PROFILE_TEXT[:i])
    | st.tuples(st.integers(0, len(PROFILE_TEXT)), st.text(min_size=1, max_size=4)).map(
        lambda t: PROFILE_TEXT[:t[0]] + t[1] + PROFILE_TEXT[t[0] + len(t[1]):])
)


@SETTINGS
@given(content=PROFILE_CONTENTS)
def test_random_file_is_a_profile_error(fuzz_dir: Path, content: str | bytes) -> None:
    path = fuzz_dir / "profile.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    try:
        load_profile(path)
    except ProfileError as exc:
        assert str(path) in str(exc)
