"""The session's state as pandas DataFrames with stable columns.

The column lists below are part of the public API: notebooks and users select
columns by these names. Times are ``pandas.Timestamp`` (UTC), durations in ms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from spear_nb.communication.channel import percentile
from spear_nb.execution.manager import TaskExecutionManager

INSTANCE_COLUMNS = [
    "instance_id",
    "function",
    "task_id",
    "runtime",
    "status",
    "health",
    "channel",
    "pid",
    "active",
    "capacity",
    "requests_total",
    "requests_ok",
    "requests_failed",
    "latency_mean_ms",
    "latency_p99_ms",
    "created_at",
    "ready_at",
    "last_request_at",
    "stopped_at",
    "failure",
]
TASK_COLUMNS = [
    "task_id",
    "function",
    "artifact_id",
    "runtime",
    "kind",
    "status",
    "instances",
    "max_instances",
    "max_concurrency",
    "timeout_s",
    "requests_total",
    "requests_ok",
    "requests_failed",
    "requests_active",
    "latency_mean_ms",
    "latency_p99_ms",
    "created_at",
]
CHANNEL_COLUMNS = [
    "channel_id",
    "instance_id",
    "type",
    "state",
    "address",
    "messages_sent",
    "messages_received",
    "bytes_sent",
    "bytes_received",
    "errors",
    "auth_failures",
    "heartbeats_sent",
    "heartbeats_received",
    "direct_calls",
    "in_flight",
    "rtt_mean_ms",
    "rtt_p99_ms",
    "connected_at",
    "last_activity",
    "fallback_from",
    "reconnects",
]
METRIC_COLUMNS = [
    "function",
    "calls",
    "succeeded",
    "failed",
    "cancelled",
    "timed_out",
    "new_instances",
    "p50_ms",
    "p99_ms",
    "mean_ms",
    "max_ms",
]
EVENT_COLUMNS = [
    "seq",
    "time",
    "phase",
    "duration_ms",
    "execution_id",
    "artifact_id",
    "task_id",
    "instance_id",
    "detail",
]
EXECUTION_COLUMNS = [
    "execution_id",
    "function",
    "mode",
    "status",
    "task_id",
    "instance_id",
    "new_instance",
    "direct",
    "submitted_at",
    "duration_ms",
    "error",
]

_TIME_COLUMNS = (
    "created_at",
    "ready_at",
    "last_request_at",
    "stopped_at",
    "connected_at",
    "last_activity",
    "time",
    "submitted_at",
)

# Whole numbers that some rows lack (a pod has no local process id).
_ID_COLUMNS = ("pid",)


def frame(rows: Iterable[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """A DataFrame with exactly ``columns``, times converted to timestamps."""
    df = pd.DataFrame(list(rows), columns=columns)
    for column in _TIME_COLUMNS:
        if column in df.columns:
            df[column] = pd.to_datetime(df[column], unit="s", utc=True)
    for column in _ID_COLUMNS:  # whole numbers, also where some rows have none
        if column in df.columns and df[column].dtype.kind in "fO":
            df[column] = df[column].astype("Int64")
    return df


def instances(manager: TaskExecutionManager) -> pd.DataFrame:
    return frame(instance_rows(manager), INSTANCE_COLUMNS)


def instance_rows(manager: TaskExecutionManager) -> list[dict[str, Any]]:
    """The rows of :func:`instances` as dicts, times as epoch seconds."""
    rows = []
    for instance in manager.instances.values():
        task = instance.task
        runtime = manager.runtimes.get(task.runtime)
        row = {
            "instance_id": instance.instance_id,
            "function": task.name,
            "task_id": task.task_id,
            "runtime": task.runtime.value,
            "status": instance.status.value,
            "health": instance.health.value,
            "channel": instance.channel_type,
            "active": instance.metrics.active,
            "capacity": instance.capacity,
            "created_at": instance.created_at,
            "ready_at": instance.ready_at,
            "stopped_at": instance.stopped_at,
            "failure": instance.failure,
        }
        metrics = instance.metrics.as_row()
        row.update(
            {
                "requests_total": metrics["requests_total"],
                "requests_ok": metrics["requests_ok"],
                "requests_failed": metrics["requests_failed"],
                "latency_mean_ms": metrics["latency_mean_ms"],
                "latency_p99_ms": metrics["latency_p99_ms"],
                "last_request_at": metrics["last_request_at"],
            }
        )
        row.update(runtime.describe_instance(instance))
        rows.append(row)
    return rows


def tasks(manager: TaskExecutionManager) -> pd.DataFrame:
    return frame(task_rows(manager), TASK_COLUMNS)


def task_rows(manager: TaskExecutionManager) -> list[dict[str, Any]]:
    """The rows of :func:`tasks` as dicts, times as epoch seconds."""
    rows = []
    for task in manager.tasks.values():
        settings = task.settings
        row = {
            "task_id": task.task_id,
            "function": task.name,
            "artifact_id": task.artifact.artifact_id,
            "runtime": task.runtime.value,
            "kind": task.artifact.spec.kind.value,
            "status": task.status.value,
            "instances": len(task.instances),
            "max_instances": settings.max_instances,
            "max_concurrency": settings.max_concurrency,
            "timeout_s": settings.timeout,
            "created_at": task.created_at,
        }
        row.update(task.metrics.as_row())
        rows.append(row)
    return rows


def channels(manager: TaskExecutionManager) -> pd.DataFrame:
    return frame(channel_rows(manager), CHANNEL_COLUMNS)


def channel_rows(manager: TaskExecutionManager) -> list[dict[str, Any]]:
    """The rows of :func:`channels` as dicts, times as epoch seconds."""
    factory = manager.factory
    rows = []
    seen: dict[str, int] = {}
    for channel in factory.channels():
        row = channel.describe()
        row["auth_failures"] += factory.auth_failures_for(channel.instance_id)
        # How many channels this instance had before this one.
        row["reconnects"] = seen.get(channel.instance_id, 0)
        seen[channel.instance_id] = row["reconnects"] + 1
        rows.append(row)
    return rows


def metrics(manager: TaskExecutionManager) -> pd.DataFrame:
    """Counts since the session started; latencies over the execution log."""
    grouped: dict[str, list[Any]] = {name: [] for name in manager.outcomes}
    for execution in manager.executions:
        if execution.duration is not None:
            grouped.setdefault(execution.function, []).append(execution)
    rows = []
    for function, records in grouped.items():
        durations = [r.duration * 1e3 for r in records if r.duration is not None]
        counts: Mapping[str, int] = manager.outcomes.get(function, {})
        ended = ("succeeded", "failed", "cancelled", "timed_out")
        rows.append(
            {
                "function": function,
                "calls": sum(counts.get(status, 0) for status in ended),
                "succeeded": counts.get("succeeded", 0),
                "failed": counts.get("failed", 0),
                "cancelled": counts.get("cancelled", 0),
                "timed_out": counts.get("timed_out", 0),
                "new_instances": counts.get("new_instance", 0),
                "p50_ms": percentile(durations, 0.5),
                "p99_ms": percentile(durations, 0.99),
                "mean_ms": sum(durations) / len(durations) if durations else None,
                "max_ms": max(durations) if durations else None,
            }
        )
    return frame(rows, METRIC_COLUMNS)


def events(manager: TaskExecutionManager) -> pd.DataFrame:
    return frame((e.as_row() for e in manager.events), EVENT_COLUMNS)


def executions(manager: TaskExecutionManager) -> pd.DataFrame:
    return frame((e.as_row() for e in manager.executions), EXECUTION_COLUMNS)
