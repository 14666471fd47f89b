"""What the report says, computed once from the typed inputs: groups, bests, regret, speedups.

Rows are grouped by (topology fingerprint, transport, collective): only rows of one group
were measured under the same conditions, so only they are compared with each other. The
figures, the HTML page and the Markdown summary all read these objects, so they can never
disagree about a number.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TypeVar

from topocoll.reports.inputs import (
    Decision,
    Inputs,
    Profile,
    ResultRow,
    Topology,
    TuningTable,
)

_Keyed = TypeVar("_Keyed", Profile, TuningTable)

BASELINE = "native"
TUNED = "tuned"


@dataclass(frozen=True, order=True)
class GroupKey:
    collective: str
    transport: str
    fingerprint: str


@dataclass(frozen=True)
class Choice:
    """The algorithm picked for the sizes [lo, hi); hi None = unbounded."""

    lo: int
    hi: int | None
    algorithm: str
    predicted_us: float | None = None


@dataclass
class Group:
    """Every row measured on one topology, one transport, one collective."""

    key: GroupKey
    topology: Topology
    rows: dict[str, dict[int, ResultRow]] = field(default_factory=dict)
    tuning: TuningTable | None = None
    profile: Profile | None = None

    @property
    def decision(self) -> Decision | None:
        return self.tuning.collectives.get(self.key.collective) if self.tuning else None

    @property
    def sizes(self) -> list[int]:
        return sorted({n for by_size in self.rows.values() for n in by_size})

    @property
    def ours(self) -> list[str]:
        """Our forced algorithms (not the baseline, not the tuner), in a stable order."""
        return sorted(a for a in self.rows if a not in (BASELINE, TUNED))

    @property
    def has_baseline(self) -> bool:
        return BASELINE in self.rows

    @property
    def has_tuned(self) -> bool:
        return TUNED in self.rows

    @property
    def contender(self) -> str:
        """What we put against the baseline: the tuned backend, or else our best per size."""
        return TUNED if self.has_tuned else "best of ours"

    def series(self, algorithm: str) -> list[ResultRow]:
        return [self.rows[algorithm][n] for n in sorted(self.rows.get(algorithm, {}))]

    def time(self, algorithm: str, nbytes: int) -> float | None:
        row = self.rows.get(algorithm, {}).get(nbytes)
        return row.time_us if row else None

    def best_ours(self, nbytes: int) -> tuple[str, float] | None:
        times = [(t, a) for a in self.ours if (t := self.time(a, nbytes)) is not None]
        if not times:
            return None
        t, a = min(times)
        return a, t

    def contender_time(self, nbytes: int) -> float | None:
        if self.has_tuned:
            return self.time(TUNED, nbytes)
        best = self.best_ours(nbytes)
        return best[1] if best else None

    def speedup(self, nbytes: int) -> float | None:
        """time(baseline) / time(contender): > 1 means we are faster than the library."""
        base, ours = self.time(BASELINE, nbytes), self.contender_time(nbytes)
        return base / ours if base and ours else None

    def tuned_regret(self, nbytes: int) -> float | None:
        """time(tuned) / best forced algorithm of ours - 1 (0 = the tuner found the best)."""
        tuned, best = self.time(TUNED, nbytes), self.best_ours(nbytes)
        return tuned / best[1] - 1.0 if tuned and best else None

    def model_regret(self, nbytes: int) -> float | None:
        """The same for the tuning table's pick at this size, timed by its forced run."""
        decision, best = self.decision, self.best_ours(nbytes)
        picked = decision.at(nbytes) if decision else None
        t = self.time(picked.algorithm, nbytes) if picked else None
        return t / best[1] - 1.0 if t and best else None

    def choices(self) -> list[Choice]:
        """The tuner's choice over the size axis: the table's ranges, else the tuned rows'."""
        if self.decision:
            return [Choice(r.lo, r.hi, r.algorithm,
                           r.candidates[r.algorithm].predicted_us
                           if r.algorithm in r.candidates else None)
                    for r in self.decision.ranges]
        tuned = self.series(TUNED)
        out: list[Choice] = []
        for i, row in enumerate(tuned):
            lo = 0 if i == 0 else _geometric_mid(tuned[i - 1].bytes, row.bytes)
            hi = None if i == len(tuned) - 1 else _geometric_mid(row.bytes, tuned[i + 1].bytes)
            if out and out[-1].algorithm == row.chosen:
                out[-1] = Choice(out[-1].lo, hi, row.chosen)
            else:
                out.append(Choice(lo, hi, row.chosen, row.predicted_us))
        return out

    def best_ranges(self) -> list[tuple[int, int, str]]:
        """Consecutive measured sizes with the same best algorithm of ours: (lo, hi, name)."""
        out: list[tuple[int, int, str]] = []
        for n in self.sizes:
            best = self.best_ours(n)
            if best is None:
                continue
            if out and out[-1][2] == best[0]:
                out[-1] = (out[-1][0], n, best[0])
            else:
                out.append((n, n, best[0]))
        return out

    def headline(self) -> tuple[int, float] | None:
        """The speedup at the largest size with both a baseline and a contender."""
        for n in reversed(self.sizes):
            s = self.speedup(n)
            if s is not None:
                return n, s
        return None


