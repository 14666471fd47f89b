"""The emulated multi-node cluster: one network namespace per node, shaped uplinks.

Why: collectives that know the topology only pay off when a node's inside is much faster
than its uplink. On one machine we get that by giving every "node" its own network
namespace (its own interfaces, addresses and hostname), joining the nodes through Linux
bridges in a "switch" namespace, and shaping every uplink with `tbf`. MPI and torchrun
then see several hosts: shared memory inside a node, TCP over a slow link between nodes.

What `cluster_up` creates (2 nodes, 2 rails)::

    tc-node0                       tc-switch                       tc-node1
    eth0 10.77.0.1/24 ==veth== n0r0 --[br0]-- n1r0 ==veth== eth0 10.77.0.2/24
    eth1 10.77.1.1/24 ==veth== n0r1 --[br1]-- n1r1 ==veth== eth1 10.77.1.2/24

- one namespace per node (`tc-node<i>`, loopback up, IPv6 off so that nothing picks a
  link-local address), hostname `node<i>` for every process we start there (through
  `unshare --uts`, so the machine's own hostname is untouched);
- one bridge per rail in `tc-switch`; rail k is the subnet 10.77.k.0/24 and node i is
  10.77.k.(i+1) on it. Each rail is a network of its own, as NIC rails are;
- both ends of every veth shaped with `tbf rate RATE burst 32kb latency 50ms`: the node
  side limits what a node sends, the switch side what it receives, like a real NIC.
  tbf lets `burst` bytes through at line speed, so it is kept small beside the messages
  we time and recorded in the state (a physical bound may add it back);
- TCP congestion control pinned on every route a node's TCP uses (its rail subnets, its
  own addresses and loopback), `cubic` by default: Linux's default. Namespaces otherwise
  inherit the machine's choice, and this VM's is `bbr`, under which a 1 MiB `pairwise`
  all-to-all over Gloo had batches of 55-180 ms among ones of 18-20 ms (mean 30-37 ms
  against 18.4-18.9 with cubic, Gloo's own all-to-all 21.6-23.6 against 18.5-18.8);
- jumbo frames on every veth and bridge (MTU 9000 by default, as cluster fabrics use):
  at 1500 bytes this 2-core machine spends the link's time in per-packet kernel work
  (one bulk flow 107 MB/s instead of 124, Gloo's 64 MiB all-reduce 1.6 s instead of
  1.0 s), and the shaper, not the CPU, must be what limits a flow;
- `/etc/netns/tc-node<i>/hosts` naming every node, so `node1` resolves inside the
  namespaces (`ip netns exec` mounts it over /etc/hosts; the machine's own file is not
  touched).

Nothing is created in, or routed through, the root namespace: the veths are created
directly inside the node namespaces with their peers in the switch namespace, so traffic
between nodes can only reach namespaces this module created.

The state (layout, rails, rate, burst, names, addresses, the `TOPOCOLL_TOPOLOGY` string)
goes to a JSON file (default `/run/topocoll/cluster.json`, or `$TOPOCOLL_CLUSTER_STATE`)
that `cluster_run`, `cluster_down` and the benchmarks read.

`cluster_run` starts a job on the nodes with mpirun (from node 0's namespace, the other
nodes reached through a generated "ssh agent" script that enters their namespace) or with
one torchrun per node namespace (static rendezvous on node 0's rail-0 address).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from .spec import ENV_VAR as TOPOLOGY_ENV_VAR
from .spec import parse_layout

NODE_PREFIX = "tc-node"
SWITCH_NS = "tc-switch"
HOST_PREFIX = "node"
SUBNET_PREFIX = "10.77"
DEFAULT_RATE = "1gbit"
DEFAULT_BURST = "32kb"
DEFAULT_LATENCY = "50ms"
DEFAULT_MTU = 9000
LEGACY_MTU = 1500
DEFAULT_CONGESTION_CONTROL = "cubic"  # Linux's default, whatever the machine runs
HOST_CONGESTION_CONTROL = "host"  # leave the routes alone: the machine's default applies
AVAILABLE_CONGESTION_CONTROL = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
MIN_MTU, MAX_MTU = 1280, 65535
DEFAULT_TIMEOUT = 600.0
STATE_ENV = "TOPOCOLL_CLUSTER_STATE"
DEFAULT_STATE_FILE = "/run/topocoll/cluster.json"
AGENT_NAME = "cluster-agent.sh"
NETNS_ETC = Path("/etc/netns")
TIMEOUT_RC = 124
KILL_GRACE = 3.0
MAX_NODES = 250  # host part .1 .. .250 of a /24
MAX_RAILS = 100
LAUNCHERS = ("mpirun", "torchrun")
NEEDS_ROOT = "topocoll cluster needs root (network namespaces)"

_OUR_NAMESPACE = re.compile(rf"^(?:{re.escape(NODE_PREFIX)}\d+|{re.escape(SWITCH_NS)})$")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(bit|bps)?$", re.IGNORECASE)
_SIZE = re.compile(r"^(\d+)\s*([kmg]?)(b|bit)?$", re.IGNORECASE)
_SI = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BINARY = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


class ClusterError(RuntimeError):
    """A user-facing failure of the emulated cluster: printed as one line."""


class RootRequired(ClusterError):
    """Namespaces, veths and qdiscs can only be created by root."""

    def __init__(self) -> None:
        super().__init__(NEEDS_ROOT)


# ----- the state ------------------------------------------------------------------------
@dataclass
class NodeState:
    """One emulated node: its namespace, hostname, ranks and per-rail devices/addresses."""

    index: int
    namespace: str
    hostname: str
    ranks: int
    devices: list[str]  # node-side veth per rail: eth0, eth1, ...
    addresses: list[str]  # this node's address on each rail
    switch_ports: list[str]  # switch-side veth per rail

    @property
    def address(self) -> str:
        """Rail 0's address: the one launchers use to reach the node."""
        return self.addresses[0]


