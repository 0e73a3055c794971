"""The Session: a synchronous facade over the async manager, made for notebooks."""

from __future__ import annotations

import asyncio
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
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd

from spear_nb import _cleanup
from spear_nb._arguments import checked as _checked
from spear_nb._arguments import whole
from spear_nb._bridge import LoopThread
from spear_nb._handles import ChunkStream, ExecutionHandle, chunk_aiter, start_on_loop
from spear_nb.communication.factory import CommunicationFactory
from spear_nb.communication.lane import busy_poll_seconds
from spear_nb.config import SessionConfig
from spear_nb.errors import (
    ConfigurationError,
    FunctionNotFound,
    InvalidArguments,
    SessionClosed,
)
from spear_nb.execution.events import EventLog
from spear_nb.execution.manager import NOT_DIRECT, TaskExecutionManager
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

if TYPE_CHECKING:
    from spear_nb.notebook.dashboard import Dashboard
    from spear_nb.notebook.snapshot import StaticDashboard
    from spear_nb.notebook.timeline import Timeline

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
            config = SessionConfig(**settings)
        if config.kubeconfig or config.kube_context:
            from spear_nb.runtime._kube import check_kube_settings

            check_kube_settings(config)
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
            self._workdir,
            events,
            self.config.max_frame_size,
            busy_poll=busy_poll_seconds(self.config.busy_poll_us),
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

    def _check_usable(self) -> None:
        if self.state is not SessionState.OPEN:
            raise SessionClosed("The session is closed; create a new one.")

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.state is not SessionState.OPEN:
            coro.close()
            self._check_usable()
        if self._loop.on_loop_thread:
            return self._loop.run(coro)  # refused there, with the reason
        return self._loop.run(self._settled(coro))

    async def _arun(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.state is not SessionState.OPEN:
            coro.close()
            self._check_usable()
        return await self._loop.run_async(self._settled(coro))

    async def _settled(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` once the direct calls made so far are in the records, so
        that what it reads (tables, metrics) includes them."""
        manager = getattr(self, "_manager", None)
        if manager is not None:
            manager.settle_direct()
        return await coro

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
        if self.config.direct_calls and not self._loop.on_loop_thread:
            name = self._known_name(function)
            if name is not None:
                result = self._manager.submit_direct(name, args, kwargs)
                if result is not NOT_DIRECT:
                    return result
        return self._run(self._invoke(function, args, kwargs))

    def _known_name(self, function: str | Callable[..., Any]) -> str | None:
        """The registered name a call means, without registering anything."""
        if isinstance(function, str):
            return function
        known = self._callables.get(id(function))
        return known[1] if known is not None and known[0] is function else None

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
        if not isinstance(function, str):
            function = await self._resolve(function)
        request = self._request_for(function, args, kwargs, ExecutionMode.SYNC)
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
        return self._request_for(name, args, kwargs, mode, on_chunk)

    def _request_for(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        mode: ExecutionMode,
        on_chunk: Callable[[Any], None] | None = None,
    ) -> InvokeFunctionRequest:
        task = self._manager.function(name)
        request = InvokeFunctionRequest(
            name, args, kwargs, mode=mode, on_chunk=on_chunk
        )
        if task.artifact.spec.kind in (ArtifactKind.COMMAND, ArtifactKind.WASM):
            if mode is ExecutionMode.STREAM:
                raise InvalidArguments(
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
            raise InvalidArguments(
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
        return self._read(lambda: build(self._manager))

    def _read(self, read: Callable[[], T]) -> T:
        """Run ``read`` on the session's loop; once the session is closed, here:
        the loop has stopped and nothing changes any more, so what it reads is
        how the session ended."""
        if self.state is SessionState.CLOSED:
            return read()

        async def on_loop() -> T:
            return read()

        return self._run(on_loop())

    @_checked
    def instances(self) -> pd.DataFrame:
        """One row per instance, live or stopped (``frames.INSTANCE_COLUMNS``)."""
        return self._table(frames.instances)

    @_checked
    def tasks(self) -> pd.DataFrame:
        """One row per task; columns in ``frames.TASK_COLUMNS``."""
        return self._table(frames.tasks)

    @_checked
    def channels(self) -> pd.DataFrame:
        """One row per channel, with traffic and latency stats."""
        return self._table(frames.channels)

    @_checked
    def metrics(self) -> pd.DataFrame:
        """Per-function call counts and latency percentiles."""
        return self._table(frames.metrics)

    @_checked
    def events(self) -> pd.DataFrame:
        """The event log: a row per phase of each execution and per lifecycle change."""
        return self._table(frames.events)

    @_checked
    def executions(self) -> pd.DataFrame:
        """One row per call, most recent last."""
        return self._table(frames.executions)

    @_checked
    def inspect(self, name_or_id: str) -> display.Inspection:
        """Details of a function, task, instance or execution, by name or id."""

        async def look() -> display.Inspection:
            instance = self._manager.instances.get(name_or_id)
            if instance is not None:
                runtime = self._manager.runtimes.get(instance.task.runtime)
                await runtime.refresh_instance(instance)
            return display.inspect(self._manager, name_or_id)

        if self.state is SessionState.CLOSED:  # as the tables: how it ended
            return display.inspect(self._manager, name_or_id)
        return self._run(look())

    # -- control -------------------------------------------------------------------

    @_checked
    def scale(self, name: str | Callable[..., Any], count: int) -> None:
        """Start or stop instances of ``name`` (a registered name, or a callable
        registered before) until ``count`` are ready."""
        count = whole(count, "scale()'s count of instances")
        self._run(self._manager.scale(self._name_of(name, "scale"), count))

    def _name_of(self, function: str | Callable[..., Any], what: str) -> str:
        """The registered name of ``function``, for the methods that do not
        register a callable on first use."""
        if isinstance(function, str):
            return function
        name = self._known_name(function) if callable(function) else None
        if name is None:
            raise InvalidArguments(
                f"{what}() takes a registered name, or a callable registered "
                f"before; got {type(function).__name__}"
            )
        return name

    @_checked
    def stop_instance(self, instance_id: str) -> None:
        """Stop one instance; the next call starts a new one if needed."""

        async def stop() -> None:
            instance = self._manager.instances.get(instance_id)
            if instance is None:
                raise FunctionNotFound(f"no instance {instance_id!r} in this session")
            await self._manager.stop_instance(instance, "stopped by the user")

        self._run(stop())

    @property
    def functions(self) -> FunctionNames:
        """The registered function names, sorted; ``s.functions()`` works too."""
        return FunctionNames(sorted(self._manager.functions))

    # -- many calls, timelines and the dashboard ---------------------------------------

    @_checked
    def map(
        self,
        function: str | Callable[..., Any],
        inputs: Iterable[Any],
        /,
        *,
        progress: bool = True,
        max_in_flight: int | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Call ``function`` once per input, concurrently; results in input order.

        Each input is the one argument of one call (to pass several, map over
        tuples and unpack them in the function). At most ``max_in_flight`` calls
        run at once; by default the function's capacity, ``max_instances`` times
        ``max_concurrency``, so no call waits in the instance queue. A progress
        bar (``tqdm.auto``: a widget in notebooks) counts finished calls unless
        ``progress=False``.

        If a call fails, the calls still running are cancelled (inside their
        instances), those not started are dropped, and the first error raised is
        raised here. With ``return_exceptions=True`` every call runs and a failed
        call's error takes its place in the returned list.
        """
        items = _inputs(inputs)
        bar = self._map_progress(function, len(items), progress)
        try:
            return self._run(
                self._map(function, items, max_in_flight, return_exceptions, bar)
            )
        finally:
            if bar is not None:
                bar.close()

    @_checked
    async def amap(
        self,
        function: str | Callable[..., Any],
        inputs: Iterable[Any],
        /,
        *,
        progress: bool = True,
        max_in_flight: int | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Coroutine twin of :meth:`map`."""
        items = _inputs(inputs)
        bar = self._map_progress(function, len(items), progress)
        try:
            return await self._arun(
                self._map(function, items, max_in_flight, return_exceptions, bar)
            )
        finally:
            if bar is not None:
                bar.close()

    @staticmethod
    def _map_progress(
        function: str | Callable[..., Any], total: int, progress: bool
    ) -> Any:
        if not progress or total == 0:
            return None
        from spear_nb.notebook.progress import progress_bar

        name = function if isinstance(function, str) else name_of(function)
        return progress_bar(name, total)

    async def _map(
        self,
        function: str | Callable[..., Any],
        items: list[Any],
        max_in_flight: int | None,
        return_exceptions: bool,
        bar: Any,
    ) -> list[Any]:
        if max_in_flight is not None and (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or max_in_flight < 1
        ):
            raise ConfigurationError(
                f"max_in_flight must be a positive int, not {max_in_flight!r}"
            )
        if not items:
            return []
        name = await self._resolve(function)
        settings = self._manager.function(name).settings
        limit = max_in_flight or settings.max_instances * settings.max_concurrency
        results: list[Any] = [None] * len(items)
        indexes = iter(range(len(items)))
        failures: list[BaseException] = []

        async def worker() -> None:
            for index in indexes:
                if failures:
                    return
                try:
                    request = await self._request(
                        name, (items[index],), {}, ExecutionMode.SYNC
                    )
                    results[index] = await self._manager.submit_execution(request)
                except Exception as exc:
                    if not return_exceptions:
                        failures.append(exc)
                        raise
                    results[index] = exc
                if bar is not None:
                    bar.update(1)

        workers = [
            asyncio.get_running_loop().create_task(worker())
            for _ in range(min(limit, len(items)))
        ]
        try:
            await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            # After the first error (or Ctrl-C): cancel the calls still running.
            for worker_task in workers:
                worker_task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if failures:
            raise failures[0]
        return results

    @_checked
    def timeline(
        self,
        executions: Any = None,
        /,
        *,
        last: int = 10,
        align: str = "auto",
    ) -> Timeline:
        """Draw the five phases of executions as a chart (one bar each).

        ``executions`` is an execution id, an :class:`ExecutionHandle`, a list of
        them, or a DataFrame with an ``execution_id`` column (a slice of
        :meth:`executions`); by default the last ``last`` executions. Rows share
        one clock when the calls overlapped (``align="time"``), else each starts
        at zero (``"start"``).
        """
        return self._read(lambda: self._timeline_of(executions, last, align))

    @_checked
    async def atimeline(
        self, executions: Any = None, /, *, last: int = 10, align: str = "auto"
    ) -> Timeline:
        """Coroutine twin of :meth:`timeline`."""

        async def on_loop() -> Timeline:
            return self._timeline_of(executions, last, align)

        return await self._arun(on_loop())

    def _timeline_of(self, executions: Any, last: int, align: str) -> Timeline:
        from spear_nb.notebook.timeline import timeline_of

        last = whole(last, "timeline()'s last")
        log = list(self._manager.executions)
        if executions is None:
            return timeline_of(log[-last:] if last > 0 else [], align)
        if isinstance(executions, pd.DataFrame):
            keys: list[Any] = executions["execution_id"].tolist()
        elif isinstance(executions, (str, ExecutionHandle)):
            keys = [executions]
        elif isinstance(executions, Iterable):
            keys = list(executions)
        else:
            raise InvalidArguments(
                "timeline() takes an execution id, a handle, a list of them or a "
                f"DataFrame of executions, not {type(executions).__name__}; to draw "
                "the last n calls, pass last=n"
            )
        by_id = {e.execution_id: e for e in log}
        chosen: list[Execution] = []
        for key in keys:
            if isinstance(key, ExecutionHandle):
                chosen.append(key._execution)
                continue
            execution_id = str(getattr(key, "execution_id", key))
            found = by_id.get(execution_id)
            if found is None:
                raise FunctionNotFound(
                    f"no execution {execution_id!r} in this session's log, which "
                    f"keeps the last {self.config.execution_log_size}"
                )
            chosen.append(found)
        return timeline_of(chosen, align)

    @_checked
    def dashboard(
        self, *, interval: float | None = None, widgets: bool = True
    ) -> Dashboard | StaticDashboard:
        """The live dashboard of this session, built on first use and reused.

        An ipywidgets view that refreshes itself every ``interval`` seconds (1 by
        default) from the session's loop, while the kernel is idle or busy:
        instances, channels, per-function metrics, throughput and latency over
        time, and the phases of recent executions, with controls to pause,
        change the interval, scale a function and stop an instance. It stops
        when it is closed or the session closes. Where ipywidgets is missing (or
        with ``widgets=False``) a :class:`StaticDashboard` shows the same
        information as HTML and text, as of the call.
        """
        self._check_usable()
        current = self._live_dashboard()
        if current is not None and widgets:
            if interval is not None:
                current.interval = interval
            return current
        live = _dashboard_class() if widgets else None
        if live is None:
            from spear_nb.notebook.snapshot import StaticDashboard

            return StaticDashboard(self)
        self._dashboard = live(self, 1.0 if interval is None else interval)
        return self._dashboard

    @_checked
    async def adashboard(
        self, *, interval: float | None = None, widgets: bool = True
    ) -> Dashboard | StaticDashboard:
        """Coroutine twin of :meth:`dashboard`."""
        self._check_usable()
        current = self._live_dashboard()
        if current is not None and widgets:
            if interval is not None:
                current.interval = interval
            return current
        live = _dashboard_class() if widgets else None
        if live is None:
            from spear_nb.notebook.snapshot import StaticDashboard

            return await StaticDashboard.acreate(self)
        self._dashboard = await live.acreate(
            self, 1.0 if interval is None else interval
        )
        return self._dashboard

    def _live_dashboard(self) -> Dashboard | None:
        current: Dashboard | None = getattr(self, "_dashboard", None)
        if current is None or current.closed:
            return None
        return current

    def _close_dashboard(self) -> None:
        current = getattr(self, "_dashboard", None)
        if current is None:
            return
        try:
            current.session_closed()
        except Exception:
            logger.warning("the dashboard did not stop cleanly", exc_info=True)

    # -- lifecycle -------------------------------------------------------------------

    @_checked
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
            self._close_dashboard()
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
        self._check_usable()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Session:
        self._check_usable()
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


class FunctionNames(list[str]):
    """The registered function names: a list, which may also be called (like the
    tables beside it, ``s.functions()``) for a copy of itself."""

    def __call__(self) -> list[str]:
        return list(self)


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

    def _repr_html_(self) -> str:
        return display.function_html(self)


def _dashboard_class() -> type[Dashboard] | None:
    """The live dashboard's class, or None where ipywidgets cannot be imported."""
    try:
        from spear_nb.notebook.dashboard import Dashboard
    except ImportError as exc:
        logger.info("no live dashboard (%s); showing a static one", exc)
        return None
    return Dashboard


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
        raise InvalidArguments(
            f"{name!r} takes one bytes payload (for example invoke({name!r}, b'...')),"
            f" got {len(args)} positional and {len(kwargs)} keyword arguments"
        )
    payload = args[0]
    if isinstance(payload, str):
        return payload.encode()
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    raise InvalidArguments(
        f"{name!r} takes bytes (or str, sent as UTF-8), not {type(payload).__name__}"
    )


def _inputs(inputs: Iterable[Any]) -> list[Any]:
    """The inputs of a map as a list; what is not iterable is refused clearly."""
    if isinstance(inputs, (bytes, bytearray, memoryview)):
        raise InvalidArguments(
            f"map() over {type(inputs).__name__} would make one call per byte, "
            "with an int each; to send the bytes as one payload use invoke(), or "
            "map over a list of payloads: map(f, [b'...', b'...'])"
        )
    try:
        return list(inputs)
    except TypeError:
        if hasattr(inputs, "__iter__"):
            raise  # an iterator that failed while producing its items
        raise InvalidArguments(
            f"map() takes an iterable of inputs, one per call, got "
            f"{type(inputs).__name__} {inputs!r}; for one call use invoke(), or "
            "wrap it: map(f, [x])"
        ) from None
