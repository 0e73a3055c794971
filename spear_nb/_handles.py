"""Handles for calls that outlive the method that started them: submit and stream."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from typing import Any

from spear_nb._arguments import checked, seconds
from spear_nb._bridge import (
    CANCEL_GRACE,
    CTRL_C,
    WAIT_SLICE,
    LoopThread,
    wait_slices,
)
from spear_nb.errors import ExecutionCancelled, WaitTimeout
from spear_nb.execution.model import Execution


class ExecutionHandle:
    """A call running in the background (``Session.submit``).

    ``result()`` blocks for the value, ``cancel()`` stops the call in its instance,
    and ``await handle`` works in async code.
    """

    def __init__(
        self,
        loop: LoopThread,
        execution: Execution,
        task: asyncio.Task[Any],
        future: concurrent.futures.Future[Any],
    ) -> None:
        self._loop = loop
        self._execution = execution
        self._task = task
        self._future = future

    @property
    def execution_id(self) -> str:
        return self._execution.execution_id

    @property
    def function(self) -> str:
        return self._execution.function

    @property
    def status(self) -> str:
        """pending, running, succeeded, failed, cancelled or timed_out."""
        return self._execution.status.value

    def done(self) -> bool:
        return self._future.done()

    @checked
    def result(self, timeout: float | None = None) -> Any:
        """Wait for the call and return its value (or raise its error).

        Ctrl-C while waiting cancels the call. ``timeout`` limits the wait, not
        the call: on expiry :class:`WaitTimeout` is raised and the call goes on.
        """
        timeout = seconds(timeout, "result()'s timeout")
        try:
            for wait in wait_slices(timeout):
                try:
                    return self._future.result(timeout=wait)
                except concurrent.futures.TimeoutError:
                    # The call's own ExecutionTimeout is a TimeoutError too.
                    if self._future.done():
                        raise
                except concurrent.futures.CancelledError:
                    raise ExecutionCancelled(
                        f"{self.execution_id} was cancelled"
                    ) from None
        except KeyboardInterrupt:
            self._cancel(CTRL_C)
            raise
        raise WaitTimeout(
            f"{self.execution_id} is still {self.status} after {timeout:g} s; it "
            "goes on: wait again, or cancel() it"
        )

    @checked
    def cancel(self) -> bool:
        """Cancel the call; return False if it had already finished."""
        return self._cancel(None)

    def _cancel(self, why: str | None) -> bool:
        if self._future.done():
            return False
        self._loop.loop.call_soon_threadsafe(self._task.cancel, why)
        return True

    def __await__(self) -> Generator[Any, None, Any]:
        return self._await().__await__()

    async def _await(self) -> Any:
        try:
            return await asyncio.wrap_future(self._future)
        except asyncio.CancelledError:
            if self._future.cancelled():
                raise ExecutionCancelled(f"{self.execution_id} was cancelled") from None
            raise

    def __repr__(self) -> str:
        return f"<ExecutionHandle {self.execution_id} {self.function} {self.status}>"

    def _repr_html_(self) -> str:
        # Imported here: the display layer loads jinja2 and its templates.
        from spear_nb.notebook.display import execution_html

        return execution_html(self._execution)


Starter = Callable[[], Coroutine[Any, Any, tuple[Execution, Coroutine[Any, Any, Any]]]]


async def start_on_loop(loop: LoopThread, make: Starter) -> ExecutionHandle:
    """On the session loop: create an execution, start it as a task, wrap it."""
    execution, coro = await make()
    task = asyncio.get_running_loop().create_task(coro)
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    task.add_done_callback(lambda t: _copy(t, future))
    return ExecutionHandle(loop, execution, task, future)


def _copy(task: asyncio.Task[Any], future: concurrent.futures.Future[Any]) -> None:
    if task.cancelled():
        future.cancel()
        future.set_running_or_notify_cancel()
    elif task.exception() is not None:
        future.set_exception(task.exception())
    else:
        future.set_result(task.result())


_END = object()


class ChunkStream:
    """A sync iterator over the chunks of a streamed call, as they arrive."""

    def __init__(
        self, start: Callable[[Callable[[Any], None]], ExecutionHandle]
    ) -> None:
        self._chunks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.handle = start(self._chunks.put)
        self.handle._future.add_done_callback(lambda _: self._chunks.put(_END))

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        try:
            while True:
                try:
                    item = self._chunks.get(timeout=WAIT_SLICE)
                except queue.Empty:
                    continue
                if item is _END:
                    self.handle.result()  # raises the call's error, if any
                    return
                yield item
        finally:
            # A consumer that stops early (break, Ctrl-C) cancels the call, and
            # waits for the instance to confirm so that it is free again.
            if self.handle.cancel():
                concurrent.futures.wait([self.handle._future], timeout=CANCEL_GRACE)


async def chunk_aiter(
    start: Callable[[Callable[[Any], None]], Coroutine[Any, Any, ExecutionHandle]],
) -> AsyncIterator[Any]:
    """An async iterator over the chunks of a streamed call."""
    caller = asyncio.get_running_loop()
    chunks: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        caller.call_soon_threadsafe(chunks.put_nowait, item)

    handle = await start(put)
    handle._future.add_done_callback(lambda _: put(_END))
    try:
        while True:
            item = await chunks.get()
            if item is _END:
                await handle
                return
            yield item
    finally:
        if handle.cancel():
            await asyncio.wait(
                [asyncio.wrap_future(handle._future)], timeout=CANCEL_GRACE
            )
