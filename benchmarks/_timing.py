"""Timing helpers shared by the benchmark scripts (not part of the package).

Every figure is a median with its p99 over individually timed calls; the warm-up
calls are never counted.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any


def summarize(samples: list[float]) -> dict[str, float]:
    """Median and p99 of durations in seconds, in microseconds, and the count."""
    ordered = sorted(samples)
    return {
        "median_us": statistics.median(ordered) * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e6,
        "n": len(ordered),
    }


def durations(call: Callable[[], Any], n: int) -> list[float]:
    """The duration of each of ``n`` calls of ``call``, in seconds."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def timed(call: Callable[[], Any], n: int, warmup: int = 50) -> dict[str, float]:
    """``warmup`` untimed calls, then the summary of ``n`` timed ones."""
    for _ in range(warmup):
        call()
    return summarize(durations(call, n))


async def timed_async(
    call: Callable[[], Awaitable[Any]], n: int, warmup: int = 50
) -> dict[str, float]:
    """:func:`timed` for a coroutine function, awaited on the running loop."""
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return summarize(samples)


# A batch: make ``k`` calls and return their durations.
Batch = Callable[[int], list[float]]


def interleaved(
    paths: dict[str, tuple[Batch, int]], rounds: int
) -> dict[str, dict[str, float]]:
    """Time every path in turn, round after round, so that all see the same load.

    ``paths`` maps a name to ``(batch, per_round)``: ``batch(k)`` makes ``k``
    calls and returns their durations. Each round starts one path further on.
    """
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for batch, per_round in paths.values():
        batch(max(3, per_round // 4))
    for r in range(rounds):
        order = list(paths.items())
        order = order[r % len(order) :] + order[: r % len(order)]
        for name, (batch, per_round) in order:
            samples[name].extend(batch(per_round))
    return {name: summarize(values) for name, values in samples.items()}


def each(call: Callable[[], Any]) -> Batch:
    """A batch for :func:`interleaved` that times ``k`` calls of ``call``."""
    return lambda k: durations(call, k)


def on_loop(session: Any, function: str, *args: Any) -> Batch:
    """A batch of calls awaited on a session's own loop: no thread hop."""

    async def run(k: int) -> list[float]:
        samples = []
        for _ in range(k):
            start = time.perf_counter()
            await session._invoke(function, args, {})
            samples.append(time.perf_counter() - start)
        return samples

    return lambda k: session._loop.run(run(k))


class ForkedEcho:
    """A blocking echo over a Unix socket pair, served by a forked child.

    The floor for any request/response between two processes on this machine.
    """

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.pid = os.fork()
        if self.pid == 0:
            # Keep only its own end: an inherited end of another echo would keep
            # that echo's child from seeing its host close.
            keep = theirs.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, 1 << 16)
            while data := theirs.recv(65536):
                theirs.sendall(data)
            os._exit(0)
        theirs.close()

    def call(self, payload: bytes) -> None:
        self.sock.sendall(payload)
        self.sock.recv(65536)

    def close(self) -> None:
        self.sock.close()
        os.waitpid(self.pid, 0)

    def __enter__(self) -> ForkedEcho:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
