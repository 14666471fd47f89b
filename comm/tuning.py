"""The decision table: per collective, half-open byte ranges -> algorithm (a score map).

Shape (JSON, `schema: topocoll.tuning`, `version: 1`), as UCC's score maps:

    {"fingerprint": ..., "topology": {...}, "transport": "gloo", "intra": "shm",
     "profile": {...the link figures the model used...} | null,
     "collectives": {"all_reduce": {"fallback": "ring", "ranges": [
         {"lo": 0, "hi": 2, "algorithm": "hierarchical_leader", "source": "model",
          "candidates": {"ring": {"predicted_us": 41.0, "measured_us": null}, ...}},
         ..., {"lo": 1073741824, "hi": null, ...}]}}}

`lo`/`hi` are bytes per rank (the benchmark's `bytes`), `hi: null` is unbounded. Every
range keeps the predicted and measured cost of every candidate, so each decision can be
explained. A table is only valid for the topology shape (fingerprint) and transport it
was tuned on: `load_for_job` refuses another with a warning and falls back to the model
priced with the table's own link figures (or to the built-in defaults without them).

Loading never trusts the file: JSON only (no pickle, no eval), every field checked, and
any problem is a `TuningError` naming the file and the field.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from topocoll.topology import Topology
from topocoll.topology.profile import Profile, ProfileError, profile_from_dict

from .algorithms import NATIVE, algorithm_names
from .collectives import COLLECTIVES

SCHEMA = "topocoll.tuning"
VERSION = 1
ENV_FILE = "TOPOCOLL_TUNING_FILE"
MAX_RANGES = 4096

log = logging.getLogger("topocoll")


class TuningError(ValueError):
    """A tuning table that cannot be used; the message names file and field."""


class ForeignTableError(TuningError):
    """A valid table made for another topology shape or transport."""


@dataclass(frozen=True)
class Candidate:
    """One algorithm's cost in one range: the model's, measured, and the model refined by
    measurements at other sizes (what the pick compares where nothing was measured)."""

    predicted_us: float | None = None
    measured_us: float | None = None
    refined_us: float | None = None

    @property
    def cost_us(self) -> float | None:
        for value in (self.measured_us, self.refined_us, self.predicted_us):
            if value is not None:
                return value
        return None

    def to_dict(self) -> dict[str, float | None]:
        return {"predicted_us": _round(self.predicted_us), "measured_us": _round(self.measured_us),
                "refined_us": _round(self.refined_us)}


@dataclass(frozen=True)
class SizeRange:
    lo: int
    hi: int | None  # exclusive; None = unbounded
    algorithm: str
    source: str
    candidates: dict[str, Candidate] = field(default_factory=dict)

    def contains(self, nbytes: int) -> bool:
        return self.lo <= nbytes and (self.hi is None or nbytes < self.hi)

    def to_dict(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "algorithm": self.algorithm,
                "source": self.source,
                "candidates": {k: v.to_dict() for k, v in sorted(self.candidates.items())}}


@dataclass(frozen=True)
class CollectiveTable:
    fallback: str
    ranges: tuple[SizeRange, ...]

    def lookup(self, nbytes: int) -> SizeRange | None:
        starts = [r.lo for r in self.ranges]
        i = bisect.bisect_right(starts, nbytes) - 1
        if i >= 0 and self.ranges[i].contains(nbytes):
            return self.ranges[i]
        return None


@dataclass(frozen=True)
class TuningTable:
    topology: Topology
    transport: str
    intra: str
    collectives: dict[str, CollectiveTable]
    profile: Profile | None = None
    created: str = ""
    source: str = ""

    @property
    def fingerprint(self) -> str:
        return self.topology.fingerprint

    def lookup(self, collective: str, nbytes: int) -> str | None:
        """The algorithm for a call, or None when the table has no opinion."""
        table = self.collectives.get(collective)
        if table is None:
            return None
        found = table.lookup(nbytes)
        return found.algorithm if found else table.fallback

    def explain(self, collective: str, nbytes: int) -> SizeRange | None:
        table = self.collectives.get(collective)
        return table.lookup(nbytes) if table else None

    def check_applies(self, topology: Topology, transport: str) -> None:
        if topology.fingerprint != self.fingerprint:
            raise ForeignTableError(
                f"tuning table {self.source or '(in memory)'} was made for topology "
                f"{self.fingerprint} ({self.topology.describe()}), this job is "
                f"{topology.fingerprint} ({topology.describe()})")
        if transport and self.transport and transport != self.transport:
            raise ForeignTableError(
                f"tuning table {self.source or '(in memory)'} was made for transport "
                f"{self.transport!r}, this job uses {transport!r}")

    def to_dict(self) -> dict[str, Any]:
        profile = None
        if self.profile is not None:
            profile = {k: v for k, v in self.profile.to_dict().items() if k != "samples"}
            profile["source"] = self.profile.source
        return {
            "schema": SCHEMA, "version": VERSION, "created": self.created,
            "fingerprint": self.fingerprint,
            "topology": {**self.topology.to_dict(), "fingerprint": self.fingerprint},
            "transport": self.transport, "intra": self.intra, "profile": profile,
            "collectives": {name: {"fallback": t.fallback,
                                   "ranges": [r.to_dict() for r in t.ranges]}
                            for name, t in sorted(self.collectives.items())},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# ----- loading -------------------------------------------------------------------------
def load_tuning(path: str | Path) -> TuningTable:
    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TuningError(f"tuning table {where}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TuningError(f"tuning table {where}: not text: {exc}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # also: too deep, int over 4300 digits
        raise TuningError(f"tuning table {where}: not valid JSON: {exc}") from None
    return table_from_dict(data, where)


def table_from_dict(data: Any, where: str = "(in memory)") -> TuningTable:
    def fail(field_name: str, problem: str) -> TuningError:
        return TuningError(f"tuning table {where}: field '{field_name}' {problem}")

    if not isinstance(data, Mapping):
        raise TuningError(f"tuning table {where}: top level must be an object")
    if data.get("schema") != SCHEMA:
        raise fail("schema", f"must be {SCHEMA!r}, got {data.get('schema')!r}")
    if type(data.get("version")) is not int or data.get("version") != VERSION:
        raise fail("version", f"{data.get('version')!r} is not supported (this topocoll "
                              f"reads version {VERSION})")
    topo_data = data.get("topology")
    if not isinstance(topo_data, Mapping):
        raise fail("topology", "is missing or not an object")
    try:
        topology = Topology.from_dict(dict(topo_data))
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise fail("topology", f"is invalid: {exc}") from None
    if data.get("fingerprint") != topology.fingerprint:
        raise fail("fingerprint", f"{data.get('fingerprint')!r} does not match its topology "
                                  f"({topology.fingerprint}): edited or corrupt")
    for name in ("transport", "intra"):
        if not isinstance(data.get(name, ""), str):
            raise fail(name, "must be a string")
    profile = None
    if data.get("profile") is not None:
        try:
            profile = profile_from_dict(data["profile"], f"{where} (field 'profile')")
        except ProfileError as exc:
            raise TuningError(str(exc)) from None
    colls = data.get("collectives")
    if not isinstance(colls, Mapping) or not colls:
        raise fail("collectives", "is missing, empty or not an object")
    tables = {}
    for name, entry in colls.items():
        if name not in COLLECTIVES:
            raise fail(f"collectives.{name}", f"is not a collective ({', '.join(COLLECTIVES)})")
        tables[name] = _collective_from_dict(name, entry, fail)
    return TuningTable(topology, str(data.get("transport", "")), str(data.get("intra", "")),
                       tables, profile, str(data.get("created", "")), where)


def _collective_from_dict(name: str, entry: Any, fail: Any) -> CollectiveTable:
    at = f"collectives.{name}"
    if not isinstance(entry, Mapping):
        raise fail(at, "must be an object")
    known = set(algorithm_names(name)) | {NATIVE}
    fallback = entry.get("fallback")
    if not isinstance(fallback, str) or fallback not in known:
        raise fail(f"{at}.fallback", f"{fallback!r} is not an algorithm for {name}")
    raw = entry.get("ranges")
    if not isinstance(raw, list) or not raw or len(raw) > MAX_RANGES:
        raise fail(f"{at}.ranges", f"must be a non-empty list of at most {MAX_RANGES}")
    ranges: list[SizeRange] = []
    previous_hi: int | None = 0
    for i, item in enumerate(raw):
        where = f"{at}.ranges[{i}]"
        if not isinstance(item, Mapping):
            raise fail(where, "must be an object")
        lo, hi = item.get("lo"), item.get("hi")
        if not _is_int(lo) or lo < 0:
            raise fail(f"{where}.lo", f"must be an integer >= 0, got {lo!r}")
        if hi is not None and (not _is_int(hi) or hi <= lo):
            raise fail(f"{where}.hi", f"must be an integer > lo ({lo}) or null, got {hi!r}")
        if previous_hi is None or lo != previous_hi:
            raise fail(f"{where}.lo", f"must start where the previous range ends "
                                      f"({previous_hi}); ranges are contiguous and ascending")
        algorithm = item.get("algorithm")
        if not isinstance(algorithm, str) or algorithm not in known:
            raise fail(f"{where}.algorithm", f"{algorithm!r} is not an algorithm for {name}")
        source = item.get("source", "")
        if not isinstance(source, str):
            raise fail(f"{where}.source", "must be a string")
        ranges.append(SizeRange(lo, hi, algorithm, source,
                                _candidates(item.get("candidates", {}), known, where, fail)))
        previous_hi = hi
    return CollectiveTable(fallback, tuple(ranges))


def _candidates(raw: Any, known: set[str], where: str, fail: Any) -> dict[str, Candidate]:
    if not isinstance(raw, Mapping):
        raise fail(f"{where}.candidates", "must be an object")
    out = {}
    for algo, cost in raw.items():
        if algo not in known:
            raise fail(f"{where}.candidates", f"names unknown algorithm {algo!r}")
        if not isinstance(cost, Mapping):
            raise fail(f"{where}.candidates.{algo}", "must be an object")
        values = []
        for key in ("predicted_us", "measured_us", "refined_us"):
            v = cost.get(key)
            if v is not None and not (_is_number(v) and v >= 0):
                raise fail(f"{where}.candidates.{algo}.{key}", f"must be a number >= 0 or "
                                                               f"null, got {v!r}")
            values.append(None if v is None else float(v))
        out[str(algo)] = Candidate(*values)
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


# ----- what a job uses -----------------------------------------------------------------
class ModelSelector:
    """Chooses by pricing every candidate with the cost model, per power-of-two bucket.

    Used when a table does not fit this job (another topology) but carries link figures,
    or when only a profile is given: the decisions then come from the model, priced on
    this job's real topology.
    """

    def __init__(self, topology: Topology, profile: Profile) -> None:
        self.topology = topology
        self.profile = profile
        self._cache: dict[tuple[str, int], str | None] = {}

    def lookup(self, collective: str, nbytes: int) -> str | None:
        bucket = max(int(nbytes), 1).bit_length() - 1
        key = (collective, bucket)
        if key not in self._cache:
            from .tuner import rank_candidates

            try:
                ranked = rank_candidates(collective, 1 << bucket, self.topology, self.profile)
            except ValueError as exc:  # e.g. figures without this job's link classes
                if not any(c == collective for c, _ in self._cache):
                    log.warning("topocoll: cannot price %s with the table's link figures "
                                "(%s); using the built-in defaults", collective, exc)
                ranked = []
            self._cache[key] = ranked[0][0] if ranked else None
        return self._cache[key]


def load_for_job(topology: Topology, transport: str, path: str | None = None
                 ) -> TuningTable | ModelSelector | None:
    """The decisions a job should use, from `path` or $TOPOCOLL_TUNING_FILE.

    Never raises: a broken file is a warning and the built-in defaults; a foreign table
    is a warning and the model priced with the table's link figures on this topology.
    """
    path = path or os.environ.get(ENV_FILE, "").strip() or None
    if not path:
        return None
    try:
        table = load_tuning(path)
        table.check_applies(topology, transport)
        return table
    except ForeignTableError as exc:
        if table.profile is not None:
            log.warning("topocoll: %s; choosing with the cost model and the table's link "
                        "figures instead", exc)
            return ModelSelector(topology, table.profile)
        log.warning("topocoll: %s; using the built-in defaults", exc)
    except TuningError as exc:
        log.warning("topocoll: %s; using the built-in defaults", exc)
    return None
