"""Issue 3: heartbeats in both directions; a paused (SIGSTOP) instance is noticed
by its silence, its calls fail with ChannelError, and it is replaced."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

import spear_nb
from tests import _remote
from tests._support import EventWaiter, all_gone, rows, wait_until, warm_grpc

INTERVAL = 0.2
MISSES = 3
# Silence is noticed within MISSES intervals plus one beat; allow a generous
# margin for a loaded machine, still far below any call's timeout.
NOTICED_WITHIN = 8.0


@pytest.fixture(scope="module", autouse=True)
def _grpc_process_state() -> None:
    warm_grpc()


class Paused:
    """Processes a test stopped; killed in teardown if still stopped."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def stop(self, pid: int) -> None:
        self.pids.append(pid)
        os.kill(pid, signal.SIGSTOP)

    def cleanup(self) -> None:
        me = psutil.Process()
        ours = {p.pid for p in me.children(recursive=True)}
        for pid in self.pids:
            if pid in ours:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def beating() -> Iterator[tuple[spear_nb.Session, Paused]]:
    s = spear_nb.Session(
        stop_grace=0.5,
        execution_timeout=60,
        heartbeat_interval=INTERVAL,
        heartbeat_misses=MISSES,
    )
    paused = Paused()
    try:
        yield s, paused
    finally:
        paused.cleanup()
        s.close()


def _channel(s: spear_nb.Session, instance_id: str) -> dict:
    (row,) = rows(s.channels(), instance_id=instance_id).to_dict("records")
    return row


@pytest.mark.parametrize("kind", ["unix", "tcp", "grpc"])
def test_heartbeats_flow_both_ways_on_a_live_channel(beating, kind) -> None:
    s, _ = beating
    s.register("inc", _remote.inc, channel=kind)
    assert s.invoke("inc", 1) == 2
    (instance_id,) = s.instances()["instance_id"]

    def beats() -> dict | None:
        row = _channel(s, instance_id)
        many = MISSES + 2  # the host sends one per interval: past the limit
        ok = row["heartbeats_sent"] >= many and row["heartbeats_received"] >= many
        return row if ok else None

    row = wait_until(beats, timeout=15)
    assert row, _channel(s, instance_id)
    # Longer than the silence limit has passed: still the same healthy channel.
    assert row["state"] == "connected" and row["type"] == kind
    assert row["errors"] == 0
    assert s.invoke("inc", 2) == 3
    assert list(s.instances()["instance_id"]) == [instance_id]


def test_a_busy_instance_keeps_beating(beating, ready) -> None:
    """A call that blocks the agent's main thread for many intervals is not taken
    for a paused instance: the agent beats from a thread of its own."""
    s, _ = beating
    s.register("block", _remote.report_and_block)
    handle = s.submit("block", ready.port, "done")
    ready.wait()
    (instance_id,) = s.instances()["instance_id"]
    start = _channel(s, instance_id)["heartbeats_received"]
    # Past the silence limit, measured in beats heard meanwhile (at most one per
    # interval while the main thread is blocked).
    heard = wait_until(
        lambda: _channel(s, instance_id)["heartbeats_received"] >= start + MISSES + 2,
        timeout=15,
    )
    assert heard, _channel(s, instance_id)
    assert not handle.done()
    ready.release()
    assert handle.result(timeout=30) == "done"
    assert _channel(s, instance_id)["state"] == "connected"
    (status,) = s.instances()["status"]
    assert status == "ready"


@pytest.mark.parametrize("kind", ["unix", "grpc"])
def test_a_call_to_an_instance_paused_mid_call_fails_with_channel_error(
    beating, ready, kind
) -> None:
    s, paused = beating
    s.register("block", _remote.report_and_block, channel=kind)
    assert s.invoke("block", None, "warm") == "warm"
    (old_id,) = s.instances()["instance_id"]
    (old_pid,) = s.instances()["pid"]
    handle = s.submit("block", ready.port, "never")
    assert ready.wait() == old_pid
    paused.stop(old_pid)
    began = time.monotonic()
    with pytest.raises(spear_nb.ChannelError) as info:
        handle.result(timeout=NOTICED_WITHIN + 10)
    took = time.monotonic() - began
    assert took < NOTICED_WITHIN, took
    message = str(info.value)
    assert "heartbeat" in message and old_id in message
    assert handle.status == "failed"
    # The next call gets a new instance.
    assert s.invoke("block", None, "next") == "next"
    table = s.instances().set_index("instance_id")
    assert len(table) == 2
    assert table.loc[old_id, "status"] in ("failed", "stopped")
    assert "heartbeat" in table.loc[old_id, "failure"]
    (new_id,) = [i for i in table.index if i != old_id]
    assert table.loc[new_id, "status"] == "ready"
    assert table.loc[new_id, "pid"] != old_pid
    old_channel = _channel(s, old_id)
    assert old_channel["state"] in ("disconnected", "closed")
    assert old_channel["errors"] >= 1
    # The paused process is not left behind: the session killed it.
    assert all_gone([int(old_pid)]) == []
    statuses = s.executions()["status"].tolist()
    assert statuses == ["succeeded", "failed", "succeeded"]


