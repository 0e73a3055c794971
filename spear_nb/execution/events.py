"""Structured events of the flow, kept in a bounded in-memory log."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

# The five phases of one execution, in order, then lifecycle events.
PHASES = ("request", "artifact", "task", "instance", "channel", "execute")


class Event:
    """One thing that happened: a phase of an execution or a lifecycle change."""

    __slots__ = (
        "artifact_id",
        "detail",
        "duration",
        "execution_id",
        "instance_id",
        "phase",
        "seq",
        "start",
        "task_id",
    )

    def __init__(
        self,
        seq: int,
        phase: str,
        start: float,
        duration: float,
        execution_id: str = "",
        artifact_id: str = "",
        task_id: str = "",
        instance_id: str = "",
        detail: str = "",
    ) -> None:
        self.seq = seq
        self.phase = phase
        self.start = start
        self.duration = duration
        self.execution_id = execution_id
        self.artifact_id = artifact_id
        self.task_id = task_id
        self.instance_id = instance_id
        self.detail = detail

    def as_row(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.start,
            "phase": self.phase,
            "duration_ms": self.duration * 1e3,
            "execution_id": self.execution_id,
            "artifact_id": self.artifact_id,
            "task_id": self.task_id,
            "instance_id": self.instance_id,
            "detail": self.detail,
        }

    def __repr__(self) -> str:
        return f"<Event {self.seq} {self.phase} {self.execution_id or self.detail}>"


class EventLog:
    """The last ``maxlen`` events, with listeners for live views."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self._events: deque[Event] = deque(maxlen=maxlen)
        self._seq = itertools.count(1)
        self._listeners: list[Callable[[Event], None]] = []
        # Wall-clock time of perf_counter's zero, so events carry wall times cheaply.
        self._offset = time.time() - time.perf_counter()

    def emit(
        self,
        phase: str,
        started: float,
        execution_id: str = "",
        artifact_id: str = "",
        task_id: str = "",
        instance_id: str = "",
        detail: str = "",
    ) -> Event:
        """Record a phase that began at ``started`` (a perf_counter value)."""
        now = time.perf_counter()
        event = Event(
            next(self._seq),
            phase,
            started + self._offset,
            now - started,
            execution_id,
            artifact_id,
            task_id,
            instance_id,
            detail,
        )
        self._events.append(event)
        for listener in self._listeners:
            listener(event)
        return event

    def note(self, phase: str, detail: str, **ids: str) -> Event:
        """Record an instant lifecycle event (no duration)."""
        return self.emit(phase, time.perf_counter(), detail=detail, **ids)

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener(event)`` for each new event; returns the unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def __iter__(self) -> Iterator[Event]:
        return iter(list(self._events))

    def __len__(self) -> int:
        return len(self._events)
