"""The direct lane: a blocking connection that a calling thread drives itself.

A synchronous ``Session.invoke`` from a notebook cell or a script would otherwise
hand its call to the session's event loop and wait to be handed the result back:
two thread wake-ups, which on a small machine cost more than the round trip to
the instance. So a process instance that serves one call at a time dials the host
a second time, and that connection, its lane, belongs to no event loop. A thread
that finds the instance idle takes the lane's lock, writes the execute request
and reads the reply itself; the loop is told about the call afterwards (metrics,
events, channel stats) and nobody waits for that.

Everything else (a first call, a busy instance, async and stream calls, a lane
that broke) goes through the loop and the instance's channel as before.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from spear_nb.communication.protocol import Message, MessageType
from spear_nb.communication.wire import CPU_SAMPLE, BusyPoll, Wire, current_cpu
from spear_nb.errors import ProtocolError

# How long a caller blocks in one read before it looks at the instance again
# (the loop may have found it paused or dead meanwhile).
SLICE = 0.25
# Lane request ids start here, far from the channel's, so that a cancel meant for
# one can never be taken for the other inside the instance.
FIRST_REQUEST_ID = 1 << 40
# A frame this small fits in the socket's buffer: sending it never waits.
_SMALL = 64 * 1024


def busy_poll_seconds(microseconds: float) -> float:
    """How long to busy-poll: ``microseconds``, or nothing on a single CPU, where
    polling only keeps the peer from running."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return microseconds * 1e-6 if cpus > 1 else 0.0


def _kernel_read_timeout(sock: socket.socket) -> bool:
    """Make the kernel end a blocking read of ``sock`` after :data:`SLICE`
    (``SO_RCVTIMEO``); False where it cannot."""
    seconds = int(SLICE)
    timeval = struct.pack("ll", seconds, int((SLICE - seconds) * 1e6))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    except (OSError, AttributeError):
        return False
    return True


class LaneLost(Exception):
    """The lane broke during a call: the instance closed it or died."""


class LaneTimeout(Exception):
    """No reply came before the deadline."""


class DirectLane:
    """One instance's blocking connection, used by one calling thread at a time."""

    def __init__(
        self,
        instance_id: str,
        sock: socket.socket,
        max_frame: int,
        busy_poll: float = 0.0,
    ) -> None:
        self.instance_id = instance_id
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        self.busy_poll = BusyPoll(poller, busy_poll)  # for a reply, before sleeping
        self.wire = Wire(sock, max_frame)
        self.broken = ""  # why the lane may not be used; "" while it works
        self.calls = 0
        self.sent = 0  # bytes of the last request; the reply's: wire.last_size
        self._lock = threading.Lock()
        self._ids = itertools.count(FIRST_REQUEST_ID)
        # Reads end after a slice either way. Where the kernel can time them
        # out, the socket blocks and each read is one system call; with
        # Python's own timeout every read and write polls first.
        self._slice: float | None = None if _kernel_read_timeout(sock) else SLICE
        sock.settimeout(self._slice)

    def acquire(self) -> bool:
        """Take the lane for one call if it is free and works; never blocks."""
        if self.broken or not self._lock.acquire(blocking=False):
            return False
        if self.broken:  # closed between the check and the lock
            self._lock.release()
            return False
        return True

    @property
    def in_use(self) -> bool:
        """Whether a thread holds the lane for a call now."""
        return self._lock.locked()

    def release(self) -> None:
        """Give the lane back; a lane that broke meanwhile is closed now."""
        if self.broken:
            with contextlib.suppress(OSError):
                self.wire.sock.close()
        self._lock.release()

    def call(
        self, message: Message, deadline: float, check: Callable[[], str]
    ) -> Message:
        """Send an execute request and block until its reply (the lane is held).

        ``check`` is asked between reads whether the instance is still fit to
        answer; a non-empty reason ends the wait with :class:`LaneLost`. Raises
        :class:`LaneTimeout` at ``deadline`` (a ``time.perf_counter`` value).
        """
        message.request_id = next(self._ids)
        if self.busy_poll.seconds and not self.calls % CPU_SAMPLE:
            message.headers = {**(message.headers or {}), "cpu": current_cpu()}
        data = self.wire.encode(message)  # PayloadTooLarge here: nothing was sent
        sock = self.wire.sock
        try:
            if len(data) > _SMALL:  # may wait for the instance to read it all
                sock.settimeout(max(0.001, deadline - time.perf_counter()))
            sock.sendall(data)
            if len(data) > _SMALL:
                sock.settimeout(self._slice)
        except KeyboardInterrupt:
            if len(data) > _SMALL:  # a frame may be half written: out of step
                self.close("a call was interrupted while it was being sent")
            # A small frame goes out in one write, before the interrupt is seen
            # or not at all: the lane is in step either way, and the caller
            # stops the call (or finds that nothing runs).
            raise
        except BaseException as exc:  # a frame may be half written: out of step
            self.close(f"sending a call failed ({exc!r})")
            if isinstance(exc, TimeoutError):
                raise LaneTimeout() from None
            if isinstance(exc, OSError):
                raise LaneLost(f"the lane broke while sending: {exc}") from exc
            raise
        self.calls += 1
        self.sent = len(data)
        return self.reply(message.request_id, deadline, check)

    def reply(self, rid: int, deadline: float, check: Callable[[], str]) -> Message:
        """Read until the reply to request ``rid`` arrives."""
        if not self.wire.buffered_frame():
            self.busy_poll.wait()
        while True:
            try:
                reply = self.wire.read()
            except (TimeoutError, BlockingIOError):  # a slice passed
                reason = self.broken or check()
                if reason:
                    raise LaneLost(reason) from None
                if time.perf_counter() >= deadline:
                    raise LaneTimeout() from None
                continue
            except (OSError, ProtocolError) as exc:
                raise LaneLost(self.broken or f"the lane broke: {exc}") from exc
            if reply is None:
                raise LaneLost(self.broken or "the instance closed its lane")
            if reply.type is MessageType.EXECUTE_RESPONSE and reply.request_id == rid:
                return reply
            raise LaneLost(
                f"the instance sent a {reply.type.name} for request "
                f"{reply.request_id} on its lane, not the reply to {rid}"
            )

    def close(self, reason: str) -> None:
        """Stop using the lane; a call blocked on it wakes up with ``reason``.

        Safe from any thread. The socket is closed by whoever holds the lane when
        it lets go, or here if nobody does.
        """
        if not self.broken:
            self.broken = reason
        with contextlib.suppress(OSError):
            self.wire.sock.shutdown(socket.SHUT_RDWR)
        if self._lock.acquire(blocking=False):
            try:
                with contextlib.suppress(OSError):
                    self.wire.sock.close()
            finally:
                self._lock.release()

    def __repr__(self) -> str:
        state = f"broken: {self.broken}" if self.broken else "open"
        return f"<DirectLane {self.instance_id} {state} calls={self.calls}>"
