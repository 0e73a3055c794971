"""Nothing is left behind: after close, after an unclosed session is dropped, at
interpreter exit, and when the host is killed with SIGKILL."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import selectors
import subprocess
import sys
import textwrap
from collections.abc import Iterable

import psutil
import pytest

import spear_nb
from tests import _remote
from tests._support import ReadySignal, all_gone


def _descendants() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True)]


def _read_line(process: subprocess.Popen, timeout: float = 60.0) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(process.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), "the script printed nothing"
    return process.stdout.readline().decode()


def _busy_session(s: spear_nb.Session) -> None:
    s.register("inc", _remote.inc)
    s.register("wc", command=["wc", "-w"])
    s.register("tcp", _remote.double, channel="tcp")
    assert s.invoke("inc", 1) == 2
    assert s.invoke("wc", b"a b") == b"2\n"
    assert s.invoke("tcp", 2) == 4


def test_close_leaves_no_process_and_no_socket() -> None:
    s = spear_nb.Session(stop_grace=0.5)
    _busy_session(s)
    workdir = s._workdir
    assert os.path.exists(os.path.join(workdir, "host.sock"))
    pids = _descendants()
    instance_pids = [int(p) for p in s.instances()["pid"].dropna()]
    assert set(instance_pids) <= set(pids)
    assert s._watchdog.pid in pids
    s.close()
    assert all_gone(pids) == []
    assert not os.path.exists(workdir)
    assert s.state.value == "closed"


def test_closing_twice_is_fine() -> None:
    s = spear_nb.Session(stop_grace=0.5)
    assert s.invoke(_remote.inc, 1) == 2
    s.close()
    s.close()
    assert "closed" in repr(s)


def test_a_closed_session_raises_session_closed() -> None:
    with spear_nb.Session(stop_grace=0.5) as s:
        s.register("inc", _remote.inc)
    for use in (
        lambda: s.invoke("inc", 1),
        lambda: s.register("other", _remote.inc),
        lambda: asyncio.run(s.ainvoke("inc", 1)),
        lambda: s.__enter__(),  # with s: again
        lambda: asyncio.run(s.__aenter__()),
    ):
        with pytest.raises(spear_nb.SessionClosed, match="closed"):
            use()


def test_the_tables_show_how_a_closed_session_ended() -> None:
    with spear_nb.Session(stop_grace=0.5) as s:
        s.register("inc", _remote.inc)
        assert s.invoke("inc", 1) == 2
    assert s.instances()["status"].tolist() == ["stopped"]
    assert s.executions()["status"].tolist() == ["succeeded"]
    assert s.channels()["state"].tolist() == ["closed"]
    assert s.metrics()["function"].tolist() == ["inc"]
    assert "execute" in s.events()["phase"].tolist()
    assert s.tasks()[["function", "status"]].values.tolist() == [["inc", "stopped"]]
    assert s.inspect("inc-1")["status"] == "stopped"
    assert "<svg" in s.timeline()._repr_html_()


def test_async_context_manager() -> None:
    async def main() -> tuple[int, str]:
        async with spear_nb.Session(stop_grace=0.5) as s:
            result = await s.ainvoke(_remote.inc, 1)
        return result, s.state.value

    assert asyncio.run(main()) == (2, "closed")


def test_an_unclosed_session_that_is_dropped_is_cleaned_up() -> None:
    s = spear_nb.Session(stop_grace=0.5)
    _busy_session(s)
    workdir = s._workdir
    pids = _descendants()
    del s
    gc.collect()
    assert all_gone(pids) == []
    assert not os.path.exists(workdir)


def _sigkill(process: subprocess.Popen, also: Iterable[int] = ()) -> set[int]:
    """Kill a host script with SIGKILL; return its descendants' pids (and
    ``also``'s), all of which its watchdogs must then end."""
    host = psutil.Process(process.pid)
    pids = {p.pid for p in host.children(recursive=True)} | set(also)
    process.kill()
    process.wait(60)
    return pids


def _run_script(tmp_path, body: str, *args: str) -> subprocess.Popen:
    script = tmp_path / "host.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        cwd=str(tmp_path),
    )


def test_interpreter_exit_without_close_cleans_up(tmp_path) -> None:
    process = _run_script(
        tmp_path,
        """
        import json, psutil, spear_nb
        s = spear_nb.Session(stop_grace=0.5)
        s.register("inc", lambda x: x + 1)
        s.register("wc", command=["wc", "-w"])
        assert s.invoke("inc", 1) == 2 and s.invoke("wc", b"a") == b"1\\n"
        pids = [p.pid for p in psutil.Process().children(recursive=True)]
        print(json.dumps({"pids": pids, "workdir": s._workdir}), flush=True)
        # no close(): the exit hook must do it
        """,
    )
    try:
        info = json.loads(_read_line(process))
        assert process.wait(60) == 0
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    assert info["pids"]
    assert all_gone(info["pids"]) == []
    assert not os.path.exists(info["workdir"])


