"""Helpers that wait on real events (sockets, the session's event log)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import psutil

from spear_nb.communication.protocol import FrameDecoder, Message, unpack


class ReadySignal:
    """A loopback TCP listener that remote functions dial to say "I am running".

    Each connection sends ``"<pid>\\n"``; :meth:`wait` returns the next pid.
    :meth:`release` sends one byte to every connection so blocked functions return.
    """

    def __init__(self) -> None:
        # Room for hundreds of calls dialling at once (the stress tests).
        self._server = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port: int = self._server.getsockname()[1]
        self._conns: list[socket.socket] = []

    def wait(self, timeout: float = 30.0) -> int:
        self._server.settimeout(timeout)
        conn, _ = self._server.accept()
        self._conns.append(conn)
        conn.settimeout(timeout)
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(64)
            if not chunk:
                break
            data += chunk
        return int(data.strip())

    def wait_closed(self, timeout: float = 30.0) -> bool:
        """Wait until the newest connection is closed by the remote function."""
        conn = self._conns[-1]
        conn.settimeout(timeout)
        try:
            while True:
                data = conn.recv(64)
                if not data:
                    return True
        except OSError:
            return False

    def release(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.sendall(b"g")

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
        self._conns.clear()
        self._server.close()


class EventWaiter:
    """Wait until the session's event log holds an event matching ``predicate``.

    The listener is installed on the session's loop thread, and events already in
    the log are checked at the same time, so nothing is missed.
    """

    def __init__(self, session: Any, predicate: Callable[[Any], bool]) -> None:
        self._predicate = predicate
        self._event = threading.Event()
        self.matched: list[Any] = []
        self._unsubscribe: Callable[[], None] | None = None
        log = session._manager.events
        self._session = session

        async def subscribe() -> None:
            for event in log:
                self._on_event(event)
            self._unsubscribe = log.subscribe(self._on_event)

        session._loop.run(subscribe())

    def _on_event(self, event: Any) -> None:
        if self._predicate(event):
            self.matched.append(event)
            self._event.set()

    def wait(self, timeout: float = 30.0) -> bool:
        return self._event.wait(timeout)

    def close(self) -> None:
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is None or not self._session._loop.alive:
            return

        async def drop() -> None:
            unsubscribe()

        self._session._loop.run(drop())

    def __enter__(self) -> EventWaiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_messages(sock: socket.socket, max_frame: int = 1 << 20) -> list[Message]:
    """Read framed messages from ``sock`` until the peer closes it."""
    decoder = FrameDecoder(max_frame)
    messages: list[Message] = []
    while True:
        data = sock.recv(65536)
        if not data:
            return messages
        messages.extend(unpack(body) for body in decoder.feed(data))


def all_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Wait for the processes to exit; return the pids still alive."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [
        p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]


def rows(df: Any, **where: Any) -> Any:
    """The rows of a DataFrame whose columns equal the given values."""
    mask = None
    for column, value in where.items():
        m = df[column] == value
        mask = m if mask is None else mask & m
    return df if mask is None else df[mask]


def wait_until(
    predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02
) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Bounded: after ``timeout`` seconds it returns the last (falsy) value, so the
    caller's assert fails with a message instead of hanging.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


_grpc_keepalive: list[Any] = []


def warm_grpc() -> None:
    """Keep gRPC initialised for the rest of this process.

    gRPC opens its pollers, event fds and wake-up sockets when the first channel
    or server is made and closes them when the last one is garbage-collected,
    which happens at unpredictable times. Holding one blocking channel and one
    asyncio channel (never used) keeps that state open from here on, so the
    per-test leak check does not count it. Call it from a module-scoped fixture.
    """
    if _grpc_keepalive:
        return
    import asyncio

    import grpc
    import grpc.aio

    async def aio_channel() -> Any:
        return grpc.aio.insecure_channel("unix:/nonexistent/spear-nb-keepalive")

    _grpc_keepalive.append(grpc.insecure_channel("unix:/nonexistent/spear-nb-keep"))
    _grpc_keepalive.append(asyncio.run(aio_channel()))


def call_in_thread(
    call: Callable[[], Any],
) -> tuple[threading.Thread, list[BaseException]]:
    """Start ``call()`` in a thread; whatever it raises is appended to the list."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def signal_when_running(ready: ReadySignal, sig: int) -> threading.Thread:
    """Send ``sig`` to the instance as soon as its function says it runs."""

    def send() -> None:
        try:
            pid = ready.wait()
        except OSError:
            return
        os.kill(pid, sig)

    thread = threading.Thread(target=send)
    thread.start()
    return thread
