"""What the dashboard shows, taken on the session loop and drawn as HTML or text.

A :class:`Snapshot` is plain data read from the manager in one go on the session's
loop thread (where that state lives); rendering it needs no loop and does no I/O.
The live widget (:mod:`spear_nb.notebook.dashboard`) and the static fallback
(:class:`StaticDashboard`, used where ipywidgets is missing) draw the same
snapshot, so they show the same information.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from spear_nb.execution.events import EventLog
from spear_nb.execution.manager import TaskExecutionManager
from spear_nb.execution.model import Execution, ExecutionStatus, InstanceStatus
from spear_nb.notebook import frames
from spear_nb.notebook.display import render_macro
from spear_nb.notebook.timeline import ExecutionPhases, phases_of, render_html

if TYPE_CHECKING:
    from spear_nb.session import Session

# Rows shown per table; live instances and channels come first.
MAX_ROWS = 12
# Executions drawn in the timeline of recent executions.
RECENT_EXECUTIONS = 8
# Samples of the activity plot kept (one per refresh).
HISTORY = 120

_ENDED = (InstanceStatus.STOPPED.value, InstanceStatus.FAILED.value)


@dataclasses.dataclass(frozen=True)
class Sample:
    """Calls finished in one refresh period, and their latency."""

    time: float  # wall-clock time at the end of the period
    calls_per_s: float
    p50_ms: float | None
    mean_ms: float | None
    failed: int


class Activity:
    """Counts finished calls between samples, from the session's own hooks.

    Subscribes to the event log for new executions and hooks each one's
    ``listeners`` to hear when it ends; :meth:`sample` turns what was heard
    since the last sample into one :class:`Sample`. Everything here runs on the
    session loop thread.
    """

    def __init__(self, log: EventLog, running: Iterable[Execution] = ()) -> None:
        self.samples: deque[Sample] = deque(maxlen=HISTORY)
        self._durations: deque[float] = deque(maxlen=4096)
        self._count = 0
        self._failed = 0
        self._since = time.perf_counter()
        self._closed = False
        for execution in running:
            self._watch(execution)
        self._unsubscribe: Callable[[], None] | None = log.subscribe_executions(
            self._watch
        )

    def _watch(self, execution: Execution) -> None:
        if execution.listeners is None:
            execution.listeners = []
        execution.listeners.append(self._finished)

    def _finished(self, execution: Execution) -> None:
        if self._closed:
            return
        self._count += 1
        if execution.status is not ExecutionStatus.SUCCEEDED:
            self._failed += 1
        if execution.duration is not None:
            self._durations.append(execution.duration)

    def sample(self) -> Sample:
        """Close the current period and return its sample."""
        now = time.perf_counter()
        period = max(now - self._since, 1e-9)
        durations = list(self._durations)
        sample = Sample(
            time.time(),
            self._count / period,
            statistics.median(durations) * 1e3 if durations else None,
            statistics.fmean(durations) * 1e3 if durations else None,
            self._failed,
        )
        self._durations.clear()
        self._count = self._failed = 0
        self._since = now
        self.samples.append(sample)
        return sample

    def close(self) -> None:
        self._closed = True
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()


def activity_of(
    executions: Iterable[Execution], now: float, window: float = 60.0, step: float = 2.0
) -> list[Sample]:
    """Samples over the last ``window`` seconds, bucketed from the execution log.

    Used where no :class:`Activity` has been listening (the static dashboard).
    """
    buckets = max(1, int(window / step))
    start = now - buckets * step
    durations: list[list[float]] = [[] for _ in range(buckets)]
    failed = [0] * buckets
    for execution in executions:
        if execution.duration is None:
            continue
        ended = execution.submitted_at + execution.duration
        if ended < start or ended >= now:
            continue
        index = int((ended - start) / step)
        durations[index].append(execution.duration)
        if execution.status is not ExecutionStatus.SUCCEEDED:
            failed[index] += 1
    return [
        Sample(
            start + (i + 1) * step,
            len(d) / step,
            statistics.median(d) * 1e3 if d else None,
            statistics.fmean(d) * 1e3 if d else None,
            failed[i],
        )
        for i, d in enumerate(durations)
    ]


@dataclasses.dataclass
class Snapshot:
    """The state of a session at one moment, ready to draw."""

    session_id: str
    state: str
    taken_at: float
    functions: list[str]
    instances: list[dict[str, Any]]
    hidden_instances: int
    channels: list[dict[str, Any]]
    hidden_channels: int
    tasks: list[dict[str, Any]]
    recent: list[ExecutionPhases]
    samples: list[Sample]
    executions: int
    running: int
    paused: bool = False
    interval: float = 1.0

    @property
    def live_instances(self) -> list[str]:
        return [r["instance_id"] for r in self.instances if r["status"] == "ready"]

    def counts(self) -> dict[str, int]:
        return {
            "functions": len(self.functions),
            "ready": len(self.live_instances),
            "executions": self.executions,
            "running": self.running,
        }


def take(
    session: Session,
    manager: TaskExecutionManager,
    samples: Sequence[Sample] | None = None,
) -> Snapshot:
    """Read the manager's state; call on the session loop thread."""
    manager.settle_direct()
    now = time.perf_counter()
    instances, hidden_instances = _live_first(
        frames.instance_rows(manager), "status", _ENDED
    )
    channels, hidden_channels = _live_first(
        frames.channel_rows(manager), "state", ("closed", "disconnected")
    )
    current = {t.task_id for t in manager.functions.values()}
    tasks = [row for row in frames.task_rows(manager) if row["task_id"] in current]
    executions = manager.executions
    recent = [phases_of(e, now) for e in list(executions)[-RECENT_EXECUTIONS:]]
    running = sum(
        1
        for e in list(executions)[-256:]
        if e.status in (ExecutionStatus.PENDING, ExecutionStatus.RUNNING)
    )
    if samples is None:
        samples = activity_of(executions, time.time())
    return Snapshot(
        session_id=session.session_id,
        state=session.state.value,
        taken_at=time.time(),
        functions=sorted(manager.functions),
        instances=instances,
        hidden_instances=hidden_instances,
        channels=channels,
        hidden_channels=hidden_channels,
        tasks=tasks,
        recent=recent,
        samples=list(samples),
        executions=len(executions),
        running=running,
    )


