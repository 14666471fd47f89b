"""The emulated cluster: namespaces, shaped links, mpirun/torchrun jobs across nodes.

Root only (network namespaces): the module is skipped with the reason otherwise. Every
test brings its cluster down in a fixture, even when it fails, and the state file lives in
the test's temporary folder (the namespace names are fixed: do not run this while using
an emulated cluster of your own on the same machine).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from topocoll.topology import cluster
from topocoll.topology.cluster import (
    NODE_PREFIX,
    SWITCH_NS,
    cluster_down,
    cluster_run,
    cluster_up,
    emulated_cluster,
    format_status,
    load_state,
    namespace_pids,
    our_namespaces,
)


def _netns_unusable() -> str | None:
    """Why namespaces cannot be used here (None when they can): probed once."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    probe = f"tc-probe-{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                              timeout=20)
        if made.returncode != 0:
            return f"`ip netns add` does not work here: {made.stderr.strip()}"
        up = subprocess.run(["ip", "-n", probe, "link", "set", "lo", "up"],
                            capture_output=True, text=True, timeout=20)
        if up.returncode != 0:
            return f"cannot configure a network namespace here: {up.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` does not work here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20,
                       check=False)
    return None


_REASON = _netns_unusable()
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(_REASON is not None, reason=f"emulated cluster: {_REASON}"),
]

PYTHON = sys.executable

MPI_HOSTS = """
from mpi4py import MPI
import os
comm = MPI.COMM_WORLD
import sys
sys.stdout.write(f"rank {comm.Get_rank()} host {MPI.Get_processor_name()} "
                 f"topology {os.environ.get('TOPOCOLL_TOPOLOGY')}\\n")
sys.stdout.flush()
"""

TORCH_HOSTS = """
import os, socket
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
assert value.item() == world * (world + 1) / 2, value
import sys  # one write per line: ranks share the pipe, a separate newline can interleave
sys.stdout.write(f"rank {rank} host {socket.gethostname()} sum {value.item():g}\\n")
sys.stdout.flush()
dist.destroy_process_group()
"""

TRANSFER = """
import socket, sys, time
mode, addr, port, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "recv":
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((addr, port))
    server.listen(1)
    server.settimeout(30)
    print("ready", flush=True)
    conn, _ = server.accept()
    conn.settimeout(30)
    buf, got, start = bytearray(1 << 20), 0, None
    while got < nbytes:
        n = conn.recv_into(buf)
        if not n:
            break
        if start is None:
            start = time.perf_counter()
        got += n
    elapsed = time.perf_counter() - start
    conn.sendall(b"k")
    print(f"{got} {elapsed:.6f}", flush=True)
else:
    sock = socket.create_connection((addr, port), timeout=30)
    chunk, left = bytes(1 << 20), nbytes
    while left > 0:
        sock.sendall(chunk[:min(left, len(chunk))])
        left -= len(chunk)
    sock.recv(1)
"""