@dataclass
class ClusterState:
    """Everything `up` created and `run`/`down`/the benchmarks need (saved as JSON)."""

    layout: list[int]
    rails: int
    rate: str
    rate_bytes_per_s: float
    burst: str
    burst_bytes: int
    latency: str
    switch: str
    bridges: list[str]
    subnets: list[str]
    nodes: list[NodeState]
    topology: str  # the TOPOCOLL_TOPOLOGY value for jobs on this cluster
    state_file: str
    agent: str  # the mpirun (PRRTE) ssh agent script
    created: float = field(default_factory=time.time)
    mtu: int = DEFAULT_MTU  # of every veth and bridge
    quickack: bool = False  # every node's routes ACK at once (no delayed ACKs): see up
    congestion_control: str = DEFAULT_CONGESTION_CONTROL  # of every node route: see up

    @property
    def world_size(self) -> int:
        return sum(self.layout)

    @property
    def namespaces(self) -> list[str]:
        return [node.namespace for node in self.nodes] + [self.switch]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterState:
        fields = dict(data)
        fields["nodes"] = [NodeState(**node) for node in fields["nodes"]]
        fields.setdefault("mtu", LEGACY_MTU)  # written before the field: kernel default links
        fields.setdefault("quickack", False)  # written before the field: delayed ACKs
        # written before the field: the routes were left to the machine's default
        fields.setdefault("congestion_control", HOST_CONGESTION_CONTROL)
        return cls(**fields)


def state_file_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Where the state lives: `path`, else `$TOPOCOLL_CLUSTER_STATE`, else /run/topocoll."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE_FILE)


def load_state(path: str | os.PathLike[str] | None = None) -> ClusterState | None:
    """The running cluster's state, or None when there is none (no file)."""
    file = state_file_path(path)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise ClusterError(f"cannot read the cluster state {file}: {exc}") from exc
    try:
        return ClusterState.from_dict(data)
    except (KeyError, TypeError) as exc:
        raise ClusterError(f"cluster state {file} is not one this version wrote: {exc}") \
            from exc


def require_state(path: str | os.PathLike[str] | None = None) -> ClusterState:
    """The state, or a clear error telling the user to bring a cluster up first."""
    state = load_state(path)
    if state is None:
        raise ClusterError(f"no emulated cluster (no {state_file_path(path)}); run "
                           "`topocoll cluster up` first")
    return state


# ----- parsing --------------------------------------------------------------------------
def parse_rate(text: str) -> float:
    """A tc rate (`1gbit`, `100mbit`, `12.5mbps`, a bare number = bit/s) in bytes/s.

    tc's `kbit`/`mbit`/`gbit` are decimal (1 mbit = 10^6 bit/s) and `*bps` are bytes.
    """
    match = _RATE.match(text.strip())
    if not match:
        raise ValueError(f"bad rate {text!r}: expected e.g. 1gbit, 100mbit, 12mbps")
    value = float(match[1]) * _SI[match[2].lower()]
    per_second = value if (match[3] or "").lower() == "bps" else value / 8
    if per_second <= 0:
        raise ValueError(f"bad rate {text!r}: must be positive")
    return per_second


