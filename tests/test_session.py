"""The flow through the sync facade: request, artifact, task, instance, channel,
execute, and the tables that show it."""

from __future__ import annotations

import asyncio
import threading

import psutil
import pytest

import spear_nb
from spear_nb.execution.events import PHASES
from tests import _remote
from tests._support import EventWaiter, ReadySignal, all_gone, rows


def test_invoke_returns_the_result(session) -> None:
    session.register("inc", _remote.inc)
    assert session.invoke("inc", 41) == 42


def test_invoke_passes_args_and_kwargs(session) -> None:
    session.register("add", _remote.add)
    assert session.invoke("add", 1, 2, scale=10) == 30
    assert session.invoke("add", 5, b=1) == 6
    assert session.invoke("add", a=2) == 2


def test_values_roundtrip_through_pickle(session) -> None:
    session.register("ident", lambda x: x)
    value = {"nested": [1, 2.5, None, (b"bytes", "text")], "set": {1, 2}}
    assert session.invoke("ident", value) == value


def test_one_hundred_sequential_calls_use_one_instance(session) -> None:
    session.register("inc", _remote.inc)
    for i in range(100):
        assert session.invoke("inc", i) == i + 1
    instances = rows(session.instances(), function="inc")
    assert len(instances) == 1
    (row,) = instances.to_dict("records")
    assert row["requests_total"] == 100
    assert row["requests_ok"] == 100
    assert row["status"] == "ready"
    assert row["active"] == 0
    executions = rows(session.executions(), function="inc")
    assert executions["new_instance"].sum() == 1
    assert set(executions["instance_id"]) == {row["instance_id"]}


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_an_instance_process_is_named_after_its_instance(start_method) -> None:
    with spear_nb.Session(start_method=start_method) as s:
        s.register("inc", _remote.inc)
        s.invoke("inc", 1)
        (pid,) = s.instances()["pid"]
        assert psutil.Process(int(pid)).name() == "spear:inc-1"  # ps -e, top


def test_same_spec_under_two_names_shares_the_artifact(session) -> None:
    a = session.register("first", _remote.inc)
    b = session.register("second", _remote.inc)
    c = session.register("third", _remote.double)
    assert a.artifact_id == b.artifact_id
    assert c.artifact_id != a.artifact_id
    assert a.task_id != b.task_id
    assert a.kind == "callable" and a.runtime == "process"
    assert session.invoke("second", 1) == 2
    tasks = session.tasks().set_index("function")
    assert tasks.loc["first", "artifact_id"] == tasks.loc["second", "artifact_id"]


def test_registering_the_same_function_twice_keeps_the_task(session) -> None:
    a = session.register("inc", _remote.inc)
    session.invoke("inc", 1)
    b = session.register("inc", _remote.inc)
    assert a.task_id == b.task_id
    session.invoke("inc", 1)
    assert len(rows(session.instances(), function="inc")) == 1


def _stops(session: spear_nb.Session, instance_id: str) -> EventWaiter:
    """Waits for the instance_stopped event of ``instance_id``."""
    return EventWaiter(
        session,
        lambda e: e.phase == "instance_stopped" and e.instance_id == instance_id,
    )


def test_reregistering_a_name_runs_the_new_code(session) -> None:
    session.register("f", _remote.double)
    assert session.invoke("f", 5) == 10
    (old_id,) = rows(session.instances(), function="f")["instance_id"]
    with _stops(session, old_id) as stopped:
        session.register("f", _remote.triple)
        assert session.invoke("f", 5) == 15
        assert stopped.wait(30), "the old instance was not stopped"
    table = rows(session.instances(), function="f")
    assert len(table) == 2, table
    assert old_id in set(rows(table, status="stopped")["instance_id"])
    assert len(rows(table, status="ready")) == 1


@pytest.mark.parametrize("how", ["submit", "invoke in a thread"])
def test_reregistering_lets_a_running_call_finish_on_the_old_instance(
    session, how
) -> None:
    """The old instance stops once its call has ended, not in the middle of it
    (which failed the call with a lost channel)."""
    ready = ReadySignal()
    results: list[object] = []
    try:
        session.register("job", _remote.report_and_block)
        if how == "submit":
            handle = session.submit("job", ready.port, "old")
        else:  # a blocking call, which takes the instance's direct lane
            caller = threading.Thread(
                target=lambda: results.append(session.invoke("job", ready.port, "old"))
            )
            caller.start()
        ready.wait(60)  # the old call runs
        (old_id,) = rows(session.instances(), function="job")["instance_id"]
        with _stops(session, old_id) as stopped:
            session.register("job", _remote.double)
            assert session.invoke("job", 4) == 8  # the new code, on a new instance
            old = rows(session.instances(), instance_id=old_id)
            assert old["status"].iloc[0] == "ready"  # still running the old call
            ready.release()
            if how == "submit":
                assert handle.result(timeout=60) == "old"
            else:
                caller.join(60)
                assert results == ["old"]
            assert stopped.wait(30), "the old instance was not stopped"
    finally:
        ready.release()
        ready.close()
    (old,) = rows(session.instances(), instance_id=old_id).to_dict("records")
    assert old["status"] == "stopped" and old["requests_ok"] == 1
    statuses = session.executions()["status"].tolist()
    assert statuses.count("succeeded") == len(statuses)