@pytest.fixture(autouse=True)
def state_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private state file for the test; the cluster is always brought down after it."""
    path = tmp_path / "state" / "cluster.json"
    monkeypatch.setenv(cluster.STATE_ENV, str(path))
    try:
        yield path
    finally:
        cluster_down()
    assert our_namespaces() == [], "the test left namespaces behind"


def _topocoll(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "topocoll", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _sh(*cmd: str) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30,
                          check=True).stdout


def _hosts_by_rank(output: str) -> dict[int, str]:
    return {int(rank): host for rank, host in re.findall(r"rank (\d+) host (\S+?)(?= |$)",
                                                          output, flags=re.MULTILINE)}


def _assert_nothing_left(state_file: Path) -> None:
    assert our_namespaces() == []
    assert not state_file.exists()
    assert not any(Path("/etc/netns", ns).exists()
                   for ns in (f"{NODE_PREFIX}0", f"{NODE_PREFIX}1", SWITCH_NS))


@pytest.mark.timeout(90)
def test_up_and_down_are_idempotent(state_file: Path) -> None:
    links_before = _sh("ip", "-o", "link", "show")
    routes_before = _sh("ip", "route", "show")
    first = _topocoll("cluster", "up", "--nodes", "2", "--ranks-per-node", "2",
                      "--inter-node-rate", "1gbit")
    assert first.returncode == 0, first.stderr
    state = cluster_up(2, 2, rate="1gbit")  # again: cleans the first one up, then makes it
    assert our_namespaces() == [f"{NODE_PREFIX}0", f"{NODE_PREFIX}1", SWITCH_NS]
    assert load_state() == state and state.state_file == str(state_file)
    status = _topocoll("cluster", "status")
    assert status.returncode == 0 and "node1" in status.stdout and "10.77.0.2" in status.stdout
    # Nothing in the root namespace changed: no interface, no route.
    links = [line.split(":")[1].strip().split("@")[0] for line in links_before.splitlines()]
    assert [line.split(":")[1].strip().split("@")[0]
            for line in _sh("ip", "-o", "link", "show").splitlines()] == links
    assert _sh("ip", "route", "show") == routes_before
    for _ in range(2):
        down = _topocoll("cluster", "down")
        assert down.returncode == 0, down.stderr
        _assert_nothing_left(state_file)
    assert "nothing to remove" in down.stdout
    assert _topocoll("cluster", "status").stdout.strip() == "no cluster"


@pytest.mark.timeout(90)
def test_up_refuses_while_a_job_runs_on_the_cluster(state_file: Path) -> None:
    """`cluster up` over a cluster in use would kill the job (it once killed the suite's
    last stage): refused naming the namespace and pid, unless --force."""
    state = cluster_up(2, 1, rate="1gbit")
    job = subprocess.Popen(["ip", "netns", "exec", state.nodes[1].namespace, "sleep", "600"],
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not _sleepers(state.nodes[1].namespace):
            assert time.monotonic() < deadline, "the sleeper never started"
            time.sleep(0.1)
        refused = _topocoll("cluster", "up", "--nodes", "2", "--ranks-per-node", "1")
        assert refused.returncode != 0
        assert "in use" in refused.stderr and state.nodes[1].namespace in refused.stderr
        assert f"pid {_sleepers(state.nodes[1].namespace)[0]}" in refused.stderr
        assert job.poll() is None, "the refused `up` killed the job"
        with pytest.raises(cluster.ClusterError, match="in use"):
            cluster_up(2, 1, rate="1gbit")
        forced = _topocoll("cluster", "up", "--nodes", "2", "--ranks-per-node", "1",
                           "--force")
        assert forced.returncode == 0, forced.stderr
        assert job.wait(10) != 0  # --force replaced the cluster and killed the job
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(10)


@pytest.mark.timeout(90)
def test_down_kills_what_a_crashed_job_left(state_file: Path) -> None:
    state = cluster_up(2, 1, rate="1gbit")
    # A rank left behind in a node, and a whole `cluster run` whose wrapper died (SIGKILL:
    # no chance to clean up) while its ranks kept running on both nodes.
    orphan = subprocess.Popen(["ip", "netns", "exec", state.nodes[0].namespace, "sleep",
                               "600"], start_new_session=True)
    job = subprocess.Popen([PYTHON, "-m", "topocoll", "cluster", "run", "--launcher",
                            "mpirun", "--", "sleep", "600"], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not all(_sleepers(node.namespace) for node in state.nodes):
            assert time.monotonic() < deadline, "the job never started on both nodes"
            assert job.poll() is None, "the job ended early"
            time.sleep(0.2)
        job.kill()
        job.wait(10)
        assert all(_sleepers(node.namespace) for node in state.nodes)
        removed = cluster_down()
        assert set(removed) == set(state.namespaces)
        assert orphan.wait(10) != 0  # killed
        _assert_nothing_left(state_file)
        assert not _sleepers_anywhere()
    finally:
        for proc in (orphan, job):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _sleepers(ns: str) -> list[int]:
    return [pid for pid in namespace_pids(ns) if _cmdline(pid)[:2] == ["sleep", "600"]]


def _sleepers_anywhere() -> list[int]:
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if _cmdline(pid)[:2] == ["sleep", "600"]]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


@pytest.mark.timeout(60)
def test_emulated_cluster_context_always_brings_it_down(state_file: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), \
            emulated_cluster(2, 1, rate="500mbit") as state:
        assert load_state() == state and state.rate_bytes_per_s == 62.5e6
        assert set(our_namespaces()) == set(state.namespaces)
        raise RuntimeError("boom")
    _assert_nothing_left(state_file)


@pytest.mark.timeout(60)
def test_uneven_layout_with_two_rails(state_file: Path) -> None:
    state = cluster_up(layout="3,5", rails=2, rate="1gbit")
    assert [node.ranks for node in state.nodes] == [3, 5]
    assert state.topology == "3,5:rails=2"
    assert state.subnets == ["10.77.0.0/24", "10.77.1.0/24"]
    assert state.burst_bytes == 32 * 1024 and state.rate_bytes_per_s == 125e6
    for node in state.nodes:
        addresses = _sh("ip", "-n", node.namespace, "-o", "-4", "addr", "show")
        for rail in range(2):
            assert f"eth{rail}    inet 10.77.{rail}.{node.index + 1}/24" in addresses
            node_side = _sh("tc", "-n", node.namespace, "qdisc", "show", "dev", f"eth{rail}")
            switch_side = _sh("tc", "-n", SWITCH_NS, "qdisc", "show", "dev",
                              f"n{node.index}r{rail}")
            for qdisc in (node_side, switch_side):
                assert "tbf" in qdisc and "rate 1Gbit" in qdisc, qdisc
            node_link = _sh("ip", "-n", node.namespace, "-o", "link", "show", f"eth{rail}")
            switch_link = _sh("ip", "-n", SWITCH_NS, "-o", "link", "show",
                              f"n{node.index}r{rail}")
            for link in (node_link, switch_link):
                assert f"mtu {state.mtu} " in link and state.mtu == 9000, link
    for rail in range(2):
        ports = _sh("ip", "-n", SWITCH_NS, "-o", "link", "show", "master", f"br{rail}")
        assert f"n0r{rail}@" in ports and f"n1r{rail}@" in ports
        bridge = _sh("ip", "-n", SWITCH_NS, "-o", "link", "show", f"br{rail}")
        assert f"mtu {state.mtu} " in bridge, bridge
    hosts = Path("/etc/netns", state.nodes[1].namespace, "hosts").read_text()
    assert "10.77.0.1 node0" in hosts
    for node in state.nodes:  # Linux's delayed ACKs unless --quickack; cubic, pinned
        routes = _sh("ip", "-n", node.namespace, "route", "show")
        assert "quickack" not in routes and "congctl cubic" in routes, routes
    assert "TCP cubic" in format_status(state, state.namespaces)


def test_quickack_routes_on_every_rail_of_every_node(state_file: Path) -> None:
    state = cluster_up(layout="2,3", rails=2, quickack=True)
    for node in state.nodes:
        routes = _sh("ip", "-n", node.namespace, "-o", "route", "show").splitlines()
        for rail in range(2):
            mine = [r for r in routes if r.startswith(f"10.77.{rail}.0/24 dev eth{rail} ")]
            assert len(mine) == 1 and "quickack 1" in mine[0], routes
    assert "quickack" in format_status(state, state.namespaces)


_CONGESTION_OF = """
import socket, sys
def algorithm(sock):
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\\0").decode()
if sys.argv[1] == "serve":
    server = socket.create_server((sys.argv[2], 0))
    print(server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    print(algorithm(conn), flush=True)
    conn.recv(1)
elif sys.argv[1] == "connect":
    client = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=20)
    print(algorithm(client), flush=True)
    client.sendall(b"x")