def parse_burst(text: str) -> int:
    """A tc burst size (`32kb` = 32 KiB, tc's `k` being 1024 here) in bytes."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"bad burst {text!r}: expected e.g. 32kb")
    size = int(match[1]) * _BINARY[match[2].lower()]
    if (match[3] or "").lower() == "bit":
        size //= 8
    if size < 2048:
        raise ValueError(f"burst {text!r} is below one full-size packet; use e.g. 32kb")
    return size


def resolve_layout(nodes: int = 2, ranks_per_node: int = 4,
                   layout: str | Sequence[int] | None = None) -> list[int]:
    """Ranks per node: `layout` (`3,5`, `2x4` or a list) when given, else nodes x ranks."""
    if layout is None:
        sizes = [ranks_per_node] * nodes
    elif isinstance(layout, str):
        sizes = list(parse_layout(layout))
    else:
        sizes = [int(n) for n in layout]
    if not sizes or any(n < 1 for n in sizes):
        raise ValueError(f"layout {sizes}: every node needs at least one rank")
    if len(sizes) > MAX_NODES:
        raise ValueError(f"at most {MAX_NODES} emulated nodes, not {len(sizes)}")
    return sizes


def plan_cluster(layout: Sequence[int], rails: int = 1, rate: str = DEFAULT_RATE,
                 burst: str = DEFAULT_BURST, state_file: str | os.PathLike[str] | None = None,
                 mtu: int = DEFAULT_MTU, quickack: bool = False,
                 congestion_control: str = DEFAULT_CONGESTION_CONTROL) -> ClusterState:
    """Names and addresses of a cluster, without creating anything (pure, testable)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", congestion_control):
        raise ValueError(f"congestion control {congestion_control!r}: give an algorithm's "
                         f"name (e.g. cubic, reno, bbr) or {HOST_CONGESTION_CONTROL!r}")
    if not 1 <= rails <= MAX_RAILS:
        raise ValueError(f"rails must be 1..{MAX_RAILS}, not {rails}")
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise ValueError(f"mtu must be {MIN_MTU}..{MAX_MTU} bytes, not {mtu}")
    if parse_burst(burst) < mtu:
        raise ValueError(f"burst {burst!r} is below one {mtu}-byte packet (the MTU); "
                         "tbf would never send one")
    file = state_file_path(state_file)
    nodes = [
        NodeState(index=i, namespace=f"{NODE_PREFIX}{i}", hostname=f"{HOST_PREFIX}{i}",
                  ranks=int(ranks), devices=[f"eth{k}" for k in range(rails)],
                  addresses=[f"{SUBNET_PREFIX}.{k}.{i + 1}" for k in range(rails)],
                  switch_ports=[f"n{i}r{k}" for k in range(rails)])
        for i, ranks in enumerate(layout)
    ]
    return ClusterState(
        layout=[int(n) for n in layout], rails=rails, rate=rate,
        rate_bytes_per_s=parse_rate(rate), burst=burst, burst_bytes=parse_burst(burst),
        latency=DEFAULT_LATENCY, switch=SWITCH_NS, bridges=[f"br{k}" for k in range(rails)],
        subnets=[f"{SUBNET_PREFIX}.{k}.0/24" for k in range(rails)], nodes=nodes,
        topology=f"{','.join(str(n) for n in layout)}:rails={rails}",
        state_file=str(file), agent=str(file.parent / AGENT_NAME), mtu=mtu,
        quickack=quickack, congestion_control=congestion_control)


# ----- running ip / tc ------------------------------------------------------------------
def require_root() -> None:
    """Only root may create namespaces; say so in one line rather than fail half-way."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise RootRequired()
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            raise ClusterError(f"topocoll cluster needs `{tool}` (iproute2 / util-linux)")


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short system command; on failure raise with the command and its stderr."""
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60,
                            check=False)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise ClusterError(f"`{' '.join(cmd)}` failed: {detail[-1] if detail else ''}")
    return result


