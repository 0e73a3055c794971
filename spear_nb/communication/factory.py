"""The communication factory: one pooled, authenticated channel per instance.

Each runtime has a strategy, a primary channel type and fallbacks. For transports
where the host listens (unix, tcp) the factory owns the listeners, registers the
secret an instance will present, and hands the instance the address to dial.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from spear_nb.communication.channel import Channel, ChannelType
from spear_nb.communication.lane import DirectLane
from spear_nb.communication.protocol import DEFAULT_MAX_FRAME, Message, MessageType
from spear_nb.communication.stream import StreamChannel, StreamListener
from spear_nb.errors import (
    AuthenticationFailed,
    ChannelError,
    ConfigurationError,
    InstanceStartFailed,
)
from spear_nb.execution.events import EventLog

logger = logging.getLogger(__name__)

# runtime -> channel types in order of preference
DEFAULT_STRATEGIES: dict[str, tuple[str, ...]] = {
    "process": ("unix", "tcp"),
    "kubernetes": ("grpc", "tcp"),
    "wasm": ("memory",),
}
DIAL_IN_TYPES = ("unix", "tcp")
# sun_path holds 108 bytes on Linux, 104 on macOS, including the final NUL.
MAX_UNIX_PATH = 107 if sys.platform.startswith("linux") else 103


@dataclass
class _Expectation:
    instance_id: str
    secret: str
    bootstrap: bytes
    future: asyncio.Future[Channel]
    channel_type: str
    auth_failures: int = 0
    fallback_from: str = ""  # the type tried first, when this one is a fallback
    # Types passed over for a standby dial-in, told if the instance dials in.
    skipped: list[str] = field(default_factory=list)


@dataclass
class FactoryStats:
    auth_failures: int = 0
    fallbacks: int = 0
    replaced: int = 0
    unknown_instance_attempts: int = 0
    fallback_reasons: list[str] = field(default_factory=list)


Connector = Callable[[], Awaitable[Channel]]


class CommunicationFactory:
    """Hands out the channel of an instance, creating or replacing it as needed."""

    def __init__(
        self,
        workdir: str,
        events: EventLog,
        max_frame: int = DEFAULT_MAX_FRAME,
        strategies: dict[str, tuple[str, ...]] | None = None,
        busy_poll: float = 0.0,
    ) -> None:
        self.workdir = workdir
        self.busy_poll = busy_poll  # seconds; what direct lanes poll before sleeping
        self.events = events
        self.max_frame = max_frame
        self.strategies = dict(DEFAULT_STRATEGIES)
        if strategies:
            self.strategies.update(strategies)
        self.stats = FactoryStats()
        self._listeners: dict[str, StreamListener] = {}
        self._listener_lock = asyncio.Lock()
        self._expected: dict[str, _Expectation] = {}
        self._pool: dict[str, Channel] = {}
        self._connectors: dict[str, Connector] = {}
        # Per instance: asked when its channel has been silent too long; True
        # means the peer is known to be busy (running on a CPU), not paused.
        self._busy_checks: dict[str, Callable[[], bool]] = {}
        self._history: list[Channel] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        # Instances stopped lately: one may still dial in, and is refused quietly.
        self._released: deque[str] = deque(maxlen=256)
        # instance id -> its direct lane; read by calling threads, changed on the loop
        self.lanes: dict[str, DirectLane] = {}

    # -- dial-in transports ------------------------------------------------------

    def strategy(self, runtime: str, override: str = "") -> tuple[str, ...]:
        """The channel types to try for a runtime, most preferred first."""
        if override:
            return (override, *[t for t in self.strategies[runtime] if t != override])
        return self.strategies[runtime]

    async def listen_for(
        self,
        instance_id: str,
        secret: str,
        bootstrap: bytes,
        types: tuple[str, ...],
        standby: bool = False,
    ) -> dict[str, str]:
        """Prepare for an instance to dial in; return the environment it needs.

        Tries the channel types in order and falls back when a listener cannot be
        made (for example a socket path too long for the OS), logging why.
        ``standby``: the dial-in is only the fallback of a channel the host
        opens itself (gRPC); the types skipped here are told only if it is used.
        """
        reasons: list[str] = []
        for kind in types:
            if kind not in DIAL_IN_TYPES:
                reasons.append(f"{kind}: instances cannot dial in over it")
                continue
            try:
                listener = await self._listener(kind)
            except (OSError, ChannelError) as exc:
                reasons.append(f"{kind}: {exc}")
                continue
            if reasons and not standby:
                self._fell_back(instance_id, kind, reasons)
            loop = asyncio.get_running_loop()
            self._expected[instance_id] = _Expectation(
                instance_id,
                secret,
                bootstrap,
                loop.create_future(),
                kind,
                fallback_from="" if standby else _tried_first(reasons),
                skipped=reasons if standby else [],
            )
            return listener.env()
        raise ChannelError(
            f"no channel could be opened for instance {instance_id}; tried "
            + "; ".join(reasons)
        )

    def expectation(self, instance_id: str) -> asyncio.Future[Channel]:
        """The future of an instance's dial-in, made by :meth:`listen_for`."""
        return self._expected[instance_id].future

    def adopt(self, instance_id: str, channel: Channel) -> None:
        """Pool a channel the host opened itself (it dialled the instance)."""
        self._expected.pop(instance_id, None)
        channel.on_lost(self._lost)
        self._pool[instance_id] = channel
        self._history.append(channel)

    def fell_back(self, instance_id: str, channel: Channel, reasons: list[str]) -> None:
        """Record that an instance reached the host over a fallback channel."""
        expected = self._expected.get(instance_id)
        if expected is not None:
            reasons = reasons + expected.skipped
        channel.fallback_from = _tried_first(reasons)
        self._fell_back(instance_id, channel.type.value, reasons)

    def _fell_back(self, instance_id: str, chosen: str, reasons: list[str]) -> None:
        reason = "; ".join(reasons)
        self.stats.fallbacks += 1
        self.stats.fallback_reasons.append(f"{instance_id}: {reason} -> {chosen}")
        logger.info("instance %s uses %s: %s", instance_id, chosen, reason)
        self.events.note(
            "channel_fallback", f"{reason}; using {chosen}", instance_id=instance_id
        )

    async def _listener(self, kind: str) -> StreamListener:
        async with self._listener_lock:
            existing = self._listeners.get(kind)
            if existing is not None and existing.serving:
                return existing
            if existing is not None:
                # Closed, or its socket file was removed or replaced: instances
                # already connected keep their connections; new ones need a
                # listener they can reach.
                logger.warning(
                    "the %s listener at %s stopped serving; listening again",
                    kind,
                    existing.address,
                )
                del self._listeners[kind]
                await existing.close()
            listener = StreamListener(
                ChannelType(kind), self._authenticate, self.max_frame, self._refused
            )
            if kind == "unix":
                path = os.path.join(self.workdir, "host.sock")
                if len(os.fsencode(path)) > MAX_UNIX_PATH:
                    raise ChannelError(
                        f"the socket path {path!r} is longer than the {MAX_UNIX_PATH} "
                        "bytes the OS allows"
                    )
                _remove_stale_socket(path)
                await listener.start_unix(path)
            else:
                await listener.start_tcp()
            self._listeners[kind] = listener
            logger.debug("listening for instances on %s", listener.address)
            return listener

    def _authenticate(
        self, channel: StreamChannel, instance_id: str, secret: str
    ) -> bytes:
        expected = self._expected.get(instance_id)
        if expected is None:
            self.stats.unknown_instance_attempts += 1
            if instance_id in self._released:
                channel.quiet = True  # it was stopped while it was dialling in
                raise AuthenticationFailed(
                    f"instance {instance_id!r} was stopped before it connected"
                )
            raise AuthenticationFailed(f"no instance {instance_id!r} is expected")
        if not hmac.compare_digest(secret.encode(), expected.secret.encode()):
            expected.auth_failures += 1
            raise AuthenticationFailed(f"wrong secret for instance {instance_id}")
        if channel.peer_info.get("lane"):
            return self._accept_lane(channel, instance_id, expected)
        if expected.future.done():
            raise AuthenticationFailed(f"instance {instance_id} is already connected")
        channel.instance_id = instance_id
        channel.expects_heartbeats = True  # every dial-in peer is an agent
        if expected.fallback_from:
            channel.fallback_from = expected.fallback_from
        channel.on_lost(self._lost)
        self._pool[instance_id] = channel
        self._history.append(channel)
        expected.future.set_result(channel)
        return expected.bootstrap

    def _accept_lane(
        self, channel: StreamChannel, instance_id: str, expected: _Expectation
    ) -> bytes:
        """Let an authenticated instance open its direct lane (one, after its
        channel)."""
        pooled = self._pool.get(instance_id)
        if pooled is None or not pooled.connected or instance_id in self.lanes:
            raise AuthenticationFailed(
                f"instance {instance_id} cannot open a direct lane now: it has "
                + ("one already" if instance_id in self.lanes else "no channel")
            )

        def adopt(sock: socket.socket) -> None:
            if self._pool.get(instance_id) is not pooled or not pooled.connected:
                sock.close()  # the instance went away meanwhile
                return
            self.lanes[instance_id] = DirectLane(
                instance_id, sock, self.max_frame, self.busy_poll
            )

        channel.detach = adopt
        return b""

    def close_lane(self, instance_id: str, reason: str) -> None:
        """Close an instance's direct lane; a call blocked on it fails with reason."""
        lane = self.lanes.pop(instance_id, None)
        if lane is not None:
            lane.close(reason)

    def _refused(self, channel: StreamChannel, reason: str) -> None:
        self.stats.auth_failures += 1
        self.events.note("auth_refused", reason, instance_id=channel.instance_id)

    def _lost(self, channel: Channel) -> None:
        if self._pool.get(channel.instance_id) is channel:
            self.close_lane(channel.instance_id, channel.close_reason)
        if channel.close_reason != "closed by the host":
            self.events.note(
                "channel_lost", channel.close_reason, instance_id=channel.instance_id
            )

    async def wait_connected(
        self, instance_id: str, timeout: float, gone: asyncio.Future[object] | None
    ) -> Channel:
        """Wait until the instance has dialled in and authenticated.

        ``gone`` completes if the instance dies first, which ends the wait at once.
        """
        expected = self._expected[instance_id]
        waiters: set[asyncio.Future[object]] = {expected.future}  # type: ignore[arg-type]
        if gone is not None:
            waiters.add(gone)
        done, _ = await asyncio.wait(
            waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if expected.future in done:
            return expected.future.result()
        if not done:
            raise InstanceStartFailed(
                f"instance {instance_id} did not connect within {timeout:g} s"
            )
        raise InstanceStartFailed(f"instance {instance_id} exited before connecting")

    # -- liveness ------------------------------------------------------------------

    def start_heartbeats(self, interval: float, misses: int) -> None:
        """Beat on every channel each ``interval``; drop those silent too long."""
        self._heartbeat_task = asyncio.get_running_loop().create_task(
            self._beat(interval, misses)
        )

    async def _beat(self, interval: float, misses: int) -> None:
        beat = Message(MessageType.HEARTBEAT, 0)
        limit = interval * misses
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            for channel in list(self._pool.values()):
                if not channel.connected:
                    continue
                if channel.expects_heartbeats:
                    heard = channel.stats.last_activity or channel.stats.connected_at
                    silent = now - (heard or now)
                    if silent > limit and not self._busy(channel, silent):
                        channel.stats.errors += 1
                        channel.drop(
                            f"nothing heard for {silent:.1f} s ({misses} heartbeats "
                            "missed): the instance is paused or hung"
                            + (
                                ""
                                if channel.instance_id in self._busy_checks
                                else " (or its function holds the GIL in one long "
                                "C call: if so, raise heartbeat_misses)"
                            )
                        )
                        continue
                try:
                    beat.timestamp = now
                    channel.send(beat)
                except ChannelError:
                    continue

    def _busy(self, channel: Channel, silent: float) -> bool:
        check = self._busy_checks.get(channel.instance_id)
        if check is None or not check():
            return False
        # Its heartbeat thread cannot run: a C call holds the GIL, say.
        logger.info(
            "instance %s: nothing heard for %.1f s, but it is busy on a CPU",
            channel.instance_id,
            silent,
        )
        return True

    def set_busy_check(self, instance_id: str, check: Callable[[], bool]) -> None:
        """Let a silent channel of ``instance_id`` live on while ``check()`` says
        its peer is busy (the runtime can see its process run) rather than
        paused; without one, silence alone ends the channel."""
        self._busy_checks[instance_id] = check

    # -- channels made by runtimes (memory, grpc) ---------------------------------

    def set_connector(self, instance_id: str, connector: Connector) -> None:
        """Register how to (re)create the channel of an instance the host dials."""
        self._connectors[instance_id] = connector

    # -- the pool ----------------------------------------------------------------

    async def get_or_create_channel(self, instance_id: str) -> Channel:
        """Return the live pooled channel of an instance, replacing a dead one."""
        channel = self._pool.get(instance_id)
        if channel is not None and channel.connected:
            return channel
        if channel is not None:
            del self._pool[instance_id]
            self.stats.replaced += 1
        connector = self._connectors.get(instance_id)
        if connector is None:
            reason = channel.close_reason if channel is not None else "never connected"
            raise ChannelError(
                f"the channel to instance {instance_id} is gone ({reason}) and the "
                "instance cannot dial in again; it will be replaced"
            )
        fresh = await connector()
        fresh.on_lost(self._lost)
        self._pool[instance_id] = fresh
        self._history.append(fresh)
        return fresh

    def pooled(self, instance_id: str) -> Channel | None:
        return self._pool.get(instance_id)

    def release(self, instance_id: str) -> None:
        """Close and forget the channel of a stopped instance."""
        if self._expected.pop(instance_id, None) is not None:
            self._released.append(instance_id)
        self._connectors.pop(instance_id, None)
        self._busy_checks.pop(instance_id, None)
        self.close_lane(instance_id, "the instance was stopped")
        channel = self._pool.pop(instance_id, None)
        if channel is not None:
            channel.close()

    def channels(self) -> list[Channel]:
        """Every channel made in this session, live ones and closed ones."""
        return list(self._history)

    def auth_failures_for(self, instance_id: str) -> int:
        expected = self._expected.get(instance_id)
        return expected.auth_failures if expected is not None else 0

    def listener_addresses(self) -> dict[str, str]:
        return {kind: lst.address for kind, lst in self._listeners.items()}

    async def close(self) -> None:
        """Close every channel and listener."""
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        for instance_id in list(self._pool):
            self.release(instance_id)
        for listener in self._listeners.values():
            await listener.close()
        self._listeners.clear()


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on any more (left by a crash)."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        logger.warning("removing a stale socket file %s", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ConfigurationError(f"another process is already listening on {path}")


def _tried_first(reasons: list[str]) -> str:
    """The channel type named by the first of ``reasons`` ("kind: why")."""
    return reasons[0].split(":", 1)[0] if reasons else ""
