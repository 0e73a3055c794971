"""Blocking framed messages over one socket: the agent's side of a channel, and
the host's direct lane (:mod:`spear_nb.communication.lane`).

It imports only the standard library and the protocol module, so an agent that
uses it still starts within a few milliseconds.
"""

from __future__ import annotations

import functools
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from spear_nb.communication.protocol import (
    LENGTH,
    Message,
    check_length,
    frame,
    unpack,
)

T = TypeVar("T")


class Wire:
    """Blocking framed messages over one socket."""

    def __init__(self, sock: socket.socket, max_frame: int) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self._buffer = bytearray(256 * 1024)
        self._start = 0
        self._end = 0
        self._lock = threading.Lock()
        self.last_size = 0  # bytes of the last frame read, its length prefix included
        self.holding = False
        self._held: list[bytes] = []

    def read(self) -> Message | None:
        """Return the next message, or None when the peer closed the connection."""
        while True:
            have = self._end - self._start
            need = LENGTH.size
            if have >= LENGTH.size:
                (length,) = LENGTH.unpack_from(self._buffer, self._start)
                check_length(length, self.max_frame)
                need = LENGTH.size + length
                if have >= need:
                    begin = self._start + LENGTH.size
                    self._start += need
                    self.last_size = need
                    with memoryview(self._buffer) as view:
                        return unpack(view[begin : begin + length])
            if self._start + need > len(self._buffer):
                self._compact(need)
            with memoryview(self._buffer) as view:
                received = self.sock.recv_into(view[self._end :])
            if received == 0:
                return None
            self._end += received

    def _compact(self, need: int) -> None:
        pending = self._buffer[self._start : self._end]
        if need > len(self._buffer):
            self._buffer = bytearray(max(need, 2 * len(self._buffer)))
        self._buffer[: len(pending)] = pending
        self._start, self._end = 0, len(pending)

    def encode(self, message: Message) -> bytes:
        """One frame of ``message``; PayloadTooLarge if it exceeds the limit."""
        return frame(message, self.max_frame)

    def write(self, message: Message) -> None:
        data = frame(message, self.max_frame)
        with self._lock:
            if self.holding:
                self._held.append(data)
            else:
                self.sock.sendall(data)

    def buffered_frame(self) -> bool:
        """Whether a whole frame is already buffered (no read would block)."""
        have = self._end - self._start
        if have < LENGTH.size:
            return False
        (length,) = LENGTH.unpack_from(self._buffer, self._start)
        return have >= LENGTH.size + length

    def hold(self) -> None:
        """Keep replies back until :meth:`flush`, to send them in one call."""
        self.holding = True

    def flush(self) -> None:
        with self._lock:
            self.holding = False
            held, self._held = self._held, []
            if held:
                self.sock.sendall(b"".join(held))


def spin_briefly(look: Callable[[], T], seconds: float) -> T:
    """Call ``look`` until it finds something (a true result) or ``seconds``
    have passed, without sleeping; return its last result.

    A process woken from sleep on this kind of machine (a virtual CPU that was
    halted) answers tens of microseconds later than one that is still running;
    looking a little first saves that on back-to-back messages. The CPU is
    yielded between looks (and the GIL with it), so a peer on the same CPU, or
    a thread of this process, may still get to run.
    """
    until = time.perf_counter() + seconds
    while not (found := look()):
        if time.perf_counter() >= until:
            return found
        os.sched_yield()
    return found


def poll_briefly(poller: select.poll, seconds: float) -> list[tuple[int, int]]:
    """Look for input for up to ``seconds`` without sleeping (see
    :func:`spin_briefly`); return what the poll found ready, or an empty list if
    nothing came in time."""
    return spin_briefly(functools.partial(poller.poll, 0), seconds)


# At most this many waits in a row go without looking after looks that failed.
MAX_SKIP = 64