else:
    for host in sys.argv[2:]:
        server = socket.create_server((host, 0))
        client = socket.create_connection(server.getsockname(), timeout=20)
        conn, _ = server.accept()
        print(host, algorithm(client), algorithm(conn), flush=True)
"""


@pytest.mark.timeout(120)
def test_every_connection_of_a_node_uses_the_clusters_congestion_control(
        state_file: Path) -> None:
    """Real sockets, not just the route table: between nodes (both ends) and inside a
    node (its rail address and loopback). reno is the default of no machine we know, so
    this fails wherever the routes are not what the connections take."""
    state = cluster_up(2, 1, congestion_control="reno")
    node0, node1 = (node.namespace for node in state.nodes)
    server = subprocess.Popen(["ip", "netns", "exec", node1, sys.executable, "-c",
                               _CONGESTION_OF, "serve", "10.77.0.2"],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        client = subprocess.run(["ip", "netns", "exec", node0, sys.executable, "-c",
                                 _CONGESTION_OF, "connect", "10.77.0.2", port],
                                capture_output=True, text=True, timeout=60)
        assert client.stdout.split() == ["reno"], client.stderr
        assert server.stdout.readline().strip() == "reno"
    finally:
        server.kill()
        server.wait(timeout=20)
    inside = subprocess.run(["ip", "netns", "exec", node0, sys.executable, "-c",
                             _CONGESTION_OF, "local", "10.77.0.1", "127.0.0.1"],
                            capture_output=True, text=True, timeout=60)
    assert inside.stdout.splitlines() == ["10.77.0.1 reno reno", "127.0.0.1 reno reno"], \
        inside.stderr
    assert "TCP reno" in format_status(state, state.namespaces)


def test_up_refuses_a_congestion_control_the_kernel_lacks(state_file: Path) -> None:
    result = _topocoll("cluster", "up", "--nodes", "2", "--ranks-per-node", "1",
                       "--congestion-control", "nosuchalgo")
    assert result.returncode != 0
    assert "'nosuchalgo' is not available" in result.stderr and "Traceback" not in \
        result.stderr, result.stderr
    assert our_namespaces() == []


@pytest.mark.timeout(120)
def test_mpirun_job_sees_two_hosts(state_file: Path, tmp_path: Path) -> None:
    cluster_up(2, 2, rate="1gbit")
    script = tmp_path / "hosts.py"
    script.write_text(MPI_HOSTS)
    result = _topocoll("cluster", "run", "--launcher", "mpirun", "--timeout", "100", "--",
                       "python", str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    hosts = _hosts_by_rank(result.stdout)
    assert hosts == {0: "node0", 1: "node0", 2: "node1", 3: "node1"}, result.stdout
    assert "topology 2,2:rails=1" in result.stdout


@pytest.mark.timeout(120)
def test_torchrun_gloo_job_sees_two_hosts(state_file: Path, tmp_path: Path) -> None:
    cluster_up(2, 2, rate="1gbit")
    script = tmp_path / "gloo.py"
    script.write_text(TORCH_HOSTS)
    result = _topocoll("cluster", "run", "--launcher", "torchrun", "--timeout", "100", "--",
                       "python", str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    hosts = _hosts_by_rank(result.stdout)
    assert hosts == {0: "node0", 1: "node0", 2: "node1", 3: "node1"}, result.stdout
    assert result.stdout.count("sum 10") == 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_uneven_layout_jobs(launcher: str, state_file: Path, tmp_path: Path) -> None:
    cluster_up(layout="1,2", rate="1gbit")
    script = tmp_path / "job.py"
    script.write_text(MPI_HOSTS if launcher == "mpirun" else TORCH_HOSTS)
    out = tmp_path / "out.txt"
    with out.open("w") as sink:
        code = cluster_run(launcher, ["python", str(script)], 100, stdout=sink,
                           stderr=subprocess.DEVNULL)
    assert code == 0
    hosts = _hosts_by_rank(out.read_text())
    assert hosts == {0: "node0", 1: "node1", 2: "node1"}
    assert Counter(hosts.values()) == {"node0": 1, "node1": 2}


@pytest.mark.timeout(60)
def test_job_timeout_kills_everything(state_file: Path) -> None:
    state = cluster_up(2, 1, rate="1gbit")
    start = time.monotonic()
    code = cluster_run("mpirun", ["sleep", "600"], 4, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    assert code == 124
    assert time.monotonic() - start < 30
    assert not any(namespace_pids(node.namespace) for node in state.nodes)
    assert cluster_run("mpirun", ["sh", "-c", "exit 3"], 60, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL) == 3


def _transfer_seconds(sender_ns: str, receiver_ns: str, address: str, nbytes: int,
                      script: Path) -> float:
    receiver = subprocess.Popen(["ip", "netns", "exec", receiver_ns, PYTHON, str(script),
                                 "recv", address, "5201", str(nbytes)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", sender_ns, PYTHON, str(script), "send",
                        address, "5201", str(nbytes)], check=True, timeout=60)
        got, elapsed = receiver.stdout.readline().split()
        assert int(got) == nbytes
        return float(elapsed)
    finally:
        if receiver.poll() is None:
            receiver.kill()
        receiver.wait()


@pytest.mark.timeout(90)
def test_shaping_limits_the_inter_node_link(state_file: Path, tmp_path: Path) -> None:
    state = cluster_up(2, 1, rate="100mbit")
    script = tmp_path / "transfer.py"
    script.write_text(TRANSFER)
    nbytes = 4 << 20
    node0, node1 = state.nodes
    shaped = nbytes / _transfer_seconds(node0.namespace, node1.namespace, node1.address,
                                        nbytes, script)
    loopback = nbytes / _transfer_seconds(node0.namespace, node0.namespace, "127.0.0.1",
                                          nbytes, script)
    print(f"shaped 100mbit: {shaped / 1e6:.1f} MB/s, loopback: {loopback / 1e6:.0f} MB/s")
    assert 5e6 < shaped < 20e6  # 100 mbit/s = 12.5 MB/s on the wire
    assert loopback > 5 * shaped


@pytest.mark.timeout(30)
def test_non_root_gets_one_line_error(state_file: Path) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv (util-linux) to drop root")
    result = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                             PYTHON, "-m", "topocoll", "cluster", "up"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "topocoll cluster needs root (network namespaces)"
