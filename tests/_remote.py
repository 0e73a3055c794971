"""Functions that run inside instances.

conftest registers this module with ``cloudpickle.register_pickle_by_value`` so
that its functions travel by value: the agent never has to import the tests.
"""

from __future__ import annotations

import os
import socket
import time


def inc(x):
    return x + 1


def add(a, b=0, *, scale=1):
    return (a + b) * scale


def double(x):
    return 2 * x


def triple(x):
    return 3 * x


def pid():
    return os.getpid()


def echo_len(data):
    return len(data)


def make_bytes(n):
    return b"x" * n


def explode_on_purpose(x):
    raise ValueError(f"bad input {x!r}")


def return_unpicklable():
    import threading

    return threading.Lock()


def exit_with(code):
    os._exit(code)


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def report_and_block(port, value=None):
    """Tell the test we run (our pid, over TCP), then block until it says go.

    With ``port=None`` return ``value`` at once.
    """
    if port is None:
        return value
    conn = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        conn.sendall(f"{os.getpid()}\n".encode())
        conn.settimeout(60)
        conn.recv(1)
    finally:
        conn.close()
    return value


def report_and_sleep(port, seconds):
    """Tell the test we run, then sleep (to be killed or cancelled)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=60)
    conn.sendall(f"{os.getpid()}\n".encode())
    conn.close()
    time.sleep(seconds)
    return seconds


def raise_unprintable():
    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no str for you")

    raise Unprintable()


def chatty(text):
    print(text, flush=True)
    return len(text)


REPORT_FROM_STDIN = (
    "import os, socket, sys, time;"
    "c = socket.create_connection(('127.0.0.1', int(sys.stdin.read())));"
    "c.sendall(f'{os.getpid()}\\n'.encode()); c.close(); time.sleep(30)"
)


def count_up(n):
    for i in range(n):
        yield i * i


def numbers(limit=None):
    i = 0
    while limit is None or i < limit:
        yield i
        i += 1
