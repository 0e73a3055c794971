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


def inc_and_moves(x: int) -> tuple[int, tuple[int, int, int]]:
    """``x + 1``, and how often this agent compared its CPU with its caller's,
    found them the same, and moved off it."""
    import gc

    from spear_nb.agent._serve import Server

    (server,) = [o for o in gc.get_objects() if isinstance(o, Server)]
    spread = server.spread
    return x + 1, (spread.looks, spread.met, spread.moves)


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


# -- issue 3: channels, modes, cancel (appended) ------------------------------------


def identity(x):
    return x


def _wait_for_file(path, limit=60.0):
    """Poll for a file the test creates (a gate), for at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.001)


def gated_square(x, gate_dir):
    """Wait for ``gate_dir/go``, sleep a pseudo-random few ms, return ``x * x``.

    Call 0 also waits for ``gate_dir/release-0``, which the test creates only once
    it holds the result of call 1: call 0's reply always comes back after call 1's.
    """
    _wait_for_file(os.path.join(gate_dir, "go"))
    time.sleep(((x * 7919) % 5) / 1000)
    if x == 0:
        _wait_for_file(os.path.join(gate_dir, "release-0"))
    return x * x


def spin_until_cancelled(port, value=None):
    """Tell the test we run, then loop in Python bytecode until interrupted.

    The connection stays open while we spin; it closes when the cancel lands.
    With ``port=None`` return ``value`` at once.
    """
    if port is None:
        return value
    conn = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        conn.sendall(f"{os.getpid()}\n".encode())
        while True:
            time.sleep(0.005)
    finally:
        conn.close()


def spin_or_block(how, port, value=None):
    """``spin_until_cancelled`` or ``report_and_block``, chosen per call."""
    if how == "spin":
        return spin_until_cancelled(port, value)
    return report_and_block(port, value)


def two_steps(port):
    """Yield 0, then block until the test says go (see report_and_block), yield 1."""
    yield 0
    report_and_block(port)
    yield 1


# A command: with a payload "echo:<bytes>" it writes <bytes> to stdout; with a
# port it starts a sleeping child in its own process group, reports its own pid
# and then the child's (two connections), and sleeps.
REPORT_OR_ECHO = (
    "import os, socket, subprocess, sys, time\n"
    "data = sys.stdin.buffer.read()\n"
    "if data.startswith(b'echo:'):\n"
    "    sys.stdout.buffer.write(data[5:]); sys.exit(0)\n"
    "port = int(data)\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "for pid in (os.getpid(), child.pid):\n"
    "    c = socket.create_connection(('127.0.0.1', port))\n"
    "    c.sendall(f'{pid}\\n'.encode()); c.close()\n"
    "time.sleep(60)\n"
)


def byte_chunks(data, size):
    """Yield ``data`` in pieces of ``size`` bytes."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def sized_chunks(sizes):
    """Yield ``b"y" * n`` for each ``n`` in ``sizes``."""
    for n in sizes:
        yield b"y" * n


def deaf_sleep(seconds):
    """Sleep with the cancel signal blocked: a call that cannot be interrupted,
    like a long C call, so that cancelling it ends with its instance killed."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        time.sleep(seconds)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    return seconds


def import_path(names: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """This instance's ``sys.path``, and where each named module would be
    imported from (None: nowhere)."""
    import importlib.util
    import sys

    found = {}
    for name in names:
        spec = importlib.util.find_spec(name)
        found[name] = spec.origin if spec is not None else None
    return list(sys.path), found


def sys_exit(message: str) -> None:
    """Leave the way a script would: sys.exit(message)."""
    import sys

    sys.exit(message)


def interrupt_itself() -> None:
    raise KeyboardInterrupt("raised by the function itself")


def hold_the_gil(n):
    """One C call that keeps the GIL (no thread of the process runs meanwhile)."""
    return sum(range(n))


def module_attribute(module, name):
    """``getattr(import_module(module), name, None)`` in the instance."""
    import importlib

    return getattr(importlib.import_module(module), name, None)
