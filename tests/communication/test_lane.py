"""The direct lane: blocking calls from a thread talk to an idle instance
themselves, and every fault on that path ends as it does on the channel."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

import pytest

import spear_nb
from spear_nb.communication.protocol import Message, MessageType, frame
from spear_nb.communication.wire import Wire
from tests import _remote
from tests._support import call_in_thread, rows, signal_when_running


def _directs(s: spear_nb.Session) -> list[bool]:
    return s.executions()["direct"].tolist()


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_warm_blocking_calls_take_the_lane_and_are_recorded(kind) -> None:
    with spear_nb.Session(stop_grace=0.5) as s:
        s.register("inc", _remote.inc, channel=kind)
        results = [s.invoke("inc", i) for i in range(20)]
        assert results == [i + 1 for i in range(20)]

        # The first call started the instance through the loop; the rest went
        # over its lane, and the records show them at once.
        assert _directs(s) == [False] + [True] * 19
        (channel,) = s.channels().to_dict("records")
        assert channel["type"] == kind
        assert channel["direct_calls"] == 19
        assert channel["messages_sent"] >= 20
        assert channel["bytes_received"] > 0
        assert channel["rtt_mean_ms"] > 0
        (task,) = s.tasks().to_dict("records")
        assert task["requests_total"] == task["requests_ok"] == 20
        (instance,) = s.instances().to_dict("records")
        assert instance["requests_total"] == 20
        assert instance["active"] == 0
        phases = s.events().query("execution_id == 'ex-20'")["phase"].tolist()
        assert phases == [
            "request",
            "artifact",
            "task",
            "instance",
            "channel",
            "execute",
        ]


def test_direct_calls_can_be_turned_off() -> None:
    with spear_nb.Session(direct_calls=False) as s:
        for i in range(5):
            assert s.invoke(_remote.inc, i) == i + 1
        assert _directs(s) == [False] * 5
        assert s.channels()["direct_calls"].tolist() == [0]


@pytest.mark.parametrize(
    "settings",
    [{"max_concurrency": 2}, {"max_concurrency": 4, "pipeline": True}],
    ids=["threads", "pipeline"],
)
def test_instances_serving_several_calls_at_once_have_no_lane(settings) -> None:
    with spear_nb.Session() as s:
        s.register("inc", _remote.inc, **settings)
        for i in range(5):
            assert s.invoke("inc", i) == i + 1
        assert not any(_directs(s))


def test_async_and_stream_calls_stay_on_the_loop(session) -> None:
    session.register("inc", _remote.inc)
    session.register("count", _remote.count_up)
    assert session.invoke("inc", 1) == 2
    assert session.submit("inc", 2).result(30) == 3
    assert list(session.stream("count", 3)) == list(_remote.count_up(3))
    assert session.invoke("inc", 3) == 4
    assert _directs(session) == [False, False, False, True]


def test_calls_from_many_threads_mix_lane_and_loop() -> None:
    with spear_nb.Session(execution_timeout=60) as s:
        s.register("add", _remote.add, max_instances=2)
        s.scale("add", 2)
        wrong: list[object] = []

        def caller(k: int) -> None:
            for i in range(150):
                try:
                    if s.invoke("add", k, i) != k + i:
                        wrong.append((k, i))
                except BaseException as exc:
                    wrong.append(exc)

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert wrong == []
        directs = _directs(s)
        assert len(directs) == 1200
        assert any(directs) and not all(directs)  # busy instances: some queue
        (task,) = s.tasks().to_dict("records")
        assert task["requests_total"] == task["requests_ok"] == 1200
        assert s.instances()["active"].tolist() == [0, 0]


def test_ctrl_c_during_a_direct_call_stops_it_and_keeps_the_instance(
    session, ready
) -> None:
    session.register("block", _remote.report_and_block)
    assert session.invoke("block", None, "warm") == "warm"
    (pid,) = session.instances()["pid"]
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread().ident == main

    def interrupt_when_running() -> None:
        ready.wait()
        signal.pthread_kill(main, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_when_running)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            session.invoke("block", ready.port, "never")
    finally:
        interrupter.join(60)
    assert ready.wait_closed()  # the function was interrupted inside the instance
    assert session.invoke("block", None, "next") == "next"
    assert session.instances()["pid"].tolist() == [pid]
    table = session.executions()
    assert table["status"].tolist() == ["succeeded", "cancelled", "succeeded"]
    assert table["direct"].tolist() == [False, True, True]


def test_timeout_of_a_direct_call_interrupts_it(ready) -> None:
    with spear_nb.Session(stop_grace=2.0) as s:
        s.register("block", _remote.report_and_block, timeout=0.5)
        assert s.invoke("block", None, "warm") == "warm"
        (pid,) = s.instances()["pid"]
        started = time.monotonic()
        with pytest.raises(spear_nb.ExecutionTimeout, match=r"timeout of 0\.5 s"):
            s.invoke("block", ready.port, "never")
        assert time.monotonic() - started < 5
        assert s.invoke("block", None, "again") == "again"
        assert s.instances()["pid"].tolist() == [pid]  # interrupted, not killed
        assert s.executions()["status"].tolist() == [
            "succeeded",
            "timed_out",
            "succeeded",
        ]


def test_instance_killed_during_a_direct_call(session, ready) -> None:
    session.register("victim", _remote.report_and_block)
    assert session.invoke("victim", None, "warm") == "warm"
    killer = signal_when_running(ready, signal.SIGKILL)
    try:
        with pytest.raises(spear_nb.InstanceCrashed, match="SIGKILL"):
            session.invoke("victim", ready.port, "never")
    finally:
        killer.join(60)
    assert session.invoke("victim", None, "again") == "again"
    table = session.executions()
    assert table["status"].tolist() == ["succeeded", "failed", "succeeded"]
    assert table["direct"].tolist()[:2] == [False, True]


def test_a_paused_instance_fails_its_direct_call_by_heartbeat(ready) -> None:
    with spear_nb.Session(
        stop_grace=0.5, heartbeat_interval=0.2, heartbeat_misses=3
    ) as s:
        s.register("victim", _remote.report_and_block)
        assert s.invoke("victim", None, "warm") == "warm"
        stopper = signal_when_running(ready, signal.SIGSTOP)
        started = time.monotonic()
        try:
            with pytest.raises(spear_nb.ChannelError, match="heartbeats missed"):
                s.invoke("victim", ready.port, "never")
        finally:
            stopper.join(60)
        assert time.monotonic() - started < 10
        assert s.invoke("victim", None, "again") == "again"
        assert s.executions()["direct"].tolist()[1] is True


def _lane_auth(address: str, instance_id: str, secret: str) -> Message | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(address)
        request = Message(MessageType.AUTH_REQUEST, 0)
        request.headers = {"instance_id": instance_id, "secret": secret, "lane": True}
        sock.sendall(frame(request))
        return Wire(sock, 1 << 20).read()
    finally:
        sock.close()


def test_a_second_lane_or_a_wrong_secret_is_refused(session) -> None:
    assert session.invoke(_remote.inc, 1) == 2
    manager = session._manager
    (instance,) = manager.instances.values()
    address = manager.factory.listener_addresses()["unix"]
    for secret, why in ((instance.secret, "one already"), ("guess", "wrong secret")):
        reply = _lane_auth(address, instance.instance_id, secret)
        assert reply is not None and reply.header("ok") is False
        assert why in reply.payload.decode()
    assert session.invoke(_remote.inc, 2) == 3
    assert _directs(session) == [False, True]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "loop"])
def test_the_call_after_an_instance_killed_on_timeout_gets_a_new_one(direct) -> None:
    with spear_nb.Session(stop_grace=0.3, direct_calls=direct) as s:
        s.register("deaf", _remote.deaf_sleep, timeout=0.3)
        assert s.invoke("deaf", 0) == 0
        (old_pid,) = s.instances()["pid"]
        with pytest.raises(spear_nb.ExecutionTimeout):
            s.invoke("deaf", 30)  # cannot be interrupted: its instance is killed
        # At once, not after the loop noticed the exit: a new instance serves it.
        assert s.invoke("deaf", 0) == 0
        table = s.instances().set_index("pid")
        assert table.loc[old_pid, "status"] in ("failed", "stopped")
        assert "it was killed" in table.loc[old_pid, "failure"]
        (new,) = table[table["status"] == "ready"].index
        assert new != old_pid
        statuses = s.executions()["status"].tolist()
        assert statuses == ["succeeded", "timed_out", "succeeded"]
        assert s.executions()["direct"].tolist()[1] is direct


@pytest.mark.parametrize("grace", [0.5, 10.0])
def test_close_interrupts_a_direct_call_in_flight(ready, grace) -> None:
    s = spear_nb.Session(stop_grace=grace)
    s.register("block", _remote.report_and_block)
    assert s.invoke("block", None, "warm") == "warm"
    caller, errors = call_in_thread(lambda: s.invoke("block", ready.port, "never"))
    ready.wait()
    started = time.monotonic()
    s.close()
    closing = time.monotonic() - started
    caller.join(30)
    assert not caller.is_alive()
    (error,) = errors
    assert isinstance(error, spear_nb.SessionClosed), repr(error)
    # The call was interrupted in its instance, which then stopped politely:
    # close() did not sit out the grace of an instance that would not stop.
    assert closing < 5, closing


def test_a_direct_call_has_all_six_phase_events(session) -> None:
    session.register("inc", _remote.inc)
    session.invoke("inc", 1)
    session.invoke("inc", 2)
    events = session.events().query("execution_id == 'ex-2'")
    assert events["phase"].tolist() == [
        "request",
        "artifact",
        "task",
        "instance",
        "channel",
        "execute",
    ]
    assert (events["duration_ms"] >= 0).all()
    assert events["duration_ms"].iloc[-1] > 0  # the execute phase is the call
    assert events["detail"].tolist()[4] == "unix (direct lane)"


def test_busy_polling_backs_off_while_it_does_not_pay() -> None:
    """A poll that finds nothing in time makes the next waits block at once,
    twice as many after each failure; one that finds input starts over."""
    import select

    from spear_nb.communication.wire import MAX_SKIP, BusyPoll

    ours, theirs = socket.socketpair()
    with ours, theirs:
        poller = select.poll()
        poller.register(ours, select.POLLIN)
        spin = BusyPoll(poller, 0.001)
        skips = []
        for _ in range(8):  # nothing ever arrives
            spin.wait()
            skips.append(spin.skip)
            while spin.skip:
                spin.wait()  # skipped: returns without polling
        assert skips == [1, 2, 4, 8, 16, 32, 64, 64] and MAX_SKIP == 64
        assert (spin.hits, spin.misses) == (0, 8)

        theirs.sendall(b"x")  # input is there: the poll pays, and starts over
        spin.wait()
        assert (spin.hits, spin.skip) == (1, 0)
        ours.recv(1)
        spin.wait()
        assert spin.skip == 1  # a miss again backs off from one

    assert BusyPoll(poller, 0.0).skip == 0  # polling switched off: never waits


def test_a_lone_call_on_the_loop_polls_for_its_reply_but_not_beside_others(
    session, ready
) -> None:
    """The loop busy-polls a socket channel for the reply of the only call in the
    session (a halted CPU is slow to wake), never while other calls run."""
    from spear_nb.communication.lane import busy_poll_seconds

    session.register("inc", _remote.inc)
    session.register("other", _remote.inc)
    session.register("block", _remote.report_and_block)
    for i in range(5):
        assert session.submit("inc", i).result(timeout=30) == i + 1  # via the loop
    factory = session._manager.factory

    def spin(name: str) -> Any:
        (instance_id,) = rows(session.instances(), function=name)["instance_id"]
        return factory.pooled(instance_id)._spin

    if busy_poll_seconds(50) == 0:  # one CPU: polling is off everywhere
        assert spin("inc") is None
    else:
        polled = spin("inc")
        assert polled is not None and polled.hits + polled.misses >= 1

    blocked = session.submit("block", ready.port, "done")
    ready.wait()
    assert session.submit("other", 1).result(timeout=30) == 2  # beside "block"
    assert spin("other") is None  # it never polled
    ready.release()
    assert blocked.result(timeout=30) == "done"


_TWO_CPUS = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="keeping two polling ends on two CPUs needs two CPUs",
)


def _last_cpu(tid: int) -> int:
    """The CPU a thread last ran on, as Linux reports it."""
    with open(f"/proc/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[36])


def _place(tid: int, cpu: int) -> None:
    """Move a thread onto ``cpu`` and give it back every CPU it had."""
    allowed = os.sched_getaffinity(tid)
    os.sched_setaffinity(tid, {cpu})
    os.sched_setaffinity(tid, allowed)


@_TWO_CPUS
def test_a_polling_thread_moves_off_its_peers_cpu_and_keeps_its_affinity() -> None:
    """Spread moves the calling thread off the CPU its peer polls on, at once,
    leaves its affinity as it was, and looks less often while moves do not
    last."""
    from spear_nb.communication.wire import MAX_SKIP, Spread, current_cpu

    seen: dict[str, Any] = {}

    def look() -> None:
        allowed = os.sched_getaffinity(0)
        spread = Spread()
        here = current_cpu()
        seen["elsewhere"] = spread.check(here + 1 if here + 1 in allowed else here - 1)
        seen["still"] = current_cpu() == here
        seen["moved"] = spread.check(current_cpu())
        seen["away"] = current_cpu() != here
        seen["allowed"] = os.sched_getaffinity(0) == allowed
        skips = [spread.skip]
        for _ in range(8):  # the peer follows it each time: look less often
            while spread.skip:
                assert not spread.check(current_cpu())  # skipped: no look
            assert spread.check(current_cpu())
            skips.append(spread.skip)
        seen["skips"] = skips
        while spread.skip:
            spread.check(current_cpu())
        assert not spread.check(-5)  # apart: the next move is looked for at once
        assert spread.check(current_cpu()) and spread.skip == 0
        seen["moves"] = spread.moves

    thread, errors = call_in_thread(look)
    thread.join(30)
    assert not errors
    assert seen["elsewhere"] is False and seen["still"]
    assert seen["moved"] and seen["away"] and seen["allowed"]
    assert seen["skips"] == [0, 1, 2, 4, 8, 16, 32, 64, 64] and MAX_SKIP == 64
    assert seen["moves"] == 10


@_TWO_CPUS
@pytest.mark.parametrize("path", ["lane", "loop"])
def test_an_instance_that_polls_on_its_callers_cpu_moves_off_it(path) -> None:
    """Two polling ends on one CPU only take it from each other: the instance
    hears which CPU its caller polls on and, each time it finds itself there,
    moves to another one, with its affinity left as it was. ``lane``: blocking
    calls from a thread; ``loop``: lone calls awaited on the session's loop.

    The caller is pinned to one CPU and the instance is put there before each
    round; whether the kernel keeps it there until it looks is the kernel's
    choice, so the test asks for looks, and for a move at every meeting."""
    from spear_nb.communication.wire import CPU_SAMPLE

    with spear_nb.Session(busy_poll_us=200) as s:
        s.register("inc", _remote.inc_and_moves)
        assert s.invoke("inc", 0) == (1, (0, 0, 0))
        (pid,) = s.instances()["pid"].tolist()
        allowed = os.sched_getaffinity(pid)
        cpu = min(allowed)
        seen = [(0, 0, 0)]

        def calls() -> None:
            for _ in range(50):
                _place(pid, cpu)  # beside its caller
                for i in range(2 * CPU_SAMPLE):
                    if path == "lane":
                        value, seen[0] = s.invoke("inc", i)
                    else:
                        value, seen[0] = s.submit("inc", i).result(timeout=30)
                    assert value == i + 1
                if seen[0][1]:  # it met its caller (and so moved): enough
                    return

        if path == "lane":

            def pinned() -> None:
                os.sched_setaffinity(0, {cpu})  # this thread only: it ends here
                calls()

            thread, errors = call_in_thread(pinned)
            thread.join(60)
            assert not errors
        else:
            loop_thread = s._loop._thread.native_id
            loop_allowed = os.sched_getaffinity(loop_thread)
            os.sched_setaffinity(loop_thread, {cpu})
            try:
                calls()
            finally:
                os.sched_setaffinity(loop_thread, loop_allowed)
        looks, met, moves = seen[0]
        assert looks >= 1  # the caller's CPU reached the instance
        assert moves == met  # every meeting ended in a move
        assert os.sched_getaffinity(pid) == allowed
        assert s.executions()["direct"].iloc[-1] == (path == "lane")


@_TWO_CPUS
def test_polling_for_a_lone_call_does_not_serialise_calls_that_start_together(
    session,
) -> None:
    """The loop polls for the reply of a call that is alone when it starts; the
    callers that start right after it must still get their calls in flight
    beside it (a poll that delivered the reply itself let the first caller run
    all its calls before the others started any: its awaits never waited)."""
    import asyncio

    session.register("echo", _remote.inc, max_concurrency=8, pipeline=True)
    assert session.invoke("echo", 0) == 1
    order: list[int] = []

    async def caller(who: int) -> None:
        for i in range(20):
            assert await session._invoke("echo", (i,), {}) == i + 1
            order.append(who)

    async def together() -> None:
        await asyncio.gather(*(caller(who) for who in range(8)))

    session._loop.run(together())
    # Had the first caller kept the loop, its 20 calls would all come first.
    assert order[:20] != [0] * 20, order[:20]
    assert len(set(order[:20])) > 1
