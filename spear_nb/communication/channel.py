"""What every channel has: a type, a state, stats and request/response matching."""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from spear_nb.communication.protocol import Message, MessageType
from spear_nb.errors import ChannelError, ProtocolError, RemoteError

logger = logging.getLogger(__name__)

_channel_ids = itertools.count(1)


class ChannelType(str, enum.Enum):
    """The transport under a channel."""

    UNIX = "unix"
    TCP = "tcp"
    GRPC = "grpc"
    MEMORY = "memory"
    STDIO = "stdio"


class ChannelState(str, enum.Enum):
    """Where a channel is in its life. CONNECTED is the only state that serves."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


def percentile(values: deque[float] | list[float], q: float) -> float:
    """Return the ``q`` quantile (0..1) of ``values`` by nearest rank, or NaN."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class ChannelStats:
    """Traffic and latency counters of one channel."""

    def __init__(self) -> None:
        self.messages_sent = 0
        self.messages_received = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.errors = 0
        self.auth_failures = 0
        self.heartbeats_sent = 0
        self.heartbeats_received = 0
        self.direct_calls = 0  # calls made over the instance's direct lane instead
        self.connected_at: float | None = None
        self.last_activity: float | None = None
        self.round_trips: deque[float] = deque(maxlen=2048)

    def sent(self, nbytes: int) -> None:
        self.messages_sent += 1
        self.bytes_sent += nbytes
        self.last_activity = time.time()

    def received(self, nbytes: int) -> None:
        self.messages_received += 1
        self.bytes_received += nbytes
        self.last_activity = time.time()

    @property
    def rtt_mean(self) -> float:
        """Mean round trip in seconds over the recent window, NaN if none."""
        trips = self.round_trips
        return sum(trips) / len(trips) if trips else float("nan")

    @property
    def rtt_p99(self) -> float:
        """99th percentile round trip in seconds over the recent window."""
        return percentile(self.round_trips, 0.99)


StreamCallback = Callable[[Message], None]


