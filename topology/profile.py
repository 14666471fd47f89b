"""The interconnect profile: measured latency and bandwidth per link class.

A profile is what the cost model needs to price a schedule on real links:
- per link class (`intra`, `inter/<rail>`; `inter` as the default for every rail):
  `alpha_us` (per-message latency), `beta_us_per_byte` (inverse bandwidth of one flow)
  and `shared_beta_us_per_byte` (inverse bandwidth of the shared resource behind the link,
  a node's uplink on that rail or a node's memory system, when every pair uses it at
  once), with the fit quality `r2` and the flow count of the concurrent sweep;
- `compute`: local reduce and copy cost per byte (the gamma of the literature);
- `overhead_us`: the executor's per-step cost on the CPU (posting and polling a message);
- `machines`: which ranks of the measured job share one machine's cores, and how many
  cores (ranks of an emulated cluster's nodes all run on one host; so may two
  containers). The model charges their CPU work together against those cores.

It is read from JSON written by `topocoll profile` (or built from a preset's nominal
figures) and never trusted: every field is type-checked and a bad file raises
`ProfileError` naming the file and the field. No pickle, no eval: plain JSON only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model import Level, Topology
from .presets import Preset

SCHEMA = "topocoll.profile"
VERSION = 1


class ProfileError(ValueError):
    """A profile file or object that cannot be used; the message names file and field."""


@dataclass(frozen=True)
class LinkProfile:
    """alpha-beta figures of one link class."""

    alpha_us: float
    beta_us_per_byte: float
    shared_beta_us_per_byte: float
    r2: float | None = None
    flows: int = 1
    # One pair sending both ways at once (measured on the emulated cluster: one Gloo
    # connection carrying both directions got 72-105 MB/s each way, two connections, one
    # per direction, the line rate; shaper queue depth made no difference). None = beta.
    duplex_beta_us_per_byte: float | None = None
    # Latency when `flows` messages cross the shared resource at once (the transport's
    # per-message cost under load: CPU, the TCP stack, the shaper's queue). None = alpha.
    shared_alpha_us: float | None = None
    # Bytes the link lets through at once after it has rested: a rate shaper's token
    # bucket (tc's tbf `burst` on the emulated cluster). Zero on a NIC, which has none.
    burst_bytes: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"alpha_us": self.alpha_us, "beta_us_per_byte": self.beta_us_per_byte,
                "shared_beta_us_per_byte": self.shared_beta_us_per_byte, "r2": self.r2,
                "flows": self.flows, "duplex_beta_us_per_byte": self.duplex_beta_us_per_byte,
                "shared_alpha_us": self.shared_alpha_us, "burst_bytes": self.burst_bytes}

    def alpha_with(self, messages: int) -> float:
        """Latency of a message sharing its resource with `messages - 1` others: linear
        between the one-flow and the measured `flows`-flow latency, and held there beyond
        it (what was not measured is not extrapolated: a crowd of tiny messages is paid
        for by the per-step overhead instead)."""
        if messages <= 1 or self.shared_alpha_us is None or self.flows <= 1:
            return self.alpha_us
        extra = max(self.shared_alpha_us - self.alpha_us, 0.0) / (self.flows - 1)
        return self.alpha_us + extra * (min(messages, self.flows) - 1)

    @property
    def duplex_beta(self) -> float:
        return self.duplex_beta_us_per_byte or self.beta_us_per_byte

    @property
    def bandwidth_gbs(self) -> float:
        return 1e-3 / self.beta_us_per_byte if self.beta_us_per_byte > 0 else math.inf


@dataclass(frozen=True)
class Machine:
    """Ranks of the measured job that share one machine, and the cores they may use."""

    ranks: tuple[int, ...]
    cores: int

    def to_dict(self) -> dict[str, Any]:
        return {"ranks": list(self.ranks), "cores": self.cores}


@dataclass(frozen=True)
class Profile:
    """Link figures for one topology shape and transport."""

    links: dict[str, LinkProfile]
    reduce_us_per_byte: float
    copy_us_per_byte: float
    overhead_us: float
    topology: Topology | None = None
    transport: str = ""
    intra: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    samples: tuple[dict[str, Any], ...] = ()
    created: str = ""
    source: str = ""
    machines: tuple[Machine, ...] = ()  # empty: unknown, no shared-core charge

    def link(self, level: Level | str) -> LinkProfile:
        """Figures for a level: `inter/1` falls back to `inter`, `self` to a local copy."""
        key = str(level)
        if key in self.links:
            return self.links[key]
        kind = key.partition("/")[0]
        if kind in self.links:
            return self.links[kind]
        if kind == "self":
            return LinkProfile(0.0, self.copy_us_per_byte, self.copy_us_per_byte)
        if kind == "inter":
            rails = sorted(k for k in self.links if k.startswith("inter/"))
            if rails:
                return self.links[rails[0]]
        if kind == "intra" and "inter" in self.links:  # one-level job measured on the network
            return self.links["inter"]
        raise ProfileError(f"profile {self.source or '(in memory)'}: no figures for link "
                           f"class {key!r}; has {', '.join(sorted(self.links))}")

    @property
    def fingerprint(self) -> str | None:
        return self.topology.fingerprint if self.topology is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "version": VERSION, "created": self.created,
            "topology": ({**self.topology.to_dict(), "fingerprint": self.topology.fingerprint}
                         if self.topology is not None else None),
            "fingerprint": self.fingerprint, "transport": self.transport, "intra": self.intra,
            "versions": dict(self.versions),
            "links": {k: v.to_dict() for k, v in sorted(self.links.items())},
            "compute": {"reduce_us_per_byte": self.reduce_us_per_byte,
                        "copy_us_per_byte": self.copy_us_per_byte},
            "overhead_us": self.overhead_us,
            "machines": [m.to_dict() for m in self.machines],
            "samples": list(self.samples),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")


# ----- building ------------------------------------------------------------------------
def from_preset(preset: Preset) -> Profile:
    """Nominal figures of a preset (datasheet-level), for simulation."""
    def figures(f: Any, sharers: int) -> LinkProfile:
        beta = 1e-3 / f.bandwidth_gbs
        return LinkProfile(f.alpha_us, beta, beta / sharers, None, sharers)

    # A GPU node's NVLink fabric scales with its GPUs (each has its own links into the
    # switch): the node's aggregate is ranks_per_node times one GPU's. A rail's NIC is one
    # link, shared by the ranks on that rail.
    return Profile(
        links={"intra": figures(preset.intra, preset.ranks_per_node),
               "inter": figures(preset.inter, 1)},
        reduce_us_per_byte=1e-3 / 1000.0,  # ~1 TB/s device reduce
        copy_us_per_byte=1e-3 / 1000.0,
        overhead_us=2.0,
        topology=preset.topology(),
        transport="nominal",
        source=f"preset {preset.name}",
    )


@dataclass(frozen=True)
class Fit:
    alpha_us: float
    beta_us_per_byte: float
    r2: float


def fit_alpha_beta(points: Sequence[tuple[float, float]]) -> Fit:
    """time = alpha + beta * bytes, fitted the way the two terms show themselves.

    A plain least-squares line is ruled by whichever end of a five-decade sweep is noisier
    (on a loaded 2-core machine the small sizes jitter by milliseconds). So, as LogP-style
    fits do: beta is the slope over the larger half of the sizes (where bandwidth rules
    and a shaper's burst no longer flatters), as a Theil-Sen median, and alpha is the median
    excess of the smaller half over that slope. Both stay positive: a negative latency or
    a free link is a fitting artefact. `r2` is the fit quality over every point, on
    log(time), so each decade counts alike.
    """
    pts = sorted((float(b), float(t)) for b, t in points if t > 0)
    if len(pts) < 2:
        raise ProfileError(f"need at least two timed sizes to fit alpha/beta, got {len(pts)}")
    if len({b for b, _ in pts}) < 2:
        raise ProfileError("alpha/beta fit needs at least two distinct sizes")
    half = len(pts) // 2
    large = pts[half:] if len(pts) - half >= 2 else pts
    # Theil-Sen: the median of the slopes between every two large sizes, so one noisy
    # point (a stall of the machine, a shaper's burst) cannot tilt the line.
    slopes = sorted((t2 - t1) / (b2 - b1) for i, (b1, t1) in enumerate(large)
                    for b2, t2 in large[i + 1:] if b2 > b1)
    beta = slopes[len(slopes) // 2] if slopes else 0.0
    if beta <= 0:
        # Noise swamped the slope (sizes that are all latency-bound): the largest size's
        # excess over the fastest time, never a free link.
        biggest = pts[-1]
        fastest = min(t for _, t in pts)
        beta = ((biggest[1] - fastest) if biggest[1] > fastest else biggest[1]) / biggest[0]
    small = pts[:max(half, 1)]
    excess = sorted(t - beta * b for b, t in small)
    alpha = max(excess[len(excess) // 2], 0.0)
    logs = [math.log(t) for _, t in pts]
    mean_log = sum(logs) / len(logs)
    ss_res = sum((math.log(alpha + beta * b) - v) ** 2 for (b, _), v in zip(pts, logs))
    ss_tot = sum((v - mean_log) ** 2 for v in logs)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return Fit(alpha, beta, r2)


# A burst is only believed when it explains the sweep this much better than none does.
BURST_MIN_GAIN = 2.0


def fit_with_burst(points: Sequence[tuple[float, float]]) -> tuple[Fit, float]:
    """time = alpha + beta * max(bytes - burst, 0): a link behind a token-bucket shaper.

    Why: a shaper (tc's tbf on the emulated cluster, a cloud NIC's rate limit) lets its
    bucket's worth of bytes through at once after the link rested, so a lone 1 MiB message
    took 6.5 ms where its line rate says 8.4, while 4 MiB took 32.4 ms, at the line rate.
    A straight line through that sweep has too small a slope and too large a price for
    lone mid-size messages (a binomial tree's at 1 MiB, +21..+32% in five full runs).
    The burst is tried at sizes of 16 KiB up to a quarter of the largest probe, each
    with its own `fit_alpha_beta` on the sizes less the burst, and kept only when its
    squared log error is under half that of no burst: a NIC's sweep keeps 0.
    """
    plain = fit_alpha_beta(points)
    pts = [(float(b), float(t)) for b, t in points if t > 0]
    largest = max((b for b, _ in pts), default=0.0)

    def error(fit: Fit, burst: float) -> float:
        return sum((math.log(max(fit.alpha_us + fit.beta_us_per_byte * max(b - burst, 0.0),
                                 1e-9)) - math.log(t)) ** 2 for b, t in pts)

    best, best_burst, best_error = plain, 0.0, error(plain, 0.0)
    limit = best_error / BURST_MIN_GAIN
    for k in range(14, 40):
        for burst in (float(1 << k), float(3 << (k - 1))):
            if burst > largest / 4:
                continue
            shifted = [(max(b - burst, 0.0), t) for b, t in pts]
            if len({b for b, _ in shifted}) < 2:
                continue
            fit = fit_alpha_beta(shifted)
            err = error(fit, burst)
            if err < limit and err < best_error:
                best, best_burst, best_error = fit, burst, err
    return best, best_burst


# ----- loading -------------------------------------------------------------------------
def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file; any problem is a ProfileError naming the file."""
    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ProfileError(f"profile {where}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ProfileError(f"profile {where}: not text: {exc}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # also: too deep, int over 4300 digits
        raise ProfileError(f"profile {where}: not valid JSON: {exc}") from None
    return profile_from_dict(data, where)


def profile_from_dict(data: Any, where: str = "(in memory)") -> Profile:
    if not isinstance(data, Mapping):
        raise ProfileError(f"profile {where}: top level must be an object")
    if data.get("schema") != SCHEMA:
        raise ProfileError(f"profile {where}: field 'schema' must be {SCHEMA!r}, "
                           f"got {data.get('schema')!r}")
    if type(data.get("version")) is not int or data.get("version") != VERSION:
        raise ProfileError(f"profile {where}: field 'version' {data.get('version')!r} is "
                           f"not supported (this topocoll reads version {VERSION})")
    links_data = _field(data, "links", Mapping, where)
    if not links_data:
        raise ProfileError(f"profile {where}: field 'links' is empty")
    links: dict[str, LinkProfile] = {}
    for name, entry in links_data.items():
        try:
            Level.parse(str(name))
        except ValueError:
            raise ProfileError(f"profile {where}: links: unknown link class {name!r}") from None
        at = f"links.{name}"
        if not isinstance(entry, Mapping):
            raise ProfileError(f"profile {where}: field '{at}' must be an object")
        beta = _number(entry, "beta_us_per_byte", where, at)
        r2 = entry.get("r2")
        if r2 is not None and not _finite(r2):
            raise ProfileError(f"profile {where}: field '{at}.r2' must be a number or null")
        duplex = entry.get("duplex_beta_us_per_byte")
        if duplex is not None and not (_finite(duplex) and duplex > 0):
            raise ProfileError(f"profile {where}: field '{at}.duplex_beta_us_per_byte' must be "
                               f"a finite number > 0 or null, got {duplex!r}")
        shared_alpha = entry.get("shared_alpha_us")
        if shared_alpha is not None and not (_finite(shared_alpha) and shared_alpha >= 0):
            raise ProfileError(f"profile {where}: field '{at}.shared_alpha_us' must be a "
                               f"finite number >= 0 or null, got {shared_alpha!r}")
        burst = entry.get("burst_bytes", 0.0)
        if not (_finite(burst) and burst >= 0):
            raise ProfileError(f"profile {where}: field '{at}.burst_bytes' must be a finite "
                               f"number >= 0, got {burst!r}")
        flows = entry.get("flows", 1)
        if not isinstance(flows, int) or isinstance(flows, bool) or flows < 1:
            raise ProfileError(f"profile {where}: field '{at}.flows' must be a positive int")
        links[str(name)] = LinkProfile(
            alpha_us=_number(entry, "alpha_us", where, at),
            beta_us_per_byte=beta,
            shared_beta_us_per_byte=_number(entry, "shared_beta_us_per_byte", where, at,
                                            default=beta),
            r2=float(r2) if r2 is not None else None,
            flows=flows,
            duplex_beta_us_per_byte=float(duplex) if duplex is not None else None,
            shared_alpha_us=float(shared_alpha) if shared_alpha is not None else None,
            burst_bytes=float(burst),
        )
    compute = _field(data, "compute", Mapping, where)
    topology = None
    if data.get("topology") is not None:
        try:
            topology = Topology.from_dict(_field(data, "topology", Mapping, where))
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            raise ProfileError(f"profile {where}: field 'topology': {exc}") from None
    samples = data.get("samples", [])
    if not isinstance(samples, list) or not all(isinstance(s, Mapping) for s in samples):
        raise ProfileError(f"profile {where}: field 'samples' must be a list of objects")
    versions = data.get("versions", {})
    if not isinstance(versions, Mapping):
        raise ProfileError(f"profile {where}: field 'versions' must be an object")
    return Profile(
        links=links,
        reduce_us_per_byte=_number(compute, "reduce_us_per_byte", where, "compute"),
        copy_us_per_byte=_number(compute, "copy_us_per_byte", where, "compute"),
        overhead_us=_number(data, "overhead_us", where, ""),
        topology=topology,
        transport=str(data.get("transport", "")),
        intra=str(data.get("intra", "")),
        versions={str(k): str(v) for k, v in versions.items()},
        samples=tuple(dict(s) for s in samples),
        created=str(data.get("created", "")),
        source=where,
        machines=_machines(data.get("machines", []), where),
    )


def _machines(value: Any, where: str) -> tuple[Machine, ...]:
    """The optional `machines` field: a list of {"ranks": [distinct ints >= 0], "cores": int
    >= 1}, no rank on two machines (profiles written before it existed have none)."""
    if not isinstance(value, list):
        raise ProfileError(f"profile {where}: field 'machines' must be a list")
    out, seen = [], set()
    for k, entry in enumerate(value):
        at = f"machines[{k}]"
        ranks = entry.get("ranks") if isinstance(entry, Mapping) else None
        cores = entry.get("cores") if isinstance(entry, Mapping) else None
        if (not isinstance(ranks, list) or not ranks
                or not all(type(r) is int and r >= 0 for r in ranks)):
            raise ProfileError(f"profile {where}: field '{at}.ranks' must be a non-empty list "
                               "of rank numbers")
        if type(cores) is not int or cores < 1:
            raise ProfileError(f"profile {where}: field '{at}.cores' must be an int >= 1, "
                               f"got {cores!r}")
        if seen & set(ranks) or len(set(ranks)) != len(ranks):
            raise ProfileError(f"profile {where}: field '{at}.ranks' repeats a rank")
        seen |= set(ranks)
        out.append(Machine(tuple(ranks), cores))
    return tuple(out)


def _finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _field(data: Mapping[str, Any], name: str, kind: type, where: str) -> Any:
    if name not in data:
        raise ProfileError(f"profile {where}: missing field '{name}'")
    value = data[name]
    if not isinstance(value, kind):
        raise ProfileError(f"profile {where}: field '{name}' has the wrong type "
                           f"({type(value).__name__})")
    return value


def _number(data: Mapping[str, Any], name: str, where: str, at: str,
            default: float | None = None) -> float:
    path = f"{at}.{name}" if at else name
    if name not in data:
        if default is not None:
            return default
        raise ProfileError(f"profile {where}: missing field '{path}'")
    value = data[name]
    if not _finite(value) or value < 0:
        raise ProfileError(f"profile {where}: field '{path}' must be a finite number >= 0, "
                           f"got {value!r}")
    return float(value)
