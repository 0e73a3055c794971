"""The Session: a synchronous facade over the async manager, made for notebooks."""

from __future__ import annotations

import enum
import itertools
import logging
import os
import shutil
import sys
import threading
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, TypeVar

import pandas as pd

from spear_nb import _cleanup
from spear_nb._bridge import LoopThread
from spear_nb._handles import ChunkStream, ExecutionHandle, chunk_aiter, start_on_loop
from spear_nb.communication.factory import CommunicationFactory
from spear_nb.config import SessionConfig
from spear_nb.errors import (
    ConfigurationError,
    FunctionNotFound,
    InvalidSpec,
    SessionClosed,
)
from spear_nb.execution.events import EventLog
from spear_nb.execution.manager import TaskExecutionManager
from spear_nb.execution.model import (
    ArtifactKind,
    Execution,
    ExecutionMode,
    InvokeFunctionRequest,
    RuntimeType,
    Task,
)
from spear_nb.execution.spec import build_settings, build_spec, check_name, name_of
from spear_nb.notebook import display, frames
from spear_nb.runtime.base import Runtime, RuntimeContext, RuntimeManager
from spear_nb.runtime.process import ProcessRuntime

logger = logging.getLogger(__name__)

T = TypeVar("T")
_session_numbers = itertools.count(1)


