"""Shared fixtures: a private temp root, the leak check and a session."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import cloudpickle
import psutil
import pytest

import spear_nb
from tests import _remote
from tests._support import ReadySignal

# Remote functions travel by value, so instances never import the test modules.
cloudpickle.register_pickle_by_value(_remote)

WORKDIR_PREFIX = "spear_nb-"
FD_SLACK = 2
_private_tmp: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Give the test run its own temp root.

    Work directories (and the stale-directory sweep) then only ever see this run's
    directories, not those of other spear_nb users on the machine.
    """
    global _private_tmp
    _private_tmp = tempfile.mkdtemp(prefix="spear-nb-tests-")
    os.environ["TMPDIR"] = _private_tmp
    tempfile.tempdir = None  # recomputed from TMPDIR
    assert tempfile.gettempdir() == _private_tmp


def pytest_unconfigure(config: pytest.Config) -> None:
    if _private_tmp is not None:
        shutil.rmtree(_private_tmp, ignore_errors=True)


def _workdirs() -> set[str]:
    root = tempfile.gettempdir()
    return {
        os.path.join(root, name)
        for name in os.listdir(root)
        if name.startswith(WORKDIR_PREFIX)
    }


def _suspect_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t not in before
        and t.is_alive()
        and (not t.daemon or t.name.startswith("spear_nb-"))
    ]


def _describe_fds() -> list[str]:
    out = []
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        with contextlib.suppress(OSError):
            out.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
    return out


@pytest.fixture(autouse=True)
def leak_check() -> Iterator[None]:
    """After each test: no child process, no spear_nb thread, no work directory
    and no file descriptor is left behind."""
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    threads_before = set(threading.enumerate())
    dirs_before = _workdirs()
    fds_before = me.num_fds()
    yield
    problems: list[str] = []

    new_children = [
        p for p in me.children(recursive=True) if p.pid not in children_before
    ]
    # The watchdog and instances exit as a session closes; give them an
    # event-based moment (wait_procs returns as soon as they are gone).
    _, alive = psutil.wait_procs(new_children, timeout=5)
    alive = [p for p in alive if p.is_running()]
    if alive:
        described = []
        for p in alive:
            try:
                described.append(f"{p.pid} {p.cmdline()}")
            except psutil.Error:
                described.append(str(p.pid))
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        problems.append(f"child processes left: {described}")

    threads = _suspect_threads(threads_before)
    for t in threads:
        t.join(timeout=5)
    threads = [t for t in threads if t.is_alive()]
    if threads:
        problems.append(f"threads left: {[t.name for t in threads]}")

    left = _workdirs() - dirs_before
    if left:
        for path in left:
            shutil.rmtree(path, ignore_errors=True)
        problems.append(f"work directories left: {sorted(left)}")

    fds_after = me.num_fds()
    if fds_after > fds_before + FD_SLACK:
        problems.append(
            f"file descriptors grew from {fds_before} to {fds_after}: "
            + ", ".join(_describe_fds())
        )

    assert not problems, "; ".join(problems)


@pytest.fixture
def session() -> Iterator[spear_nb.Session]:
    """A session with short grace periods, closed after the test."""
    s = spear_nb.Session(stop_grace=0.5, execution_timeout=60)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def ready() -> Iterator[ReadySignal]:
    """A loopback listener that remote functions dial when they start running."""
    signal_ = ReadySignal()
    try:
        yield signal_
    finally:
        signal_.release()
        signal_.close()
