"""Issue 3: cancel. ``handle.cancel()`` stops the call inside its instance (a
Python function is interrupted, a command's process group is killed); the
execution is recorded as cancelled and the instance stays in service."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

import spear_nb
from tests import _remote
from tests._support import ReadySignal, all_gone, rows, wait_until, warm_grpc


@pytest.fixture(scope="module", autouse=True)
def _grpc_process_state() -> None:
    warm_grpc()


@pytest.fixture
def other() -> Iterator[ReadySignal]:
    """A second ReadySignal, to tell two running calls apart."""
    signal_ = ReadySignal()
    try:
        yield signal_
    finally:
        signal_.release()
        signal_.close()


def _status(s: spear_nb.Session, execution_id: str) -> str:
    (status,) = rows(s.executions(), execution_id=execution_id)["status"]
    return str(status)


@pytest.mark.parametrize("kind", ["unix", "tcp", "grpc"])
def test_cancel_interrupts_a_running_python_function(session, ready, kind) -> None:
    session.register("spin", _remote.spin_until_cancelled, channel=kind)
    handle = session.submit("spin", ready.port)
    pid = ready.wait()
    (instance_id,) = session.instances()["instance_id"]
    assert handle.status == "running"
    assert handle.cancel() is True
    with pytest.raises(spear_nb.ExecutionCancelled):
        handle.result(timeout=30)
    # The loop in the instance was interrupted: its finally closed the socket.
    assert ready.wait_closed(timeout=30)
    assert handle.status == "cancelled"
    assert _status(session, handle.execution_id) == "cancelled"
    assert handle.cancel() is False  # already over
    # The same instance, the same process, serves the next call.
    assert session.invoke("spin", None, "next") == "next"
    (row,) = session.instances().to_dict("records")
    assert row["instance_id"] == instance_id and row["pid"] == pid
    assert row["status"] == "ready" and row["requests_total"] == 2
    assert psutil.pid_exists(pid)
    (cancelled,) = session.metrics()["cancelled"]
    assert cancelled == 1


@pytest.mark.parametrize("kind", ["unix", "tcp", "grpc"])
def test_cancel_breaks_a_blocking_sleep_and_keeps_the_instance(
    session, ready, kind
) -> None:
    """A call blocked in C (``time.sleep``) is interrupted too, not waited out or
    killed with its instance: over gRPC the lone call runs on the agent's main
    thread, where a signal can break the sleep."""
    session.register("nap", _remote.report_and_sleep, channel=kind)
    handle = session.submit("nap", ready.port, 60)
    pid = ready.wait()
    handle.cancel()
    with pytest.raises(spear_nb.ExecutionCancelled):
        handle.result(timeout=30)
    # Had the sleep gone on past stop_grace (0.5 s here), the instance would
    # have been killed and replaced.
    assert _status(session, handle.execution_id) == "cancelled"
    (row,) = session.instances().to_dict("records")
    assert row["pid"] == pid and row["status"] == "ready"
    assert psutil.pid_exists(pid)


@pytest.mark.parametrize("kind", ["unix", "grpc"])
def test_cancel_hits_only_its_own_call_on_a_shared_instance(
    session, ready, other, kind
) -> None:
    # Over grpc the first call runs on the agent's thread for a lone call and
    # the second in its pool: the second is not held back behind the first.
    session.register(
        "work", _remote.spin_or_block, max_concurrency=2, max_instances=1, channel=kind
    )
    doomed = session.submit("work", "spin", ready.port)
    spared = session.submit("work", "block", other.port, "spared")
    pid = ready.wait()
    assert other.wait() == pid  # both run at once in the same instance
    doomed.cancel()
    with pytest.raises(spear_nb.ExecutionCancelled):
        doomed.result(timeout=30)
    assert ready.wait_closed(timeout=30)  # the spinning thread was interrupted
    assert not spared.done() and spared.status == "running"
    other.release()
    assert spared.result(timeout=30) == "spared"
    assert session.invoke("work", "block", None, 7) == 7
    (row,) = session.instances().to_dict("records")
    assert row["pid"] == pid and row["status"] == "ready"
    statuses = session.executions()["status"].tolist()
    assert statuses == ["cancelled", "succeeded", "succeeded"]


def test_cancel_kills_a_running_command_and_its_children(session, ready) -> None:
    session.register("cmd", command=[sys.executable, "-c", _remote.REPORT_OR_ECHO])
    assert session.invoke("cmd", b"echo:warm") == b"warm"
    (instance_id,) = session.instances()["instance_id"]
    handle = session.submit("cmd", str(ready.port))
    command_pid = ready.wait()
    child_pid = ready.wait()
    assert psutil.Process(child_pid).ppid() == command_pid
    handle.cancel()
    with pytest.raises(spear_nb.ExecutionCancelled):
        handle.result(timeout=30)
    assert all_gone([command_pid, child_pid]) == []
    assert handle.status == "cancelled"
    # The command instance is still in service.
    assert session.invoke("cmd", b"echo:\x00after\xff") == b"\x00after\xff"
    (row,) = session.instances().to_dict("records")
    assert row["instance_id"] == instance_id and row["status"] == "ready"
    statuses = session.executions()["status"].tolist()
    assert statuses == ["succeeded", "cancelled", "succeeded"]


@pytest.mark.parametrize("kind", ["unix", "grpc"])
def test_leaving_a_stream_cancels_the_call_in_its_instance(
    session, ready, kind
) -> None:
    # The function blocks in a socket read: only a signal gets it out of there.
    session.register("steps", _remote.two_steps, channel=kind)
    stream = session.stream("steps", ready.port)
    assert next(stream) == 0
    ready.wait()  # the function now blocks before its second chunk
    (instance_id,) = session.instances()["instance_id"]
    stream.close()  # what `break` out of the for loop does
    assert ready.wait_closed(timeout=30)  # the call was interrupted in there
    assert wait_until(lambda: session.executions()["status"].tolist() == ["cancelled"])
    assert list(session.stream("steps", None)) == [0, 1]
    assert list(session.instances()["instance_id"]) == [instance_id]
    assert session.executions()["mode"].tolist() == ["stream", "stream"]


def test_a_result_timeout_bounds_the_wait_not_the_call(session, ready) -> None:
    session.register("block", _remote.report_and_block)
    handle = session.submit("block", ready.port, "value")
    ready.wait()
    start = time.monotonic()
    with pytest.raises(spear_nb.WaitTimeout) as info:
        handle.result(timeout=0.05)
    waited = time.monotonic() - start
    # On time, not rounded up to the 0.25 s slices between Ctrl-C checks.
    assert 0.05 <= waited < 0.2, waited
    assert isinstance(info.value, TimeoutError)  # except TimeoutError still works
    assert not isinstance(info.value, spear_nb.ExecutionTimeout)
    assert handle.execution_id in str(info.value)
    assert not handle.done() and handle.status == "running"
    ready.release()
    assert handle.result(timeout=30) == "value"
    assert handle.status == "succeeded"
    assert _status(session, handle.execution_id) == "succeeded"


def test_cancel_a_call_still_waiting_for_a_free_instance(session, ready) -> None:
    session.register("block", _remote.report_and_block, max_instances=1)
    running = session.submit("block", ready.port, "first")
    ready.wait()
    queued = session.submit("block", None, "never runs")
    assert queued.status in ("pending", "running")
    queued.cancel()
    with pytest.raises(spear_nb.ExecutionCancelled):
        queued.result(timeout=30)
    assert not running.done()
    ready.release()
    assert running.result(timeout=30) == "first"
    assert session.invoke("block", None, "third") == "third"
    (row,) = session.instances().to_dict("records")
    assert row["requests_total"] == 2  # the cancelled call never reached it
    statuses = session.executions()["status"].tolist()
    assert statuses == ["succeeded", "cancelled", "succeeded"]


@pytest.mark.parametrize(
    "start_method",
    [
        "fork",
        "spawn",
    ],
)
def test_cancel_during_a_cold_start_leaves_the_session_usable(start_method) -> None:
    with spear_nb.Session(stop_grace=0.5, start_method=start_method) as s:
        s.register("inc", _remote.inc)
        handle = s.submit("inc", 1)  # its instance (and the zygote) are starting
        handle.cancel()
        with pytest.raises(spear_nb.ExecutionCancelled):
            handle.result(timeout=30)
        assert s.invoke("inc", 2) == 3
        assert s.invoke("inc", 3) == 4
        statuses = s.executions()["status"].tolist()
        assert statuses == ["cancelled", "succeeded", "succeeded"]


def test_a_cancel_in_the_same_loop_turn_as_the_wake_up_wins(session) -> None:
    """A queued call woken for a free slot and cancelled before it resumes ends
    cancelled (``asyncio.wait_for`` before 3.12 would swallow that cancel and
    run the call), and the slot it was woken for goes to the next queued call."""
    session.register("inc", _remote.inc, max_instances=1)
    manager = session._manager
    task = manager.functions["inc"]

    async def race() -> tuple[bool, bool]:
        deadline = time.perf_counter() + 30
        woken = asyncio.ensure_future(manager._wait_for_slot(task, deadline))
        behind = asyncio.ensure_future(manager._wait_for_slot(task, deadline))
        await asyncio.sleep(0)  # both wait in the task's queue
        manager._wake(task)  # a slot frees for the first ...
        woken.cancel()  # ... and its call is cancelled in the same turn
        with pytest.raises(asyncio.CancelledError):
            await woken
        await asyncio.wait_for(behind, 30)  # the slot was handed on
        return woken.cancelled(), behind.done()

    assert session._loop.run(race()) == (True, True)
    assert not manager._waiters[task.task_id]