def test_reregistering_while_the_first_instance_starts_lets_its_call_run(
    session, tmp_path
) -> None:
    """The call that is starting the old function's first instance runs there
    (the instance was stopped as it became ready, before the call took it)."""
    ready = ReadySignal()
    (tmp_path / "slow_to_load.py").write_text(
        "import os, socket\n"
        "c = socket.create_connection(('127.0.0.1', int(os.environ['TEST_PORT'])))\n"
        "c.sendall(f'{os.getpid()}\\n'.encode())\n"
        "c.recv(1)\n"
        "def fn(x):\n"
        "    return ('old', x)\n"
    )
    env = {"TEST_PORT": str(ready.port)}
    try:
        session.register("job", handler="slow_to_load:fn", cwd=tmp_path, env=env)
        handle = session.submit("job", 1)
        ready.wait(60)  # its instance is loading the function
        assert handle.status == "pending"
        session.register("job", _remote.double)
        ready.release()
        assert handle.result(timeout=60) == ("old", 1)
        assert session.invoke("job", 4) == 8
    finally:
        ready.release()
        ready.close()
    old = rows(session.instances(), function="job").sort_values("instance_id")
    assert old["requests_ok"].tolist() == [1, 1]


def test_two_lambdas_invoked_directly(session) -> None:
    assert session.invoke(lambda x: x + 1, 1) == 2
    assert session.invoke(lambda x: x * 10, 2) == 20


def test_direct_invoke_registers_the_callable(session) -> None:
    assert session.invoke(_remote.double, 4) == 8
    assert "double" in session.functions
    # Called like the tables beside it, it gives the same names.
    assert session.functions() == session.functions == sorted(session.functions)
    assert type(session.functions()) is list
    assert session.invoke("double", 5) == 10
    assert session.invoke(_remote.double, 6) == 12
    # Calling by object again reuses the registration and the warm instance.
    assert len(rows(session.instances(), function="double")) == 1
    assert len(session.tasks()) == 1


def test_concurrent_first_calls_respect_the_instance_cap(session) -> None:
    session.register("sleepy", _remote.sleep_for, max_instances=2)
    barrier = threading.Barrier(8)
    results: list[object] = []
    errors: list[BaseException] = []

    def call(i: int) -> None:
        barrier.wait()
        try:
            results.append(session.invoke("sleepy", 0.05 + i / 1000))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(results) == [0.05 + i / 1000 for i in range(8)]
    instances = rows(session.instances(), function="sleepy")
    assert 1 <= len(instances) <= 2
    assert instances["requests_total"].sum() == 8
    (task,) = session.tasks().to_dict("records")
    assert task["requests_total"] == 8 and task["instances"] <= 2


def test_reject_policy_raises_resource_exhausted_when_busy(session, ready) -> None:
    session.register(
        "block", _remote.report_and_block, max_instances=1, queue_policy="reject"
    )
    outcome: list[object] = []
    worker = threading.Thread(
        target=lambda: outcome.append(session.invoke("block", ready.port, "done"))
    )
    worker.start()
    try:
        ready.wait()
        with pytest.raises(spear_nb.ResourceExhausted, match="busy") as info:
            session.invoke("block", None, "second")
        assert "max_instances" in str(info.value)
    finally:
        ready.release()
        worker.join(60)
    assert outcome == ["done"]
    assert session.invoke("block", None, "third") == "third"
    assert len(rows(session.instances(), function="block")) == 1


def test_wait_policy_queues_until_the_instance_is_free(session, ready) -> None:
    session.register("block", _remote.report_and_block, max_instances=1)
    outcome: dict[str, object] = {}
    first = threading.Thread(
        target=lambda: outcome.__setitem__(
            "first", session.invoke("block", ready.port, 1)
        )
    )
    first.start()
    ready.wait()
    second = threading.Thread(
        target=lambda: outcome.__setitem__("second", session.invoke("block", None, 2))
    )
    second.start()
    ready.release()
    first.join(60)
    second.join(60)
    assert outcome == {"first": 1, "second": 2}
    assert len(rows(session.instances(), function="block")) == 1