class BusyWait(Generic[T]):
    """Look busily before each blocking wait, for as long as that pays.

    It pays when the peer runs on another CPU and answers within the look. When
    a look finds nothing in time, the peer is slow to answer or shares this CPU
    (the scheduler puts two processes that talk back and forth there), where
    looking only keeps it from running; so the next waits block at once, twice
    as many after each failed look (up to :data:`MAX_SKIP`), and then one look
    tries again. A look that finds something starts over.
    """

    def __init__(self, look: Callable[[], T], seconds: float) -> None:
        self.look = look
        self.seconds = seconds
        self.skip = 0  # waits left that block without looking
        self._backoff = 0
        self.hits = 0
        self.misses = 0

    def wait(self) -> T | None:
        """Look for up to ``seconds`` unless looking has not been paying; return
        what the look found (None if it did not look, false if it found
        nothing)."""
        if not self.seconds:
            return None
        if self.skip:
            self.skip -= 1
            return None
        found = spin_briefly(self.look, self.seconds)
        if found:
            self.hits += 1
            self._backoff = 0
        else:
            self.misses += 1
            self._backoff = min(max(1, 2 * self._backoff), MAX_SKIP)
            self.skip = self._backoff
        return found


class BusyPoll(BusyWait[list[tuple[int, int]]]):
    """A :class:`BusyWait` on a ``select.poll``: what it finds is the ready list."""

    def __init__(self, poller: select.poll, seconds: float) -> None:
        super().__init__(functools.partial(poller.poll, 0), seconds)
        self.poller = poller


def _find_getcpu() -> Callable[[], int]:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            getcpu = ctypes.CDLL(None, use_errno=True).sched_getcpu
            getcpu.argtypes = []
            getcpu.restype = ctypes.c_int
            getcpu()
            return getcpu
        except (OSError, AttributeError):
            pass
    return lambda: -1


_getcpu: Callable[[], int] | None = None
# While both ends of a connection poll, the host tells the instance which CPU
# it runs on every this many calls, in a "cpu" header (see Spread).
CPU_SAMPLE = 8


def current_cpu() -> int:
    """The CPU the calling thread runs on now (about 0.1 µs), or -1 where the
    system does not tell."""
    global _getcpu
    if _getcpu is None:
        _getcpu = _find_getcpu()
    return _getcpu()


class Spread:
    """Keeps a polling thread off the CPU its polling peer runs on.

    Linux wakes the reader of a Unix or TCP socket on the writer's CPU, so two
    processes that take turns on one connection end up sharing a CPU, and stay
    there while both poll (nothing sleeps, so nothing is placed again). Polling
    ends then only take the CPU from each other: a round trip takes two to four
    times as long as with one end on each CPU. So when the peer says which CPU
    it runs on and it is this thread's, the thread moves itself to another CPU
    it may use: it narrows its own affinity to exclude this one, which moves it
    at once, and puts the affinity back as it was. Threads it starts later get
    the affinity they would have had anyway. A move the scheduler undoes before
    the next look makes the next looks further apart, twice as far each time
    (up to :data:`MAX_SKIP`).
    """

    def __init__(self) -> None:
        self.looks = 0  # times it compared its CPU with the peer's
        self.met = 0  # ... and found the two the same
        self.moves = 0
        self.skip = 0  # looks left to ignore
        self._backoff = 0
        self.disabled = False

    def check(self, peer_cpu: int) -> bool:
        """Move off ``peer_cpu`` if this thread runs there; True if it moved."""
        if self.disabled:
            return False
        if self.skip:
            self.skip -= 1
            return False
        here = current_cpu()
        self.looks += 1
        if here < 0 or here != peer_cpu:
            self._backoff = 0
            return False
        self.met += 1
        try:
            allowed = os.sched_getaffinity(0)
            if len(allowed) < 2 or here not in allowed:
                return False
            os.sched_setaffinity(0, allowed - {here})
        except (OSError, AttributeError):  # not allowed here, or not Linux
            self.disabled = True
            return False
        try:
            os.sched_setaffinity(0, allowed)
        except OSError:  # cannot be put back: never narrow it again
            self.disabled = True
        self.moves += 1
        self.skip = self._backoff
        self._backoff = min(max(1, 2 * self._backoff), MAX_SKIP)
        return True
