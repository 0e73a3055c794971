"""Functions the notebook-layer tests run inside instances (sent by value)."""

from __future__ import annotations

import os
import socket


def square(x):
    return x * x


def fail_on_three(x):
    if x == 3:
        raise ValueError("three is not allowed")
    return x


def block_or_fail(item):
    """("block", port): say we run, then wait for the test; ("fail", x): raise."""
    action, value = item
    if action == "fail":
        raise ValueError(f"failing on purpose: {value}")
    conn = socket.create_connection(("127.0.0.1", value), timeout=60)
    try:
        conn.sendall(f"{os.getpid()}\n".encode())
        conn.settimeout(60)
        conn.recv(1)
    finally:
        conn.close()
    return value