def test_round_robin_alternates_between_instances(session) -> None:
    session.register("rr", _remote.pid, scheduler="round_robin", max_instances=2)
    session.scale("rr", 2)
    instances = session.instances()
    assert len(instances) == 2 and set(instances["status"]) == {"ready"}
    pids = [session.invoke("rr") for _ in range(4)]
    assert set(pids) == {int(p) for p in instances["pid"]}
    assert pids[0] != pids[1] and pids[0] == pids[2] and pids[1] == pids[3]


def test_least_connections_keeps_using_the_oldest_idle_instance(session) -> None:
    session.register("lc", _remote.pid, max_instances=2)
    session.scale("lc", 2)
    pids = {session.invoke("lc") for _ in range(4)}
    assert len(pids) == 1
    oldest = session.instances().sort_values("created_at")["pid"].iloc[0]
    assert pids == {int(oldest)}


def test_scale_down_stops_instances(session) -> None:
    session.register("inc", _remote.inc, max_instances=3)
    session.scale("inc", 3)
    pids = [int(p) for p in session.instances()["pid"]]
    assert len(pids) == 3
    session.scale("inc", 1)
    table = session.instances()
    assert sorted(table["status"]) == ["ready", "stopped", "stopped"]
    stopped = [int(p) for p in table[table["status"] == "stopped"]["pid"]]
    assert all_gone(stopped) == []
    with pytest.raises(spear_nb.ConfigurationError, match="between 0 and 3"):
        session.scale("inc", 4)
    assert session.invoke("inc", 1) == 2


def test_events_show_every_phase_of_an_execution(session) -> None:
    session.register("inc", _remote.inc)
    session.invoke("inc", 1)
    session.invoke("inc", 2)
    executions = session.executions()
    events = session.events()
    for execution_id in executions["execution_id"]:
        mine = events[events["execution_id"] == execution_id].sort_values("seq")
        assert list(mine["phase"]) == list(PHASES)
        assert (mine["duration_ms"] >= 0).all()
        assert set(mine["task_id"].iloc[2:]) == {"inc"}
        assert set(mine["artifact_id"].iloc[1:]) == set(session.tasks()["artifact_id"])
        assert set(mine["instance_id"].iloc[3:]) == set(
            session.instances()["instance_id"]
        )
    first, second = executions["execution_id"]
    detail = events[(events["execution_id"] == first) & (events["phase"] == "instance")]
    assert list(detail["detail"]) == ["new"]
    detail = events[
        (events["execution_id"] == second) & (events["phase"] == "instance")
    ]
    assert list(detail["detail"]) == ["reused"]
    lifecycle = set(events["phase"])
    assert {"register", "instance_started"} <= lifecycle


def test_executions_and_tasks_tables(session) -> None:
    session.register("inc", _remote.inc)
    session.register("boom", _remote.explode_on_purpose)
    session.invoke("inc", 1)
    with pytest.raises(spear_nb.RemoteError):
        session.invoke("boom", 1)
    executions = session.executions().set_index("function")
    assert executions.loc["inc", "status"] == "succeeded"
    assert executions.loc["boom", "status"] == "failed"
    assert "ValueError" in executions.loc["boom", "error"]
    assert executions.loc["inc", "new_instance"]
    assert executions.loc["inc", "duration_ms"] > 0
    tasks = session.tasks().set_index("function")
    assert tasks.loc["inc", "requests_ok"] == 1
    assert tasks.loc["boom", "requests_failed"] == 1
    assert tasks.loc["inc", "kind"] == "callable"
    assert tasks.loc["inc", "timeout_s"] == 60


def test_metrics_counts_add_up(session) -> None:
    session.register("inc", _remote.inc)
    session.register("boom", _remote.explode_on_purpose)
    for i in range(3):
        session.invoke("inc", i)
    for i in range(2):
        with pytest.raises(spear_nb.RemoteError):
            session.invoke("boom", i)
    metrics = session.metrics().set_index("function")
    for function, (ok, failed) in {"inc": (3, 0), "boom": (0, 2)}.items():
        row = metrics.loc[function]
        assert row["calls"] == ok + failed
        assert row["succeeded"] == ok
        assert row["failed"] == failed
        assert row["calls"] == (
            row["succeeded"] + row["failed"] + row["cancelled"] + row["timed_out"]
        )
        assert row["new_instances"] == 1
        assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]