def _live_first(
    rows: list[dict[str, Any]], column: str, ended: Sequence[str]
) -> tuple[list[dict[str, Any]], int]:
    live = [r for r in rows if r[column] not in ended]
    done = [r for r in rows if r[column] in ended]
    room = max(0, MAX_ROWS - len(live))
    shown = live + (done[-room:] if room else [])
    return shown, len(rows) - len(shown)


# -- formatting shared by the HTML and text views ----------------------------------


def ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def size(value: int) -> str:
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} GiB"


def instance_cells(row: dict[str, Any]) -> dict[str, Any]:
    capacity = max(1, int(row["capacity"] or 1))
    active = int(row["active"] or 0)
    return {
        "instance": row["instance_id"],
        "function": row["function"],
        "runtime": row["runtime"],
        "status": row["status"],
        "health": row["health"],
        "load": f"{active}/{capacity}",
        "load_fraction": min(1.0, active / capacity),
        "requests": str(row["requests_total"]),
        "failed": str(row["requests_failed"]),
        "latency": f"{ms(row['latency_mean_ms'])} / {ms(row['latency_p99_ms'])}",
        "channel": row["channel"] or "",
        "failure": row["failure"] or "",
    }


def channel_cells(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "channel": row["channel_id"],
        "instance": row["instance_id"],
        "type": row["type"]
        + (f" (from {row['fallback_from']})" if row["fallback_from"] else ""),
        "state": row["state"],
        "messages": f"{row['messages_sent']} / {row['messages_received']}",
        "direct": str(row["direct_calls"]),
        "bytes": f"{size(row['bytes_sent'])} / {size(row['bytes_received'])}",
        "errors": str(row["errors"] + row["auth_failures"]),
        "rtt": f"{ms(row['rtt_mean_ms'])} / {ms(row['rtt_p99_ms'])}",
    }


def task_cells(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "function": row["function"],
        "runtime": row["runtime"],
        "kind": row["kind"],
        "instances": f"{row['instances']}/{row['max_instances']}",
        "concurrency": str(row["max_concurrency"]),
        "calls": str(row["requests_total"]),
        "ok": str(row["requests_ok"]),
        "failed": str(row["requests_failed"]),
        "active": str(row["requests_active"]),
        "latency": f"{ms(row['latency_mean_ms'])} / {ms(row['latency_p99_ms'])}",
    }


# -- the activity plot ---------------------------------------------------------------

PLOT_WIDTH = 300
PLOT_HEIGHT = 56


def sparkline(values: Sequence[float | None], unit: str) -> dict[str, Any]:
    """Points of one small line plot, newest on the right.

    A period without a value (no call finished, so no latency) is skipped: the
    line joins the periods on either side of it.
    """
    known = [v for v in values if v is not None]
    top = max(known, default=0.0)
    top = top if top > 0 else 1.0
    step = (PLOT_WIDTH - 4) / max(1, HISTORY - 1)
    offset = PLOT_WIDTH - 3 - step * (len(values) - 1)
    points = [
        f"{offset + index * step:.1f},"
        f"{PLOT_HEIGHT - 2 - (value / top) * (PLOT_HEIGHT - 6):.1f}"
        for index, value in enumerate(values)
        if value is not None
    ]
    last = known[-1] if known else None
    return {
        "lines": [" ".join(points)] if len(points) > 1 else [],
        "dots": points[-1:],  # the newest value
        "top": f"{ms(top)} {unit}",
        "last": "-" if last is None else f"{ms(last)} {unit}",
    }