class SessionState(str, enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Session:
    """Run functions in warm task instances and look inside while they run.

    ``Session()`` starts a background event loop that owns every instance and
    channel; its methods block until their work is done and each has an
    ``a``-prefixed coroutine twin for ``await`` in notebook cells. Use it as a
    context manager, or call :meth:`close`; an exit hook and a watchdog process
    clean up if you do neither.
    """

    def __init__(self, config: SessionConfig | None = None, **settings: Any) -> None:
        if config is not None and settings:
            raise ConfigurationError("pass either a SessionConfig or keyword settings")
        if config is None:
            try:
                config = SessionConfig(**settings)
            except TypeError as exc:
                raise ConfigurationError(f"unknown session setting: {exc}") from None
        self.config = config
        self.session_id = f"s{os.getpid()}-{next(_session_numbers)}"
        self.state = SessionState.OPEN
        self._callables: dict[int, tuple[Callable[..., Any], str]] = {}
        self._close_lock = threading.Lock()
        self._workdir = _cleanup.make_workdir()
        self._watchdog = _cleanup.Watchdog()
        self._watchdog.start()
        self._watchdog.tell(f"path {self._workdir}")
        self._loop = LoopThread(f"spear_nb-{self.session_id}")
        try:
            self._manager = self._loop.run(self._build())
        except BaseException:
            self._loop.stop()
            self._watchdog.close()
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise
        _cleanup.track(self)
        logger.info("session %s started in %s", self.session_id, self._workdir)

    async def _build(self) -> TaskExecutionManager:
        events = EventLog(self.config.event_log_size)
        factory = CommunicationFactory(
            self._workdir, events, self.config.max_frame_size
        )
        context = RuntimeContext(
            self.config, factory, events, self._workdir, self._watchdog, self.session_id
        )
        runtimes = RuntimeManager(
            context,
            {
                RuntimeType.PROCESS: ProcessRuntime,
                RuntimeType.WASM: _wasm_runtime,
                RuntimeType.KUBERNETES: _kubernetes_runtime,
            },
        )
        factory.start_heartbeats(
            self.config.heartbeat_interval, self.config.heartbeat_misses
        )
        return TaskExecutionManager(self.config, runtimes, factory, events)

    # -- the bridge ----------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.state is not SessionState.OPEN:
            coro.close()
            raise SessionClosed("The session is closed; create a new one.")
        return self._loop.run(coro)

    async def _arun(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.state is not SessionState.OPEN:
            coro.close()
            raise SessionClosed("The session is closed; create a new one.")
        return await self._loop.run_async(coro)

    # -- register ------------------------------------------------------------------

    def register(
        self,
        name: str,
        fn: Callable[..., Any] | None = None,
        *,
        command: str | Sequence[str] | None = None,
        handler: str | None = None,
        script: str | os.PathLike[str] | None = None,
        wasm: str | bytes | os.PathLike[str] | None = None,
        image: str | None = None,
        runtime: str | None = None,
        channel: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
        max_instances: int | None = None,
        max_concurrency: int | None = None,
        idle_timeout: float | None = None,
        queue_policy: str | None = None,
        scheduler: str | None = None,
        **options: Any,
    ) -> FunctionInfo:
        """Register a function under ``name`` and return a summary of it.

        Give exactly one of: a Python callable (shipped with cloudpickle), a
        ``command`` (payload on stdin, result on stdout, one process per call), a
        ``handler`` ``"package.module:function"``, a ``script`` that calls
        :func:`spear_nb.agent.serve`, or a ``wasm`` module. Registering the same
        name again replaces the function; its old instances are stopped.
        """
        return self._run(
            self.aregister(
                name,
                fn,
                command=command,
                handler=handler,
                script=script,
                wasm=wasm,
                image=image,
                runtime=runtime,
                channel=channel,
                env=env,
                cwd=cwd,
                timeout=timeout,
                max_instances=max_instances,
                max_concurrency=max_concurrency,
                idle_timeout=idle_timeout,
                queue_policy=queue_policy,
                scheduler=scheduler,
                **options,
            )
        )

    async def aregister(
        self,
        name: str,
        fn: Callable[..., Any] | None = None,
        *,
        timeout: float | None = None,
        max_instances: int | None = None,
        max_concurrency: int | None = None,
        idle_timeout: float | None = None,
        queue_policy: str | None = None,
        scheduler: str | None = None,
        command: str | Sequence[str] | None = None,
        handler: str | None = None,
        script: str | os.PathLike[str] | None = None,
        wasm: str | bytes | os.PathLike[str] | None = None,
        image: str | None = None,
        runtime: str | None = None,
        channel: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> FunctionInfo:
        """Coroutine twin of :meth:`register`."""
        check_name(name)
        spec = build_spec(
            fn,
            command=command,
            handler=handler,
            script=script,
            wasm=wasm,
            image=image,
            runtime=runtime,
            channel=channel,
            env=env,
            cwd=cwd,
            options=options,
        )
        settings = build_settings(
            self.config.task_settings(),
            timeout=timeout,
            max_instances=max_instances,
            max_concurrency=max_concurrency,
            idle_timeout=idle_timeout,
            queue_policy=queue_policy,
            scheduler=scheduler,
        )
        task = await self._arun(self._manager.register(name, spec, settings))
        if fn is not None:
            self._callables[id(fn)] = (fn, name)
        return FunctionInfo.of(task)

    # -- invoke --------------------------------------------------------------------

    def invoke(
        self, function: str | Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Any:
        """Run a function in a warm instance and return its result.

        ``function`` is a registered name or a callable (registered on first use
        under its ``__name__``). A callable's return value comes back as is; a
        command or WASM function takes one ``bytes`` payload and returns bytes.
        """
        return self._run(self._invoke(function, args, kwargs))

    async def ainvoke(
        self, function: str | Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Any:
        """Coroutine twin of :meth:`invoke`."""
        return await self._arun(self._invoke(function, args, kwargs))

    async def _invoke(
        self,
        function: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        request = await self._request(function, args, kwargs, ExecutionMode.SYNC)
        return await self._manager.submit_execution(request)

    async def _request(
        self,
        function: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        mode: ExecutionMode,
        on_chunk: Callable[[Any], None] | None = None,
    ) -> InvokeFunctionRequest:
        name = function if isinstance(function, str) else await self._resolve(function)
        task = self._manager.function(name)
        request = InvokeFunctionRequest(
            name, args, kwargs, mode=mode, on_chunk=on_chunk
        )
        if task.artifact.spec.kind in (ArtifactKind.COMMAND, ArtifactKind.WASM):
            if mode is ExecutionMode.STREAM:
                raise InvalidSpec(
                    f"{name!r} is a byte function; only Python functions stream"
                )
            request.payload = _byte_payload(name, args, kwargs)
            request.args, request.kwargs = (), {}
        return request

    # -- async and stream modes ------------------------------------------------------

    def submit(
        self, function: str | Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> ExecutionHandle:
        """Start a call and return its handle at once (async mode).

        ``handle.result(timeout)`` waits for the value, ``handle.cancel()`` stops
        the call in its instance, and ``await handle`` works in async code.
        """
        return self._run(self._start(function, args, kwargs, ExecutionMode.ASYNC))

    async def asubmit(
        self, function: str | Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> ExecutionHandle:
        """Coroutine twin of :meth:`submit`."""
        return await self._arun(
            self._start(function, args, kwargs, ExecutionMode.ASYNC)
        )

    def stream(
        self, function: str | Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Iterator[Any]:
        """Call a function that yields; iterate over its chunks as they come.

        Each item the function yields inside its instance is sent as soon as it is
        produced. Leaving the loop early cancels the call.
        """

        def start(on_chunk: Callable[[Any], None]) -> ExecutionHandle:
            return self._run(
                self._start(function, args, kwargs, ExecutionMode.STREAM, on_chunk)
            )

        return iter(ChunkStream(start))

    def astream(
        self, function: str | Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """Async twin of :meth:`stream`: ``async for chunk in s.astream(...)``."""

        async def start(on_chunk: Callable[[Any], None]) -> ExecutionHandle:
            return await self._arun(
                self._start(function, args, kwargs, ExecutionMode.STREAM, on_chunk)
            )

        return chunk_aiter(start)

    async def _start(
        self,
        function: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        mode: ExecutionMode,
        on_chunk: Callable[[Any], None] | None = None,
    ) -> ExecutionHandle:
        async def make() -> tuple[Execution, Coroutine[Any, Any, Any]]:
            request = await self._request(function, args, kwargs, mode, on_chunk)
            execution = self._manager.new_execution(request)
            return execution, self._manager.submit_execution(request, execution)

        return await start_on_loop(self._loop, make)

    async def _resolve(self, function: str | Callable[..., Any]) -> str:
        if isinstance(function, str):
            return function
        if not callable(function):
            raise InvalidSpec(
                f"invoke takes a registered name or a callable, not "
                f"{type(function).__name__}"
            )
        known = self._callables.get(id(function))
        if known is not None and known[0] is function:
            name = known[1]
            if name in self._manager.functions:
                return name
        name = name_of(function)
        await self.aregister(name, function)
        return name

    # -- tables ----------------------------------------------------------------------

    def _table(
        self, build: Callable[[TaskExecutionManager], pd.DataFrame]
    ) -> pd.DataFrame:
        async def snapshot() -> pd.DataFrame:
            return build(self._manager)

        return self._run(snapshot())

    def instances(self) -> pd.DataFrame:
        """One row per instance, live or stopped (``frames.INSTANCE_COLUMNS``)."""
        return self._table(frames.instances)

    def tasks(self) -> pd.DataFrame:
        """One row per task; columns in ``frames.TASK_COLUMNS``."""
        return self._table(frames.tasks)

    def channels(self) -> pd.DataFrame:
        """One row per channel, with traffic and latency stats."""
        return self._table(frames.channels)

    def metrics(self) -> pd.DataFrame:
        """Per-function call counts and latency percentiles."""
        return self._table(frames.metrics)

    def events(self) -> pd.DataFrame:
        """The event log: a row per phase of each execution and per lifecycle change."""
        return self._table(frames.events)

    def executions(self) -> pd.DataFrame:
        """One row per call, most recent last."""
        return self._table(frames.executions)

    def inspect(self, name_or_id: str) -> display.Inspection:
        """Details of a function, task, instance or execution, by name or id."""

        async def look() -> display.Inspection:
            instance = self._manager.instances.get(name_or_id)
            if instance is not None:
                runtime = self._manager.runtimes.get(instance.task.runtime)
                await runtime.refresh_instance(instance)
            return display.inspect(self._manager, name_or_id)

        return self._run(look())

    # -- control -------------------------------------------------------------------

    def scale(self, name: str, count: int) -> None:
        """Start or stop instances of ``name`` until ``count`` are ready."""
        self._run(self._manager.scale(name, count))

    def stop_instance(self, instance_id: str) -> None:
        """Stop one instance; the next call starts a new one if needed."""

        async def stop() -> None:
            instance = self._manager.instances.get(instance_id)
            if instance is None:
                raise FunctionNotFound(f"no instance {instance_id!r} in this session")
            await self._manager.stop_instance(instance, "stopped by the user")

        self._run(stop())

    @property
    def functions(self) -> list[str]:
        """The registered function names."""
        return sorted(self._manager.functions)

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Stop every instance, close every channel and stop the loop thread.

        Calls still running fail with :class:`SessionClosed`. Closing twice is
        harmless.
        """
        with self._close_lock:
            if self.state is not SessionState.OPEN:
                return
            self.state = SessionState.CLOSING
        try:
            if self._loop.on_loop_thread:
                self._abandon()
                return
            if self._loop.alive:
                try:
                    self._loop.run(self._shutdown(), timeout=60)
                except Exception:
                    logger.exception("closing session %s failed", self.session_id)
            self._watchdog.close()
            self._loop.stop()
            shutil.rmtree(self._workdir, ignore_errors=True)
        finally:
            self.state = SessionState.CLOSED
            _cleanup.untrack(self)
        logger.info("session %s closed", self.session_id)

    async def _shutdown(self) -> None:
        manager = self._manager
        await manager.close()
        await manager.runtimes.close()
        await manager.factory.close()

    def _abandon(self) -> None:
        """Close without the loop: the watchdog kills what is left."""
        self._watchdog.close_abruptly()
        self._loop.stop()

    async def aclose(self) -> None:
        """Coroutine twin of :meth:`close` (it runs the close in a thread)."""
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if getattr(self, "state", SessionState.CLOSED) is not SessionState.OPEN:
            return
        if sys.is_finalizing():
            return
        try:
            self._abandon()
            self.state = SessionState.CLOSED
        except Exception:
            pass

    # -- display -------------------------------------------------------------------

    def __repr__(self) -> str:
        manager = getattr(self, "_manager", None)
        count = len(manager.functions) if manager is not None else 0
        return (
            f"<spear_nb.Session {self.session_id} {self.state.value} functions={count}>"
        )

    def _repr_html_(self) -> str:
        if self.state is not SessionState.OPEN:
            return display.escape(repr(self))
        return self._run(self._html())

    async def _html(self) -> str:
        return display.session_html(self, self._manager)


class FunctionInfo:
    """What ``register`` returns: the function's task and artifact at a glance."""

    def __init__(
        self, name: str, task_id: str, artifact_id: str, runtime: str, kind: str
    ) -> None:
        self.name = name
        self.task_id = task_id
        self.artifact_id = artifact_id
        self.runtime = runtime
        self.kind = kind

    @classmethod
    def of(cls, task: Task) -> FunctionInfo:
        spec = task.artifact.spec
        return cls(
            task.name,
            task.task_id,
            task.artifact.artifact_id,
            spec.runtime.value,
            spec.kind.value,
        )

    def __repr__(self) -> str:
        return (
            f"<function {self.name!r}: {self.kind} on {self.runtime}, "
            f"task {self.task_id}, artifact {self.artifact_id}>"
        )


def _wasm_runtime(context: RuntimeContext) -> Runtime:
    # Imported on first use: wasmtime loads a large library, and may be missing.
    from spear_nb.runtime.wasm import WasmRuntime

    return WasmRuntime(context)


def _kubernetes_runtime(context: RuntimeContext) -> Runtime:
    # Imported on first use: most sessions never create a pod.
    from spear_nb.runtime.kubernetes import KubernetesRuntime

    return KubernetesRuntime(context)


def _byte_payload(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    if kwargs or len(args) != 1:
        raise InvalidSpec(
            f"{name!r} takes one bytes payload (for example invoke({name!r}, b'...')),"
            f" got {len(args)} positional and {len(kwargs)} keyword arguments"
        )
    payload = args[0]
    if isinstance(payload, str):
        return payload.encode()
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    raise InvalidSpec(
        f"{name!r} takes bytes (or str, sent as UTF-8), not {type(payload).__name__}"
    )