HOST = """
import json, sys, threading
import psutil, spear_nb

port = int(sys.argv[1])
s = spear_nb.Session(stop_grace=0.5, start_method=sys.argv[2])

def forever(port):
    import os, socket, time
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(f"{os.getpid()}\\n".encode())
    c.close()
    time.sleep(3600)

REPORT = (
    "import os, socket, sys, time;"
    "c = socket.create_connection(('127.0.0.1', int(sys.stdin.read())));"
    "c.sendall(f'{os.getpid()}\\\\n'.encode()); c.close(); time.sleep(3600)"
)
s.register("forever", forever)
s.register("cmd", command=[sys.executable, "-c", REPORT])
s.register("inc", lambda x: x + 1)
assert s.invoke("inc", 1) == 2
for call in (lambda: s.invoke("forever", port), lambda: s.invoke("cmd", str(port))):
    threading.Thread(target=call, daemon=True).start()
print(json.dumps({"workdir": s._workdir, "watchdog": s._watchdog.pid}), flush=True)
threading.Event().wait()
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_host_killed_with_sigkill_leaves_nothing(tmp_path, start_method) -> None:
    ready = ReadySignal()
    process = _run_script(tmp_path, HOST, str(ready.port), start_method)
    try:
        info = json.loads(_read_line(process))
        running = {ready.wait(60), ready.wait(60)}  # the callable and the command
        assert os.path.isdir(info["workdir"])
        pids = _sigkill(process, running)
        assert info["watchdog"] in pids
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        ready.release()
        ready.close()
    # The watchdog removes the work directory and then exits: wait for the
    # processes, then the directory must already be gone.
    assert all_gone(sorted(pids)) == []
    assert not os.path.exists(info["workdir"])


KUBE_HOST = """
import json, threading
import spear_nb
from spear_nb.testing import LocalKubeAPI

kube = LocalKubeAPI().start()
s = spear_nb.Session(kubeconfig=kube.kubeconfig, stop_grace=0.5)
s.register("inc", lambda x: x + 1, image="spear-nb-agent:test")
assert s.invoke("inc", 1) == 2
print(json.dumps({"kube": kube.directory, "pods": kube.pod_pids()}), flush=True)
threading.Event().wait()
"""


def test_host_of_a_local_kube_api_killed_with_sigkill_leaves_nothing(
    tmp_path,
) -> None:
    """The test double's pods die, and its directory (kubeconfig, pod logs) is
    removed, by the watchdogs of the session and of the API server."""
    pytest.importorskip("kubernetes")
    process = _run_script(tmp_path, KUBE_HOST)
    try:
        info = json.loads(_read_line(process, timeout=120))
        assert info["pods"] and os.path.isdir(info["kube"])
        pids = _sigkill(process, info["pods"])
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    assert all_gone(sorted(pids)) == []
    assert not os.path.exists(info["kube"])


def test_closing_a_session_that_used_grpc_leaves_no_thread(tmp_path) -> None:
    # In a new interpreter: the other tests keep gRPC's pollers open on purpose.
    process = _run_script(
        tmp_path,
        """
        import json, threading, spear_nb
        before = [t.name for t in threading.enumerate()]
        with spear_nb.Session(stop_grace=0.5) as s:
            s.register("inc", lambda x: x + 1, channel="grpc")
            assert s.invoke("inc", 1) == 2
            during = [t.name for t in threading.enumerate()]
        after = [t.name for t in threading.enumerate()]
        print(json.dumps({"before": before, "during": during, "after": after}))
        """,
    )
    try:
        out, _ = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    threads = json.loads(out)
    assert len(threads["during"]) > len(threads["before"])  # the loop, gRPC's poller
    assert threads["after"] == threads["before"], threads


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_a_stopped_instance_exits_cleanly_having_been_told_to(kind) -> None:
    # The CLOSE message used to be dropped as the channel closed in the same
    # turn: the agent then saw the host vanish and exited with code 3.
    with spear_nb.Session(stop_grace=5) as s:
        s.register("inc", _remote.inc, channel=kind)
        s.register("other", _remote.inc, channel=kind)
        assert s.invoke("inc", 1) == 2 and s.invoke("other", 1) == 2
        s.stop_instance("inc-1")
    events = s.events()
    exits = events[events["phase"] == "process_exited"]
    assert sorted(exits["instance_id"]) == ["inc-1", "other-1"]
    assert all(d.endswith("exited with code 0") for d in exits["detail"]), list(
        exits["detail"]
    )


def test_forking_after_grpc_prints_nothing(tmp_path) -> None:
    # gRPC's fork handlers used to print a line on stderr for every command run
    # after a gRPC call (a process forked while gRPC's threads ran).
    script = tmp_path / "host.py"
    script.write_text(
        textwrap.dedent(
            """
            import spear_nb
            with spear_nb.Session(stop_grace=0.5) as s:
                s.register("inc", lambda x: x + 1, channel="grpc")
                assert s.invoke("inc", 1) == 2
                s.register("wc", command=["wc", "-c"])
                assert [s.invoke("wc", b"abc") for _ in range(3)] == [b"3\\n"] * 3
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "fork" not in done.stderr, done.stderr


def test_the_watchdog_says_how_to_delete_a_pod_it_could_not(tmp_path) -> None:
    """The host died and the API server cannot be reached (here: nothing listens
    at its address): one line names the pod and the command that deletes it."""
    pytest.importorskip("kubernetes")
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        textwrap.dedent(
            """
            apiVersion: v1
            kind: Config
            clusters: [{name: c, cluster: {server: "http://127.0.0.1:9"}}]
            users: [{name: u, user: {token: t}}]
            contexts: [{name: x, context: {cluster: c, user: u}}]
            current-context: x
            """
        )
    )
    # The lines a session sends; end of input without "bye": the host died.
    lines = f"pod spear-ns spear-f-1 {kubeconfig}\n"
    done = subprocess.run(
        [sys.executable, "-m", "spear_nb._watchdog"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))},
    )
    assert done.returncode == 0
    (line,) = done.stderr.strip().splitlines()
    assert "could not delete pod spear-f-1 in namespace spear-ns" in line
    assert line.endswith("kubectl delete pod -n spear-ns spear-f-1")
