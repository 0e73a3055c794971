"""Leave nothing behind: the live-session registry, the exit hook and the watchdog."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from typing import Protocol

import psutil

logger = logging.getLogger(__name__)

WORKDIR_PREFIX = "spear_nb-"
OWNER_FILE = "owner.pid"


class _Closable(Protocol):
    def close(self) -> None: ...


_live: weakref.WeakSet[_Closable] = weakref.WeakSet()
_hook_lock = threading.Lock()
_hook_installed = False


def track(session: _Closable) -> None:
    """Close ``session`` at interpreter exit if the user did not."""
    global _hook_installed
    with _hook_lock:
        _live.add(session)
        if not _hook_installed:
            atexit.register(_close_all)
            _hook_installed = True


def untrack(session: _Closable) -> None:
    _live.discard(session)


def _close_all() -> None:
    for session in list(_live):
        try:
            session.close()
        except Exception:  # never raise from an exit hook
            logger.exception("closing a session at exit failed")


def make_workdir() -> str:
    """Create the session's private (0700) directory and sweep stale ones."""
    sweep_stale_workdirs()
    path = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
    with open(os.path.join(path, OWNER_FILE), "w") as f:
        f.write(str(os.getpid()))
    return path


def sweep_stale_workdirs(root: str | None = None) -> list[str]:
    """Remove work directories whose owning process is gone; return them."""
    root = root or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(WORKDIR_PREFIX):
            continue
        path = os.path.join(root, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            with open(os.path.join(path, OWNER_FILE)) as f:
                owner = int(f.read().strip() or "0")
        except (OSError, ValueError):
            continue
        if owner and not psutil.pid_exists(owner):
            logger.info("removing %s left by a session that crashed", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class Watchdog:
    """A guardian process that cleans up if this process dies without closing."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "spear_nb._watchdog"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def tell(self, line: str) -> None:
        process = self._process
        if process is None or process.stdin is None:
            return
        with self._lock:
            try:
                process.stdin.write(line.encode() + b"\n")
                process.stdin.flush()
            except (BrokenPipeError, ValueError):
                logger.warning("the cleanup watchdog is gone; crash cleanup is off")

    def close(self) -> None:
        """Tell the watchdog all is clean and wait for it to exit."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.stdin is not None:
                process.stdin.write(b"bye\n")
                process.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close_abruptly(self) -> None:
        """Hang up without 'bye': the watchdog kills and removes what it knows of."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.stdin is not None:
                process.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
