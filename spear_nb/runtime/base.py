"""The interface every runtime implements, and the runtime manager."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from spear_nb._cleanup import Watchdog
from spear_nb.communication.channel import Channel
from spear_nb.communication.factory import CommunicationFactory
from spear_nb.communication.lane import DirectLane
from spear_nb.config import SessionConfig
from spear_nb.errors import ConfigurationError
from spear_nb.execution.events import EventLog
from spear_nb.execution.model import (
    ArtifactSpec,
    Execution,
    InvokeFunctionRequest,
    RuntimeType,
    TaskInstance,
)


@dataclasses.dataclass
class RuntimeContext:
    """What the session gives every runtime."""

    config: SessionConfig
    factory: CommunicationFactory
    events: EventLog
    workdir: str
    watchdog: Watchdog
    session_id: str
    # Set by the manager: a runtime calls it when an instance dies on its own.
    on_instance_lost: Callable[[TaskInstance, str], None] = lambda i, r: None
    # Set by the manager: how many calls run on the session's loop now.
    calls_running: Callable[[], int] = lambda: 0


class Runtime(abc.ABC):
    """Creates, starts, runs calls on, checks and stops instances of one kind."""

    type: RuntimeType

    def __init__(self, context: RuntimeContext) -> None:
        self.context = context

    @abc.abstractmethod
    def validate(self, spec: ArtifactSpec) -> None:
        """Raise InvalidSpec if this runtime cannot run the artifact."""

    def uses_channel(self, instance: TaskInstance) -> bool:
        """Whether calls to this instance travel over a pooled channel."""
        return True

    @abc.abstractmethod
    async def start_instance(self, instance: TaskInstance) -> None:
        """Bring a created instance to READY (its channel connected)."""

    @abc.abstractmethod
    async def execute(
        self,
        instance: TaskInstance,
        channel: Channel | None,
        request: InvokeFunctionRequest,
        execution: Execution,
        timeout: float,
    ) -> Any:
        """Run one call on the instance and return its result."""

    def call_direct(
        self,
        instance: TaskInstance,
        lane: DirectLane,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float,
        loop: asyncio.AbstractEventLoop,
        execution: Execution,
    ) -> Any:
        """Run one call over an instance's direct lane, in the calling thread.

        Only runtimes whose instances open lanes implement it. A call refused
        before it is sent is marked ``execution.refused``.
        """
        raise NotImplementedError(f"the {self.type.value} runtime has no lanes")

    def interrupt(self, instance: TaskInstance) -> None:  # noqa: B027 - optional
        """Interrupt the call an instance runs now, where the runtime can."""

    @abc.abstractmethod
    async def stop_instance(self, instance: TaskInstance) -> None:
        """Stop the instance politely, then by force; never raise."""

    @abc.abstractmethod
    async def health_check(self, instance: TaskInstance) -> bool:
        """Return whether the instance is still able to serve."""

    def describe_instance(self, instance: TaskInstance) -> dict[str, Any]:
        """Runtime-specific columns of ``Session.instances()``."""
        return {}

    def inspect_instance(self, instance: TaskInstance) -> dict[str, Any]:
        """Details for ``Session.inspect`` (logs and the like)."""
        return self.describe_instance(instance)

    async def refresh_instance(self, instance: TaskInstance) -> None:  # noqa: B027
        """Fetch, off the loop, what :meth:`inspect_instance` shows (pod logs)."""

    async def close(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release what the runtime holds beyond its instances."""


class RuntimeManager:
    """Holds one runtime per type, created on first use."""

    def __init__(
        self,
        context: RuntimeContext,
        factories: dict[RuntimeType, Callable[[RuntimeContext], Runtime]],
    ) -> None:
        self.context = context
        self._factories = factories
        self._runtimes: dict[RuntimeType, Runtime] = {}

    def get(self, runtime: RuntimeType) -> Runtime:
        existing = self._runtimes.get(runtime)
        if existing is not None:
            return existing
        factory = self._factories.get(runtime)
        if factory is None:
            raise ConfigurationError(
                f"the {runtime.value} runtime is not available in this session"
            )
        created = factory(self.context)
        self._runtimes[runtime] = created
        return created

    def active(self) -> list[Runtime]:
        return list(self._runtimes.values())

    async def close(self) -> None:
        for runtime in self._runtimes.values():
            await runtime.close()
