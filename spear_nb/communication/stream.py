"""Unix-socket and TCP channels: length-prefixed frames over a byte stream.

The host listens; each instance dials in and must authenticate with its first
message. Reading goes through :class:`asyncio.BufferedProtocol` into one
preallocated buffer, which avoids the per-read allocation of asyncio streams (the
largest cost of a round trip on small messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from spear_nb.communication.channel import Channel, ChannelState, ChannelType
from spear_nb.communication.protocol import (
    DEFAULT_MAX_FRAME,
    LENGTH,
    Message,
    MessageType,
    check_length,
    frame,
    unpack,
)
from spear_nb.communication.wire import CPU_SAMPLE, BusyPoll, current_cpu
from spear_nb.errors import ChannelError, ProtocolError

logger = logging.getLogger(__name__)

_INITIAL_BUFFER = 256 * 1024

# Called with (channel, instance_id, secret); returns the bootstrap payload for the
# auth response, or raises AuthenticationFailed.
Authenticator = Callable[["StreamChannel", str, str], bytes]


class StreamChannel(Channel, asyncio.BufferedProtocol):
    """A channel over one accepted Unix-socket or TCP connection."""

    def __init__(
        self,
        channel_type: ChannelType,
        authenticator: Authenticator,
        max_frame: int = DEFAULT_MAX_FRAME,
        on_auth_failure: Callable[[StreamChannel, str], None] | None = None,
    ) -> None:
        super().__init__()
        self.type = channel_type
        self.max_frame = max_frame
        self._authenticator = authenticator
        self._on_auth_failure = on_auth_failure
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray(_INITIAL_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self._authenticated = False
        self._outgoing: list[bytes] = []
        # Set by the authenticator when this connection is to become a direct
        # lane: it is then handed over as a plain socket instead of served here.
        self.detach: Callable[[socket.socket], None] | None = None
        self.quiet = False  # a refusal that is expected, logged at debug only
        self._spin: BusyPoll | None = None
        self._polls = 0
        self._tell_cpu = False  # the next request says which CPU the loop is on

    # -- asyncio.BufferedProtocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = transport.get_extra_info("peername")
            self.address = f"{peer[0]}:{peer[1]}" if peer else ""
        elif sock is not None:
            self.address = str(transport.get_extra_info("sockname") or "")

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._end == len(self._buffer):
            self._make_room()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        try:
            self._parse()
        except ProtocolError as exc:
            if not self._authenticated:
                self._reject(str(exc))
            else:
                self._protocol_violation(exc)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost ({exc})" if exc else "the instance closed it"
        self._transport = None
        self._set_lost(ChannelState.DISCONNECTED, reason)

    # -- framing -------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buffer
        while self._end - self._start >= LENGTH.size:
            (length,) = LENGTH.unpack_from(buf, self._start)
            check_length(length, self.max_frame)
            stop = self._start + LENGTH.size + length
            if stop > self._end:
                if stop - self._start > len(buf):
                    self._grow(stop - self._start)
                return
            body = self._view[self._start + LENGTH.size : stop]
            self._start = stop
            message = unpack(body)
            if self._authenticated:
                self._deliver(message, length + LENGTH.size)
            else:
                self._authenticate(message, length + LENGTH.size)
            if self._transport is None or self._transport.is_closing():
                return
        if self._start == self._end:
            self._start = self._end = 0

    def _make_room(self) -> None:
        pending = self._end - self._start
        if self._start > 0:
            self._buffer[:pending] = self._buffer[self._start : self._end]
            self._start, self._end = 0, pending
        else:
            self._grow(len(self._buffer) * 2)

    def _grow(self, needed: int) -> None:
        size = max(needed, len(self._buffer) * 2)
        pending = bytes(self._view[self._start : self._end])
        self._buffer = bytearray(size)
        self._buffer[: len(pending)] = pending
        self._view = memoryview(self._buffer)
        self._start, self._end = 0, len(pending)

    # -- auth ------------------------------------------------------------------------

    def _authenticate(self, message: Message, nbytes: int) -> None:
        if message.type is not MessageType.AUTH_REQUEST:
            self._reject(f"the first message was {message.type.name}, not AUTH_REQUEST")
            return
        instance_id = str(message.header("instance_id", ""))
        secret = str(message.header("secret", ""))
        self.instance_id = instance_id
        self.peer_info = {
            k: v for k, v in (message.headers or {}).items() if k != "secret"
        }
        try:
            bootstrap = self._authenticator(self, instance_id, secret)
        except ChannelError as exc:
            self._reject(str(exc))
            return
        if self.detach is not None:
            self._hand_over(message.request_id, self.detach)
            return
        self._authenticated = True
        self.state = ChannelState.CONNECTED
        self.stats.connected_at = time.time()
        self.stats.received(nbytes)
        reply = Message(MessageType.AUTH_RESPONSE, message.request_id, bootstrap)
        reply.headers = {"ok": True}
        self.stats.sent(self._write(reply))

    def _hand_over(self, rid: int, detach: Callable[[socket.socket], None]) -> None:
        """Accept the connection as a direct lane: stop reading it on the loop
        and pass a duplicate of its socket, with the auth reply sent, to
        ``detach``."""
        transport = self._transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        lane = socket.socket(fileno=os.dup(sock.fileno()))
        self._transport = None
        self.state = ChannelState.CLOSED
        self.close_reason = "handed over as a direct lane"
        transport.close()  # closes the loop's descriptor only; the duplicate lives
        reply = Message(MessageType.AUTH_RESPONSE, rid)
        reply.headers = {"ok": True}
        try:
            lane.settimeout(5.0)
            lane.sendall(frame(reply))
        except OSError as exc:
            logger.debug("a direct lane broke before it was used: %s", exc)
            lane.close()
            return
        detach(lane)

    def _reject(self, reason: str) -> None:
        self.stats.auth_failures += 1
        level = logging.DEBUG if self.quiet else logging.WARNING
        logger.log(level, "refused a %s connection: %s", self.type.value, reason)
        if self._on_auth_failure is not None:
            self._on_auth_failure(self, reason)
        if self._transport is not None and not self._transport.is_closing():
            reply = Message(MessageType.AUTH_RESPONSE, 0, reason.encode())
            reply.headers = {"ok": False}
            self._transport.write(frame(reply))
            self._transport.close()
        self.state = ChannelState.CLOSED
        self.close_reason = f"authentication failed: {reason}"

    # -- Channel -------------------------------------------------------------------

    def _write(self, message: Message) -> int:
        if self._tell_cpu and message.type is MessageType.EXECUTE_REQUEST:
            self._tell_cpu = False
            message.headers = {**(message.headers or {}), "cpu": current_cpu()}
        data = frame(message, self.max_frame)
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ChannelError(
                f"the {self.type.value} channel to instance {self.instance_id} "
                "is closed"
            )
        # Frames written during one turn of the loop leave in one system call:
        # with many calls in flight this saves a write (and a wake-up of the
        # instance) per frame; a lone call waits only for the end of the turn.
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(data)
        return len(data)

    def poll_for_reply(self, seconds: float) -> None:
        """Send what is queued now, then busy-poll the socket for up to
        ``seconds`` (less while that does not pay, see :class:`BusyPoll`).

        For a lone call on an idle loop: the reply then finds the loop awake,
        instead of a halted CPU that takes tens of microseconds to wake. The
        loop is blocked meanwhile, so callers use it only when nothing else
        is running.
        """
        if self._outgoing:
            self._flush()
        spin = self._spin
        if spin is None:
            transport = self._transport
            sock = transport.get_extra_info("socket") if transport else None
            if sock is None:
                return
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            spin = self._spin = BusyPoll(poller, seconds)
        self._polls += 1
        if not self._polls % CPU_SAMPLE:  # so that the instance polls elsewhere
            self._tell_cpu = True
        spin.wait()

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if len(outgoing) == 1:
            transport.write(outgoing[0])
        else:
            transport.write(b"".join(outgoing))

    def _close_transport(self) -> None:
        if self._transport is not None:
            if self._outgoing:
                # Frames queued this turn (a CLOSE message, say) go out first;
                # the transport sends what it holds before it closes.
                self._flush()
            self._transport.close()


class StreamListener:
    """A listening Unix socket or TCP port that instances dial into."""

    def __init__(
        self,
        channel_type: ChannelType,
        authenticator: Authenticator,
        max_frame: int = DEFAULT_MAX_FRAME,
        on_auth_failure: Callable[[StreamChannel, str], None] | None = None,
    ) -> None:
        self.type = channel_type
        self.max_frame = max_frame
        self._authenticator = authenticator
        self._on_auth_failure = on_auth_failure
        self._server: asyncio.AbstractServer | None = None
        self.path: str | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.accepted = 0
        self._inode: tuple[int, int] | None = None

    def _protocol(self) -> StreamChannel:
        self.accepted += 1
        return StreamChannel(
            self.type, self._authenticator, self.max_frame, self._on_auth_failure
        )

    async def start_unix(self, path: str) -> None:
        """Listen on a Unix socket at ``path`` (owner-only permissions)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._protocol, path, backlog=512)
        os.chmod(path, 0o600)
        info = os.stat(path)
        self._inode = (info.st_dev, info.st_ino)
        self.path = path

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on TCP ``host:port``; port 0 picks a free one."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, host, port, backlog=512, reuse_address=True
        )
        sock = self._server.sockets[0]
        self.host, self.port = sock.getsockname()[:2]

    @property
    def serving(self) -> bool:
        """Whether instances can still dial in: the server is open and, for a
        Unix socket, its file is still the one this listener made."""
        if self._server is None or not self._server.is_serving():
            return False
        return self.path is None or self._owns_file()

    @property
    def address(self) -> str:
        """Where instances dial: a socket path or ``host:port``."""
        return self.path if self.path is not None else f"{self.host}:{self.port}"

    def env(self) -> dict[str, Any]:
        """The environment an instance needs to find this listener."""
        if self.path is not None:
            return {"SPEAR_CHANNEL": "unix", "SPEAR_ADDRESS": self.path}
        return {"SPEAR_CHANNEL": "tcp", "SPEAR_ADDRESS": f"{self.host}:{self.port}"}

    async def close(self) -> None:
        """Stop listening and remove the socket file (if it is still this one's)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.path is not None and self._owns_file():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _owns_file(self) -> bool:
        """Whether the file at :attr:`path` is still the socket this listener made."""
        try:
            info = os.stat(self.path or "")
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self._inode
