"""The zygote: a warm template process that forks new agent instances.

Starting a Python interpreter and importing the agent's modules costs tens of
milliseconds; forking a process that has already done so costs about one. A
session starts one zygote (``python -m spear_nb.agent._zygote``) and asks it, over
its stdin, to fork each new instance; the zygote answers on its stdout with the
child's pid, and later with its exit status, because only a parent can reap a child.

The zygote stays single-threaded, which is what makes forking it safe. It dies with
the session (parent-death signal and end of file on stdin), and its children die
with it.

Requests and replies are length-prefixed msgpack maps, framed as on channels.
"""

from __future__ import annotations

import importlib
import os
import select
import signal
import sys
import traceback
from typing import Any

import cloudpickle  # noqa: F401  - preloaded: every callable instance needs it
import msgpack

from spear_nb.agent import _serve
from spear_nb.communication.protocol import LENGTH, FrameDecoder

EXIT_CHILD_FAILED = 70


def _send(body: dict[str, Any]) -> None:
    data = msgpack.packb(body, use_bin_type=True)
    os.write(1, LENGTH.pack(len(data)) + data)


def _child(request: dict[str, Any], keep: list[int]) -> int:
    """Runs in the forked child: become an agent instance."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in keep:
        os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    env = dict(request["env"])
    env["SPEAR_HOST_PID"] = str(os.getppid())
    os.environ.clear()
    os.environ.update(env)
    cwd = request.get("cwd") or ""
    if cwd:
        os.chdir(cwd)
    # A new interpreter would build sys.path from PYTHONPATH; a fork must do it.
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    for entry in reversed([cwd, *extra] if cwd else extra):
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
    importlib.invalidate_caches()
    return _serve.run()


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send({"op": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _serve.die_with_parent(int(os.environ.get("SPEAR_HOST_PID", "0")))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    decoder = FrameDecoder()
    _send({"op": "ready", "pid": os.getpid()})
    while True:
        readable, _, _ = select.select([0, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
            _reap()
        if 0 not in readable:
            continue
        data = os.read(0, 65536)
        if not data:
            return 0
        for body in decoder.feed(data):
            request = msgpack.unpackb(body, raw=False)
            try:
                pid = os.fork()
            except OSError as exc:
                _send({"op": "error", "id": request["id"], "message": str(exc)})
                continue
            if pid == 0:
                code = EXIT_CHILD_FAILED
                try:
                    code = _child(request, [wake_r, wake_w])
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            _send({"op": "spawned", "id": request["id"], "pid": pid})


if __name__ == "__main__":
    sys.exit(main())
