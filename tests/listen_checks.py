"""One rank of the listening-socket check; `tests/test_security.py` starts it.

Usage (as a rank of `launch_local`): `python tests/listen_checks.py OUTDIR TRANSPORT`.
The rank joins a job on TRANSPORT (every level on it, `--intra same`), runs one
all-reduce so every lazily made endpoint exists, then records the addresses that it and
its launcher (the parent process, which serves the job's TCPStore) listen on, read from
/proc: `rank<r>.json` in OUTDIR.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path

LISTEN = "0A"  # TCP state in /proc/net/tcp*
UNCONNECTED = "07"  # UDP "close": bound, accepting datagrams from anyone


def _address(hex_address: str, v6: bool) -> str:
    """/proc/net/tcp's `0100007F:1F90` (host byte order words) as `127.0.0.1:8080`."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if v6:  # four 32-bit words, each in host (little-endian) order
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return f"[{ipaddress.IPv6Address(raw)}]:{int(port, 16)}"
    return f"{ipaddress.IPv4Address(raw[::-1])}:{int(port, 16)}"


def listening(pid: int) -> list[str]:
    """Addresses process `pid` listens on (TCP LISTEN, unconnected bound UDP)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            wanted = LISTEN if proto.startswith("tcp") else UNCONNECTED
            if inode in inodes and state == wanted:
                found.append(f"{proto} {_address(local, proto.endswith('6'))}")
    return sorted(found)


def main() -> int:
    import torch

    from topocoll.comm.job import init_job

    out, transport = Path(sys.argv[1]), sys.argv[2]
    job = init_job(transport, "same", 60.0, "torchrun")
    job.communicator.all_reduce(torch.ones(1000))
    record = {"rank": job.rank, "transport": transport, "rank_listens": listening(os.getpid()),
              "launcher_listens": listening(os.getppid())}
    (out / f"rank{job.rank}.json").write_text(json.dumps(record))
    job.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
