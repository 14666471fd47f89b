"""Security checks of issue #9: what a local job listens on, and what we deserialize.

1. A local job (our launcher) must listen on loopback only: the launcher's TCPStore, and
   in every rank Gloo's pairs, UCX's TCP listener and anything else. Before the fix the
   store listened on `*:port` (torch binds the wildcard whatever host it is given) and
   each UCX rank on the machine's public address too; read here from /proc, as
   `ss -ltnp` shows it. (MPI jobs run mpirun in a loopback-only network namespace, which
   `test_transport_mpi.py` checks.)
2. Nothing read from the network or from files is unpickled or evaluated: the package
   source is parsed and every call that would (pickle/marshal/shelve loads, eval/exec,
   torch.load, yaml.load, numpy allow_pickle, torch's *_object collectives, mpi4py's
   lowercase pickle-based methods) is reported.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import sys
from pathlib import Path

import pytest

from topocoll.extras import available

ROOT = Path(__file__).resolve().parent.parent
CHECKS = Path(__file__).with_name("listen_checks.py")
PACKAGE_DIRS = ("comm", "topology", "benchmarks", "reports", "topocoll")

sys.path.insert(0, str(CHECKS.parent))
from listen_checks import listening  # noqa: E402


def _loopback(entry: str) -> bool:
    """`tcp 127.0.0.1:5000` / `tcp6 [::1]:5000` -> True; wildcard or public -> False."""
    host = entry.split(" ", 1)[1].rsplit(":", 1)[0].strip("[]")
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
@pytest.mark.parametrize("transport", ["gloo", "ucx", "shm"])
def test_local_job_listens_on_loopback_only(transport: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if transport == "ucx" and not available("ucxx"):
        pytest.skip("ucxx is not installed (extra 'ucx')")
    from topocoll.benchmarks.launcher import launch_local

    for key in ("GLOO_SOCKET_IFNAME", "UCX_NET_DEVICES"):  # the launcher's defaults must
        monkeypatch.delenv(key, raising=False)              # do it, not the caller's
    result = launch_local(3, [str(CHECKS), str(tmp_path), transport], timeout=120)
    assert result.returncode == 0, result.stderr_tail
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    for record in records:
        where = f"{transport}: rank {record['rank']}"
        exposed = [e for e in record["rank_listens"] if not _loopback(e)]
        assert not exposed, f"{where} listens beyond loopback: {exposed}"
        store = record["launcher_listens"]
        assert store, f"{where}: the launcher's store was not seen listening"
        assert all(_loopback(e) for e in store), f"{where}: the launcher's store: {store}"
    if transport in ("gloo", "ucx"):  # the check sees sockets where there are some
        assert all(r["rank_listens"] for r in records), records


def test_server_store_listens_on_the_named_address_only() -> None:
    from topocoll.comm.store import server_store

    store = server_store("127.0.0.1", 0, 1, timeout=10)
    try:
        mine = [e for e in listening(os.getpid()) if e.endswith(f":{store.port}")]
        assert mine == [f"tcp 127.0.0.1:{store.port}"], mine
    finally:
        del store
    with pytest.raises(OSError):  # not an address of this machine: refuse, do not widen
        server_store("192.0.2.254", 0, 1, timeout=10, strict=True)


# ----- nothing read is unpickled or evaluated -------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle"}
UNSAFE_CALLS = {"eval", "exec"}
UNSAFE_ATTRS = {("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"),
                ("pickle", "loads"), ("pickle", "load"), ("marshal", "loads")}
TORCH_OBJECT_COLLECTIVES = {"all_gather_object", "broadcast_object_list", "gather_object",
                            "scatter_object_list", "send_object_list", "recv_object_list"}
MPI4PY_PICKLING = {"bcast", "gather", "scatter", "allgather", "alltoall", "send", "recv",
                   "isend", "irecv", "sendrecv", "ssend", "bsend", "reduce", "allreduce"}


def _unsafe(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""]
            found += [(node.lineno, f"import {n}") for n in names
                      if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in UNSAFE_CALLS:
            found.append((node.lineno, f"{func.id}()"))
        if isinstance(func, ast.Attribute):
            owner = func.value
            owner_name = owner.id if isinstance(owner, ast.Name) else (
                owner.attr if isinstance(owner, ast.Attribute) else "")
            if (owner_name, func.attr) in UNSAFE_ATTRS:
                found.append((node.lineno, f"{owner_name}.{func.attr}()"))
            if func.attr in TORCH_OBJECT_COLLECTIVES:
                found.append((node.lineno, f"{func.attr}() (pickles)"))
            if func.attr in MPI4PY_PICKLING and "comm" in owner_name.lower():
                found.append((node.lineno, f"{owner_name}.{func.attr}() (mpi4py pickles)"))
        for kw in node.keywords:
            if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant)
                                                 and kw.value.value is False):
                found.append((node.lineno, "allow_pickle"))
    return found


def _sources() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py"))


def test_nothing_read_is_unpickled_or_evaluated() -> None:
    problems = []
    for path in _sources():
        for line, what in _unsafe(ast.parse(path.read_text(), str(path))):
            problems.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert _sources(), "no package sources found"
    assert not problems, "unsafe deserialization or evaluation:\n" + "\n".join(problems)


@pytest.mark.parametrize("code, expected", [
    ("import pickle\npickle.loads(b)", ["import pickle", "pickle.loads()"]),
    ("eval(text)", ["eval()"]),
    ("torch.load(f)", ["torch.load()"]),
    ("np.load(f, allow_pickle=True)", ["allow_pickle"]),
    ("self.comm.bcast(obj)", ["comm.bcast() (mpi4py pickles)"]),
    ("dist.all_gather_object(out, obj)", ["all_gather_object() (pickles)"]),
    ("comm.Bcast(buf)\njson.loads(text)", []),
])
def test_the_scan_finds_what_it_looks_for(code: str, expected: list[str]) -> None:
    assert [what for _, what in _unsafe(ast.parse(code))] == expected, code
