"""Rich display: HTML from templates that follow JupyterLab's theme variables."""

from __future__ import annotations

import enum
import html
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jinja2

from spear_nb.errors import FunctionNotFound
from spear_nb.execution.manager import TaskExecutionManager
from spear_nb.execution.model import Execution

if TYPE_CHECKING:
    from spear_nb.session import Session

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("spear_nb.notebook", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


def escape(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def render(template: str, **values: Any) -> str:
    return _env.get_template(template).render(**values)


def render_macro(template: str, macro: str, **values: Any) -> str:
    """Call one macro of a template with ``values`` as its single argument."""
    module = _env.get_template(template).module
    return str(getattr(module, macro)(values))


def _readable(name: str, value: Any) -> Any:
    """Times (``*_at`` seconds since the epoch) as UTC timestamps, enums as their
    values: what the DataFrames show, so the two read alike."""
    if isinstance(value, enum.Enum):
        return value.value
    if (name.endswith("_at") or name == "last_activity") and isinstance(value, float):
        import pandas as pd

        return pd.Timestamp(value, unit="s", tz="UTC")
    return value


class Inspection(Mapping[str, Any]):
    """Details of one object of the session, shown as a table in notebooks."""

    def __init__(
        self, kind: str, key: str, details: dict[str, Any], chart: str = ""
    ) -> None:
        self.kind = kind
        self.key = key
        self._details = {name: _readable(name, v) for name, v in details.items()}
        self._chart = chart  # HTML drawn under the table (an execution's phases)

    def __getitem__(self, name: str) -> Any:
        return self._details[name]

    def __iter__(self) -> Any:
        return iter(self._details)

    def __len__(self) -> int:
        return len(self._details)

    def __repr__(self) -> str:
        lines = [f"{self.kind} {self.key}"]
        for name, value in self._details.items():
            text = str(value)
            if "\n" in text:
                text = "\n    " + text.rstrip().replace("\n", "\n    ")
            lines.append(f"  {name}: {text}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return render(
            "inspection.html.j2",
            kind=self.kind,
            key=self.key,
            details=self._details,
            chart=self._chart,
        )


def inspect(manager: TaskExecutionManager, key: str) -> Inspection:
    """Find ``key`` among functions, tasks, instances, executions, artifacts and
    channels."""
    if key in manager.functions or key in manager.tasks:
        task = manager.functions.get(key) or manager.tasks[key]
        spec = task.artifact.spec
        details: dict[str, Any] = {
            "function": task.name,
            "task_id": task.task_id,
            "artifact_id": task.artifact.artifact_id,
            "runtime": spec.runtime.value,
            "kind": spec.kind.value,
            "channel": spec.channel or "(runtime default)",
            "instances": [i.instance_id for i in task.instances],
        }
        if spec.command:
            details["command"] = list(spec.command)
        if spec.target:
            details["target"] = spec.target
        details.update({f"setting.{k}": v for k, v in vars(task.settings).items()})
        details.update(task.metrics.as_row())
        return Inspection("function", task.name, details)
    instance = manager.instances.get(key)
    if instance is not None:
        runtime = manager.runtimes.get(instance.task.runtime)
        details = {
            "instance_id": instance.instance_id,
            "task_id": instance.task.task_id,
            "runtime": instance.task.runtime.value,
            "status": instance.status.value,
            "health": instance.health.value,
            "channel": instance.channel_type,
            "failure": instance.failure,
        }
        details.update(instance.metrics.as_row())
        details.update(runtime.inspect_instance(instance))
        return Inspection("instance", key, details)
    for execution in manager.executions:
        if execution.execution_id == key:
            from spear_nb.notebook.timeline import phases_of, render_html

            details = execution.as_row()
            details["phases"] = [
                f"{e.phase}: {e.duration * 1e3:.3f} ms {e.detail}".rstrip()
                for e in manager.events
                if e.execution_id == key
            ]
            chart = render_html([phases_of(execution)], details=False)
            return Inspection("execution", key, details, chart)
    artifact = manager.artifacts.get(key)
    if artifact is not None:
        spec = artifact.spec
        details = {
            "artifact_id": artifact.artifact_id,
            "runtime": spec.runtime.value,
            "kind": spec.kind.value,
            "code_bytes": len(spec.code),
            "target": spec.target,
            "command": list(spec.command),
            "env": dict(spec.env),
            "cwd": spec.cwd,
            "channel": spec.channel or "(runtime default)",
            "options": dict(spec.options),
            "tasks": [
                t.task_id for t in manager.tasks.values() if t.artifact is artifact
            ],
            "created_at": time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(artifact.created_at)
            ),
        }
        return Inspection("artifact", key, details)
    from spear_nb.notebook.frames import channel_rows

    for row in channel_rows(manager):
        if row["channel_id"] == key:
            return Inspection("channel", key, row)
    raise FunctionNotFound(
        f"nothing named {key!r} in this session: it is not a function, task, "
        "artifact, instance, channel or execution id"
    )


def session_html(session: Session, manager: TaskExecutionManager) -> str:
    live = [i for i in manager.instances.values() if i.status.value == "ready"]
    return render(
        "session.html.j2",
        session_id=session.session_id,
        state=session.state.value,
        functions=[
            {
                "name": name,
                "kind": task.artifact.spec.kind.value,
                "runtime": task.runtime.value,
                "instances": len(task.instances),
                "calls": task.metrics.total,
                "failed": task.metrics.failed,
            }
            for name, task in sorted(manager.functions.items())
        ],
        live=len(live),
        executions=len(manager.executions),
        now=time.strftime("%H:%M:%S"),
    )


def function_html(info: Any) -> str:
    """What ``Session.register`` returns, as a small card."""
    return render(
        "inspection.html.j2",
        kind="function",
        key=info.name,
        details={
            "kind": info.kind,
            "runtime": info.runtime,
            "task_id": info.task_id,
            "artifact_id": info.artifact_id,
        },
        chart="",
    )


def execution_html(execution: Execution) -> str:
    """An execution handle: its status and, as far as it got, its phases."""
    from spear_nb.notebook.timeline import phases_of, render_html

    details: dict[str, Any] = {
        "function": execution.function,
        "status": execution.status.value,
        "mode": execution.mode.value,
        "instance_id": execution.instance_id or "(not yet chosen)",
    }
    if execution.duration is not None:
        details["duration_ms"] = f"{execution.duration * 1e3:.3f}"
    if execution.error:
        details["error"] = execution.error
    return render(
        "inspection.html.j2",
        kind="execution",
        key=execution.execution_id,
        details=details,
        chart=render_html([phases_of(execution)], details=False),
    )
