"""The phases of executions as a chart: one bar per execution, a segment per phase.

The execution log keeps, for each call, the perf_counter time at which each phase
ended (``Execution.marks``). This module turns those marks into rows of segments
and draws them as an SVG Gantt chart (``Timeline._repr_html_``) or as text. The
``artifact`` and ``task`` lookups are one step of the flow (phase 2, *artifact and
task*), so they are drawn as one segment; ``Timeline.to_frame`` keeps both.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from spear_nb.errors import ConfigurationError
from spear_nb.execution.model import PHASES, Execution, ExecutionStatus

# The five phases of the flow as drawn: (label, phases of the event log it covers).
STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("request", ("request",)),
    ("artifact/task", ("artifact", "task")),
    ("instance", ("instance",)),
    ("channel", ("channel",)),
    ("execute", ("execute",)),
)
# Mid-tone colours that read on light and dark backgrounds alike.
COLOURS = {
    "request": "#7986cb",
    "artifact/task": "#4db6ac",
    "instance": "#ffb74d",
    "channel": "#ba68c8",
    "execute": "#4fc3f7",
}
TIMELINE_COLUMNS = [
    "execution_id",
    "function",
    "status",
    "instance_id",
    "new_instance",
    "phase",
    "start_ms",
    "duration_ms",
    "running",
]


@dataclasses.dataclass(frozen=True)
class Segment:
    """One phase of one execution; times in seconds of the perf_counter clock."""

    phase: str
    start: float
    duration: float
    running: bool = False  # the phase the call is in right now


@dataclasses.dataclass(frozen=True)
class ExecutionPhases:
    """The phases an execution has been through, read from its marks."""

    execution_id: str
    function: str
    status: str
    instance_id: str
    new_instance: bool
    start: float
    segments: tuple[Segment, ...]
    error: str = ""

    @property
    def end(self) -> float:
        if not self.segments:
            return self.start
        last = self.segments[-1]
        return last.start + last.duration

    @property
    def duration(self) -> float:
        return self.end - self.start

    def step_durations(self) -> dict[str, float]:
        """Seconds spent in each of the five steps (artifact and task summed)."""
        totals: dict[str, float] = {}
        for label, phases in STEPS:
            spent = [s.duration for s in self.segments if s.phase in phases]
            if spent:
                totals[label] = sum(spent)
        return totals


def phases_of(execution: Execution, now: float | None = None) -> ExecutionPhases:
    """Read the phases of ``execution`` from its marks (on the session loop).

    A call still running gets an open segment for its current phase, up to
    ``now`` (a perf_counter value; the present by default).
    """
    now = time.perf_counter() if now is None else now
    marks = list(execution.marks)
    ended = None
    if execution.duration is not None:
        ended = execution.started + execution.duration
    elif execution.status not in (ExecutionStatus.PENDING, ExecutionStatus.RUNNING):
        ended = marks[-1] if marks else execution.started  # refused before it ran
    segments: list[Segment] = []
    start = execution.started
    for index, phase in enumerate(PHASES):
        if index < len(marks):
            segments.append(Segment(phase, start, marks[index] - start))
            start = marks[index]
            continue
        if ended is not None:  # the phase the call failed in
            segments.append(Segment(phase, start, max(0.0, ended - start)))
        else:
            segments.append(Segment(phase, start, max(0.0, now - start), True))
        break
    return ExecutionPhases(
        execution.execution_id,
        execution.function,
        execution.status.value,
        execution.instance_id,
        execution.new_instance,
        execution.started,
        tuple(segments),
        execution.error,
    )


ALIGNMENTS = ("auto", "time", "start")


def overlapping(rows: Sequence[ExecutionPhases]) -> bool:
    """Whether any two of the executions ran at the same time."""
    ordered = sorted(rows, key=lambda r: r.start)
    return any(b.start < a.end for a, b in itertools.pairwise(ordered))


class Timeline:
    """Executions drawn by phase: an SVG chart in notebooks, a table as text.

    With ``align="time"`` the rows share one clock, so calls that overlapped
    (``Session.map``) are drawn side by side; with ``"start"`` each row starts
    at zero, which compares the phases of calls made one after another.
    ``"auto"`` picks ``"time"`` when some calls overlapped. ``to_frame()`` gives
    one row per execution and phase.
    """

    def __init__(self, rows: Sequence[ExecutionPhases], align: str = "auto") -> None:
        if align not in ALIGNMENTS:
            raise ConfigurationError(
                f"align must be one of {', '.join(ALIGNMENTS)}, not {align!r}"
            )
        self.rows = list(rows)
        if align == "auto":
            align = "time" if overlapping(self.rows) else "start"
        self.align = align

    def __len__(self) -> int:
        return len(self.rows)

    def to_frame(self) -> pd.DataFrame:
        """One row per execution and phase; ``start_ms`` from the first start."""
        origin = min((r.start for r in self.rows), default=0.0)
        records = [
            {
                "execution_id": row.execution_id,
                "function": row.function,
                "status": row.status,
                "instance_id": row.instance_id,
                "new_instance": row.new_instance,
                "phase": segment.phase,
                "start_ms": (segment.start - origin) * 1e3,
                "duration_ms": segment.duration * 1e3,
                "running": segment.running,
            }
            for row in self.rows
            for segment in row.segments
        ]
        return pd.DataFrame(records, columns=TIMELINE_COLUMNS)

    def __repr__(self) -> str:
        if not self.rows:
            return "<Timeline: no executions>"
        lines = [f"<Timeline of {len(self.rows)} execution(s)>"]
        for row in self.rows:
            steps = ", ".join(
                f"{label} {seconds * 1e3:.3f}"
                for label, seconds in row.step_durations().items()
            )
            where = describe_instance(row)
            lines.append(
                f"  {row.execution_id} {row.function} {row.status} "
                f"{row.duration * 1e3:.3f} ms{where}: {steps} (ms)"
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return render_html(self.rows, align=self.align)


def describe_instance(row: ExecutionPhases) -> str:
    if not row.instance_id:
        return ""
    return f" on {row.instance_id} ({'new' if row.new_instance else 'reused'})"


def format_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.1f} ms"
    return f"{ms * 1e3:.0f} µs"


# -- drawing ----------------------------------------------------------------------

LABEL_WIDTH = 190
BAR_WIDTH = 430
ROW_HEIGHT = 20
AXIS_HEIGHT = 18


def chart(rows: Sequence[ExecutionPhases], align: str = "time") -> dict[str, Any]:
    """Geometry of the SVG chart: rows of rectangles on one time axis.

    ``align="time"``: one clock for all rows; ``"start"``: each row from zero.
    """
    first = min((r.start for r in rows), default=0.0)
    if align == "start":
        span = max((r.duration for r in rows), default=0.0)
    else:
        span = max((r.end for r in rows), default=0.0) - first
    span = span if span > 0 else 1e-6
    scale = BAR_WIDTH / span
    drawn = []
    for index, row in enumerate(rows):
        origin = row.start if align == "start" else first
        y = AXIS_HEIGHT + index * ROW_HEIGHT
        rects = []
        for label, phases in STEPS:
            parts = [s for s in row.segments if s.phase in phases]
            if not parts:
                continue
            start = parts[0].start
            duration = sum(s.duration for s in parts)
            rects.append(
                {
                    "x": LABEL_WIDTH + (start - origin) * scale,
                    "width": max(1.5, duration * scale),
                    "colour": COLOURS[label],
                    "running": any(s.running for s in parts),
                    "title": f"{row.execution_id} {label}: {format_ms(duration)}",
                }
            )
        failed = row.status in (
            ExecutionStatus.FAILED.value,
            ExecutionStatus.TIMED_OUT.value,
            ExecutionStatus.CANCELLED.value,
        )
        drawn.append(
            {
                "y": y,
                "label": f"{row.execution_id} {row.function}",
                "detail": f"{format_ms(row.duration)}{describe_instance(row)}",
                "status": row.status,
                "failed": failed,
                "error": row.error,
                "rects": rects,
                "end_x": LABEL_WIDTH + (row.end - origin) * scale,
            }
        )
    ticks = [
        {"x": LABEL_WIDTH + BAR_WIDTH * f, "label": format_ms(span * f) if f else "0"}
        for f in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    return {
        "rows": drawn,
        "ticks": ticks,
        "width": LABEL_WIDTH + BAR_WIDTH + 50,
        "height": AXIS_HEIGHT + len(rows) * ROW_HEIGHT + 4,
        "label_width": LABEL_WIDTH,
        "bar_width": BAR_WIDTH,
        "legend": [{"label": label, "colour": COLOURS[label]} for label, _ in STEPS],
        "note": "each row from its own start" if align == "start" else "one clock",
    }


def render_html(
    rows: Sequence[ExecutionPhases], *, align: str = "start", details: bool = True
) -> str:
    """The chart, and for a single execution a table of its phase durations."""
    from spear_nb.notebook.display import render

    single = rows[0] if details and len(rows) == 1 else None
    steps = []
    if single is not None:
        steps = [
            {"label": label, "ms": f"{seconds * 1e3:.3f}"}
            for label, seconds in single.step_durations().items()
        ]
    return render(
        "timeline.html.j2",
        chart=chart(rows, align) if rows else None,
        single=single,
        steps=steps,
    )


def timeline_of(
    executions: Iterable[Execution], align: str = "auto", now: float | None = None
) -> Timeline:
    """A :class:`Timeline` of the given executions, in the order given."""
    now = time.perf_counter() if now is None else now
    return Timeline([phases_of(e, now) for e in executions], align)