@pytest.mark.parametrize("kind", ["unix", "grpc"])
def test_an_idle_paused_instance_is_replaced_transparently(beating, kind) -> None:
    s, paused = beating
    s.register("inc", _remote.inc, channel=kind)
    assert s.invoke("inc", 1) == 2
    (old_id,) = s.instances()["instance_id"]
    (old_pid,) = s.instances()["pid"]
    with EventWaiter(
        s, lambda e: e.phase == "instance_lost" and e.instance_id == old_id
    ) as lost:
        paused.stop(int(old_pid))
        assert lost.wait(NOTICED_WITHIN), "a paused idle instance went unnoticed"
        assert "heartbeat" in lost.matched[0].detail
    # No error reaches the user: the next call simply runs on a new instance.
    assert s.invoke("inc", 2) == 3
    table = s.instances().set_index("instance_id")
    assert len(table) == 2
    assert table.loc[old_id, "status"] in ("failed", "stopped")
    assert "heartbeat" in table.loc[old_id, "failure"]
    (new_id,) = [i for i in table.index if i != old_id]
    assert table.loc[new_id, "status"] == "ready"
    assert s.executions()["status"].tolist() == ["succeeded", "succeeded"]
    assert s.executions()["new_instance"].tolist() == [True, True]
    assert all_gone([int(old_pid)]) == []
    if kind == "unix":  # a local process: its exit is seen too, and added

        def failure() -> str:
            return str(s.instances().set_index("instance_id").loc[old_id, "failure"])

        assert wait_until(lambda: "SIGKILL" in failure()), failure()
        assert "heartbeat" in failure()  # still why it was killed


@pytest.mark.parametrize("kind", ["unix", "grpc"])
def test_a_call_holding_the_gil_past_the_silence_limit_runs_on(
    beating, kind, caplog
) -> None:
    """One long C call holds the GIL, so the agent's heartbeat thread cannot
    beat; the session sees the process run on a CPU and lets the call go on."""
    s, _ = beating
    # About four silence limits' worth of sum(range(n)) on this machine.
    n = 2_000_000
    started = time.perf_counter()
    _remote.hold_the_gil(n)
    n = int(n * 4 * INTERVAL * MISSES / (time.perf_counter() - started))
    s.register("hog", _remote.hold_the_gil, channel=kind)
    assert s.invoke("hog", 10) == 45
    (instance_id,) = s.instances()["instance_id"]
    with caplog.at_level("INFO", logger="spear_nb.communication.factory"):
        assert s.invoke("hog", n) == n * (n - 1) // 2
    assert "but it is busy on a CPU" in caplog.text  # it was silent that long
    row = _channel(s, instance_id)
    assert row["state"] == "connected" and row["errors"] == 0
    assert list(s.instances()["instance_id"]) == [instance_id]


def test_the_busy_check_tells_a_running_process_from_a_stopped_one() -> None:
    from spear_nb.runtime.process import _BusyCheck

    spin = psutil.Popen([sys.executable, "-c", "while True: pass"])
    sleep = psutil.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        busy, idle = _BusyCheck(spin.pid), _BusyCheck(sleep.pid)
        busy()
        cpu = sum(spin.cpu_times()[:2])
        assert wait_until(lambda: sum(spin.cpu_times()[:2]) > cpu, timeout=30)
        assert busy()  # its CPU time grew since the last look
        assert wait_until(lambda: sleep.status() == psutil.STATUS_SLEEPING, 30)
        assert not idle() and not idle()  # asleep: it would beat if it could
        spin.send_signal(signal.SIGSTOP)
        assert wait_until(lambda: spin.status() == psutil.STATUS_STOPPED, 30)
        assert not busy()  # paused
        assert not _BusyCheck(2**22 + 12345)()  # no such process
    finally:
        for process in (spin, sleep):
            process.kill()
            process.wait(30)
