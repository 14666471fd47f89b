"""A rendezvous store server that listens only on the address the job names.

torch's `TCPStore(host, port, is_master=True)` ignores `host` for its listening socket: it
binds the wildcard address (`*:port`, every interface, IPv4 and IPv6; seen with `ss -ltnp`
on torch 2.13), so a local job's store was reachable from the whole network. We bind the
socket ourselves to `host` and hand it over with `master_listen_fd`; the store owns it
from then on (and closes it when it is destroyed).
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from typing import Any

log = logging.getLogger("topocoll")

LOOPBACK = "127.0.0.1"


def _bound_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port` (port 0: the OS picks one)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def server_store(host: str, port: int, world_size: int | None, timeout: float,
                 wait_for_workers: bool = False, strict: bool = True) -> Any:
    """The master `TCPStore`, listening on `host` only (its `.port` is the bound port).

    `strict=False` falls back to torch's own wildcard bind (with a warning) when `host`
    is not an address of this machine, e.g. a MASTER_ADDR that reaches us through NAT:
    a job that worked before must not stop working, but the local launcher is strict.
    """
    import torch.distributed as dist

    try:
        sock = _bound_socket(host, port)
    except OSError as exc:
        if strict:
            raise
        log.warning("topocoll: cannot listen on %s:%d only (%s); the store listens on every "
                    "interface", host, port, exc)
        return dist.TCPStore(host, port, world_size, True, timeout=timedelta(seconds=timeout),
                             wait_for_workers=wait_for_workers)
    bound_port = sock.getsockname()[1]
    return dist.TCPStore(host, bound_port, world_size, True,
                         timeout=timedelta(seconds=timeout),
                         wait_for_workers=wait_for_workers, master_listen_fd=sock.detach())


__all__ = ["LOOPBACK", "server_store"]
