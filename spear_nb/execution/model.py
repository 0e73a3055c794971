"""Artifacts, tasks, instances and executions: the nouns of the flow.

An *artifact* is what runs (a Python callable, a handler, a script, a command, a WASM
module, a container image) with its runtime, environment and limits. A *task* is an
invokable unit of an artifact with its scaling and timeout settings. An *instance*
is a running copy of a task on a runtime; instances are reused across calls. An
*execution* is one call.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from spear_nb.communication.channel import percentile
from spear_nb.errors import SpearError


class RuntimeType(str, enum.Enum):
    """Where instances of an artifact run."""

    PROCESS = "process"
    WASM = "wasm"
    KUBERNETES = "kubernetes"


class ArtifactKind(str, enum.Enum):
    """What an artifact holds."""

    CALLABLE = "callable"  # a Python callable shipped with cloudpickle
    HANDLER = "handler"  # "package.module:function", imported by the agent
    SCRIPT = "script"  # a Python script that calls spear_nb.agent.serve()
    COMMAND = "command"  # any executable: payload on stdin, result on stdout
    WASM = "wasm"  # a WebAssembly module
    IMAGE = "image"  # a container image running the agent


@dataclasses.dataclass(frozen=True)
class ArtifactSpec:
    """Everything that decides what runs. Equal specs give the same artifact."""

    runtime: RuntimeType
    kind: ArtifactKind
    code: bytes = b""  # cloudpickled callable, or WASM bytes
    target: str = ""  # handler "module:function", script path, or image name
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = ""
    channel: str = ""  # channel type override; "" means the runtime's strategy
    options: tuple[tuple[str, Any], ...] = ()  # runtime-specific settings

    def digest(self) -> str:
        """A short content hash that names the artifact."""
        h = hashlib.sha256()
        for part in (
            self.runtime.value,
            self.kind.value,
            self.target,
            "\0".join(self.command),
            repr(self.env),
            self.cwd,
            self.channel,
            repr(self.options),
        ):
            h.update(part.encode())
            h.update(b"\x1f")
        h.update(self.code)
        return h.hexdigest()[:12]

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


@dataclasses.dataclass
class Artifact:
    """What runs, registered once per distinct spec."""

    artifact_id: str
    spec: ArtifactSpec
    created_at: float = dataclasses.field(default_factory=time.time)

    def __repr__(self) -> str:
        s = self.spec
        return f"<Artifact {self.artifact_id} {s.runtime.value}/{s.kind.value}>"


class QueuePolicy(str, enum.Enum):
    """What a call does when every instance is busy and the cap is reached."""

    WAIT = "wait"  # wait in a bounded queue for a free instance
    REJECT = "reject"  # raise ResourceExhausted at once


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """Scaling and timeout settings of a task (defaults follow the Rust system)."""

    timeout: float = 300.0
    max_instances: int = 50
    max_concurrency: int = 1  # calls one instance serves at once
    min_instances: int = 0
    idle_timeout: float = 120.0
    start_timeout: float = 30.0
    queue_policy: QueuePolicy = QueuePolicy.WAIT
    max_queue: int = 1024
    scheduler: str = "least_connections"


class Metrics:
    """Request counters and a window of recent latencies."""

    __slots__ = ("active", "failed", "last_request_at", "latencies", "ok", "total")

    def __init__(self) -> None:
        self.total = 0
        self.ok = 0
        self.failed = 0
        self.active = 0
        self.last_request_at: float | None = None
        self.latencies: deque[float] = deque(maxlen=2048)

    def started(self) -> None:
        self.total += 1
        self.active += 1
        self.last_request_at = time.time()

    def finished(self, seconds: float, ok: bool) -> None:
        self.active -= 1
        self.count(seconds, ok)

    def withdrawn(self) -> None:
        """Give back a slot taken for a call that was refused before it was
        sent: the call does not count as a request."""
        self.active -= 1
        self.total -= 1

    def record(self, seconds: float, ok: bool) -> None:
        """Count a call whose slot was taken and given back elsewhere (a direct
        call, which changes ``active`` in its own thread)."""
        self.total += 1
        self.count(seconds, ok)

    def count(self, seconds: float, ok: bool) -> None:
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        self.latencies.append(seconds)

    @property
    def latency_mean(self) -> float:
        lat = self.latencies
        return sum(lat) / len(lat) if lat else float("nan")

    @property
    def latency_p99(self) -> float:
        return percentile(self.latencies, 0.99)

    def as_row(self) -> dict[str, Any]:
        return {
            "requests_total": self.total,
            "requests_ok": self.ok,
            "requests_failed": self.failed,
            "requests_active": self.active,
            "latency_mean_ms": self.latency_mean * 1e3,
            "latency_p99_ms": self.latency_p99 * 1e3,
            "last_request_at": self.last_request_at,
        }


class TaskStatus(str, enum.Enum):
    ACTIVE = "active"
    STOPPED = "stopped"


@dataclasses.dataclass(eq=False)
class Task:
    """An invokable unit of an artifact, with its instances."""

    task_id: str
    name: str
    artifact: Artifact
    settings: TaskSettings
    status: TaskStatus = TaskStatus.ACTIVE
    instances: list[TaskInstance] = dataclasses.field(default_factory=list)
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    starting: int = 0  # instances being created right now
    created_at: float = dataclasses.field(default_factory=time.time)
    # Shared by every task of one function name, so that instance ids stay
    # unique when a name is registered again.
    _instance_numbers: itertools.count[int] = dataclasses.field(
        default_factory=lambda: itertools.count(1), repr=False
    )

    @property
    def runtime(self) -> RuntimeType:
        return self.artifact.spec.runtime

    def next_instance_id(self) -> str:
        return f"{self.name}-{next(self._instance_numbers)}"

    def __repr__(self) -> str:
        return (
            f"<Task {self.task_id} {self.runtime.value} instances="
            f"{len(self.instances)}/{self.settings.max_instances}>"
        )


class InstanceStatus(str, enum.Enum):
    """The lifecycle of an instance; see ``ALLOWED`` for the legal moves."""

    CREATED = "created"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


_ALLOWED: dict[InstanceStatus, frozenset[InstanceStatus]] = {
    InstanceStatus.CREATED: frozenset(
        {InstanceStatus.STARTING, InstanceStatus.STOPPED, InstanceStatus.FAILED}
    ),
    InstanceStatus.STARTING: frozenset(
        {InstanceStatus.READY, InstanceStatus.STOPPING, InstanceStatus.FAILED}
    ),
    InstanceStatus.READY: frozenset({InstanceStatus.STOPPING, InstanceStatus.FAILED}),
    InstanceStatus.STOPPING: frozenset({InstanceStatus.STOPPED, InstanceStatus.FAILED}),
    InstanceStatus.STOPPED: frozenset(),
    InstanceStatus.FAILED: frozenset({InstanceStatus.STOPPING, InstanceStatus.STOPPED}),
}


class Health(str, enum.Enum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class InvalidTransition(SpearError):
    """An instance was asked to move to a state it cannot reach from where it is."""


@dataclasses.dataclass(eq=False)
class TaskInstance:
    """A running copy of a task. ``handle`` holds the runtime's own state."""

    instance_id: str
    task: Task
    secret: str
    status: InstanceStatus = InstanceStatus.CREATED
    health: Health = Health.UNKNOWN
    handle: Any = None
    channel_type: str = ""
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    created_at: float = dataclasses.field(default_factory=time.time)
    ready_at: float | None = None
    stopped_at: float | None = None
    failure: str = ""
    health_failures: int = 0

    def move(self, status: InstanceStatus) -> None:
        """Change status, refusing moves the lifecycle does not allow."""
        if status is self.status:
            return
        if status not in _ALLOWED[self.status]:
            raise InvalidTransition(
                f"instance {self.instance_id} cannot go from {self.status.value} "
                f"to {status.value}"
            )
        self.status = status
        if status is InstanceStatus.READY:
            self.ready_at = time.time()
        elif status is InstanceStatus.STOPPED:
            self.stopped_at = time.time()

    @property
    def capacity(self) -> int:
        return self.task.settings.max_concurrency

    @property
    def available(self) -> bool:
        """Ready, not known to be unhealthy, and with a free slot."""
        return (
            self.status is InstanceStatus.READY
            and self.health is not Health.UNHEALTHY
            and self.metrics.active < self.capacity
        )

    @property
    def idle_for(self) -> float:
        last = self.metrics.last_request_at or self.ready_at or self.created_at
        return time.time() - last

    def __repr__(self) -> str:
        return (
            f"<TaskInstance {self.instance_id} {self.task.runtime.value} "
            f"{self.status.value} active={self.metrics.active}/{self.capacity}>"
        )