def test_channels_table_counts_traffic(session) -> None:
    session.register("inc", _remote.inc)
    for i in range(5):
        session.invoke("inc", i)
    channels = session.channels()
    (row,) = rows(channels, type="unix").to_dict("records")
    (instance_id,) = session.instances()["instance_id"]
    assert row["instance_id"] == instance_id
    assert row["state"] == "connected"
    assert row["address"].endswith(".sock")
    # auth request + ready + 5 requests / auth response + 5 responses at least
    assert row["messages_sent"] >= 5 and row["messages_received"] >= 6
    assert row["bytes_sent"] > 0 and row["bytes_received"] > 0
    assert row["rtt_mean_ms"] > 0
    assert row["rtt_p99_ms"] >= row["rtt_mean_ms"] * 0.999  # p99 of 5 is the max
    assert row["errors"] == 0 and row["auth_failures"] == 0 and row["in_flight"] == 0


def test_tcp_channel_override(session) -> None:
    session.register("inc_tcp", _remote.inc, channel="tcp")
    assert session.invoke("inc_tcp", 1) == 2
    (row,) = rows(session.channels(), instance_id="inc_tcp-1").to_dict("records")
    assert row["type"] == "tcp"
    assert row["address"].startswith("127.0.0.1:")
    assert rows(session.instances(), function="inc_tcp")["channel"].tolist() == ["tcp"]


def test_inspect_function_instance_and_execution(session) -> None:
    session.register("whoami", _remote.pid, timeout=7)
    remote_pid = session.invoke("whoami")
    info = session.inspect("whoami")
    assert info.kind == "function"
    assert info["function"] == "whoami" and info["kind"] == "callable"
    assert info["setting.timeout"] == 7
    assert info["requests_total"] == 1
    (instance_id,) = info["instances"]
    inst = session.inspect(instance_id)
    assert inst.kind == "instance"
    assert inst["status"] == "ready"
    assert inst["pid"] == remote_pid
    (execution_id,) = session.executions()["execution_id"]
    ex = session.inspect(execution_id)
    assert ex.kind == "execution"
    assert ex["status"] == "succeeded"
    assert ex["instance_id"] == instance_id
    assert [p.split(":")[0] for p in ex["phases"]] == list(PHASES)
    assert "whoami" in repr(info)
    with pytest.raises(spear_nb.FunctionNotFound, match="not a function, task"):
        session.inspect("no-such-thing")


def test_idle_instances_are_stopped_and_replaced() -> None:
    with spear_nb.Session(stop_grace=0.5, health_check_interval=0.05) as s:
        s.register("inc", _remote.inc, idle_timeout=0.2)
        assert s.invoke("inc", 1) == 2
        (first,) = s.instances()["instance_id"]
        (pid,) = s.instances()["pid"]
        with EventWaiter(
            s,
            lambda e: (
                e.phase == "instance_stopped"
                and e.instance_id == first
                and e.detail == "idle timeout"
            ),
        ) as stopped:
            assert stopped.wait(30), "the idle instance was not stopped"
        assert all_gone([int(pid)]) == []
        (status,) = rows(s.instances(), instance_id=first)["status"]
        assert status == "stopped"
        assert s.invoke("inc", 2) == 3
        assert s.executions()["new_instance"].tolist() == [True, True]


def test_ainvoke_from_an_async_test(session) -> None:
    async def main() -> list[int]:
        await session.aregister("inc", _remote.inc)
        one = await session.ainvoke("inc", 1)
        many = await asyncio.gather(*(session.ainvoke("inc", i) for i in range(5)))
        return [one, *many]

    assert asyncio.run(main()) == [2, 1, 2, 3, 4, 5]


def test_blocking_invoke_inside_a_running_loop(session) -> None:
    """A notebook cell: the kernel's loop runs, the user calls invoke anyway."""

    async def cell() -> int:
        asyncio.get_running_loop()  # there is a loop, and it is busy with us
        return session.invoke(_remote.inc, 9)

    assert asyncio.run(cell()) == 10


def test_invoke_from_a_background_thread(session) -> None:
    session.register("inc", _remote.inc)
    out: list[int] = []
    worker = threading.Thread(target=lambda: out.append(session.invoke("inc", 2)))
    worker.start()
    worker.join(60)
    assert out == [3]
    assert session.invoke("inc", 3) == 4


def test_blocking_call_on_the_loop_thread_is_refused(session) -> None:
    async def on_loop() -> object:
        try:
            session.instances()
        except spear_nb.SpearError as exc:
            return exc
        return None

    error = session._loop.run(on_loop())
    assert isinstance(error, spear_nb.SpearError)
    assert "ainvoke" in str(error)
    assert session.invoke(_remote.inc, 1) == 2


def test_repr_does_no_io(session) -> None:
    session.register("inc", _remote.inc)
    assert "functions=1" in repr(session)
    assert "'inc'" in repr(session.register("inc", _remote.inc))