class Channel:
    """An authenticated, message-oriented connection to one instance.

    Subclasses move bytes; this class numbers requests, matches responses to them,
    routes stream chunks and keeps the stats.
    """

    type: ChannelType = ChannelType.MEMORY

    def __init__(self, instance_id: str = "", address: str = "") -> None:
        self._channel_id = ""
        self.instance_id = instance_id
        self.address = address
        self.state = ChannelState.CONNECTING
        self.stats = ChannelStats()
        self.close_reason = ""
        self.fallback_from: str = ""
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._streams: dict[int, StreamCallback] = {}
        self._sent_at: dict[int, float] = {}
        # Requests answered after their caller stopped waiting (a cancel racing
        # the reply): there is nothing left to cancel in the instance.
        self._answered_late: set[int] = set()
        self._lost_callbacks: list[Callable[[Channel], None]] = []
        self._ready: asyncio.Future[None] | None = None
        self.expects_heartbeats = False  # the peer beats; silence means it is lost
        self.peer_info: dict[str, Any] = {}  # what the peer said of itself at auth

    @property
    def channel_id(self) -> str:
        """``ch-N``, numbered when first asked for: a connection that only opens
        a direct lane, and is never shown, takes no number."""
        if not self._channel_id:
            self._channel_id = f"ch-{next(_channel_ids)}"
        return self._channel_id

    # -- what subclasses provide -------------------------------------------------

    def _write(self, message: Message) -> int:
        """Send one message now; return the bytes put on the wire."""
        raise NotImplementedError

    def _close_transport(self) -> None:
        raise NotImplementedError

    # -- the interface the runtimes use ------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state is ChannelState.CONNECTED

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def next_request_id(self) -> int:
        return next(self._ids)

    def send(self, message: Message) -> None:
        """Send a message that expects no response (signals, heartbeats, close)."""
        self._ensure_connected()
        nbytes = self._write(message)
        if message.type is MessageType.HEARTBEAT:
            self.stats.heartbeats_sent += 1
        else:
            self.stats.sent(nbytes)

    def start_request(
        self, message: Message, on_stream: StreamCallback | None = None
    ) -> asyncio.Future[Message]:
        """Send a request and return the future of its response.

        The caller awaits the future and must call :meth:`forget` with the request id
        when it gives up on it (cancel or timeout).
        """
        self._ensure_connected()
        if not message.request_id:
            message.request_id = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        rid = message.request_id
        self._pending[rid] = future
        if on_stream is not None:
            self._streams[rid] = on_stream
        try:
            nbytes = self._write(message)
        except BaseException:
            self.forget(rid)
            raise
        self._sent_at[rid] = time.perf_counter()
        self.stats.sent(nbytes)
        return future

    async def request(
        self, message: Message, on_stream: StreamCallback | None = None
    ) -> Message:
        """Send a request and wait for its response."""
        future = self.start_request(message, on_stream)
        try:
            return await future
        finally:
            self.forget(message.request_id)

    def expect_ready(self) -> asyncio.Future[None]:
        """A future the instance completes once its function is loaded.

        It fails with :class:`RemoteError` if the instance could not load it.
        """
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            # Nobody may be left to await it (a start that was cancelled): its
            # failure is then reported elsewhere, not as "never retrieved".
            self._ready.add_done_callback(_retrieve)
        return self._ready

    def expect_reply(self, request_id: int, future: asyncio.Future[Message]) -> None:
        """Route the next response to ``request_id`` into ``future``."""
        self._pending[request_id] = future

    def forget(self, request_id: int) -> None:
        """Stop waiting for a request's response."""
        self._pending.pop(request_id, None)
        self._streams.pop(request_id, None)
        self._sent_at.pop(request_id, None)
        self._answered_late.discard(request_id)

    def answered(self, request_id: int) -> bool:
        """Whether the response to a request came after its caller gave up."""
        return request_id in self._answered_late

    def on_lost(self, callback: Callable[[Channel], None]) -> None:
        """Call ``callback(channel)`` once when the channel is lost or closed."""
        self._lost_callbacks.append(callback)

    def close(self, reason: str = "closed by the host") -> None:
        """Close the channel; pending requests fail with :class:`ChannelError`."""
        if self.state is ChannelState.CLOSED:
            return
        self._set_lost(ChannelState.CLOSED, reason)
        self._close_transport()

    # -- called by subclasses when bytes arrive or the link breaks ----------------

    def _deliver(self, message: Message, nbytes: int) -> None:
        kind = message.type
        if kind is MessageType.HEARTBEAT:
            self.stats.heartbeats_received += 1
            self.stats.last_activity = time.time()
            return
        self.stats.received(nbytes)
        rid = message.request_id
        if kind is MessageType.STREAM_DATA:
            callback = self._streams.get(rid)
            if callback is not None:
                callback(message)
            return
        if kind is MessageType.EXECUTE_RESPONSE or kind is MessageType.ERROR:
            future = self._pending.pop(rid, None)
            sent = self._sent_at.pop(rid, None)
            if sent is not None:
                self.stats.round_trips.append(time.perf_counter() - sent)
            self._streams.pop(rid, None)
            if future is not None and not future.done():
                future.set_result(message)
            elif future is not None:
                self._answered_late.add(rid)
            elif future is None and kind is MessageType.ERROR and rid == 0:
                self._resolve_ready(remote_error(message.payload))
            return
        if kind is MessageType.SIGNAL and rid == 0:
            if message.header("signal") == "ready":
                self._resolve_ready(None)
            return
        if kind is MessageType.CLOSE:
            return
        self.stats.errors += 1
        logger.warning(
            "channel %s got an unexpected %s message", self.channel_id, kind.name
        )

    def _resolve_ready(self, error: BaseException | None) -> None:
        ready = self._ready
        if ready is None:
            ready = self.expect_ready()
        if ready.done():
            return
        if error is None:
            ready.set_result(None)
        else:
            ready.set_exception(error)

    def drop(self, reason: str) -> None:
        """Mark the link lost (pending calls fail with ``reason``) and close it."""
        self._set_lost(ChannelState.DISCONNECTED, reason)
        self._close_transport()

    def _protocol_violation(self, exc: ProtocolError) -> None:
        self.stats.errors += 1
        logger.warning("channel %s dropped: %s", self.channel_id, exc)
        self._set_lost(ChannelState.DISCONNECTED, str(exc))
        self._close_transport()

    def _set_lost(self, state: ChannelState, reason: str) -> None:
        if self.state in (ChannelState.CLOSED, ChannelState.DISCONNECTED):
            return
        self.state = state
        self.close_reason = reason
        error = ChannelError(
            f"the {self.type.value} channel to instance {self.instance_id} was lost: "
            f"{reason}"
        )
        pending, self._pending = self._pending, {}
        self._streams.clear()
        self._sent_at.clear()
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
        callbacks, self._lost_callbacks = self._lost_callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                logger.exception("a channel-lost callback failed")

    def _ensure_connected(self) -> None:
        if self.state is not ChannelState.CONNECTED:
            reason = f" ({self.close_reason})" if self.close_reason else ""
            raise ChannelError(
                f"the {self.type.value} channel to instance {self.instance_id} is "
                f"{self.state.value}{reason}"
            )

    def describe(self) -> dict[str, Any]:
        """One row of ``Session.channels()``."""
        s = self.stats
        return {
            "channel_id": self.channel_id,
            "instance_id": self.instance_id,
            "type": self.type.value,
            "state": self.state.value,
            "address": self.address,
            "messages_sent": s.messages_sent,
            "messages_received": s.messages_received,
            "bytes_sent": s.bytes_sent,
            "bytes_received": s.bytes_received,
            "errors": s.errors,
            "auth_failures": s.auth_failures,
            "heartbeats_sent": s.heartbeats_sent,
            "heartbeats_received": s.heartbeats_received,
            "direct_calls": s.direct_calls,
            "in_flight": self.in_flight,
            "rtt_mean_ms": s.rtt_mean * 1e3,
            "rtt_p99_ms": s.rtt_p99 * 1e3,
            "connected_at": s.connected_at,
            "last_activity": s.last_activity,
            "fallback_from": self.fallback_from,
        }

    def __repr__(self) -> str:
        return (
            f"<Channel {self.channel_id} {self.type.value} to {self.instance_id} "
            f"{self.state.value}>"
        )


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def remote_error(payload: bytes) -> RemoteError:
    """Rebuild the error an instance reported (type, message, traceback)."""
    import msgpack

    try:
        info = msgpack.unpackb(payload, raw=False)
        kind = str(info.get("type", "Exception"))
        message = str(info.get("message", ""))
        text = str(info.get("traceback", ""))
        frames = info.get("frames")
        if isinstance(frames, list) and frames:
            text = _format_frames(frames, kind, message, text)
        return RemoteError(kind, message, text)
    except Exception:
        return RemoteError("Exception", payload.decode("utf-8", "replace"), "")


def _format_frames(frames: list[Any], kind: str, message: str, text: str) -> str:
    """Format a remote traceback, filling in source lines the instance lacked.

    A function defined in a notebook cell travels without its source, so the
    instance cannot show its lines; this kernel still has them in linecache.
    """
    import linecache

    if all(str(frame[3]) for frame in frames):
        return text
    chained, _, _ = text.rpartition("Traceback (most recent call last):")
    lines = [chained, "Traceback (most recent call last):\n"]
    for filename, lineno, name, line in frames:
        lines.append(f'  File "{filename}", line {lineno}, in {name}\n')
        source = str(line) or linecache.getline(str(filename), int(lineno)).strip()
        if source:
            lines.append(f"    {source}\n")
    lines.append(f"{kind}: {message}\n" if message else f"{kind}\n")
    return "".join(lines)
