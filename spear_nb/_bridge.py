"""One background event loop per session, and the helper that blocks on it.

All async state (sockets, subprocess watchers, futures) belongs to the loop thread.
Other threads hand it coroutines: :meth:`LoopThread.run` blocks until the result is
there, :meth:`LoopThread.run_async` awaits it from another loop (a notebook cell's).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from spear_nb.errors import SpearError, WaitTimeout

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a blocking call waits at a time; Ctrl-C is noticed between slices.
WAIT_SLICE = 0.25
# After Ctrl-C, how long to let the cancellation reach the instance.
CANCEL_GRACE = 5.0
# The message of the cancel that Ctrl-C makes (so that its execution says so).
CTRL_C = "Ctrl-C"


def wait_slices(timeout: float | None) -> Iterator[float]:
    """The waits, each at most :data:`WAIT_SLICE`, that make up a blocking wait
    of ``timeout`` seconds (None: without end); the last one ends on time."""
    if timeout is None:
        while True:
            yield WAIT_SLICE
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        yield max(0.0, min(WAIT_SLICE, left))
        if left <= WAIT_SLICE:
            return


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A private event loop: uvloop's when it is installed, asyncio's otherwise.

    uvloop roughly halves the loop's own cost per round trip. It is set on this
    loop only; the global event loop policy is left alone.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """A daemon thread running an asyncio event loop until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self.loop = new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(self.loop)
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(
                        asyncio.gather(*pending, return_exceptions=True)
                    )
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.run_until_complete(self.loop.shutdown_default_executor())
            finally:
                self.loop.close()

    @property
    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block until it is done.

        Ctrl-C cancels the coroutine (and so the work in the instance), waits a
        moment for that to finish, and re-raises KeyboardInterrupt.
        """
        if self.on_loop_thread:
            coro.close()
            raise SpearError(
                "a blocking spear_nb call was made on the session's own event loop "
                "thread, which would deadlock; use the 'a'-prefixed coroutine "
                "(for example 'await session.ainvoke(...)') there"
            )
        done = threading.Lock()
        done.acquire()
        holder: list[asyncio.Task[T]] = []

        def start() -> None:
            task = self.loop.create_task(coro)
            holder.append(task)
            task.add_done_callback(lambda _: done.release())

        try:
            self.loop.call_soon_threadsafe(start)
        except RuntimeError:
            coro.close()
            raise
        try:
            for wait in wait_slices(timeout):
                if done.acquire(timeout=wait):
                    break
            else:
                self.loop.call_soon_threadsafe(lambda: holder[0].cancel())
                done.acquire(timeout=CANCEL_GRACE)
                raise WaitTimeout(
                    f"gave up waiting after {timeout:g} s; the call was cancelled"
                )
        except KeyboardInterrupt:
            self._cancel(holder, done)
            raise
        task = holder[0]
        if task.cancelled():
            raise concurrent.futures.CancelledError()
        return task.result()

    def _cancel(self, holder: list[asyncio.Task[Any]], done: threading.Lock) -> None:
        def cancel() -> None:
            if holder:
                holder[0].cancel(CTRL_C)

        self.loop.call_soon_threadsafe(cancel)
        if not done.acquire(timeout=CANCEL_GRACE):
            logger.warning("an interrupted call is still being cancelled")

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the session's loop from any other loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return await coro
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return await asyncio.wrap_future(future)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the loop and return a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and join the thread."""
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            return
        if not self.on_loop_thread:
            self._thread.join(timeout)
