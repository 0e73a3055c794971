"""The gRPC channel: one long-lived bidirectional stream per instance.

The agent serves gRPC (a pod later, or a local process with ``channel="grpc"``);
the host dials it, opens the ``Agent.Connect`` stream and sends the auth request
first, with the instance secret and the function to load. Every frame carries one
msgpack message body, the same bytes a socket channel frames. Message size limits
are set explicitly on both ends, and sizes are checked before anything is sent, so
an oversized payload gets :class:`PayloadTooLarge`, never gRPC's own error text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

# spear_nb forks while gRPC's threads run (a command function's process, say);
# gRPC's fork handlers, when on, then only print that they skip. No process of
# spear_nb uses gRPC across a fork, so they stay off unless the user set them.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc  # reads the setting above when first imported
import grpc.aio

from spear_nb.communication._grpc import spear_pb2, spear_pb2_grpc
from spear_nb.communication.channel import Channel, ChannelState, ChannelType
from spear_nb.communication.protocol import (
    ENVELOPE_ALLOWANCE,
    Message,
    MessageType,
    check_length,
    pack,
    too_large,
    unpack,
)
from spear_nb.errors import AuthenticationFailed, ChannelError

logger = logging.getLogger(__name__)

_CLOSE = object()


def channel_options(max_frame: int) -> list[tuple[str, Any]]:
    """gRPC options for both ends: explicit size limits and quick reconnects."""
    limit = max_frame + ENVELOPE_ALLOWANCE
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.initial_reconnect_backoff_ms", 20),
        ("grpc.min_reconnect_backoff_ms", 20),
        ("grpc.max_reconnect_backoff_ms", 200),
    ]


class GrpcChannel(Channel):
    """A channel over one ``Agent.Connect`` stream that the host opened."""

    type = ChannelType.GRPC

    def __init__(self, instance_id: str, address: str, max_frame: int) -> None:
        super().__init__(instance_id, address)
        self.max_frame = max_frame
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._grpc: grpc.aio.Channel | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self.expects_heartbeats = True

    async def connect(self, secret: str, bootstrap: bytes, timeout: float) -> None:
        """Dial the agent, authenticate, and start reading the stream."""
        try:
            await self._connect(secret, bootstrap, timeout)
        except BaseException:
            await self._shutdown()
            raise

    async def _connect(self, secret: str, bootstrap: bytes, timeout: float) -> None:
        self._grpc = grpc.aio.insecure_channel(
            self.address, options=channel_options(self.max_frame)
        )
        try:
            await asyncio.wait_for(self._grpc.channel_ready(), timeout)
        except asyncio.TimeoutError:
            await self._grpc.close()
            raise ChannelError(
                f"no gRPC server answered at {self.address} within {timeout:g} s"
            ) from None
        stub = spear_pb2_grpc.AgentStub(self._grpc)
        self._call = stub.Connect(self._frames())
        auth = Message(MessageType.AUTH_REQUEST, 0, bootstrap)
        auth.headers = {"instance_id": self.instance_id, "secret": secret}
        self._outbox.put_nowait(pack(auth))
        try:
            reply = await asyncio.wait_for(self._read_one(), timeout)
        except (asyncio.TimeoutError, grpc.RpcError) as exc:
            await self._shutdown()
            raise ChannelError(
                f"the gRPC agent at {self.address} did not answer the auth request: "
                f"{_rpc_text(exc)}"
            ) from exc
        if reply is None or reply.type is not MessageType.AUTH_RESPONSE:
            await self._shutdown()
            raise ChannelError(f"the gRPC agent at {self.address} broke the protocol")
        if not reply.header("ok"):
            self.stats.auth_failures += 1
            await self._shutdown()
            raise AuthenticationFailed(
                f"the gRPC agent at {self.address} refused the secret: "
                + reply.payload.decode("utf-8", "replace")
            )
        self.state = ChannelState.CONNECTED
        self.stats.connected_at = time.time()
        self._reader = asyncio.get_running_loop().create_task(self._read_all())

    async def _frames(self) -> AsyncIterator[spear_pb2.Frame]:
        while True:
            body = await self._outbox.get()
            if body is _CLOSE:
                return
            yield spear_pb2.Frame(body=body)

    async def _read_one(self) -> Message | None:
        frame = await self._call.read()
        if frame is grpc.aio.EOF:
            return None
        return unpack(frame.body)

    async def _read_all(self) -> None:
        reason = "the agent ended the stream"
        try:
            while True:
                frame = await self._call.read()
                if frame is grpc.aio.EOF:
                    break
                body = frame.body
                check_length(len(body), self.max_frame + ENVELOPE_ALLOWANCE)
                self._deliver(unpack(body), len(body))
        except grpc.RpcError as exc:
            reason = f"gRPC error: {_rpc_text(exc)}"
        except asyncio.CancelledError:
            reason = "closed by the host"
        except Exception as exc:  # a protocol violation: drop the stream
            self.stats.errors += 1
            reason = str(exc)
        self._set_lost(ChannelState.DISCONNECTED, reason)
        await self._shutdown()

    def _write(self, message: Message) -> int:
        if self.state is not ChannelState.CONNECTED:
            raise ChannelError(
                f"the grpc channel to instance {self.instance_id} is closed"
            )
        body = pack(message)
        if len(body) > self.max_frame:
            raise too_large(message, len(body), self.max_frame)
        self._outbox.put_nowait(body)
        return len(body)

    def _close_transport(self) -> None:
        self._outbox.put_nowait(_CLOSE)
        loop = asyncio.get_running_loop()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        else:
            self._closing = loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        # Dropped, not only cancelled: gRPC keeps its poller thread while any
        # call or channel object of it lives (this channel outlives its stream
        # in the session's channel history).
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        if self._grpc is not None:
            grpc_channel, self._grpc = self._grpc, None
            with contextlib.suppress(Exception):
                await grpc_channel.close()


def _rpc_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else ""
        return f"{getattr(code, 'name', code)}: {details}"
    return f"{type(exc).__name__}: {exc}"
