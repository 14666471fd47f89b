"""Load and validate the report's inputs: benchmark rows, a profile, a tuning table.

Each file's kind is detected from its content, not its name: a JSON document with a
`schema` key is a profile or a tuning table, JSON lines with `collective` and `time_us`
are benchmark results. Everything is parsed once into typed, frozen objects, so the
figures and the page never look at raw dicts; a bad input stops the report with one
`InputError` that names the file, the line (for JSON lines) and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILE_SCHEMA = "topocoll.profile"
TUNING_SCHEMA = "topocoll.tuning"
SUPPORTED_VERSION = 1
RANGE_SOURCES = ("default", "model", "model+measurement", "measurement", "override")


class InputError(ValueError):
    """A missing or malformed input, in one line: `FILE[:LINE]: field 'F': problem`."""

    def __init__(self, path: Path | str, problem: str, *, line: int | None = None,
                 field: str | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{problem}")
        self.path, self.line, self.field = str(path), line, field


# ----- typed inputs -----------------------------------------------------------------------
@dataclass(frozen=True)
class Topology:
    """What the job looked like; the fingerprint keys results, profiles and tables."""

    fingerprint: str
    node_of: tuple[int, ...]
    rails: int
    intra_link: str = ""
    inter_link: str = ""

    @property
    def layout(self) -> tuple[int, ...]:
        """Ranks per node, in node order (derived from node_of, so it cannot disagree)."""
        counts: dict[int, int] = {}
        for node in self.node_of:
            counts[node] = counts.get(node, 0) + 1
        return tuple(counts[n] for n in sorted(counts))

    def describe(self) -> str:
        layout = "+".join(map(str, self.layout))
        rails = f", {self.rails} rails" if self.rails > 1 else ""
        return f"{len(self.layout)} nodes ({layout} ranks){rails}"


@dataclass(frozen=True)
class ResultRow:
    """One benchmark row: one (collective, algorithm, size) on one topology and transport."""

    source: str
    line: int
    collective: str
    algorithm: str
    chosen: str
    transport: str
    world_size: int
    bytes: int
    time_us: float
    busbw_gbs: float
    algbw_gbs: float | None
    bound_us: float | None
    predicted_us: float | None
    wrong: int | None
    dtype: str
    launcher: str
    intra: str
    topology: Topology
    versions: Mapping[str, str]
    link_rate_bytes_per_s: float | None = None


@dataclass(frozen=True)
class LinkFit:
    """Measured alpha-beta fit of one link class (`intra`, `inter/0`, ...)."""

    name: str
    alpha_us: float
    beta_us_per_byte: float
    shared_beta_us_per_byte: float | None = None
    r2: float | None = None
    flows: int | None = None

    @property
    def bandwidth_gbs(self) -> float | None:
        return None if self.beta_us_per_byte <= 0 else 1e-3 / self.beta_us_per_byte


@dataclass(frozen=True)
class Profile:
    source: str
    created: str
    fingerprint: str
    transport: str
    intra: str
    topology: Topology | None
    versions: Mapping[str, str]
    links: Mapping[str, LinkFit]
    overhead_us: float | None = None


@dataclass(frozen=True)
class Candidate:
    predicted_us: float | None
    measured_us: float | None


@dataclass(frozen=True)
class SizeRange:
    """A half-open byte range [lo, hi) of a decision table; hi None = unbounded."""

    lo: int
    hi: int | None
    algorithm: str
    source: str
    candidates: Mapping[str, Candidate] = field(default_factory=dict)

    def contains(self, nbytes: int) -> bool:
        return nbytes >= self.lo and (self.hi is None or nbytes < self.hi)


@dataclass(frozen=True)
class Decision:
    fallback: str
    ranges: tuple[SizeRange, ...]

    def at(self, nbytes: int) -> SizeRange | None:
        return next((r for r in self.ranges if r.contains(nbytes)), None)


@dataclass(frozen=True)
class TuningTable:
    source: str
    created: str
    fingerprint: str
    transport: str
    intra: str
    topology: Topology | None
    collectives: Mapping[str, Decision]


@dataclass
class Inputs:
    """Everything the report was given, with the kind of each file for the page."""

    results: list[ResultRow] = field(default_factory=list)
    profiles: list[Profile] = field(default_factory=list)
    tunings: list[TuningTable] = field(default_factory=list)
    files: list[tuple[str, str, int]] = field(default_factory=list)  # (path, kind, items)


# ----- field access that names what is wrong ---------------------------------------------
class _Doc:
    """A JSON object plus where it came from, so every error names file, line and field."""

    def __init__(self, obj: Any, path: Path, line: int | None, prefix: str = "") -> None:
        self.path, self.line, self.prefix = path, line, prefix
        if not isinstance(obj, dict):
            raise self.error(f"expected a JSON object, got {_kind(obj)}")
        self.obj: dict[str, Any] = obj

    def error(self, problem: str, name: str | None = None) -> InputError:
        field_name = f"{self.prefix}{name}" if name else (self.prefix.rstrip(".") or None)
        return InputError(self.path, problem, line=self.line, field=field_name)

    def has(self, name: str) -> bool:
        return self.obj.get(name) is not None

    def raw(self, name: str, required: bool = True) -> Any:
        if name not in self.obj:
            if required:
                raise self.error("missing", name)
            return None
        return self.obj[name]

    def str_(self, name: str, required: bool = True, default: str = "") -> str:
        value = self.raw(name, required)
        if value is None and not required:
            return default
        if not isinstance(value, str):
            raise self.error(f"expected a string, got {_kind(value)}", name)
        return value

    def int_(self, name: str, required: bool = True, minimum: int | None = 0,
             nullable: bool = False) -> int | None:
        value = self.raw(name, required)
        if value is None and (nullable or not required):
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"expected an integer, got {_kind(value)}", name)
        if minimum is not None and value < minimum:
            raise self.error(f"expected an integer >= {minimum}, got {value}", name)
        return value

    def num(self, name: str, required: bool = True, nullable: bool = False,
            positive: bool = False) -> float | None:
        value = self.raw(name, required)
        if value is None and (nullable or not required):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"expected a number, got {_kind(value)}", name)
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            need = "> 0" if positive else ">= 0"
            raise self.error(f"expected a finite number {need}, got {value}", name)
        return float(value)

    def sub(self, name: str, required: bool = True) -> _Doc | None:
        value = self.raw(name, required)
        if value is None and not required:
            return None
        return _Doc._nested(value, self, f"{self.prefix}{name}")

    def items(self, name: str) -> list[tuple[str, _Doc]]:
        """The entries of an object-valued field, each as a _Doc with its own prefix."""
        sub = self.sub(name)
        assert sub is not None
        return [(key, _Doc._nested(value, sub, f"{sub.prefix}{key}"))
                for key, value in sub.obj.items()]

    def versions(self, name: str = "versions") -> dict[str, str]:
        sub = self.sub(name, required=False)
        if sub is None:
            return {}
        return {str(k): "" if v is None else str(v) for k, v in sub.obj.items()}

    @staticmethod
    def _nested(value: Any, parent: _Doc, prefix: str) -> _Doc:
        if not isinstance(value, dict):
            raise InputError(parent.path, f"expected a JSON object, got {_kind(value)}",
                             line=parent.line, field=prefix)
        return _Doc(value, parent.path, parent.line, prefix + ".")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


# ----- parsers per kind -----------------------------------------------------------------
def _topology(doc: _Doc) -> Topology:
    node_of = doc.raw("node_of")
    if (not isinstance(node_of, list) or not node_of
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                       for n in node_of)):
        raise doc.error("expected a non-empty list of node indices >= 0", "node_of")
    layout = doc.raw("layout", required=False)
    if layout is not None and (not isinstance(layout, list)
                               or sum(x for x in layout if isinstance(x, int)) != len(node_of)):
        raise doc.error(f"expected ranks per node adding up to {len(node_of)} ranks", "layout")
    rails = doc.int_("rails", required=False, minimum=1) or 1
    intra, inter = doc.str_("intra_link", required=False), doc.str_("inter_link", required=False)
    fingerprint = doc.str_("fingerprint", required=False)
    if not fingerprint:  # older profiles: the same hash the library computes
        from topocoll.topology import Topology as Shape

        fingerprint = Shape(tuple(node_of), rails, intra_link=intra or "shm",
                            inter_link=inter or "tcp").fingerprint
    return Topology(fingerprint=fingerprint, node_of=tuple(node_of), rails=rails,
                    intra_link=intra, inter_link=inter)


def _result_row(obj: Any, path: Path, line: int) -> ResultRow:
    doc = _Doc(obj, path, line)
    topo = doc.sub("topology")
    assert topo is not None
    budget = doc.sub("link_budget", required=False) if doc.has("link_budget") else None
    algorithm = doc.str_("algorithm")
    return ResultRow(
        source=str(path), line=line,
        collective=doc.str_("collective"), algorithm=algorithm,
        chosen=doc.str_("chosen", required=False) or algorithm,
        transport=doc.str_("transport"),
        world_size=doc.int_("world_size", minimum=1) or 1,
        bytes=doc.int_("bytes") or 0,
        time_us=doc.num("time_us", positive=True) or 0.0,
        busbw_gbs=doc.num("busbw_gbs") or 0.0,
        algbw_gbs=doc.num("algbw_gbs", required=False),
        bound_us=doc.num("bound_us", required=False, nullable=True),
        predicted_us=doc.num("predicted_us", required=False, nullable=True),
        wrong=doc.int_("wrong", required=False, nullable=True),
        dtype=doc.str_("dtype", required=False), launcher=doc.str_("launcher", required=False),
        intra=doc.str_("intra", required=False),
        topology=_topology(topo), versions=doc.versions(),
        link_rate_bytes_per_s=(budget.num("rate_bytes_per_s", required=False)
                               if budget else None),
    )


def _check_version(doc: _Doc) -> None:
    version = doc.raw("version")
    if version != SUPPORTED_VERSION:
        raise doc.error(f"unsupported version {version!r} (this topocoll reads version "
                        f"{SUPPORTED_VERSION})", "version")


def _profile(doc: _Doc) -> Profile:
    _check_version(doc)
    links: dict[str, LinkFit] = {}
    for name, link in doc.items("links"):
        links[name] = LinkFit(name=name, alpha_us=link.num("alpha_us") or 0.0,
                              beta_us_per_byte=link.num("beta_us_per_byte") or 0.0,
                              shared_beta_us_per_byte=link.num("shared_beta_us_per_byte",
                                                               required=False),
                              r2=_r2(link), flows=link.int_("flows", required=False))
    if not links:
        raise doc.error("expected at least one link class", "links")
    for i, sample in enumerate(_list(doc, "samples", required=False)):
        s = _Doc._nested(sample, doc, f"{doc.prefix}samples[{i}]")
        s.str_("link")
        s.int_("bytes")
        s.num("time_us")
    topo = doc.sub("topology", required=False) if doc.has("topology") else None
    return Profile(source=str(doc.path), created=doc.str_("created"),
                   fingerprint=doc.str_("fingerprint"), transport=doc.str_("transport"),
                   intra=doc.str_("intra", required=False),
                   topology=_topology(topo) if topo else None, versions=doc.versions(),
                   links=links, overhead_us=doc.num("overhead_us", required=False))


def _r2(link: _Doc) -> float | None:
    value = link.raw("r2", required=False)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1e9 < value <= 1:
        raise link.error(f"expected a number <= 1, got {value!r}", "r2")
    return float(value)


def _list(doc: _Doc, name: str, required: bool = True) -> list[Any]:
    value = doc.raw(name, required)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise doc.error(f"expected a list, got {_kind(value)}", name)
    return value


def _decision(doc: _Doc) -> Decision:
    ranges: list[SizeRange] = []
    for i, item in enumerate(_list(doc, "ranges")):
        r = _Doc._nested(item, doc, f"{doc.prefix}ranges[{i}]")
        lo = r.int_("lo") or 0
        hi = r.int_("hi", nullable=True)
        expected_lo = ranges[-1].hi if ranges else 0
        if lo != expected_lo:
            raise r.error(f"expected {expected_lo} (ranges are half-open [lo, hi), each "
                          f"starting where the previous one ends), got {lo}", "lo")
        if hi is not None and hi <= lo:
            raise r.error(f"expected hi > lo = {lo}, got {hi}", "hi")
        source = r.str_("source")
        if source not in RANGE_SOURCES:
            raise r.error(f"expected one of {', '.join(RANGE_SOURCES)}, got {source!r}",
                          "source")
        candidates = {name: Candidate(c.num("predicted_us", nullable=True),
                                      c.num("measured_us", nullable=True))
                      for name, c in r.items("candidates")} if r.has("candidates") else {}
        ranges.append(SizeRange(lo, hi, r.str_("algorithm"), source, candidates))
    if not ranges:
        raise doc.error("expected at least one range", "ranges")
    if ranges[-1].hi is not None:
        raise doc.error("the last range must be unbounded (hi null)",
                        f"ranges[{len(ranges) - 1}].hi")
    return Decision(fallback=doc.str_("fallback"), ranges=tuple(ranges))


def _tuning(doc: _Doc) -> TuningTable:
    _check_version(doc)
    topo = doc.sub("topology", required=False) if doc.has("topology") else None
    if doc.has("profile"):
        profile = doc.sub("profile")
        assert profile is not None
        profile.str_("fingerprint")
    return TuningTable(source=str(doc.path), created=doc.str_("created"),
                       fingerprint=doc.str_("fingerprint"), transport=doc.str_("transport"),
                       intra=doc.str_("intra", required=False),
                       topology=_topology(topo) if topo else None,
                       collectives={name: _decision(d) for name, d in doc.items("collectives")})


# ----- files ----------------------------------------------------------------------------
def expand(paths: Iterable[Path | str]) -> list[Path]:
    """Files to read: each path itself, or every *.jsonl / *.json directly in a directory."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix in (".jsonl", ".json"))
            if not found:
                raise InputError(path, "directory holds no *.jsonl or *.json files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(path, "no such file or directory")
    return files


def load_inputs(paths: Iterable[Path | str]) -> Inputs:
    """Read every input, detect its kind, validate it; raise InputError on the first fault."""
    inputs = Inputs()
    for path in expand(paths):
        kind, items = _load_file(path)
        if kind == "results":
            inputs.results.extend(items)
        elif kind == "profile":
            inputs.profiles.extend(items)
        else:
            inputs.tunings.extend(items)
        inputs.files.append((str(path), kind, len(items)))
    return inputs


def _load_file(path: Path) -> tuple[str, list[Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read: {exc}") from None
    if not text.strip():
        raise InputError(path, "empty file")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        first = next(line for line in text.splitlines() if line.strip())
        if not _is_json_object(first):
            # A document, not JSON lines: its own parse error says where.
            raise InputError(path, f"not valid JSON: {exc.msg} (column {exc.colno})",
                             line=exc.lineno) from None
        return "results", _load_lines(path, text)
    if isinstance(whole, dict) and "schema" in whole:
        doc = _Doc(whole, path, None)
        schema = whole["schema"]
        if schema == PROFILE_SCHEMA:
            return "profile", [_profile(doc)]
        if schema == TUNING_SCHEMA:
            return "tuning", [_tuning(doc)]
        raise doc.error(f"unknown schema {schema!r} (expected {PROFILE_SCHEMA!r} or "
                        f"{TUNING_SCHEMA!r})", "schema")
    if isinstance(whole, dict) and "collective" in whole and "time_us" in whole:
        return "results", _load_lines(path, text)
    raise InputError(path, "not a topocoll input: expected JSON lines with 'collective' and "
                           f"'time_us', or a document whose 'schema' is {PROFILE_SCHEMA!r} "
                           f"or {TUNING_SCHEMA!r}")


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _load_lines(path: Path, text: str) -> list[ResultRow]:
    rows: list[ResultRow] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"not valid JSON: {exc.msg} (column {exc.colno})",
                             line=number) from None
        rows.append(_result_row(obj, path, number))
    return rows
