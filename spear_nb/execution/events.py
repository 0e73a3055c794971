"""Structured events of the flow, kept in a bounded in-memory log."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from spear_nb.execution.model import PHASES, Execution


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


Entry = Event | Execution


class EventLog:
    """The last ``maxlen`` entries, with listeners for live views.

    An entry is a lifecycle :class:`Event` or an :class:`Execution`, which stands
    for the events of its phases: the hot path marks times on the execution and
    the events are built only when someone reads the log.
    """

    def __init__(self, maxlen: int = 10_000) -> None:
        self._events: deque[Entry] = deque(maxlen=maxlen)
        self._seq = itertools.count(1)
        self._listeners: list[Callable[[Event], None]] = []
        self._execution_listeners: list[Callable[[Execution], None]] = []
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

    def record_execution(self, execution: Execution) -> None:
        """Log an execution; its phase events appear as its marks come in."""
        execution.seq = next(self._seq)
        for _ in range(len(PHASES) - 1):
            next(self._seq)
        self._events.append(execution)
        for listener in self._execution_listeners:
            listener(execution)

    def note(self, phase: str, detail: str, **ids: str) -> Event:
        """Record an instant lifecycle event (no duration)."""
        return self.emit(phase, time.perf_counter(), detail=detail, **ids)

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener(event)`` for each new lifecycle event.

        Returns the function that unsubscribes. Executions, whose phase events
        are built lazily, are announced through :meth:`subscribe_executions`.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def subscribe_executions(
        self, listener: Callable[[Execution], None]
    ) -> Callable[[], None]:
        """Call ``listener(execution)`` when an execution is logged."""
        self._execution_listeners.append(listener)
        return lambda: self._execution_listeners.remove(listener)

    def __iter__(self) -> Iterator[Event]:
        for entry in list(self._events):
            if isinstance(entry, Event):
                yield entry
            else:
                yield from self.phase_events(entry)

    def phase_events(self, execution: Execution) -> list[Event]:
        """The events of the phases an execution has been through so far."""
        events = []
        start = execution.started
        marks = execution.marks
        ended = None
        if execution.duration is not None:
            ended = execution.started + execution.duration
        details = {
            "request": execution.function,
            "instance": (
                ("new" if execution.new_instance else "reused")
                if len(marks) > 3
                else ""
            ),
            "channel": (
                f"{execution.channel_type} (direct lane)"
                if execution.direct
                else execution.channel_type
            ),
        }
        for index, phase in enumerate(PHASES):
            if index < len(marks):
                end = marks[index]
            elif ended is not None:
                end = ended  # the phase the call failed in
            else:
                break
            detail = details.get(phase, "")
            if index >= len(marks) and execution.error:
                detail = execution.error
            events.append(
                Event(
                    execution.seq + index,
                    phase,
                    start + self._offset,
                    end - start,
                    execution.execution_id,
                    execution.artifact_id if index >= 1 else "",
                    execution.task_id if index >= 2 else "",
                    execution.instance_id if index >= 3 else "",
                    detail,
                )
            )
            if index >= len(marks):
                break
            start = end
        return events

    def __len__(self) -> int:
        return len(self._events)

    @property
    def offset(self) -> float:
        """Add to a perf_counter value to get wall-clock time."""
        return self._offset
