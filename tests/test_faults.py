"""Bad input and faults: each gives a spear_nb error that says what happened, and
the session keeps working afterwards."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import cloudpickle
import pytest

import spear_nb
from spear_nb import SpearError
from tests import _remote
from tests._support import EventWaiter, all_gone, call_in_thread, rows


def assert_usable(s: spear_nb.Session) -> None:
    assert s.invoke(_remote.inc, 1) == 2


# -- bad input -------------------------------------------------------------------


def test_unknown_function(session) -> None:
    session.register("inc", _remote.inc)
    with pytest.raises(spear_nb.FunctionNotFound) as info:
        session.invoke("no_such_function", 1)
    assert isinstance(info.value, SpearError)
    assert "no_such_function" in str(info.value)
    assert "not registered" in str(info.value) or "no function" in str(info.value)
    with pytest.raises(spear_nb.FunctionNotFound, match=r"did you mean 'inc'\?"):
        session.invoke("inx", 1)
    assert_usable(session)


@pytest.mark.parametrize(
    ("keywords", "expected"),
    [
        ({"max_instance": 2}, "'max_instance' (did you mean 'max_instances'?)"),
        ({"timout": 1}, "'timout' (did you mean 'timeout'?)"),
        ({"fuel": 10}, "'fuel': an option of wasm functions"),
        ({"cpu": "1"}, "'cpu': an option of kubernetes functions"),
    ],
)
def test_a_mistyped_or_misplaced_register_keyword_is_named(
    session, keywords, expected
) -> None:
    with pytest.raises(spear_nb.InvalidSpec) as info:
        session.register("f", _remote.inc, **keywords)
    assert expected in str(info.value)
    assert "max_concurrency" in str(info.value)  # the keywords it does take


@pytest.mark.parametrize(
    ("keywords", "conflict"),
    [
        ({"wasm": "(module)"}, "wasm="),
        ({"runtime": "process"}, "runtime='process'"),
    ],
)
def test_an_image_with_another_runtime_is_named_as_a_conflict(
    session, keywords, conflict
) -> None:
    fn = None if "wasm" in keywords else _remote.inc
    with pytest.raises(spear_nb.InvalidSpec) as info:
        session.register("f", fn, image="example:1", **keywords)
    text = str(info.value)
    assert f"image= names the container of a Kubernetes pod, and {conflict}" in text
    assert "unknown keyword" not in text


def test_empty_command(session) -> None:
    with pytest.raises(spear_nb.InvalidSpec, match="command") as info:
        session.register("empty", command=[])
    assert isinstance(info.value, spear_nb.ConfigurationError)
    with pytest.raises(spear_nb.InvalidSpec, match="command"):
        session.register("blank", command=["wc", ""])
    assert "empty" not in session.functions
    assert_usable(session)


def test_non_callable(session) -> None:
    with pytest.raises(spear_nb.InvalidSpec, match="not callable"):
        session.register("answer", 42)
    with pytest.raises(
        spear_nb.InvalidArguments, match="registered name or a callable"
    ):
        session.invoke(42)
    assert_usable(session)


def test_non_picklable_callable(session) -> None:
    lock = threading.Lock()

    def holds_a_lock() -> bool:
        return lock.locked()

    with pytest.raises(TypeError):  # the premise: cloudpickle refuses it
        cloudpickle.dumps(holds_a_lock)
    with pytest.raises(spear_nb.InvalidSpec) as info:
        session.register("locked", holds_a_lock)
    message = str(info.value)
    assert "holds_a_lock" in message and "cannot be pickled" in message
    assert "lock" in message
    with pytest.raises(spear_nb.InvalidSpec):
        session.invoke(holds_a_lock)
    assert session.functions == []
    assert_usable(session)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fn": _remote.inc, "command": ["wc"]},
        {"command": ["wc"], "handler": "a:b"},
        {},
    ],
    ids=["fn+command", "command+handler", "nothing"],
)
def test_exactly_one_kind_of_function(session, kwargs) -> None:
    fn = kwargs.pop("fn", None)
    with pytest.raises(spear_nb.InvalidSpec, match="exactly one of"):
        session.register("both", fn, **kwargs)
    assert_usable(session)


@pytest.mark.parametrize(
    "name", ["", "1abc", "has space", "slash/name", "x" * 64, None, "é"]
)
def test_bad_name(session, name) -> None:
    with pytest.raises(spear_nb.InvalidSpec, match="not a usable function name"):
        session.register(name, _remote.inc)
    assert_usable(session)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"handler": "no_colon"}, "module:function"),
        ({"fn": _remote.inc, "channel": "pigeon"}, "unknown channel type"),
        ({"fn": _remote.inc, "runtime": "moon"}, "unknown runtime"),
        ({"fn": _remote.inc, "timeout": 0}, "timeout"),
        ({"fn": _remote.inc, "max_instances": 0}, "max_instances"),
        ({"fn": _remote.inc, "queue_policy": "maybe"}, "queue_policy"),
        ({"command": ["wc"], "channel": "tcp"}, "no channel"),
        ({"fn": _remote.inc, "env": {"A": 1}}, "env"),
    ],
)
def test_other_invalid_specs(session, kwargs, match) -> None:
    fn = kwargs.pop("fn", None)
    with pytest.raises(spear_nb.ConfigurationError, match=match):
        session.register("bad", fn, **kwargs)
    assert "bad" not in session.functions
    assert_usable(session)


def test_payload_larger_than_the_max_frame() -> None:
    with spear_nb.Session(stop_grace=0.5, max_frame_size=1 << 20) as s:
        s.register("size", _remote.echo_len)
        assert s.invoke("size", b"x" * 1000) == 1000
        with pytest.raises(spear_nb.PayloadTooLarge) as info:
            s.invoke("size", b"x" * (2 << 20))
        assert "maximum frame size" in str(info.value)
        assert "max_frame_size" in str(info.value)  # says how to fix it
        # The instance was not harmed: the same one serves the next call.
        assert s.invoke("size", b"abc") == 3
        (row,) = rows(s.instances(), function="size").to_dict("records")
        # It never saw the refused call.
        assert row["status"] == "ready" and row["requests_total"] == 2
        (status,) = rows(s.executions(), function="size")["status"].iloc[1:2]
        assert status == "failed"


def test_result_larger_than_the_max_frame() -> None:
    with spear_nb.Session(stop_grace=0.5, max_frame_size=1 << 20) as s:
        s.register("big", _remote.make_bytes)
        assert s.invoke("big", 10) == b"x" * 10
        with pytest.raises(spear_nb.PayloadTooLarge):
            s.invoke("big", 2 << 20)
        assert s.invoke("big", 3) == b"xxx"
        assert len(rows(s.instances(), function="big")) == 1


def test_arguments_that_cannot_be_pickled(session) -> None:
    session.register("ident", lambda x: x)
    with pytest.raises(spear_nb.InvalidArguments, match="cannot be pickled"):
        session.invoke("ident", threading.Lock())
    with pytest.raises(spear_nb.InvalidArguments, match="cannot be pickled"):
        session.submit("ident", threading.Lock()).result(timeout=30)
    assert session.invoke("ident", 5) == 5


def test_result_that_cannot_be_pickled(session) -> None:
    session.register("lock", _remote.return_unpicklable)
    with pytest.raises(spear_nb.RemoteError) as info:
        session.invoke("lock")
    assert info.value.remote_type == "TypeError"
    assert "returned a lock that cannot be pickled" in info.value.remote_message
    assert "cloudpickle" not in info.value.remote_traceback
    assert_usable(session)


def test_a_generator_called_with_invoke_points_to_stream(session) -> None:
    session.register("squares", _remote.count_up)
    with pytest.raises(spear_nb.RemoteError) as info:
        session.invoke("squares", 3)
    assert info.value.remote_type == "TypeError"
    assert "session.stream(" in info.value.remote_message
    assert list(session.stream("squares", 3)) == [0, 1, 4]  # the same instance


def test_function_that_raises(session) -> None:
    session.register("boom", _remote.explode_on_purpose)
    with pytest.raises(spear_nb.RemoteError) as info:
        session.invoke("boom", 7)
    err = info.value
    assert isinstance(err, spear_nb.ExecutionError)
    assert err.remote_type == "ValueError"
    assert err.remote_message == "bad input 7"
    assert "explode_on_purpose" in err.remote_traceback
    assert "Traceback" in err.remote_traceback
    assert "ValueError: bad input 7" in str(err)
    assert "explode_on_purpose" in "".join(err._render_traceback_())
    # The instance survives its function raising and serves the next call.
    session.register("inc", _remote.inc)
    assert session.invoke("inc", 1) == 2
    with pytest.raises(spear_nb.RemoteError):
        session.invoke("boom", 8)
    (row,) = rows(session.instances(), function="boom").to_dict("records")
    assert row["status"] == "ready"
    assert (row["requests_total"], row["requests_failed"]) == (2, 2)


def test_exception_whose_str_fails(session) -> None:
    session.register("weird", _remote.raise_unprintable)
    with pytest.raises(spear_nb.RemoteError) as info:
        session.invoke("weird")
    assert info.value.remote_type.endswith("Unprintable")


def test_function_output_is_kept_in_the_instance_log(session) -> None:
    session.register("chatty", _remote.chatty)
    assert session.invoke("chatty", "hello from inside") == 17
    (instance_id,) = session.instances()["instance_id"]
    assert "hello from inside" in session.inspect(instance_id)["log_tail"]


def test_function_that_exits_the_process(session) -> None:
    session.register("quit", _remote.exit_with)
    with pytest.raises(spear_nb.InstanceCrashed, match="exited with code 7"):
        session.invoke("quit", 7)
    with pytest.raises(spear_nb.InstanceCrashed):
        session.invoke("quit", 8)
    ids = rows(session.instances(), function="quit")["instance_id"].tolist()
    assert len(set(ids)) == 2
    assert_usable(session)


def test_instance_killed_mid_call(session, ready) -> None:
    session.register("victim", _remote.report_and_block)
    assert session.invoke("victim", None, "warm") == "warm"
    (old_id,) = session.instances()["instance_id"]
    (old_pid,) = session.instances()["pid"]
    killed: list[int] = []

    def kill_when_running() -> None:
        try:
            pid = ready.wait()
        except OSError:
            return
        killed.append(pid)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    try:
        with pytest.raises(spear_nb.InstanceCrashed) as info:
            session.invoke("victim", ready.port, "never")
    finally:
        killer.join(60)
    assert killed == [int(old_pid)]
    message = str(info.value)
    assert "SIGKILL" in message and old_id in message
    assert "next call gets a new instance" in message
    assert session.invoke("victim", None, "again") == "again"
    table = session.instances().set_index("instance_id")
    assert len(table) == 2
    assert table.loc[old_id, "status"] in ("failed", "stopped")
    assert table.loc[old_id, "failure"]
    assert session.inspect(old_id)["exit"] == "was killed by SIGKILL"
    (new_id,) = [i for i in table.index if i != old_id]
    assert table.loc[new_id, "status"] == "ready"
    assert table.loc[new_id, "pid"] != old_pid
    statuses = session.executions()["status"].tolist()
    assert statuses == ["succeeded", "failed", "succeeded"]


def test_idle_instance_killed_is_replaced(session) -> None:
    session.register("inc", _remote.inc)
    assert session.invoke("inc", 1) == 2
    (old_id,) = session.instances()["instance_id"]
    (old_pid,) = session.instances()["pid"]
    with EventWaiter(
        session, lambda e: e.phase == "instance_lost" and e.instance_id == old_id
    ) as lost:
        os.kill(int(old_pid), signal.SIGKILL)
        assert lost.wait(30), "the death of an idle instance went unnoticed"
        assert lost.matched[0].detail
    assert session.invoke("inc", 2) == 3
    table = session.instances().set_index("instance_id")
    assert table.loc[old_id, "status"] in ("failed", "stopped")
    assert len(table) == 2
    assert session.executions()["new_instance"].tolist() == [True, True]


def test_command_that_exits_non_zero(session) -> None:
    # It reads its payload first; see test_command_that_ignores_stdin for one
    # that does not.
    session.register(
        "fail", command=["sh", "-c", "cat >/dev/null; echo boom >&2; exit 3"]
    )
    with pytest.raises(spear_nb.CommandFailed) as info:
        session.invoke("fail", b"")
    err = info.value
    assert isinstance(err, spear_nb.ExecutionError)
    assert err.returncode == 3
    assert err.stderr_tail == "boom"
    assert "code 3" in str(err) and "boom" in str(err)
    session.register("wc", command=["wc", "-w"])
    assert session.invoke("wc", b"still fine") == b"2\n"


def test_command_that_ignores_stdin(session) -> None:
    session.register("true", command=["true"])
    for _ in range(100):  # the race hits about one call in seven
        assert session.invoke("true", b"payload nobody reads") == b""


def test_command_stderr_tail_is_bounded(session) -> None:
    session.register(
        "loud",
        command=["sh", "-c", "cat >/dev/null; yes noise | head -c 100000 >&2; exit 1"],
    )
    with pytest.raises(spear_nb.CommandFailed) as info:
        session.invoke("loud", b"")
    assert 0 < len(info.value.stderr_tail) <= 2000
    assert "noise" in info.value.stderr_tail


def test_command_that_does_not_exist(session, tmp_path) -> None:
    missing = str(tmp_path / "no-such-program")
    session.register("ghost", command=[missing])
    with pytest.raises(spear_nb.CommandFailed, match="cannot run") as info:
        session.invoke("ghost", b"")
    assert missing in str(info.value)
    assert_usable(session)


def test_command_output_over_the_frame_limit() -> None:
    with spear_nb.Session(stop_grace=0.5, max_frame_size=4096) as s:
        s.register("zeros", command=["head", "-c", "5000", "/dev/zero"])
        with pytest.raises(spear_nb.PayloadTooLarge) as info:
            s.invoke("zeros", b"")
        assert "wrote 5,000 bytes" in str(info.value)
        assert "max_frame_size" in str(info.value)  # says what to change
        s.register("fits", command=["head", "-c", "4096", "/dev/zero"])
        assert s.invoke("fits", b"") == bytes(4096)


def test_command_timeout(session) -> None:
    session.register("slow", command=["sleep", "30"], timeout=0.3)
    killed = r"its timeout of 0\.3 s and was killed"
    with pytest.raises(spear_nb.ExecutionTimeout, match=killed):
        session.invoke("slow", b"")
    (status,) = session.executions()["status"]
    assert status == "timed_out"
    session.register("wc", command=["wc", "-w"])
    assert session.invoke("wc", b"a b") == b"2\n"


def test_execution_timeout(session) -> None:
    session.register("sleepy", _remote.sleep_for, timeout=0.5)
    with pytest.raises(spear_nb.ExecutionTimeout) as info:
        session.invoke("sleepy", 30)
    assert isinstance(info.value, TimeoutError)
    assert "timeout" in str(info.value) and "sleepy-1" in str(info.value)
    assert session.invoke("sleepy", 0) == 0
    statuses = session.executions()["status"].tolist()
    assert statuses == ["timed_out", "succeeded"]
    metrics = session.metrics().set_index("function")
    assert metrics.loc["sleepy", "timed_out"] == 1


def test_execution_timeout_message_names_the_configured_timeout(session) -> None:
    session.register("sleepy", _remote.sleep_for, timeout=0.5)
    with pytest.raises(spear_nb.ExecutionTimeout, match=r"timeout of 0\.5 s"):
        session.invoke("sleepy", 30)


def test_ctrl_c_cancels_the_call_and_keeps_the_session(session, ready) -> None:
    assert threading.current_thread() is threading.main_thread()
    session.register("block", _remote.report_and_block)
    main = threading.main_thread().ident
    assert main is not None

    def interrupt_when_running() -> None:
        try:
            ready.wait()
        except OSError:
            return
        signal.pthread_kill(main, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_when_running)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            session.invoke("block", ready.port, "never")
    finally:
        interrupter.join(60)
    # The work in the instance was stopped: the function's connection closed.
    assert ready.wait_closed()
    assert session.executions()[["status", "error"]].values.tolist() == [
        ["cancelled", "cancelled (Ctrl-C)"]
    ]
    assert session.invoke("block", None, "next") == "next"
    assert session.metrics().set_index("function").loc["block", "cancelled"] == 1


def test_ctrl_c_kills_a_running_command(session, ready) -> None:
    session.register(
        "report", command=[sys.executable, "-c", _remote.REPORT_FROM_STDIN]
    )
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()
    pids: list[int] = []

    def interrupt_when_running() -> None:
        try:
            pids.append(ready.wait())
        except OSError:
            return
        signal.pthread_kill(main, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_when_running)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            session.invoke("report", str(ready.port))
    finally:
        interrupter.join(60)
    assert len(pids) == 1
    assert all_gone(pids) == []
    # Over the session's loop, not the direct lane: said the same way.
    assert session.executions()[["status", "error"]].values.tolist() == [
        ["cancelled", "cancelled (Ctrl-C)"]
    ]
    session.register("wc", command=["wc", "-w"])
    assert session.invoke("wc", b"x y z") == b"3\n"


def test_close_fails_calls_in_flight_with_session_closed(ready) -> None:
    s = spear_nb.Session(stop_grace=0.5)
    try:
        s.register("block", _remote.report_and_block)
        worker, errors = call_in_thread(lambda: s.invoke("block", ready.port, "never"))
        ready.wait()
    finally:
        s.close()
    worker.join(60)
    assert len(errors) == 1
    assert isinstance(errors[0], spear_nb.SessionClosed), repr(errors[0])


# -- stale state of a crashed session ----------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _fake_workdir(owner: int | None) -> tuple[str, str]:
    path = tempfile.mkdtemp(prefix="spear_nb-")
    if owner is not None:
        with open(os.path.join(path, "owner.pid"), "w") as f:
            f.write(str(owner))
    sock_path = os.path.join(path, "host.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(sock_path)
    sock.listen()
    sock.close()  # the socket file stays behind, as after a crash
    return path, sock_path


def test_stale_socket_of_a_crashed_session_is_swept() -> None:
    stale, stale_sock = _fake_workdir(_dead_pid())
    alive, _ = _fake_workdir(os.getpid())
    unowned, _ = _fake_workdir(None)
    try:
        assert os.path.exists(stale_sock)
        with spear_nb.Session(stop_grace=0.5) as s:
            assert not os.path.exists(stale), "the stale work directory is still there"
            # A directory whose owner lives, or whose owner is unknown, is kept.
            assert os.path.isdir(alive)
            assert os.path.isdir(unowned)
            assert_usable(s)
            assert s._workdir != stale
    finally:
        for path in (stale, alive, unowned):
            subprocess.run(["rm", "-rf", path], check=True)


def test_a_mistyped_keyword_names_the_real_one(session) -> None:
    """The session's own methods refuse arguments that do not fit with a
    spear_nb error naming the closest keyword, not Python's TypeError."""
    with pytest.raises(spear_nb.InvalidArguments, match="did you mean 'max_in_flight'"):
        session.map(_remote.inc, [1], max_inflight=2)
    with pytest.raises(spear_nb.InvalidArguments, match="did you mean 'progress'"):
        asyncio.run(session.amap(_remote.inc, [1], progres=False))
    with pytest.raises(spear_nb.InvalidArguments, match="did you mean 'interval'"):
        session.dashboard(intervall=2)
    with pytest.raises(spear_nb.InvalidArguments, match="it takes last, align"):
        session.timeline(lst=3)
    with pytest.raises(spear_nb.InvalidArguments, match="missing a required"):
        session.scale("inc")
    with pytest.raises(spear_nb.InvalidSpec) as caught:
        session.register("pod", _remote.inc, image="x", gpu=1)
    assert len(re.findall(r"\bimage\b(?!_)", str(caught.value))) == 1  # not twice
    with pytest.raises(spear_nb.InvalidArguments, match="it takes no arguments"):
        session.instances(fn="inc")
    with pytest.raises(spear_nb.InvalidArguments, match="whole number"):
        session.scale(_remote.inc, "2")
    with pytest.raises(spear_nb.InvalidArguments, match="pass last=n"):
        session.timeline(5)
    with pytest.raises(spear_nb.InvalidArguments, match="registered before"):
        session.scale(print, 1)
    assert session.map(_remote.inc, [1, 2], progress=False) == [2, 3]
    session.scale(_remote.inc, 2)  # a callable registered before: its name
    assert len(rows(session.instances(), status="ready")) == 2