class ExecutionMode(str, enum.Enum):
    SYNC = "sync"
    ASYNC = "async"
    STREAM = "stream"


class ExecutionStatus(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


@dataclasses.dataclass
class InvokeFunctionRequest:
    """What a caller asks for: run this function with these arguments."""

    function: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    payload: bytes | None = None  # byte functions (commands, WASM) take bytes
    timeout: float | None = None
    mode: ExecutionMode = ExecutionMode.SYNC
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    on_chunk: Callable[[Any], None] | None = None  # stream mode: called per chunk


@dataclasses.dataclass(eq=False)
class Execution:
    """The record of one call, kept in the session's bounded execution log."""

    execution_id: str
    function: str
    mode: ExecutionMode
    status: ExecutionStatus = ExecutionStatus.PENDING
    task_id: str = ""
    artifact_id: str = ""
    instance_id: str = ""
    channel_id: str = ""
    submitted_at: float = dataclasses.field(default_factory=time.time)
    started: float = dataclasses.field(default_factory=time.perf_counter)
    duration: float | None = None
    error: str = ""
    new_instance: bool = False
    channel_type: str = ""
    timeout: float = 0.0  # the call's timeout as configured, in seconds
    # perf_counter marks: the end of each phase in PHASES order (started is the
    # start of the first); a failed call has fewer.
    marks: list[float] = dataclasses.field(default_factory=list)
    seq: int = 0  # first sequence number of its events in the event log
    direct: bool = False  # made over the instance's direct lane, not the loop
    # Refused before it was sent (arguments that cannot be pickled, a payload
    # over the size limit): its instance never saw it and does not count it.
    refused: bool = False
    listeners: list[Callable[[Execution], None]] | None = None

    def finished(self) -> None:
        """Tell live views (the dashboard) that the call ended."""
        if self.listeners:
            for listener in self.listeners:
                listener(self)

    def as_row(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id,
            "function": self.function,
            "mode": self.mode.value,
            "status": self.status.value,
            "task_id": self.task_id,
            "instance_id": self.instance_id,
            "new_instance": self.new_instance,
            "direct": self.direct,
            "submitted_at": self.submitted_at,
            "duration_ms": None if self.duration is None else self.duration * 1e3,
            "error": self.error,
        }


# The phases of one execution, in order, and what each mark ends.
PHASES = ("request", "artifact", "task", "instance", "channel", "execute")