def _geometric_mid(a: int, b: int) -> int:
    return round((a * b) ** 0.5)


@dataclass
class Analysis:
    groups: list[Group]
    topologies: dict[str, Topology]
    profiles: list[Profile]
    tunings: list[TuningTable]
    environment: dict[str, list[str]]
    notes: list[str]

    def by_collective(self) -> dict[str, list[Group]]:
        out: dict[str, list[Group]] = defaultdict(list)
        for g in self.groups:
            out[g.key.collective].append(g)
        return dict(out)


def analyze(inputs: Inputs) -> Analysis:
    """Group the rows and attach each group's tuning table and profile (matched by
    topology fingerprint and transport)."""
    notes: list[str] = []
    groups: dict[GroupKey, Group] = {}
    duplicates = 0
    for row in inputs.results:
        key = GroupKey(row.collective, row.transport, row.topology.fingerprint)
        group = groups.setdefault(key, Group(key, row.topology))
        by_size = group.rows.setdefault(row.algorithm, {})
        duplicates += row.bytes in by_size
        by_size[row.bytes] = row  # the last row read wins
    if duplicates:
        notes.append(f"{duplicates} rows repeat a (topology, transport, collective, algorithm, "
                     f"size) already read; the last one read is used.")
    unverified = sum(1 for r in inputs.results if r.wrong)
    if unverified:
        notes.append(f"{unverified} rows have #wrong > 0: their results were NOT correct.")
    used_tables: set[int] = set()
    for group in groups.values():
        group.tuning = _match(inputs.tunings, group.key)
        group.profile = _match(inputs.profiles, group.key)
        if group.tuning is not None and group.decision is not None:
            used_tables.add(id(group.tuning))
    for table in inputs.tunings:
        if id(table) not in used_tables:
            notes.append(f"tuning table {table.source} (fingerprint {table.fingerprint}, "
                         f"transport {table.transport}) matches no measured group.")
    topologies = {r.topology.fingerprint: r.topology for r in inputs.results}
    for source in (*inputs.profiles, *inputs.tunings):
        if source.topology is not None:
            topologies.setdefault(source.fingerprint, source.topology)
    return Analysis(groups=[groups[k] for k in sorted(groups)], topologies=topologies,
                    profiles=list(inputs.profiles), tunings=list(inputs.tunings),
                    environment=_environment(inputs), notes=notes)


def _match(candidates: list[_Keyed], key: GroupKey) -> _Keyed | None:
    """The last profile or table read for this topology fingerprint and transport: a table
    tuned on another topology or transport says nothing about these measurements."""
    exact = [c for c in candidates
             if c.fingerprint == key.fingerprint and c.transport == key.transport]
    return exact[-1] if exact else None


def _environment(inputs: Inputs) -> dict[str, list[str]]:
    """Every distinct value seen per environment field, in order of first appearance."""
    env: dict[str, dict[str, None]] = defaultdict(dict)
    for row in inputs.results:
        for name, value in row.versions.items():
            if value:
                env[f"version: {name}"][value] = None
        env["transport"][row.transport] = None
        if row.intra:
            env["intra-node transport"][row.intra] = None
        if row.launcher:
            env["launcher"][row.launcher] = None
        if row.dtype:
            env["dtype"][row.dtype] = None
        if row.link_rate_bytes_per_s:
            env["inter-node link budget"][f"{row.link_rate_bytes_per_s * 8 / 1e9:g} Gbit/s"] = None
    for source in (*inputs.profiles, *inputs.tunings):
        env["profile / tuning table"][f"{source.source} ({source.created})"] = None
        for name, value in getattr(source, "versions", {}).items():
            if value:
                env[f"version: {name}"][value] = None
    return {k: list(v) for k, v in sorted(env.items())}