def _ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip -n NS ...`: every link/address command names its namespace (never the root's)."""
    return _run(["ip", "-n", ns, *args], check=check)


def _tbf(ns: str, device: str, state: ClusterState) -> None:
    """Shape `device`'s egress: a token bucket at the uplink rate, small burst."""
    _run(["tc", "-n", ns, "qdisc", "replace", "dev", device, "root", "tbf", "rate",
          state.rate, "burst", state.burst, "latency", state.latency])


def our_namespaces() -> list[str]:
    """Namespaces that carry our names (this run's or a crashed run's)."""
    result = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    return sorted(name for name in names if _OUR_NAMESPACE.match(name))


def namespace_pids(ns: str) -> list[int]:
    """Processes living in namespace `ns` (never this process)."""
    result = _run(["ip", "netns", "pids", ns], check=False)
    pids = [int(word) for word in result.stdout.split() if word.isdigit()]
    return [pid for pid in pids if pid != os.getpid()]


def kill_namespace_processes(namespaces: Sequence[str], grace: float = KILL_GRACE) -> int:
    """SIGTERM every process in `namespaces`, then SIGKILL what is left after `grace` s.

    A namespace with a process left in it outlives `ip netns del` (with its veths and
    addresses), so `down` and a timed-out job must empty them first. Returns how many
    processes were signalled.
    """
    victims = {pid for ns in namespaces for pid in namespace_pids(ns)}
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while victims and time.monotonic() < deadline:
        victims = {pid for ns in namespaces for pid in namespace_pids(ns)}
        if victims:
            time.sleep(0.05)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(victims)


# ----- up / down ------------------------------------------------------------------------
def _make_namespace(ns: str) -> None:
    """A fresh namespace with loopback up and IPv6 off (no link-local addresses to pick)."""
    _run(["ip", "netns", "add", ns])
    _ip(ns, "link", "set", "lo", "up")
    _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
          "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
         check=False)  # a kernel without IPv6 has nothing to turn off


def _make_switch(state: ClusterState) -> None:
    _make_namespace(state.switch)
    for bridge in state.bridges:
        _ip(state.switch, "link", "add", bridge, "mtu", str(state.mtu), "type", "bridge")
        _ip(state.switch, "link", "set", bridge, "up")


def _make_node(state: ClusterState, node: NodeState) -> None:
    """The node's namespace and, per rail, a shaped veth whose peer is on the rail bridge."""
    _make_namespace(node.namespace)
    for rail, bridge in enumerate(state.bridges):
        device, port = node.devices[rail], node.switch_ports[rail]
        # Created inside the node namespace, peer straight into the switch: the pair is
        # never visible in the root namespace.
        _ip(node.namespace, "link", "add", device, "mtu", str(state.mtu), "type", "veth",
            "peer", "name", port, "mtu", str(state.mtu), "netns", state.switch)
        _ip(state.switch, "link", "set", port, "master", bridge)
        _ip(state.switch, "link", "set", port, "up")
        _ip(node.namespace, "addr", "add", f"{node.addresses[rail]}/24", "dev", device)
        _ip(node.namespace, "link", "set", device, "up")
        _tbf(node.namespace, device, state)  # what the node sends
        _tbf(state.switch, port, state)  # what the node receives
    for route in node_routes(state, node):
        _ip(node.namespace, *route)


def _route_options(state: ClusterState) -> list[str]:
    if state.congestion_control == HOST_CONGESTION_CONTROL:
        return []
    return ["congctl", state.congestion_control]


def rail_route(state: ClusterState, node: NodeState, rail: int) -> list[str]:
    """`ip route` arguments for the rail's subnet route: `congctl` (see `node_routes`)
    and, with `state.quickack`, `quickack 1`: TCP on the node then ACKs every segment at
    once instead of delaying ACKs up to 40 ms.

    Why quickack is an option: under bbr (before the congestion control was pinned) a
    1 MiB `pairwise` all-to-all over Gloo on 2x4 had batches of 50-150 ms among ones of
    17-20 ms, and quickack removed them. Off by default: Linux delays ACKs unless told
    otherwise (reports/pairwise_delayed_ack.md)."""
    return ["route", "replace", state.subnets[rail], "dev", node.devices[rail], "proto",
            "kernel", "scope", "link", "src", node.addresses[rail], *_route_options(state),
            *(["quickack", "1"] if state.quickack else [])]


def node_routes(state: ClusterState, node: NodeState) -> list[list[str]]:
    """The `ip route` arguments that give every route the node's TCP can take the
    cluster's congestion control (and the rail routes quickack when asked).

    Rail subnets carry traffic between nodes; the local table's routes (the node's own
    rail addresses, loopback) carry Gloo's and TCPStore's connections inside the node,
    which the peers' baselines use. Per route rather than the namespace's sysctl because
    a namespace may only default to algorithms in the machine-wide allowed list (`reno
    bbr` on this VM), and routes leave the machine's own settings untouched."""
    options = _route_options(state)
    routes = [rail_route(state, node, rail) for rail in range(state.rails)
              if options or state.quickack]
    if options:
        routes += [["route", "replace", "table", "local", "local", address, "dev", device,
                    "proto", "kernel", "scope", "host", "src", address, *options]
                   for device, address in zip(node.devices, node.addresses)]
        routes += [["route", "replace", "table", "local", "local", prefix, "dev", "lo",
                    "proto", "kernel", "scope", "host", "src", "127.0.0.1", *options]
                   for prefix in ("127.0.0.0/8", "127.0.0.1")]
    return routes


def add_tcp_arguments(parser: argparse.ArgumentParser) -> None:
    """`--quickack` and `--congestion-control`, for every command that brings a cluster
    up (`topocoll cluster up`, the benchmark suite): one spelling, one default."""
    parser.add_argument("--quickack", action="store_true",
                        help="TCP on every node ACKs at once (route quickack 1) instead of "
                             "delaying ACKs up to 40 ms; off in the committed runs "
                             "(reports/pairwise_delayed_ack.md)")
    parser.add_argument("--congestion-control", default=DEFAULT_CONGESTION_CONTROL,
                        metavar="NAME",
                        help=f"TCP congestion control on every node route (default: "
                             f"{DEFAULT_CONGESTION_CONTROL}, Linux's default; "
                             f"'{HOST_CONGESTION_CONTROL}' keeps this machine's default)")


def available_congestion_controls() -> list[str]:
    """The TCP congestion control algorithms this kernel has loaded."""
    try:
        return AVAILABLE_CONGESTION_CONTROL.read_text().split()
    except OSError:
        return []


def check_congestion_control(name: str, available: Sequence[str]) -> None:
    """Refuse, before creating anything, an algorithm the kernel does not have: `ip
    route ... congctl` would fail half-way through `up` with a bare RTNETLINK error."""
    if name == HOST_CONGESTION_CONTROL or name in available:
        return
    raise ClusterError(
        f"cluster up: TCP congestion control {name!r} is not available on this machine "
        f"(it has: {' '.join(available) or 'none listed'}); pass --congestion-control with "
        f"one of those, or {HOST_CONGESTION_CONTROL!r} to keep the machine's default")


def hosts_file(state: ClusterState) -> str:
    """The /etc/hosts the node namespaces see: every node's name on every rail.

    Rail 0 carries the node's name (`node1`), rail k `node1-rail<k>`. The IPv4-mapped IPv6
    forms are listed too: a dual-stack server (torch's TCPStore) sees its peers as
    `::ffff:10.77.0.2`, and without them each reverse lookup fails with a warning.
    """
    lines = ["127.0.0.1 localhost", "::ffff:127.0.0.1 localhost"]
    for node in state.nodes:
        for rail, address in enumerate(node.addresses):
            name = node.hostname if rail == 0 else f"{node.hostname}-rail{rail}"
            lines += [f"{address} {name}", f"::ffff:{address} {name}"]
    return "\n".join(lines) + "\n"


def _write_hosts_files(state: ClusterState) -> None:
    """`/etc/netns/NS/hosts`: `ip netns exec` shows it as /etc/hosts inside NS only."""
    text = hosts_file(state)
    for node in state.nodes:
        folder = NETNS_ETC / node.namespace
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(text)
        except OSError:
            return  # read-only /etc: hostnames then only resolve through the launchers


def _remove_hosts_files() -> None:
    if not NETNS_ETC.is_dir():
        return
    for folder in NETNS_ETC.iterdir():
        if _OUR_NAMESPACE.match(folder.name) and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        NETNS_ETC.rmdir()  # only when empty: someone else's entries stay


def agent_script(state: ClusterState) -> str:
    """The PRRTE "ssh agent": `AGENT [ssh options] HOST COMMAND...`.

    PRRTE starts its daemon on every other host by calling the agent the way it would
    call ssh, the command arriving as one shell string. We enter the namespace of the
    node whose address (any rail) or hostname is HOST, give the daemon that node's
    hostname, and run the command there.
    """
    cases = []
    for node in state.nodes:
        names = "|".join([*node.addresses, node.hostname])
        cases.append(f"  {names}) ns={node.namespace}; name={node.hostname} ;;")
    body = "\n".join(cases)
    return f"""#!/bin/sh
# topocoll emulated cluster: PRRTE's ssh agent (generated by `topocoll cluster up`).
while [ $# -gt 0 ]; do
  case "$1" in
    -*) shift ;;
    *) break ;;
  esac
done
host="$1"
shift
case "$host" in
{body}
  *) echo "topocoll cluster agent: unknown host $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts sh -c "hostname $name && $*"
"""


def _write_state(state: ClusterState) -> None:
    file = Path(state.state_file)
    file.parent.mkdir(parents=True, exist_ok=True)
    agent = Path(state.agent)
    agent.write_text(agent_script(state))
    agent.chmod(0o755)
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_dict(), indent=2) + "\n")
    tmp.replace(file)


def cleanup(state_file: str | os.PathLike[str] | None = None) -> list[str]:
    """Remove everything with our names (idempotent); return the namespaces removed."""
    namespaces = our_namespaces()
    kill_namespace_processes([ns for ns in namespaces if ns != SWITCH_NS])
    for ns in namespaces:
        # Deleting a namespace deletes its veths (and their peers) and bridges with it.
        _run(["ip", "netns", "del", ns], check=False)
    _remove_hosts_files()
    file = state_file_path(state_file)
    state = None
    with contextlib.suppress(ClusterError):
        state = load_state(file)
    agents = {file.parent / AGENT_NAME}
    if state is not None:
        agents.add(Path(state.agent))
    for path in (file, *agents):
        path.unlink(missing_ok=True)
    return namespaces


def busy_namespaces() -> dict[str, list[int]]:
    """Our namespaces that processes live in (a job on the cluster), with their pids."""
    busy = {ns: namespace_pids(ns) for ns in our_namespaces()}
    return {ns: pids for ns, pids in busy.items() if pids}


def cluster_up(nodes: int = 2, ranks_per_node: int = 4, *,
               layout: str | Sequence[int] | None = None, rails: int = 1,
               rate: str = DEFAULT_RATE, burst: str = DEFAULT_BURST,
               state_file: str | os.PathLike[str] | None = None,
               mtu: int = DEFAULT_MTU, force: bool = False,
               quickack: bool = False,
               congestion_control: str = DEFAULT_CONGESTION_CONTROL) -> ClusterState:
    """Create the emulated cluster (after removing any leftovers) and save its state.

    Refused while processes live in a cluster's namespaces (unless `force`): removing
    the leftovers kills them, and a `cluster up` typed while the benchmark suite ran
    once killed the suite's last stage that way."""
    require_root()
    state = plan_cluster(resolve_layout(nodes, ranks_per_node, layout), rails, rate, burst,
                         state_file, mtu, quickack, congestion_control)
    check_congestion_control(congestion_control, available_congestion_controls())
    busy = {} if force else busy_namespaces()
    if busy:
        jobs = "; ".join(f"{ns}: pid {', '.join(map(str, pids[:5]))}"
                         + (f" and {len(pids) - 5} more" if len(pids) > 5 else "")
                         for ns, pids in sorted(busy.items()))
        raise ClusterError(f"cluster up: a cluster is in use ({jobs}); wait for that job, "
                           "or `topocoll cluster down` (which kills it) first, or pass "
                           "--force")
    cleanup(state_file)
    try:
        _make_switch(state)
        for node in state.nodes:
            _make_node(state, node)
        _write_hosts_files(state)
        _write_state(state)
    except BaseException:
        cleanup(state_file)
        raise
    return state


def cluster_down(state_file: str | os.PathLike[str] | None = None) -> list[str]:
    """Remove the cluster: kill what runs in it, delete namespaces, the state file."""
    require_root()
    return cleanup(state_file)


@contextlib.contextmanager
def emulated_cluster(nodes: int = 2, ranks_per_node: int = 4, **kwargs: Any,
                     ) -> Iterator[ClusterState]:
    """`cluster_up(...)` for the `with` block; always `cluster_down()` after it."""
    state_file = kwargs.get("state_file")
    try:
        yield cluster_up(nodes, ranks_per_node, **kwargs)
    finally:
        cluster_down(state_file)


def congestion_control_text(state: ClusterState) -> str:
    """`cubic`, or what the machine's default was when the routes were left to it."""
    if state.congestion_control != HOST_CONGESTION_CONTROL:
        return state.congestion_control
    return f"the machine's default ({machine_congestion_control()})"


def machine_congestion_control() -> str:
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "unknown"


def format_status(state: ClusterState | None, present: Sequence[str] = ()) -> str:
    """What `cluster status` prints: the state, or "no cluster" (and any leftovers)."""
    if state is None:
        text = "no cluster"
        if present:
            text += (f" (leftover namespaces: {', '.join(present)}; "
                     "`topocoll cluster down` removes them)")
        return text
    layout = ",".join(str(n) for n in state.layout)
    lines = [
        f"emulated cluster: {len(state.nodes)} nodes (layout {layout}, "
        f"{state.world_size} ranks), {state.rails} rail(s), {state.rate} per uplink "
        f"each way (tbf burst {state.burst} = {state.burst_bytes} B, latency "
        f"{state.latency}), MTU {state.mtu}, TCP {congestion_control_text(state)}"
        + (", quickack (no delayed ACKs)" if state.quickack else ""),
        f"state {state.state_file}; {TOPOLOGY_ENV_VAR}={state.topology}",
    ]
    for node in state.nodes:
        links = "  ".join(f"{dev} {addr}" for dev, addr in zip(node.devices, node.addresses))
        missing = "" if node.namespace in present else "  [namespace missing]"
        lines.append(f"  {node.hostname:8s} {node.namespace:10s} {node.ranks:3d} ranks  "
                     f"{links}{missing}")
    rails = ", ".join(f"{b} {s}" for b, s in zip(state.bridges, state.subnets))
    missing = "" if state.switch in present else "  [namespace missing]"
    lines.append(f"  switch   {state.switch:10s} {rails}{missing}")
    return "\n".join(lines)


def cluster_status(state_file: str | os.PathLike[str] | None = None) -> str:
    present = our_namespaces() if shutil.which("ip") else []
    return format_status(load_state(state_file), present)


# ----- running a job --------------------------------------------------------------------
def in_node(node: NodeState, argv: Sequence[str]) -> list[str]:
    """`argv` run inside the node's namespace with the node's hostname (own UTS ns)."""
    return ["ip", "netns", "exec", node.namespace, "unshare", "--uts", "sh", "-c",
            f'hostname {node.hostname} && exec "$@"', f"topocoll-{node.hostname}", *argv]


def job_env(state: ClusterState, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every process of the job sees.

    This interpreter's bin folder goes first on PATH so `python`, `mpirun`, `prted` and
    `topocoll` are the ones of this environment on every node; the topology comes from
    the state, so ranks know the nodes without guessing.
    """
    out = dict(os.environ if env is None else env)
    bin_dir = str(Path(sys.executable).parent)
    path = out.get("PATH", os.defpath)
    if path.split(os.pathsep)[0] != bin_dir:
        out["PATH"] = os.pathsep.join([bin_dir, path])
    if sys.prefix != sys.base_prefix:
        out.setdefault("VIRTUAL_ENV", sys.prefix)
    out[TOPOLOGY_ENV_VAR] = state.topology
    out.setdefault("OMP_NUM_THREADS", "1")
    out.setdefault("PYTHONUNBUFFERED", "1")
    if not out.get("TOPOCOLL_JOB_ID", "").isalnum():
        out["TOPOCOLL_JOB_ID"] = uuid.uuid4().hex[:12]
    return out


def mpirun_job_command(state: ClusterState, cmd: Sequence[str],
                       env: Mapping[str, str]) -> list[str]:
    """The mpirun argv (run in node 0's namespace) that starts `cmd` on every node.

    Even layouts map `ppr:R:node`; uneven ones (3,5) give each host its slot count and map
    by slot, which fills node 0's slots, then node 1's, ... so ranks are consecutive per
    node, as the topology string says.
    """
    from topocoll.comm.transports.mpirun import find_mpirun, mpirun_command

    if not cmd:
        raise ClusterError("no command to run: cluster run --launcher mpirun -- CMD ...")
    hosts = ",".join(f"{node.address}:{node.ranks}" for node in state.nodes)
    even = len(set(state.layout)) == 1
    mapping = f"ppr:{state.layout[0]}:node" if even else "slot"
    forwarded = ["PATH", "VIRTUAL_ENV", "PYTHONPATH", "OMP_NUM_THREADS", "PYTHONUNBUFFERED"]
    forwarded += sorted(name for name in env if name.startswith("TOPOCOLL_"))
    extra = ["--host", hosts, "--map-by", mapping, "--bind-to", "none"]
    for name in dict.fromkeys(forwarded):
        if name in env:
            extra += ["-x", name]
    subnets = ",".join(state.subnets)
    return mpirun_command(
        state.world_size, list(cmd[1:]), python=cmd[0], extra=extra, interface=subnets,
        mca={"btl": "self,sm,tcp", "pml": "ob1", "btl_tcp_if_include": subnets},
        # The runtime's own channel on rail 0 only: PRRTE 5.0.11's prterun segfaults when
        # oob_tcp_if_include lists two subnets.
        prtemca={"plm_ssh_agent": state.agent, "oob_tcp_if_include": state.subnets[0]},
        mpirun=find_mpirun())


def free_port(node: NodeState) -> int:
    """A port free on the node's rail-0 address (asked inside its namespace)."""
    probe = ("import socket; s = socket.socket(); "
             f"s.bind(({node.address!r}, 0)); print(s.getsockname()[1])")
    result = _run(["ip", "netns", "exec", node.namespace, sys.executable, "-c", probe])
    return int(result.stdout.strip())


def torchrun_node_commands(state: ClusterState, cmd: Sequence[str], port: int,
                           ) -> list[list[str]]:
    """One torchrun per node (static rendezvous on node 0), each inside its namespace.

    torchrun gathers every agent's `--nproc-per-node` through its store and numbers ranks
    by node, so uneven layouts (3,5) work. A command that is not a `.py` script (e.g.
    `python x.py`, `topocoll bench ...`) is run as is (`--no-python`).
    """
    if not cmd:
        raise ClusterError("no command to run: cluster run --launcher torchrun -- CMD ...")
    as_script = cmd[0] == "-m" or cmd[0].endswith(".py")
    program = list(cmd) if as_script else ["--no-python", *cmd]
    master = state.nodes[0].address
    return [
        in_node(node, [sys.executable, "-m", "torch.distributed.run",
                       "--nnodes", str(len(state.nodes)), "--node-rank", str(node.index),
                       "--nproc-per-node", str(node.ranks), "--master-addr", master,
                       "--master-port", str(port), "--rdzv-backend", "static",
                       "--max-restarts", "0", *program])
        for node in state.nodes
    ]


def cluster_run(launcher: str, cmd: Sequence[str], timeout: float = DEFAULT_TIMEOUT, *,
                env: Mapping[str, str] | None = None, stdout: IO[Any] | int | None = None,
                stderr: IO[Any] | int | None = None,
                state_file: str | os.PathLike[str] | None = None) -> int:
    """Run `cmd` across the nodes with `launcher`; return the job's exit code.

    The job's output goes to `stdout`/`stderr` (ours by default). Past `timeout` seconds,
    or on Ctrl-C, everything in the node namespaces is killed; a timeout returns 124.
    """
    from topocoll.comm.transports.shm import remove_segments

    require_root()
    if launcher not in LAUNCHERS:
        raise ClusterError(f"unknown launcher {launcher!r}; choose from {', '.join(LAUNCHERS)}")
    state = require_state(state_file)
    missing = sorted(set(state.namespaces) - set(our_namespaces()))
    if missing:
        raise ClusterError(f"the cluster's namespaces {', '.join(missing)} are gone; run "
                           "`topocoll cluster up` again")
    cmd = list(cmd[1:] if cmd and cmd[0] == "--" else cmd)
    run_env = job_env(state, env)
    if launcher == "mpirun":
        commands = [in_node(state.nodes[0], mpirun_job_command(state, cmd, run_env))]
        envs = [run_env]
    else:
        commands = torchrun_node_commands(state, cmd, free_port(state.nodes[0]))
        # Every rail for Gloo: it opens one context per device and picks one by tag, so
        # chunk j of the hierarchical all-reduce (tag 16 + j) travels on rail j mod K.
        envs = [{**run_env, "GLOO_SOCKET_IFNAME": ",".join(node.devices),
                 "TP_SOCKET_IFNAME": node.devices[0], "NCCL_SOCKET_IFNAME": node.devices[0]}
                for node in state.nodes]
    try:
        with _sigterm_exits():
            return _start_and_wait(state, commands, envs, timeout, stdout, stderr)
    finally:
        remove_segments(run_env["TOPOCOLL_JOB_ID"])  # what killed ranks could not unlink


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) while a job runs, so the job is killed on the way out.

    Python's default SIGTERM action ends the process without running `finally`, which
    would leave the ranks running in the namespaces (a CI timeout sends SIGTERM).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _start_and_wait(state: ClusterState, commands: Sequence[Sequence[str]],
                    envs: Sequence[Mapping[str, str]], timeout: float,
                    stdout: IO[Any] | int | None, stderr: IO[Any] | int | None) -> int:
    """Start the launcher process(es), wait for them; the first failure ends the job."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for argv, env in zip(commands, envs):
            procs.append(subprocess.Popen(list(argv), env=dict(env), stdout=stdout,
                                          stderr=stderr, stdin=subprocess.DEVNULL,
                                          start_new_session=True))
        code = _wait(procs, timeout)
        if code == TIMEOUT_RC and any(p.poll() is None for p in procs):
            print(f"[topocoll] cluster job timed out after {timeout:.0f} s; killing it",
                  file=sys.stderr, flush=True)
        return code
    finally:
        if any(p.poll() is None for p in procs):
            _kill_job(state, procs)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=KILL_GRACE)
        _reap_leftovers([node.namespace for node in state.nodes])


def _reap_leftovers(namespaces: Sequence[str], wait: float = KILL_GRACE) -> None:
    """Give what the job left in the nodes `wait` s to exit, then kill it.

    After mpirun returns, the other nodes' PRRTE daemons take a moment to exit; a rank
    that ignored its launcher's signal would stay forever and keep its namespace busy.
    A cluster runs one job at a time, so whatever is still there belongs to this job.
    """
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not any(namespace_pids(ns) for ns in namespaces):
            return
        time.sleep(0.1)
    kill_namespace_processes(namespaces, grace=1.0)


def _wait(procs: Sequence[subprocess.Popen[bytes]], timeout: float,
          failure_grace: float = 2.0) -> int:
    """All exit 0 -> 0; a failure -> its code (others get `failure_grace` s to follow)."""
    deadline = time.monotonic() + timeout
    failed: int | None = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            bad = [c for c in codes if c]
            return failed if failed is not None else (bad[0] if bad else 0)
        if failed is None:
            failed = next((c for c in codes if c), None)
            if failed is not None:
                deadline = min(deadline, time.monotonic() + failure_grace)
        if time.monotonic() > deadline:
            return failed if failed is not None else TIMEOUT_RC
        time.sleep(0.05)


def _kill_job(state: ClusterState, procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Kill the launchers' sessions and everything left in the node namespaces."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    kill_namespace_processes([node.namespace for node in state.nodes])
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


__all__ = [
    "DEFAULT_BURST", "DEFAULT_MTU", "DEFAULT_STATE_FILE", "NEEDS_ROOT", "NODE_PREFIX", "STATE_ENV",
    "SWITCH_NS", "ClusterError", "ClusterState", "NodeState", "RootRequired", "agent_script",
    "busy_namespaces", "cleanup", "cluster_down", "cluster_run", "cluster_status", "cluster_up",
    "emulated_cluster", "format_status", "in_node", "job_env", "kill_namespace_processes",
    "load_state", "mpirun_job_command", "namespace_pids", "our_namespaces", "parse_burst",
    "parse_rate", "plan_cluster", "require_root", "require_state", "resolve_layout",
    "torchrun_node_commands",
]