def activity_plots(samples: Sequence[Sample]) -> dict[str, Any]:
    return {
        "throughput": sparkline([s.calls_per_s for s in samples], "calls/s"),
        "latency": sparkline([s.p50_ms for s in samples], "ms"),
        "width": PLOT_WIDTH,
        "height": PLOT_HEIGHT,
        "count": len(samples),
        "failed": sum(s.failed for s in samples),
    }


# -- drawing ---------------------------------------------------------------------------

SECTIONS = ("header", "instances", "channels", "tasks", "activity", "timeline")


def render_section(name: str, snapshot: Snapshot) -> str:
    """The HTML of one part of the dashboard."""
    if name == "timeline":
        return render_html(snapshot.recent, align="start", details=False)
    values: dict[str, Any] = {"snapshot": snapshot}
    if name == "header":
        values["counts"] = snapshot.counts()
        values["clock"] = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at))
    elif name == "instances":
        values["rows"] = [instance_cells(r) for r in snapshot.instances]
        values["hidden"] = snapshot.hidden_instances
    elif name == "channels":
        values["rows"] = [channel_cells(r) for r in snapshot.channels]
        values["hidden"] = snapshot.hidden_channels
    elif name == "tasks":
        values["rows"] = [task_cells(r) for r in snapshot.tasks]
    elif name == "activity":
        values["plots"] = activity_plots(snapshot.samples)
    return render_macro("dashboard.html.j2", name, **values)


def render_panel(snapshot: Snapshot) -> str:
    """The whole dashboard as one HTML block (the static view)."""
    parts = {name: render_section(name, snapshot) for name in SECTIONS}
    return render_macro("dashboard.html.j2", "panel", parts=parts)


def render_text(snapshot: Snapshot) -> str:
    """The same information as plain text."""
    counts = snapshot.counts()
    lines = [
        f"spear_nb dashboard: session {snapshot.session_id} {snapshot.state}, "
        f"{counts['functions']} functions, {counts['ready']} ready instances, "
        f"{counts['executions']} executions ({counts['running']} running)"
    ]

    def table(title: str, rows: list[dict[str, Any]], hidden: int = 0) -> None:
        lines.append("")
        lines.append(title)
        if not rows:
            lines.append("  (none)")
            return
        df = pd.DataFrame(rows)
        lines.extend("  " + line for line in df.to_string(index=False).splitlines())
        if hidden:
            lines.append(f"  ... and {hidden} more")

    table(
        "instances (latency mean / p99 ms)",
        [
            {k: v for k, v in instance_cells(r).items() if k != "load_fraction"}
            for r in snapshot.instances
        ],
        snapshot.hidden_instances,
    )
    table(
        "channels (messages and bytes sent / received, rtt mean / p99 ms)",
        [channel_cells(r) for r in snapshot.channels],
        snapshot.hidden_channels,
    )
    table("functions (latency mean / p99 ms)", [task_cells(r) for r in snapshot.tasks])
    lines.append("")
    known = [s for s in snapshot.samples if s.calls_per_s or s.p50_ms is not None]
    if known:
        last = known[-1]
        lines.append(
            f"activity: {last.calls_per_s:.1f} calls/s, p50 {ms(last.p50_ms)} ms "
            "(latest period with calls)"
        )
    else:
        lines.append("activity: no calls finished recently")
    lines.append("")
    lines.append("recent executions")
    if not snapshot.recent:
        lines.append("  (none)")
    from spear_nb.notebook.timeline import Timeline

    lines.extend(repr(Timeline(snapshot.recent)).splitlines()[1:])
    return "\n".join(lines)


class StaticDashboard:
    """The dashboard without ipywidgets: a snapshot shown as HTML and as text.

    ``Session.dashboard()`` returns one where ipywidgets cannot be imported.
    Display it again after :meth:`refresh` to see the session's current state.
    """

    def __init__(self, session: Session, snapshot: Snapshot | None = None) -> None:
        self._session = session
        self.snapshot = session._run(self._take()) if snapshot is None else snapshot

    @classmethod
    async def acreate(cls, session: Session) -> StaticDashboard:
        """Take the snapshot from async code without blocking the caller's loop."""

        async def snap() -> Snapshot:
            return take(session, session._manager)

        return cls(session, await session._arun(snap()))

    async def _take(self) -> Snapshot:
        return take(self._session, self._session._manager)

    def refresh(self) -> StaticDashboard:
        """Take a new snapshot (and return self, to display it in a cell)."""
        self.snapshot = self._session._run(self._take())
        return self

    def close(self) -> None:
        """Nothing runs in the background; present for the widget's interface."""

    def __repr__(self) -> str:
        return render_text(self.snapshot)

    def _repr_html_(self) -> str:
        return render_panel(self.snapshot)
