"""Faults while the session is busy: each one fails only what it touches, says
what happened, and leaves the session working and nothing behind.

Covered elsewhere and not repeated: one call whose instance is SIGKILLed or
exits (tests/test_faults.py), an idle instance killed, a stale socket of a crashed
session, the host killed with SIGKILL with process instances (tests/test_cleanup.py)
and with pods (tests/runtime/test_kubernetes.py), an idle pod deleted behind the
session's back and watch re-lists after timeouts and 410 (same file), an
unwritable cache directory (tests/runtime/test_wasm.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
import psutil
import pytest

import spear_nb
from spear_nb import samples
from tests._support import ReadySignal, all_gone

HAVE_KUBE = importlib.util.find_spec("kubernetes") is not None
IMAGE = "spear-nb-agent:test"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- functions that run inside instances (shipped by value) -----------------------


def work(key: int, port: int | None = None, how: str = "") -> int:
    """``key + 1``; or die by ``os._exit``; or report our pid and block."""
    if how == "exit":
        os._exit(3)
    if port is not None:
        conn = socket.create_connection(("127.0.0.1", port), timeout=60)
        conn.sendall(f"{os.getpid()}\n".encode())
        conn.settimeout(120)
        conn.recv(1)
        conn.close()
    return key + 1


def whoami() -> tuple[int, str]:
    return os.getpid(), os.environ.get("SPEAR_ADDRESS", "")


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _callers(
    s: spear_nb.Session, name: str, threads: int, calls: int
) -> tuple[list[threading.Thread], list[str], threading.Event]:
    """Threads that each make ``calls`` checked calls; ``wrong`` collects misses."""
    wrong: list[str] = []
    busy = threading.Event()  # set once calls have been flowing for a while

    def caller(n: int) -> None:
        for i in range(calls):
            key = n * 100_000 + i
            try:
                got = s.invoke(name, key)
            except BaseException as exc:
                wrong.append(f"call {key}: {exc!r}")
                return
            if got != key + 1:
                wrong.append(f"call {key}: got {got!r}")
            if i == calls // 4:
                busy.set()

    started = [threading.Thread(target=caller, args=(n,)) for n in range(threads)]
    for t in started:
        t.start()
    return started, wrong, busy


# -- an instance dies or stops in the middle of a call, under load -------------------


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP", "exit"])
def test_an_instance_lost_mid_call_under_load_fails_only_its_call(fault) -> None:
    ready = ReadySignal()
    s = spear_nb.Session(
        stop_grace=0.5,
        execution_timeout=120,
        heartbeat_interval=0.2,  # a stopped instance is noticed after 0.6 s
        heartbeat_misses=3,
    )
    try:
        s.register("work", work, max_instances=3)
        threads, wrong, busy = _callers(s, "work", threads=4, calls=300)
        assert busy.wait(60)
        victim: list[BaseException] = []

        def victim_call() -> None:
            try:
                if fault == "exit":
                    s.invoke("work", -1, None, "exit")
                else:
                    s.invoke("work", -1, ready.port)
            except BaseException as exc:
                victim.append(exc)

        caller = threading.Thread(target=victim_call)
        caller.start()
        pid = None
        if fault != "exit":
            pid = ready.wait(60)
            os.kill(pid, getattr(signal, fault))
        caller.join(60)
        for t in threads:
            t.join(120)
        assert not caller.is_alive() and not any(t.is_alive() for t in threads)

        assert wrong == [], wrong[:3]
        (error,) = victim
        if fault == "SIGSTOP":
            assert isinstance(error, spear_nb.ChannelError), repr(error)
            assert "heartbeats missed" in str(error)
        else:
            assert isinstance(error, spear_nb.InstanceCrashed), repr(error)
            expected = "SIGKILL" if fault == "SIGKILL" else "exited with code 3"
            assert expected in str(error)
        metrics = s.metrics().set_index("function").loc["work"]
        assert (metrics["calls"], metrics["succeeded"], metrics["failed"]) == (
            1201,
            1200,
            1,
        )
        (task,) = s.tasks().to_dict("records")
        assert task["requests_total"] == task["requests_ok"] + task["requests_failed"]
        assert task["requests_failed"] == 1
        table = s.instances()
        lost = table[table["status"].isin(["failed", "stopped"])]
        assert len(lost) == 1 and lost["failure"].iloc[0]
        if pid is not None:
            assert int(lost["pid"].iloc[0]) == pid
            assert all_gone([pid], timeout=15) == []  # a stopped one is killed
        assert s.invoke("work", 1) == 2  # and the session goes on
    finally:
        s.close()
        ready.release()
        ready.close()


# -- the host's listener -----------------------------------------------------------


def _break_listener(s: spear_nb.Session, kind: str, how: str) -> str:
    factory = s._manager.factory
    listener = factory._listeners[kind]
    address = listener.address
    if how == "closed":

        async def close() -> None:
            assert listener._server is not None
            listener._server.close()  # stops accepting; connections stay

        s._loop.run(close())
    else:
        os.unlink(address)  # the socket file, under the live session
    return address


@pytest.mark.parametrize(
    ("kind", "how"),
    [("unix", "closed"), ("tcp", "closed"), ("unix", "file deleted")],
)
def test_new_instances_start_after_the_listener_breaks(kind, how, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="spear_nb.communication.factory")
    with spear_nb.Session(stop_grace=0.5, execution_timeout=60) as s:
        s.register(
            "who", whoami, channel=kind, max_instances=4, scheduler="round_robin"
        )
        s.scale("who", 2)
        before = {s.invoke("who")[0] for _ in range(6)}
        assert len(before) == 2
        old_address = _break_listener(s, kind, how)
        # The instances already connected keep working over their connections.
        assert {s.invoke("who")[0] for _ in range(6)} == before
        # New instances reach a new listener.
        s.scale("who", 4)
        table = s.instances()
        assert (table["status"] == "ready").sum() == 4
        pids = {int(p) for p in table["pid"]}
        assert len(pids) == 4
        assert {s.submit("who").result(30)[0] for _ in range(8)} <= pids
        new_address = s._manager.factory.listener_addresses()[kind]
        if kind == "unix":
            assert new_address == old_address and os.path.exists(new_address)
        else:
            assert new_address != old_address
        assert any("listening again" in r.getMessage() for r in caplog.records)


# -- the WASM module cache on a full disk --------------------------------------------


@pytest.fixture
def full_disk(tmp_path) -> Iterator[str]:
    """A tiny tmpfs, filled up: every write to it fails with ENOSPC."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        (mount_point / "wasm").mkdir()
        with contextlib.suppress(OSError), open(mount_point / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        with pytest.raises(OSError) as info:  # the premise: it is full
            (mount_point / "wasm" / "probe").write_bytes(b"\0" * 8192)
        assert info.value.errno == 28  # ENOSPC
        (mount_point / "wasm" / "probe").unlink(missing_ok=True)
        yield str(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_under_the_module_cache_only_warns(full_disk, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="spear_nb.runtime.wasm")
    with spear_nb.Session(stop_grace=0.5, cache_dir=full_disk) as s:
        s.register("upper", wasm=samples.path("wasm", "upper.wat"))
        assert s.invoke("upper", b"full") == b"FULL"
        s.register("spin", wasm=samples.path("wasm", "spin.wat"))
        detail = s.events().query("phase == 'module_compiled'")["detail"].tolist()
        assert len(detail) == 2
        assert all("disk cache is unavailable" in d for d in detail)
    warnings = [r.getMessage() for r in caplog.records]
    assert any("No space left on device" in w for w in warnings), warnings
    # Nothing half-written is left in the cache directory.
    assert os.listdir(os.path.join(full_disk, "wasm")) == []


# -- closing the session with calls in flight everywhere ----------------------------


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``predicate`` until it is truthy, for at most ``timeout`` seconds."""
    pause = threading.Event()
    for _ in range(int(timeout / 0.01)):
        value = predicate()
        if value:
            return value
        pause.wait(0.01)
    return predicate()


def test_close_fails_every_call_in_flight_with_session_closed(tmp_path) -> None:
    ready = ReadySignal()
    s = spear_nb.Session(stop_grace=0.5, execution_timeout=120, cache_dir=str(tmp_path))
    outcomes: list[BaseException | object] = []
    lock = threading.Lock()

    def record(call: Callable[[], Any]) -> None:
        try:
            value: BaseException | object = call()
        except BaseException as exc:
            value = exc
        with lock:
            outcomes.append(value)

    try:
        s.register("block", work, max_instances=2)  # two run, the rest queue
        s.register("spin", wasm=samples.path("wasm", "spin.wat"), timeout=120)
        s.register("quick", work)
        assert s.invoke("quick", 1) == 2
        threads = [
            threading.Thread(
                target=record, args=(lambda i=i: s.invoke("block", i, ready.port),)
            )
            for i in range(6)
        ]
        threads.append(
            threading.Thread(target=record, args=(lambda: s.invoke("spin", b""),))
        )

        async def two_tasks() -> None:
            await asyncio.gather(
                *(asyncio.ensure_future(_arecord(s, record, i)) for i in range(2))
            )

        for t in threads:
            t.start()
        handles = [s.submit("block", 100 + i, ready.port) for i in range(2)]
        running = {ready.wait(60), ready.wait(60)}  # the two instances are busy
        assert len(running) == 2
        # Calls that would return at once if they got an instance: they queue.
        coroutines = threading.Thread(target=asyncio.run, args=(two_tasks(),))
        coroutines.start()
        threads.append(coroutines)
        # Every call has reached the manager: 2 running, 8 waiting, 1 spinning.
        assert wait_for(lambda: len(s._manager.executions) == 1 + 6 + 1 + 2 + 2)
        assert wait_for(lambda: (s.executions()["status"] == "running").sum() == 3), (
            s.executions()
        )
    finally:
        closing = threading.Thread(target=s.close)
        closing.start()
        closing.join(30)
        ready.release()
        ready.close()
    assert not closing.is_alive(), "close hung"
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    for h in handles:
        record(lambda h=h: h.result(timeout=30))
    assert len(outcomes) == 11
    wrong = [o for o in outcomes if not isinstance(o, spear_nb.SessionClosed)]
    assert wrong == [], wrong
    with pytest.raises(spear_nb.SessionClosed):
        s.invoke("quick", 1)


async def _arecord(s: spear_nb.Session, record: Callable[..., None], i: int) -> None:
    try:
        value: BaseException | object = await s.ainvoke("block", 200 + i, None)
    except BaseException as exc:
        value = exc
    record(lambda: _reraise(value))


def _reraise(value: BaseException | object) -> object:
    if isinstance(value, BaseException):
        raise value
    return value


# -- pods -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kube() -> Iterator[Any]:
    """A local API server (None without the kubernetes client).

    A process instance over gRPC stays open while the module runs: gRPC opens its
    pollers once per process (and may close them when no channel is left), and
    the per-test leak check must not count them.
    """
    with spear_nb.Session(stop_grace=0.5) as pin:
        pin.register("pin", work, channel="grpc")
        assert pin.invoke("pin", 1) == 2
        if not HAVE_KUBE:
            yield None  # the tests that need pods skip themselves
            return
        from spear_nb.testing import LocalKubeAPI

        with LocalKubeAPI() as api:
            with spear_nb.Session(kubeconfig=api.kubeconfig, stop_grace=0.5) as s:
                s.register("warm", work, image=IMAGE)
                assert s.invoke("warm", 1) == 2
            yield api
            assert api.pod_pids() == []


def test_a_pod_deleted_during_a_call_fails_that_call_clearly(kube) -> None:
    if kube is None:
        pytest.skip("the kubernetes client is not installed")
    from kubernetes import client as kube_client
    from kubernetes import config as kube_config

    ready = ReadySignal()
    api_client = kube_config.new_client_from_config(
        config_file=kube.kubeconfig, persist_config=False
    )
    s = spear_nb.Session(kubeconfig=kube.kubeconfig, stop_grace=0.5)
    try:
        s.register("work", work, image=IMAGE, max_instances=2)
        s.scale("work", 2)
        threads, wrong, busy = _callers(s, "work", threads=2, calls=100)
        assert busy.wait(60)
        errors: list[BaseException] = []

        def victim_call() -> None:
            try:
                s.invoke("work", -1, ready.port)
            except BaseException as exc:
                errors.append(exc)

        caller = threading.Thread(target=victim_call)
        caller.start()
        pid = ready.wait(60)
        (pod,) = [p for p in kube.pods() if pid in _pod_pids(kube, p)]
        name = pod["metadata"]["name"]
        kube_client.CoreV1Api(api_client).delete_namespaced_pod(
            name, "default", grace_period_seconds=0
        )
        caller.join(60)
        for t in threads:
            t.join(60)
        assert not caller.is_alive() and not any(t.is_alive() for t in threads)
        (error,) = errors
        assert isinstance(error, (spear_nb.InstanceCrashed, spear_nb.ChannelError))
        assert wrong == [], wrong[:3]
        assert all_gone([pid], timeout=15) == []
        assert s.invoke("work", 1) == 2
        assert name not in {p["metadata"]["name"] for p in kube.pods()}
    finally:
        s.close()
        api_client.close()
        ready.release()
        ready.close()
    assert kube.pods() == []


def _pod_pids(kube: Any, pod: dict[str, Any]) -> set[int]:
    """The pid of the process a pod runs, and its descendants."""
    pids: set[int] = set()
    for pid in kube.pod_pids():
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if pod["metadata"]["name"] in " ".join(process.environ().values()):
                pids.add(pid)
                pids |= {c.pid for c in process.children(recursive=True)}
    return pids


# -- the host killed with SIGKILL, with everything running --------------------------

HOST = """
import json, sys, threading
import psutil, spear_nb

port, kubeconfig = int(sys.argv[1]), sys.argv[2]

def block(port):
    import os, socket
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(f"{os.getpid()}\\n".encode())
    c.recv(1)

settings = {"kubeconfig": kubeconfig} if kubeconfig else {}
s = spear_nb.Session(stop_grace=0.5, **settings)
s.register("idle", lambda x: x + 1, max_instances=10)
s.scale("idle", 10)
s.register("busy", block, max_instances=2)
s.register("tcp", block, channel="tcp")
s.register("cmd", command=["sleep", "3600"])
calls = [lambda: s.invoke("busy", port), lambda: s.invoke("busy", port),
         lambda: s.invoke("tcp", port), lambda: s.invoke("cmd", b"")]
if kubeconfig:
    s.register("pod", block, image="spear-nb-agent:test")
    calls.append(lambda: s.invoke("pod", port))
for call in calls:
    threading.Thread(target=call, daemon=True).start()
print(json.dumps({"workdir": s._workdir, "running": len(calls) - 1}), flush=True)
threading.Event().wait()
"""


def test_host_killed_mid_calls_leaves_no_process_pod_or_directory(
    tmp_path, kube
) -> None:
    ready = ReadySignal()
    script = tmp_path / "host.py"
    script.write_text(HOST)
    host = subprocess.Popen(
        [sys.executable, str(script), str(ready.port), kube.kubeconfig if kube else ""],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
    )
    try:
        assert host.stdout is not None
        info = json.loads(host.stdout.readline())
        running = {ready.wait(60) for _ in range(info["running"])}
        pods = kube.pod_pids() if kube else []
        assert len(pods) == (1 if kube else 0)
        everything = {p.pid for p in psutil.Process(host.pid).children(recursive=True)}
        everything |= running | set(pods)
        assert len(everything) >= 10 + 2 + 1 + 2  # instances, watchdog, zygote...
        host.kill()
        host.wait(30)
        # Bounded waits on real events: the processes' ends, then the API.
        assert all_gone(sorted(everything), timeout=5) == []
        if kube is not None:
            assert wait_for(lambda: kube.pods() == [], timeout=5), kube.pods()
        assert wait_for(lambda: not os.path.exists(info["workdir"]), timeout=5)
    finally:
        host.kill()
        host.wait()
        if host.stdout is not None:
            host.stdout.close()
        ready.release()
        ready.close()


# -- two sessions never see each other -----------------------------------------------


def _auth_refused(address: str, instance_id: str, secret: str) -> bytes:
    """Dial a session's listener with these credentials; return the refusal."""
    from spear_nb.communication.protocol import Message, MessageType, frame
    from tests._support import read_messages

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    with sock:
        sock.connect(address)
        headers = {"instance_id": instance_id, "secret": secret}
        sock.sendall(frame(Message(MessageType.AUTH_REQUEST, 0, headers=headers)))
        (reply,) = read_messages(sock)
    assert reply.header("ok") is False
    return reply.payload


def _view(s: spear_nb.Session) -> dict[str, Any]:
    table = s.instances()
    instance_id = str(table["instance_id"].iloc[0])
    return {
        "workdir": s._workdir,
        "address": s._manager.factory.listener_addresses()["unix"],
        "pids": sorted(int(p) for p in table["pid"]),
        "instance_id": instance_id,
        "secret": s._manager.instances[instance_id].secret,
    }


def _check_apart(
    s: spear_nb.Session, mine: dict[str, Any], theirs: dict[str, Any]
) -> None:
    assert mine["workdir"] != theirs["workdir"]
    assert os.path.dirname(mine["address"]) == mine["workdir"]
    assert not set(mine["pids"]) & set(theirs["pids"])
    # The same instance id lives in both sessions; each secret opens only its own.
    assert mine["instance_id"] == theirs["instance_id"] == "who-1"
    assert mine["secret"] != theirs["secret"]
    assert b"wrong secret" in _auth_refused(
        theirs["address"], mine["instance_id"], mine["secret"]
    )
    assert b"wrong secret" in _auth_refused(
        mine["address"], theirs["instance_id"], theirs["secret"]
    )
    # Calls are served by this session's own instances, over its own socket.
    for _ in range(10):
        pid, address = s.invoke("who")
        assert pid in mine["pids"] and address == mine["address"]
    assert set(s.instances()["status"]) == {"ready"}


def test_two_sessions_in_one_process_never_see_each_other() -> None:
    with (
        spear_nb.Session(stop_grace=0.5) as one,
        spear_nb.Session(stop_grace=0.5) as two,
    ):
        for s in (one, two):
            s.register("who", whoami, max_instances=2, scheduler="round_robin")
            s.scale("who", 2)
        a, b = _view(one), _view(two)
        _check_apart(one, a, b)
        _check_apart(two, b, a)
        one.close()  # closing one leaves the other alone
        assert all_gone(a["pids"]) == []
        assert not os.path.exists(a["workdir"])
        assert {two.invoke("who")[0] for _ in range(4)} == set(b["pids"])


OTHER = """
import json, os, sys
import spear_nb

def whoami():
    return os.getpid(), os.environ.get("SPEAR_ADDRESS", "")

s = spear_nb.Session(stop_grace=0.5)
s.register("who", whoami, max_instances=2)
s.scale("who", 2)
table = s.instances()
iid = str(table["instance_id"].iloc[0])
print(json.dumps({
    "workdir": s._workdir,
    "address": s._manager.factory.listener_addresses()["unix"],
    "pids": sorted(int(p) for p in table["pid"]),
    "instance_id": iid,
    "secret": s._manager.instances[iid].secret,
}), flush=True)
sys.stdin.read()
s.close()
"""


def test_two_sessions_in_two_processes_never_see_each_other(tmp_path) -> None:
    script = tmp_path / "other.py"
    script.write_text(OTHER)
    other = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
    )
    try:
        assert other.stdout is not None and other.stdin is not None
        theirs = json.loads(other.stdout.readline())
        with spear_nb.Session(stop_grace=0.5) as s:
            s.register("who", whoami, max_instances=2, scheduler="round_robin")
            s.scale("who", 2)
            mine = _view(s)
            _check_apart(s, mine, theirs)
            # Our sweep of stale work directories leaves a live session's alone.
            assert os.path.isdir(theirs["workdir"])
        other.stdin.close()
        assert other.wait(30) == 0
        assert all_gone(theirs["pids"]) == []
        assert not os.path.exists(theirs["workdir"])
    finally:
        other.kill()
        other.wait()
        if other.stdout is not None:
            other.stdout.close()
