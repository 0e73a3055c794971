"""The host side of the zygote: ask it to fork instances and learn when they exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
from typing import Any

import msgpack

from spear_nb._cleanup import Watchdog
from spear_nb.communication.protocol import LENGTH, FrameDecoder
from spear_nb.errors import InstanceStartFailed

logger = logging.getLogger(__name__)


class Zygote:
    """One warm template process per session; lives on the session's loop."""

    def __init__(self, python: str, env: dict[str, str], log_path: str) -> None:
        self.python = python
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.ready: asyncio.Future[int] | None = None
        self._decoder = FrameDecoder()
        self._spawns: dict[str, asyncio.Future[tuple[int, asyncio.Future[int]]]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._out = -1

    def start(self, watchdog: Watchdog) -> None:
        """Start the zygote process; :attr:`ready` completes when it can fork."""
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.python, "-m", "spear_nb.agent._zygote"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
                start_new_session=True,
            )
        watchdog.tell(f"pgid {self.process.pid}")
        assert self.process.stdout is not None
        self._out = self.process.stdout.fileno()
        os.set_blocking(self._out, False)
        loop.add_reader(self._out, self._readable)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _readable(self) -> None:
        try:
            data = os.read(self._out, 65536)
        except BlockingIOError:
            return
        if not data:
            self._gone()
            return
        for body in self._decoder.feed(data):
            self._handle(msgpack.unpackb(body, raw=False))

    def _handle(self, reply: dict[str, Any]) -> None:
        op = reply.get("op")
        if op == "ready":
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(int(reply["pid"]))
        elif op == "spawned":
            pid = int(reply["pid"])
            # Registered now: the exit may arrive in the same read as this reply.
            exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._exits[pid] = exited
            future = self._spawns.pop(reply["id"], None)
            if future is not None and not future.done():
                future.set_result((pid, exited))
        elif op == "error":
            future = self._spawns.pop(reply["id"], None)
            if future is not None and not future.done():
                future.set_exception(
                    InstanceStartFailed(
                        f"the zygote could not fork: {reply['message']}"
                    )
                )
        elif op == "exit":
            gone = self._exits.pop(int(reply["pid"]), None)
            if gone is not None and not gone.done():
                gone.set_result(int(reply["code"]))

    def _gone(self) -> None:
        """The zygote died: its children die with it (parent-death signal)."""
        asyncio.get_running_loop().remove_reader(self._out)
        reason = InstanceStartFailed("the zygote process exited")
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(reason)
        for future in self._spawns.values():
            if not future.done():
                future.set_exception(reason)
        for exited in self._exits.values():
            if not exited.done():
                exited.set_result(-9)
        self._spawns.clear()
        self._exits.clear()
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=1)

    async def fork(
        self, instance_id: str, env: dict[str, str], cwd: str, log_path: str
    ) -> tuple[int, asyncio.Future[int]]:
        """Fork an instance; return its pid and a future of its exit code."""
        assert self.ready is not None and self.process is not None
        # Shared by every start: one cancelled caller must not cancel it for all.
        await asyncio.shield(self.ready)
        loop = asyncio.get_running_loop()
        spawned: asyncio.Future[tuple[int, asyncio.Future[int]]] = loop.create_future()
        self._spawns[instance_id] = spawned
        body = msgpack.packb(
            {"id": instance_id, "env": env, "cwd": cwd, "log": log_path},
            use_bin_type=True,
        )
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(LENGTH.pack(len(body)) + body)
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            self._spawns.pop(instance_id, None)
            raise InstanceStartFailed(f"the zygote is gone: {exc}") from exc
        return await spawned

    async def close(self) -> None:
        """Stop the zygote (its instances must be stopped first)."""
        process, self.process = self.process, None
        if process is None:
            return
        if self._out >= 0 and process.poll() is None:
            asyncio.get_running_loop().remove_reader(self._out)
        with contextlib.suppress(BrokenPipeError, ValueError, OSError):
            if process.stdin is not None:
                process.stdin.close()
        # Its stdin is closed, so it exits at once; a short blocking wait is fine
        # here, and needs no executor (which is gone during interpreter exit).
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