def test_sys_exit_in_a_function_is_its_error_and_the_instance_stays(session) -> None:
    """sys.exit() or a KeyboardInterrupt the function raises itself comes back
    as a RemoteError, like any exception; the warm instance serves on."""
    with pytest.raises(spear_nb.RemoteError) as info:
        session.invoke(_remote.sys_exit, "negative input")
    assert info.value.remote_type == "SystemExit"
    assert "negative input" in str(info.value)
    with pytest.raises(spear_nb.RemoteError) as info:
        session.submit(_remote.interrupt_itself).result(timeout=30)
    assert info.value.remote_type == "KeyboardInterrupt"
    (row,) = rows(session.instances(), function="sys_exit").to_dict("records")
    assert row["status"] == "ready" and row["requests_failed"] == 1
    assert session.invoke(_remote.inc, 1) == 2


def test_a_handles_methods_refuse_what_does_not_fit(session) -> None:
    handle = session.submit(_remote.inc, 1)
    assert handle.result(timeout=30) == 2
    with pytest.raises(spear_nb.InvalidArguments, match="number of seconds"):
        handle.result(timeout="1")
    with pytest.raises(spear_nb.InvalidArguments, match="0 or more seconds"):
        handle.result(timeout=-1)
    with pytest.raises(spear_nb.InvalidArguments, match="did you mean 'timeout'"):
        handle.result(timout=1)
    with pytest.raises(spear_nb.InvalidArguments, match="too many positional"):
        handle.cancel(True)
    with pytest.raises(spear_nb.InvalidArguments, match="whole number"):
        session.timeline(last="3")
    with pytest.raises(spear_nb.InvalidArguments, match="takes no arguments"):
        session.close(now=True)
    session.register("few", _remote.inc, max_instances=2)
    with pytest.raises(spear_nb.ConfigurationError, match="max_instances=N"):
        session.scale("few", 5)
