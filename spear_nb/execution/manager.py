"""The TaskExecutionManager: the five phases of the flow.

``submit_execution`` takes a request through artifact, task, instance, channel and
execute, and emits one event per phase. Everything here runs on the session's event
loop thread, with one exception: :meth:`TaskExecutionManager.submit_direct`, the
same phases for a synchronous call made from another thread over an idle
instance's direct lane (:mod:`spear_nb.communication.lane`). It reads the loop's
state but changes only what the slot lock guards, and hands its bookkeeping to
the loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from typing import Any

from spear_nb._bridge import CTRL_C
from spear_nb.communication.factory import CommunicationFactory
from spear_nb.config import SessionConfig
from spear_nb.errors import (
    ChannelError,
    ConfigurationError,
    ExecutionCancelled,
    ExecutionTimeout,
    FunctionNotFound,
    InstanceCrashed,
    InstanceError,
    ResourceExhausted,
    SessionClosed,
    SpearError,
    describe,
    did_you_mean,
)
from spear_nb.execution.events import EventLog
from spear_nb.execution.model import (
    Artifact,
    ArtifactSpec,
    Execution,
    ExecutionMode,
    ExecutionStatus,
    Health,
    InstanceStatus,
    InvokeFunctionRequest,
    QueuePolicy,
    Task,
    TaskInstance,
    TaskSettings,
    TaskStatus,
)
from spear_nb.execution.scheduler import Scheduler
from spear_nb.runtime.base import RuntimeManager

logger = logging.getLogger(__name__)


# submit_direct's answer when a call has to go through the loop instead.
NOT_DIRECT: Any = object()
# How soon after a direct call the loop records it, at the latest (seconds).
DIRECT_SETTLE_DELAY = 0.05


def _expire_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


def _ended_by(execution: Execution, exc: SpearError) -> None:
    """Record the error that ended a call, and the status it means."""
    if isinstance(exc, ExecutionTimeout):
        execution.status = ExecutionStatus.TIMED_OUT
    elif isinstance(exc, ExecutionCancelled):
        execution.status = ExecutionStatus.CANCELLED
    else:
        execution.status = ExecutionStatus.FAILED
    execution.error = describe(exc)


class ManagerState(str, enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class TaskExecutionManager:
    """Turns requests into executions on warm instances."""

    def __init__(
        self,
        config: SessionConfig,
        runtimes: RuntimeManager,
        factory: CommunicationFactory,
        events: EventLog,
    ) -> None:
        self.config = config
        self.runtimes = runtimes
        self.factory = factory
        self.events = events
        self.state = ManagerState.OPEN
        self.artifacts: dict[str, Artifact] = {}
        self.tasks: dict[str, Task] = {}
        self.functions: dict[str, Task] = {}
        self.instances: dict[str, TaskInstance] = {}
        self.executions: deque[Execution] = deque(maxlen=config.execution_log_size)
        # Per function: how many calls ended in each status, since the start
        # (the execution log keeps only the most recent calls).
        self.outcomes: dict[str, collections.Counter[str]] = {}
        self._execution_numbers = itertools.count(1)
        self._task_numbers: dict[str, itertools.count[int]] = {}
        self._instance_numbers: dict[str, itertools.count[int]] = {}
        self._schedulers: dict[str, Scheduler] = {}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._running: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._maintenance: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        # Taking a free slot of an instance: on the loop and by direct calls.
        self._slots = threading.Lock()
        # Direct calls that ended and are not yet in the logs and metrics.
        self._direct_lock = threading.Lock()
        self._direct_done: list[
            tuple[Execution, TaskInstance, bool, tuple[int, int]]
        ] = []
        runtimes.context.on_instance_lost = self._instance_lost
        runtimes.context.calls_running = lambda: len(self._running)

    # -- phase 2: artifact and task ----------------------------------------------

    def get_or_create_artifact(self, spec: ArtifactSpec) -> tuple[Artifact, bool]:
        """The artifact of a spec; equal specs share one."""
        artifact_id = f"art-{spec.digest()[:8]}"
        existing = self.artifacts.get(artifact_id)
        if existing is not None:
            return existing, False
        artifact = Artifact(artifact_id, spec)
        self.artifacts[artifact_id] = artifact
        return artifact, True

    def get_or_create_task(
        self, name: str, artifact: Artifact, settings: TaskSettings
    ) -> tuple[Task, bool]:
        """The task serving ``name``; a new one if its artifact or settings changed."""
        current = self.functions.get(name)
        if (
            current is not None
            and current.artifact is artifact
            and current.settings == settings
        ):
            return current, False
        numbers = self._task_numbers.setdefault(name, itertools.count(1))
        number = next(numbers)
        task_id = name if number == 1 else f"{name}#{number}"
        task = Task(task_id, name, artifact, settings)
        task._instance_numbers = self._instance_numbers.setdefault(
            name, itertools.count(1)
        )
        self.tasks[task_id] = task
        self._schedulers[task_id] = Scheduler(settings.scheduler)
        self._waiters[task_id] = deque()
        self.functions[name] = task
        if current is not None:
            self._retire(current)
        return task, True

    async def register(
        self, name: str, spec: ArtifactSpec, settings: TaskSettings
    ) -> Task:
        """Validate a function's spec and map ``name`` to its task."""
        self._check_open()
        started = time.perf_counter()
        self.runtimes.get(spec.runtime).validate(spec)
        artifact, new_artifact = self.get_or_create_artifact(spec)
        task, new_task = self.get_or_create_task(name, artifact, settings)
        self.events.emit(
            "register",
            started,
            artifact_id=artifact.artifact_id,
            task_id=task.task_id,
            detail=f"{name}: {'new' if new_artifact else 'same'} artifact, "
            f"{'new' if new_task else 'same'} task",
        )
        self._ensure_maintenance()
        return task

    def _retire(self, task: Task) -> None:
        """Stop the instances of a task that no name points to any more: the
        idle ones now, the others as their last call (or queued call) ends."""
        if any(t is task for t in self.functions.values()):
            return
        task.status = TaskStatus.STOPPED
        self._stop_idle(task)

    def _stop_idle(self, task: Task) -> None:
        """Stop a retired task's idle instances, once no call waits for one."""
        if self._waiters.get(task.task_id):
            return
        with self._slots:  # so that no direct call takes one meanwhile
            idle = [i for i in task.instances if not i.metrics.active]
            for instance in idle:
                task.instances.remove(instance)
        for instance in idle:
            self._spawn(self.stop_instance(instance, "its function was re-registered"))

    # -- phase 1..5 ----------------------------------------------------------------

    async def submit_execution(
        self, request: InvokeFunctionRequest, execution: Execution | None = None
    ) -> Any:
        """Run one request through the five phases and return its result.

        The start of each phase is marked on the execution record; the event log
        turns the marks into one event per phase when it is read.
        """
        self._check_open()
        if execution is None:
            execution = self.new_execution(request)
        marks = execution.marks
        task = self.functions.get(request.function)
        if task is None:
            execution.status = ExecutionStatus.FAILED
            execution.error = "unknown function"
            self._count(execution)
            raise self._not_found(request.function)
        marks.append(time.perf_counter())  # request done, artifact looked up
        artifact = task.artifact
        execution.task_id = task.task_id
        execution.artifact_id = artifact.artifact_id
        marks.append(time.perf_counter())  # task looked up
        settings_timeout = task.settings.timeout
        timeout = request.timeout if request.timeout is not None else settings_timeout
        started = execution.started
        execution.timeout = timeout
        current = asyncio.current_task()
        if current is not None:
            self._running.add(current)
        instance: TaskInstance | None = None
        ok = False
        try:
            marks.append(time.perf_counter())
            # The warm case without a coroutine call; otherwise create or wait.
            instance = self._reserve(task) if self.state is ManagerState.OPEN else None
            new = False
            if instance is None:
                instance, new = await self.get_or_create_instance(
                    task, started + timeout
                )
            execution.instance_id = instance.instance_id
            execution.new_instance = new
            runtime = self.runtimes.get(task.runtime)
            channel = None
            marks.append(time.perf_counter())
            if runtime.uses_channel(instance):
                channel = self.factory.pooled(instance.instance_id)
                if channel is None or not channel.connected:
                    channel = await self.factory.get_or_create_channel(
                        instance.instance_id
                    )
                execution.channel_id = channel.channel_id
                execution.channel_type = channel.type.value
            else:
                execution.channel_type = instance.channel_type
            execution.status = ExecutionStatus.RUNNING
            now = time.perf_counter()
            marks.append(now)
            remaining = max(0.001, started + timeout - now)
            result = await runtime.execute(
                instance, channel, request, execution, remaining
            )
            marks.append(time.perf_counter())
            ok = True
            execution.status = ExecutionStatus.SUCCEEDED
            return result
        except asyncio.CancelledError as exc:
            execution.status = ExecutionStatus.CANCELLED
            execution.error = (
                f"cancelled ({CTRL_C})" if CTRL_C in exc.args else "cancelled"
            )
            if self.state is not ManagerState.OPEN:
                execution.error = "the session was closed"
                raise SessionClosed(
                    "the session was closed while this call was running"
                ) from None
            raise
        except (ExecutionTimeout, ExecutionCancelled) as exc:
            _ended_by(execution, exc)
            raise
        except (InstanceCrashed, ChannelError) as exc:
            _ended_by(execution, exc)
            if instance is not None:
                self._instance_lost(instance, describe(exc))
            raise
        except SpearError as exc:
            _ended_by(execution, exc)
            raise
        finally:
            if current is not None:
                self._running.discard(current)
            duration = time.perf_counter() - started
            execution.duration = duration
            self._count(execution)
            execution.finished()
            if instance is not None:
                if execution.refused:
                    instance.metrics.withdrawn()
                else:
                    instance.metrics.finished(duration, ok)
                task.metrics.finished(duration, ok)
                self._wake(task)

    # -- the same phases over a direct lane, from the calling thread ------------

    def submit_direct(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run a synchronous call on an idle instance over its direct lane.

        Called from the caller's own thread, never the loop's. Returns
        :data:`NOT_DIRECT`, having done nothing, when no instance of ``name`` is
        idle with a working lane; the call then goes through the loop.
        """
        started = time.perf_counter()
        task = self.functions.get(name)
        if task is None or self.state is not ManagerState.OPEN:
            return NOT_DIRECT
        request_done = time.perf_counter()
        artifact = task.artifact
        artifact_done = time.perf_counter()
        scheduler = self._schedulers[task.task_id]
        timeout = task.settings.timeout
        task_done = time.perf_counter()
        lanes = self.factory.lanes
        with self._slots:
            instance = scheduler.select(task.instances)
            if instance is None:
                return NOT_DIRECT
            instance_done = time.perf_counter()
            lane = lanes.get(instance.instance_id)
            if lane is None or not lane.acquire():
                return NOT_DIRECT
            instance.metrics.active += 1
        channel_done = time.perf_counter()
        instance.metrics.last_request_at = time.time()
        execution = Execution(
            f"ex-{next(self._execution_numbers)}", name, ExecutionMode.SYNC
        )
        execution.started = started
        execution.task_id = task.task_id
        execution.artifact_id = artifact.artifact_id
        execution.instance_id = instance.instance_id
        execution.channel_type = instance.channel_type
        execution.direct = True
        channel = self.factory.pooled(instance.instance_id)
        execution.channel_id = channel.channel_id if channel is not None else ""
        execution.timeout = timeout
        execution.marks.extend(
            (request_done, artifact_done, task_done, instance_done, channel_done)
        )
        execution.status = ExecutionStatus.RUNNING
        ok = False
        try:
            runtime = self.runtimes.get(task.runtime)
            result = runtime.call_direct(
                instance, lane, args, kwargs, started + timeout, self._loop, execution
            )
            execution.marks.append(time.perf_counter())
            ok = True
            execution.status = ExecutionStatus.SUCCEEDED
            return result
        except KeyboardInterrupt:
            execution.status = ExecutionStatus.CANCELLED
            execution.error = f"cancelled ({CTRL_C})"
            raise
        except SpearError as exc:
            _ended_by(execution, exc)
            if execution.status is not ExecutionStatus.TIMED_OUT and (
                self.state is not ManagerState.OPEN
            ):
                execution.status = ExecutionStatus.CANCELLED
                execution.error = "the session was closed"
                raise SessionClosed(
                    "the session was closed while this call was running"
                ) from None
            raise
        finally:
            execution.duration = time.perf_counter() - started
            instance.metrics.active -= 1
            traffic = (lane.sent, lane.wire.last_size if ok else 0)
            lane.release()
            self._direct_finished(execution, instance, ok, traffic)

    def _direct_finished(
        self,
        execution: Execution,
        instance: TaskInstance,
        ok: bool,
        traffic: tuple[int, int],
    ) -> None:
        """Queue a direct call's bookkeeping for the loop (the calling thread).

        Waking the loop after every call would cost the caller more than the call
        (the loop thread takes the interpreter lock just as the reply arrives), so
        the loop settles a batch at a time: soon after the first of the batch, at
        once if calls wait in the queue for this slot, and always before it reads
        its state for the session (:meth:`settle_direct`).
        """
        with self._direct_lock:
            first = not self._direct_done
            self._direct_done.append((execution, instance, ok, traffic))
        try:
            if self._waiters.get(instance.task.task_id):
                self._loop.call_soon_threadsafe(self.settle_direct)
            elif first:
                self._loop.call_soon_threadsafe(
                    self._loop.call_later, DIRECT_SETTLE_DELAY, self.settle_direct
                )
        except RuntimeError:  # the loop is gone, and the logs with it
            pass

    def settle_direct(self) -> None:
        """Record the direct calls that ended since the last time (on the loop)."""
        with self._direct_lock:
            if not self._direct_done:
                return
            done, self._direct_done = self._direct_done, []
        for execution, instance, ok, (sent, received) in done:
            self.executions.append(execution)
            self.events.record_execution(execution)
            self._count(execution)
            duration = execution.duration or 0.0
            if not execution.refused:
                instance.metrics.record(duration, ok)
            task = instance.task
            task.metrics.record(duration, ok)
            channel = self.factory.pooled(instance.instance_id)
            if channel is not None:  # the lane's traffic counts as the channel's
                stats = channel.stats
                stats.direct_calls += 1
                stats.sent(sent)
                if received:
                    stats.received(received)
                    stats.round_trips.append(execution.marks[-1] - execution.marks[-2])
            execution.finished()
            self._wake(task)

    def _count(self, execution: Execution) -> None:
        counts = self.outcomes.get(execution.function)
        if counts is None:
            counts = self.outcomes[execution.function] = collections.Counter()
        counts[execution.status.value] += 1
        if execution.new_instance:
            counts["new_instance"] += 1

    def new_execution(self, request: InvokeFunctionRequest) -> Execution:
        """Create the record of a call and log it."""
        execution = Execution(
            f"ex-{next(self._execution_numbers)}", request.function, request.mode
        )
        self.executions.append(execution)
        self.events.record_execution(execution)
        return execution

    # -- phase 3: instance ---------------------------------------------------------

    async def get_or_create_instance(
        self, task: Task, deadline: float
    ) -> tuple[TaskInstance, bool]:
        """A ready instance with a free slot: reused, created, or waited for."""
        settings = task.settings
        while True:
            self._check_open()
            instance = self._reserve(task)
            if instance is not None:
                return instance, False
            if len(task.instances) + task.starting < settings.max_instances:
                instance = await self._create_instance(task, for_a_call=True)
                return instance, True
            waiters = self._waiters[task.task_id]
            if settings.queue_policy is QueuePolicy.REJECT or (
                len(waiters) >= settings.max_queue
            ):
                cap = settings.max_instances
                busy = (
                    "its only instance is" if cap == 1 else f"all {cap} instances are"
                )
                if settings.queue_policy is QueuePolicy.REJECT:
                    why = "busy and its queue_policy is 'reject'"
                    fix = "use queue_policy='wait'"
                else:
                    why = f"busy and its queue is full ({len(waiters)} calls wait)"
                    fix = "raise max_queue (a Session setting)"
                raise ResourceExhausted(
                    f"{task.name!r} cannot take this call: {busy} {why}; raise "
                    f"max_instances (now {cap}) in register(), {fix}, or call again "
                    "later"
                )
            await self._wait_for_slot(task, deadline)

    def _reserve(self, task: Task) -> TaskInstance | None:
        """Take a free slot of a ready instance, if the scheduler finds one."""
        with self._slots:
            instance = self._schedulers[task.task_id].select(task.instances)
            if instance is None:
                return None
            instance.metrics.started()
        task.metrics.started()
        return instance

    async def _wait_for_slot(self, task: Task, deadline: float) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters[task.task_id]
        waiters.append(waiter)
        # Not asyncio.wait_for: before Python 3.12 it swallows a cancel that
        # arrives in the same loop turn as the wake-up, and the cancelled call
        # would go on to run.
        timer = asyncio.get_running_loop().call_later(
            max(0.0, deadline - time.perf_counter()), _expire_waiter, waiter
        )
        try:
            await waiter
        except asyncio.TimeoutError:
            raise ExecutionTimeout(
                f"no instance of {task.name!r} became free before the call's timeout"
            ) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and not waiter.exception():
                self._wake(task)  # the slot this call was woken for is someone's
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)

    def _wake(self, task: Task, count: int = 1) -> None:
        """Let up to ``count`` queued calls look for a free slot again (a call
        ended, or an instance stopped)."""
        if task.status is TaskStatus.STOPPED:
            self._stop_idle(task)
        waiters = self._waiters.get(task.task_id)
        while waiters and count > 0:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    async def _create_instance(
        self, task: Task, for_a_call: bool = False
    ) -> TaskInstance:
        """Start an instance of ``task``; ``for_a_call``: its creator's call takes
        one slot at once (before anything else can see it idle)."""
        task.starting += 1
        started = time.perf_counter()
        instance = TaskInstance(task.next_instance_id(), task, secrets.token_hex(16))
        self.instances[instance.instance_id] = instance
        runtime = self.runtimes.get(task.runtime)
        try:
            instance.move(InstanceStatus.STARTING)
            await runtime.start_instance(instance)
            self._check_open()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                # Not a fault of the instance: the call that needed it went away.
                instance.failure = (
                    "its start was cancelled with the call that needed it"
                )
            else:
                instance.failure = describe(exc)
            instance.move(InstanceStatus.FAILED)
            instance.health = Health.UNHEALTHY
            self.factory.release(instance.instance_id)
            self.events.emit(
                "instance_failed",
                started,
                task_id=task.task_id,
                instance_id=instance.instance_id,
                detail=instance.failure,
            )
            if not isinstance(exc, InstanceError) and isinstance(exc, Exception):
                if isinstance(exc, SpearError):
                    raise
                raise InstanceError(
                    f"instance {instance.instance_id} could not start: {describe(exc)}"
                ) from exc
            raise
        finally:
            task.starting -= 1
            self._wake(task)
        instance.move(InstanceStatus.READY)
        instance.health = Health.HEALTHY
        if for_a_call:
            instance.metrics.started()
            task.metrics.started()
        task.instances.append(instance)
        # Its free slots (all but the one its creator takes) serve queued calls.
        self._wake(task, instance.capacity - 1)
        self.events.emit(
            "instance_started",
            started,
            artifact_id=task.artifact.artifact_id,
            task_id=task.task_id,
            instance_id=instance.instance_id,
            detail=instance.channel_type,
        )
        logger.info(
            "started instance %s of %s in %.1f ms",
            instance.instance_id,
            task.name,
            (time.perf_counter() - started) * 1e3,
        )
        return instance

    def _instance_lost(self, instance: TaskInstance, reason: str) -> None:
        """An instance died or broke on its own: take it out of service."""
        if instance.status in (
            InstanceStatus.STOPPING,
            InstanceStatus.STOPPED,
            InstanceStatus.FAILED,
        ):
            return
        if instance.status is InstanceStatus.STARTING:
            return  # start_instance sees the exit and reports it
        # The call that met it fails with an error saying so, and the next call
        # gets a new instance: the log need not shout about it a second time.
        logger.info(
            "instance %s taken out of service: %s", instance.instance_id, reason
        )
        instance.failure = reason
        instance.health = Health.UNHEALTHY
        instance.move(InstanceStatus.FAILED)
        task = instance.task
        if instance in task.instances:
            task.instances.remove(instance)
        self.events.note(
            "instance_lost",
            reason,
            task_id=task.task_id,
            instance_id=instance.instance_id,
        )
        self._spawn(self._finish_lost(instance))
        self._wake(task)

    async def _finish_lost(self, instance: TaskInstance) -> None:
        await self.runtimes.get(instance.task.runtime).stop_instance(instance)
        self.factory.release(instance.instance_id)
        instance.move(InstanceStatus.STOPPED)

    async def stop_instance(self, instance: TaskInstance, reason: str) -> None:
        """Take an instance out of service and stop it."""
        if instance.status in (InstanceStatus.STOPPING, InstanceStatus.STOPPED):
            return
        task = instance.task
        if instance in task.instances:
            task.instances.remove(instance)
        instance.move(InstanceStatus.STOPPING)
        try:
            await self.runtimes.get(task.runtime).stop_instance(instance)
        finally:
            self.factory.release(instance.instance_id)
            instance.move(InstanceStatus.STOPPED)
            self.events.note(
                "instance_stopped",
                reason,
                task_id=task.task_id,
                instance_id=instance.instance_id,
            )
            self._wake(task)

    async def scale(self, name: str, count: int) -> None:
        """Start or stop instances until ``name`` has ``count`` ready ones."""
        task = self.function(name)
        if count < 0 or count > task.settings.max_instances:
            raise ConfigurationError(
                f"scale {name!r} to between 0 and {task.settings.max_instances}, its "
                "max_instances; to allow more, register it again with "
                "max_instances=N"
            )
        while len(task.instances) + task.starting < count:
            await self._create_instance(task)
        idle = [i for i in task.instances if i.metrics.active == 0]
        while len(task.instances) > count and idle:
            await self.stop_instance(idle.pop(), "scaled down")

    # -- maintenance ---------------------------------------------------------------

    def _ensure_maintenance(self) -> None:
        if self._maintenance is None or self._maintenance.done():
            self._maintenance = asyncio.get_running_loop().create_task(self._maintain())

    async def _maintain(self) -> None:
        """Stop idle instances and replace unhealthy ones, periodically."""
        config = self.config
        while self.state is ManagerState.OPEN:
            idle_min = min(t.settings.idle_timeout for t in self.tasks.values())
            period = max(0.05, min(config.health_check_interval, idle_min / 2))
            await asyncio.sleep(period)
            try:
                await self.check_instances()
            except Exception:
                logger.exception("instance maintenance failed")

    async def check_instances(self) -> None:
        """One round of idle stops and health checks."""
        for task in list(self.tasks.values()):
            settings = task.settings
            runtime = self.runtimes.get(task.runtime)
            for instance in list(task.instances):
                if instance.status is not InstanceStatus.READY:
                    continue
                if (
                    instance.metrics.active == 0
                    and instance.idle_for >= settings.idle_timeout
                    and len(task.instances) > settings.min_instances
                ):
                    await self.stop_instance(instance, "idle timeout")
                    continue
                if await runtime.health_check(instance):
                    instance.health_failures = 0
                    instance.health = Health.HEALTHY
                    continue
                instance.health_failures += 1
                instance.health = Health.UNHEALTHY
                if instance.health_failures >= self.config.health_check_failures:
                    await self.stop_instance(instance, "failed its health checks")

    # -- lookups -------------------------------------------------------------------

    def function(self, name: str) -> Task:
        task = self.functions.get(name)
        if task is None:
            raise self._not_found(name)
        return task

    def _not_found(self, name: str) -> FunctionNotFound:
        hint = did_you_mean(name, list(self.functions))
        return FunctionNotFound(
            f"no function named {name!r} is registered{hint}; registered: "
            + (", ".join(sorted(self.functions)) or "none")
        )

    def _check_open(self) -> None:
        if self.state is not ManagerState.OPEN:
            raise SessionClosed("The session is closed; create a new one.")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- close -----------------------------------------------------------------------

    async def close(self) -> None:
        """Fail calls in flight with SessionClosed and stop every instance."""
        if self.state is not ManagerState.OPEN:
            return
        self.state = ManagerState.CLOSING
        if self._maintenance is not None:
            self._maintenance.cancel()
        for running in list(self._running):
            running.cancel()
        for instance_id, lane in list(self.factory.lanes.items()):
            instance = self.instances.get(instance_id)
            if lane.in_use and instance is not None:  # a direct call runs there
                self.runtimes.get(instance.task.runtime).interrupt(instance)
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()
        if self._running:
            await asyncio.wait(list(self._running), timeout=self.config.stop_grace * 2)
        instances = [
            i
            for i in self.instances.values()
            if i.status not in (InstanceStatus.STOPPED, InstanceStatus.STOPPING)
        ]
        await asyncio.gather(
            *(self.stop_instance(i, "session closed") for i in instances),
            return_exceptions=True,
        )
        if self._background:
            await asyncio.wait(
                list(self._background), timeout=self.config.stop_grace * 3
            )
        for task in self.tasks.values():
            task.status = TaskStatus.STOPPED
        self.state = ManagerState.CLOSED
