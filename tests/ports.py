"""Loopback ports for the servers tests start (Serve, moto, Ray heads, MLflow).

A port from ``bind(("127.0.0.1", 0))`` lies in the kernel's ephemeral range, which is also where every outgoing
connection gets its local port. Between choosing such a port and the server binding it (a Ray start-up: seconds to
minutes on a loaded machine), one of the many short connections Ray, MLflow and the tests make can take it, and its
TIME_WAIT then holds it for a minute: Serve's proxy failed with "Failed to bind to address '127.0.0.1:NNNNN'" that
way. Ports are therefore drawn at random below the ephemeral range and above Ray's worker ports (10002-19999), and
checked free by binding them."""

from __future__ import annotations

import random
import socket

LOWEST = 20000  # above Ray's default worker port range
_rng = random.SystemRandom()  # independent of test seeding, so concurrent sessions draw different ports


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports, free now and outside the ephemeral range (all held while choosing)."""
    high = _ephemeral_low() - 1
    held: list[socket.socket] = []
    try:
        for _ in range(200 * n):
            if len(held) == n:
                break
            sock = socket.socket()
            port = _rng.randint(LOWEST, high) if high - LOWEST >= 1000 else 0
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use, or in TIME_WAIT after an earlier server
                sock.close()
                continue
            held.append(sock)
        if len(held) < n:
            raise RuntimeError(f"no {n} free loopback ports in {LOWEST}-{high}")
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]
