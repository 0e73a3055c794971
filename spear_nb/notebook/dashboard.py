"""The live dashboard: an ipywidgets view that refreshes itself from the session loop.

Refreshes run as a task on the session's own event loop thread, where the state
they read lives, so they go on while the kernel is busy running a cell. Each
refresh reads one :class:`~spear_nb.notebook.snapshot.Snapshot` and sets one value
per view; a view whose HTML did not change sends nothing, so a busy session sends
at most a handful of small messages per refresh period.

Widget state is pushed from the loop thread. That is safe in ipykernel: comm
messages go out through the IOPub thread's socket, which accepts sends from any
thread, and messages sent from threads the kernel did not start fall back to the
shell's parent header (fixed for threads in ipykernel 7.1 after a 7.0 regression).
The dashboard never writes to stdout or stderr, which would land in whatever cell
runs at the time; messages go to its own Output widget. Its failures are logged at
info level only, below the level Python prints when no logging is configured.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import ipywidgets

from spear_nb.errors import (
    ConfigurationError,
    FunctionNotFound,
    SessionClosed,
    describe,
)
from spear_nb.notebook.snapshot import (
    SECTIONS,
    Activity,
    Snapshot,
    render_panel,
    render_section,
    render_text,
    take,
)

if TYPE_CHECKING:
    from spear_nb.session import Session

logger = logging.getLogger(__name__)

INTERVALS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
# Messages kept in the dashboard's message area.
MAX_MESSAGES = 20


def check_interval(interval: float) -> float:
    try:
        value = float(interval)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"the refresh interval is a number of seconds, not {interval!r}"
        ) from None
    if not 0.05 <= value <= 3600:
        raise ConfigurationError(
            f"the refresh interval must be between 0.05 and 3600 seconds, not {value}"
        )
    return value


class Dashboard(ipywidgets.VBox):
    """A live view of a session: instances, channels, functions, activity, phases.

    It refreshes every ``interval`` seconds on the session's loop, whether the
    kernel is idle or busy, until it is closed or the session closes. Controls
    pause refreshing, change the interval, scale a function and stop an instance;
    their errors show in the dashboard's message area.
    """

    def __init__(
        self, session: Session, interval: float = 1.0, *, start: bool = True
    ) -> None:
        # Set first: a widget that failed to build is still closed when it is
        # collected, and closing must then find nothing to stop.
        self._closed = True
        self._session = session
        self._loop_thread = session._loop
        self._interval = check_interval(interval)
        self._paused = False
        self._closed = False
        self._stopped = threading.Event()
        self._ticked = threading.Condition()
        self._message_lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._activity: Activity | None = None
        self.refreshes = 0
        self.ticks = 0
        self.pending: concurrent.futures.Future[Any] | None = None
        self._build()
        super().__init__(
            children=self._layout(),
            layout=ipywidgets.Layout(
                border="1px solid var(--jp-border-color2, #ddd)", padding="4px 8px"
            ),
        )
        self.add_class("spear-nb-dashboard")
        comm = getattr(self, "comm", None)
        if comm is not None and hasattr(comm, "on_close"):
            comm.on_close(lambda _msg: self._stop())
        if start:
            self._started(session._run(self._start()))

    @classmethod
    async def acreate(cls, session: Session, interval: float = 1.0) -> Dashboard:
        """Build a dashboard from async code without blocking the caller's loop."""
        dashboard = cls(session, interval, start=False)
        dashboard._started(await session._arun(dashboard._start()))
        return dashboard

    def _started(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._apply(snapshot)

    # -- building --------------------------------------------------------------------

    def _build(self) -> None:
        self.views: dict[str, ipywidgets.HTML] = {
            name: ipywidgets.HTML(layout=ipywidgets.Layout(overflow="auto")).add_class(
                f"spear-nb-view-{name}"
            )
            for name in SECTIONS
        }
        self.pause_button = ipywidgets.ToggleButton(
            description="Pause", icon="pause", tooltip="pause or resume refreshing"
        )
        self.pause_button.observe(self._guard("pause", self._on_pause), "value")
        labels = [(f"{i:g} s", i) for i in INTERVALS]
        if self._interval not in INTERVALS:
            labels.append((f"{self._interval:g} s", self._interval))
            labels.sort(key=lambda item: item[1])
        self.interval_picker = ipywidgets.Dropdown(
            options=labels,
            value=self._interval,
            description="every",
            layout=ipywidgets.Layout(width="140px"),
            style={"description_width": "40px"},
        )
        self.interval_picker.observe(
            self._guard("interval", self._on_interval), "value"
        )
        self.refresh_button = ipywidgets.Button(
            description="Refresh", icon="refresh", tooltip="refresh now"
        )
        self.refresh_button.on_click(self._guard("refresh", self._on_refresh))

        self.scale_function = ipywidgets.Dropdown(
            description="scale", layout=ipywidgets.Layout(width="190px")
        )
        self.scale_count = ipywidgets.BoundedIntText(
            value=1, min=0, max=50, layout=ipywidgets.Layout(width="70px")
        )
        self.scale_button = ipywidgets.Button(
            description="to N", tooltip="start or stop instances until N are ready"
        )
        self.scale_down = ipywidgets.Button(description="-1", tooltip="one fewer")
        self.scale_up = ipywidgets.Button(description="+1", tooltip="one more")
        for button in (self.scale_button, self.scale_down, self.scale_up):
            button.layout = ipywidgets.Layout(width="auto")
        self.scale_button.on_click(self._guard("scale", self._on_scale_to))
        self.scale_down.on_click(self._guard("scale", lambda _: self._on_step(-1)))
        self.scale_up.on_click(self._guard("scale", lambda _: self._on_step(+1)))
        self.scale_function.observe(
            self._guard("scale", self._on_pick_function), "value"
        )

        self.stop_picker = ipywidgets.Dropdown(
            description="instance", layout=ipywidgets.Layout(width="200px")
        )
        self.stop_button = ipywidgets.Button(
            description="Stop", icon="stop", button_style="warning"
        )
        self.stop_button.on_click(self._guard("stop", self._on_stop_instance))
        self.messages = ipywidgets.Output(
            layout=ipywidgets.Layout(max_height="120px", overflow="auto")
        )

    def _layout(self) -> list[ipywidgets.Widget]:
        views = self.views
        controls = ipywidgets.HBox(
            [
                self.pause_button,
                self.interval_picker,
                self.refresh_button,
                ipywidgets.HTML("&nbsp;&nbsp;"),
                self.scale_function,
                self.scale_count,
                self.scale_button,
                self.scale_down,
                self.scale_up,
                ipywidgets.HTML("&nbsp;&nbsp;"),
                self.stop_picker,
                self.stop_button,
            ],
            layout=ipywidgets.Layout(flex_flow="row wrap", align_items="center"),
        )
        self._containers = [controls]
        timeline_title = ipywidgets.HTML(
            "<div style='font-weight:600; margin-top:6px;'>Recent executions "
            "<span style='font-weight:normal; font-size:0.9em; "
            "color: var(--jp-ui-font-color2, gray);'>by phase, each from its own "
            "start</span></div>"
        )
        self._containers.append(timeline_title)
        return [
            views["header"],
            controls,
            views["instances"],
            views["channels"],
            views["tasks"],
            views["activity"],
            timeline_title,
            views["timeline"],
            self.messages,
        ]

    # -- the refresh task, on the session loop -----------------------------------------

    async def _start(self) -> Snapshot:
        manager = self._session._manager
        running = [e for e in manager.executions if e.duration is None]
        self._activity = Activity(manager.events, running)
        self._wake = asyncio.Event()
        snapshot = take(self._session, manager, self._activity.samples)
        snapshot.interval = self._interval
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._ended)
        return snapshot

    async def _run(self) -> None:
        shown_paused = False
        assert self._wake is not None
        while not self._closed:
            if not self._paused:
                self._refresh_now()
                shown_paused = False
            elif not shown_paused:
                self._show_paused()
                shown_paused = True
            with self._ticked:
                self.ticks += 1
                self._ticked.notify_all()
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            logger.info("the dashboard stopped refreshing: %s", describe(exc))
            self._message(f"stopped refreshing: {describe(exc)}", error=True)
        if self._activity is not None:
            self._activity.close()
        self._stopped.set()
        with self._ticked:
            self._ticked.notify_all()

    def _refresh_now(self) -> None:
        assert self._activity is not None
        try:
            self._activity.sample()
            snapshot = take(
                self._session, self._session._manager, self._activity.samples
            )
            snapshot.interval = self._interval
            self.snapshot = snapshot
            self._apply(snapshot)
            self.refreshes += 1
        except Exception as exc:
            logger.info("dashboard refresh failed: %s", describe(exc))
            self._message(f"refresh failed: {describe(exc)}", error=True)

    def _show_paused(self) -> None:
        paused = dataclasses.replace(self.snapshot, paused=True)
        self.views["header"].value = render_section("header", paused)

    def _apply(self, snapshot: Snapshot) -> None:
        """Set each view once; unchanged values send nothing."""
        for name, view in self.views.items():
            html = render_section(name, snapshot)
            if view.value != html:
                view.value = html
        self._set_options(self.scale_function, snapshot.functions)
        self._set_options(self.stop_picker, snapshot.live_instances)
        live = snapshot.state == "open"
        has_functions = live and bool(snapshot.functions)
        for button in (self.scale_button, self.scale_down, self.scale_up):
            if button.disabled == has_functions:
                button.disabled = not has_functions
        has_instances = live and bool(snapshot.live_instances)
        if self.stop_button.disabled == has_instances:
            self.stop_button.disabled = not has_instances

    @staticmethod
    def _set_options(picker: ipywidgets.Dropdown, options: list[str]) -> None:
        wanted = tuple(options)
        if tuple(picker.options) == wanted:
            return
        previous = picker.value
        with picker.hold_sync():
            picker.options = wanted
            if previous in wanted:
                picker.value = previous
            else:  # the first one, so that a button works without picking
                picker.value = wanted[0] if wanted else None

    # -- controls (called on the kernel's thread) ------------------------------------

    def _guard(self, what: str, callback: Callable[..., None]) -> Callable[..., None]:
        """Show a callback's exception in the message area instead of losing it."""

        @functools.wraps(callback)
        def guarded(*args: Any) -> None:
            try:
                callback(*args)
            except Exception as exc:
                logger.info("dashboard %s failed: %s", what, describe(exc))
                self._message(f"{what} failed: {describe(exc)}", error=True)

        return guarded

    def _on_pause(self, change: dict[str, Any]) -> None:
        self.paused = bool(change["new"])

    def _on_interval(self, change: dict[str, Any]) -> None:
        self.interval = change["new"]

    def _on_refresh(self, _: Any) -> None:
        self._wake_up()

    def _on_pick_function(self, change: dict[str, Any]) -> None:
        name = change["new"]
        if not name:
            return
        for row in self.snapshot.tasks:
            if row["function"] == name:
                self.scale_count.max = int(row["max_instances"])
                self.scale_count.value = int(row["instances"])

    def _on_scale_to(self, _: Any) -> None:
        self.scale(
            self._picked(self.scale_function, "a function"), self.scale_count.value
        )

    def _on_step(self, step: int) -> None:
        name = self._picked(self.scale_function, "a function")
        manager = self._session._manager

        async def target() -> int:
            task = manager.function(name)
            return max(0, len(task.instances) + task.starting + step)

        async def run() -> int:
            count = await target()
            await manager.scale(name, count)
            return count

        self._act(run(), lambda count: f"scaled {name} to {count} instance(s)")

    def _on_stop_instance(self, _: Any) -> None:
        self.stop_instance(self._picked(self.stop_picker, "an instance"))

    @staticmethod
    def _picked(picker: ipywidgets.Dropdown, what: str) -> str:
        if not picker.value:
            raise ConfigurationError(f"choose {what} first")
        return str(picker.value)

    def scale(self, name: str, count: int) -> concurrent.futures.Future[Any]:
        """Scale ``name`` to ``count`` instances in the background (the button)."""
        manager = self._session._manager

        async def run() -> int:
            await manager.scale(name, count)
            return count

        return self._act(run(), lambda n: f"scaled {name} to {n} instance(s)")

    def stop_instance(self, instance_id: str) -> concurrent.futures.Future[Any]:
        """Stop one instance in the background (the button)."""
        manager = self._session._manager

        async def run() -> str:
            instance = manager.instances.get(instance_id)
            if instance is None:
                raise FunctionNotFound(f"no instance {instance_id!r} in this session")
            await manager.stop_instance(instance, "stopped from the dashboard")
            return instance_id

        return self._act(run(), lambda i: f"stopped {i}")

    def _act(
        self, coro: Coroutine[Any, Any, Any], done: Callable[[Any], str]
    ) -> concurrent.futures.Future[Any]:
        """Run a control's work on the session loop without blocking the kernel."""
        if self._session.state.value != "open":
            coro.close()
            raise SessionClosed("The session is closed; create a new one.")
        if self._closed:
            coro.close()
            raise ConfigurationError("the dashboard is closed; open a new one")
        future = self._loop_thread.submit(coro)
        self.pending = future

        def report(f: concurrent.futures.Future[Any]) -> None:
            if f.cancelled():
                self._message("cancelled", error=True)
            elif f.exception() is not None:
                exc = f.exception()
                assert exc is not None
                logger.info("dashboard action failed: %s", describe(exc))
                self._message(describe(exc), error=True)
            else:
                self._message(done(f.result()))
            self._wake_up()

        future.add_done_callback(report)
        return future

    def _message(self, text: str, error: bool = False) -> None:
        """Append a line to the dashboard's own message area (any thread)."""
        stream = "stderr" if error else "stdout"
        entry = {"output_type": "stream", "name": stream, "text": text + "\n"}
        with self._message_lock:
            outputs = (*self.messages.outputs, entry)[-MAX_MESSAGES:]
            self.messages.outputs = outputs

    # -- public state ------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """Whether refreshing is paused (the Pause button)."""
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self._paused = bool(value)
        if self.pause_button.value != self._paused:
            self.pause_button.value = self._paused
        self.pause_button.description = "Resume" if self._paused else "Pause"
        self.pause_button.icon = "play" if self._paused else "pause"
        self._wake_up()

    @property
    def interval(self) -> float:
        """Seconds between refreshes."""
        return self._interval

    @interval.setter
    def interval(self, value: float) -> None:
        self._interval = check_interval(value)
        options = dict(self.interval_picker.options)
        if self._interval in options.values() and (
            self.interval_picker.value != self._interval
        ):
            self.interval_picker.value = self._interval
        self._wake_up()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def refreshing(self) -> bool:
        """Whether the refresh task is still running."""
        return not self._stopped.is_set()

    def refresh(self, timeout: float = 30.0) -> Snapshot:
        """Refresh now and wait for it; returns the new snapshot."""
        before = self.refreshes
        self._wake_up()
        self.wait_for(lambda: self.refreshes > before, timeout)
        return self.snapshot

    def wait_for(self, condition: Callable[[], bool], timeout: float = 30.0) -> bool:
        """Wait until ``condition()`` holds, checking after each tick of the task."""
        with self._ticked:
            return self._ticked.wait_for(
                lambda: condition() or self._stopped.is_set(), timeout
            ) and bool(condition())

    def _wake_up(self) -> None:
        wake = self._wake
        if wake is None or self._closed or not self._loop_thread.alive:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self._loop_thread.loop.call_soon_threadsafe(wake.set)

    # -- closing -----------------------------------------------------------------------

    def _stop(self, timeout: float = 5.0) -> None:
        """Stop the refresh task (from any thread) and wait for it elsewhere."""
        if self._closed:
            return
        self._closed = True
        task = self._task
        if task is None or not self._loop_thread.alive:
            self._stopped.set()
            return
        with contextlib.suppress(RuntimeError):
            self._loop_thread.loop.call_soon_threadsafe(task.cancel)
        if not self._loop_thread.on_loop_thread:
            self._stopped.wait(timeout)

    def session_closed(self) -> None:
        """Called by the session as it closes: stop and show the final state."""
        self._stop()
        final = dataclasses.replace(self.snapshot, state="closed")
        self.views["header"].value = render_section("header", final)
        for control in self._controls():
            control.disabled = True

    def _controls(self) -> list[ipywidgets.DOMWidget]:
        """Every button and picker, in the order they are laid out."""
        return [
            self.pause_button,
            self.interval_picker,
            self.refresh_button,
            self.scale_function,
            self.scale_count,
            self.scale_button,
            self.scale_down,
            self.scale_up,
            self.stop_picker,
            self.stop_button,
        ]

    def close(self) -> None:
        """Stop refreshing and close the widget and its parts."""
        self._stop()
        if not hasattr(self, "views"):  # it failed to build: nothing to close
            return
        for widget in (
            *self.views.values(),
            *self._containers,
            *self._controls(),
            self.messages,
        ):
            widget.close()
        super().close()

    # -- display -----------------------------------------------------------------------

    def __repr__(self) -> str:
        snapshot: Snapshot | None = getattr(self, "snapshot", None)
        if snapshot is None:
            return f"<spear_nb dashboard of session {self._session.session_id}>"
        return render_text(snapshot)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        snapshot: Snapshot | None = getattr(self, "snapshot", None)
        if bundle is None or snapshot is None:
            return bundle
        # Front ends without the widget manager show the HTML (or text) instead.
        bundle["text/plain"] = render_text(snapshot)
        bundle["text/html"] = render_panel(snapshot)
        return bundle
