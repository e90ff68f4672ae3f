"""Sockets that belong to a lab network namespace, made by a process that runs outside it.

A socket lives in the network namespace of the thread that created it, for its whole life.
So the test process (root netns: it reads the far ends' maildirs and talks SSH to the
gateways) briefly switches the calling thread into ``/run/netns/<name>`` with setns(2),
creates the socket, and switches back. The connection then comes from the customer host's
address (198.51.100.30) exactly as if a program inside the namespace had opened it, without a
process per connection (which the load run could not afford).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
_lock = threading.Lock()


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({what}): {os.strerror(err)}")


def socket_in(netns: str, family: int = socket.AF_INET) -> socket.socket:
    """A new TCP socket inside the named network namespace (e.g. ``smglab-customer``)."""
    path = os.path.join(NETNS_DIR, netns)
    with _lock:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(path, os.O_RDONLY)
            try:
                _setns(target, path)
                try:
                    return socket.socket(family, socket.SOCK_STREAM)
                finally:
                    # Must never fail: the thread would stay in the wrong namespace.
                    _setns(own, "back to our own netns")
            finally:
                os.close(target)
        finally:
            os.close(own)


def connect(netns: str, address: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A blocking TCP connection from inside ``netns`` (timeout applies to every operation)."""
    sock = socket_in(netns)
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
    except OSError:
        sock.close()
        raise
    return sock


async def open_connection(
    netns: str, address: str, port: int, timeout: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over a TCP connection made from inside ``netns``."""
    sock = socket_in(netns)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (address, port)), timeout)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=1 << 20)
