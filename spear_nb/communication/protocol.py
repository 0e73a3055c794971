"""The wire protocol every channel carries.

A message is a msgpack array ``[version, type, request_id, timestamp, payload,
headers]``: ``payload`` is bytes, ``headers`` a small map (or nil). On byte streams
(Unix sockets, TCP) each message travels as a frame: a 4-byte big-endian unsigned
length, then that many bytes of msgpack. The length is checked against the maximum
frame size before the body is read, so an oversized or corrupt length never makes
the reader allocate it.

This module imports only the standard library and msgpack: the agent imports it
before anything else, and its start-up time counts in every cold start.
"""

from __future__ import annotations

import enum
import struct
import threading
import time
from typing import Any

import msgpack

from spear_nb.errors import PayloadTooLarge, ProtocolError

VERSION = 1
LENGTH = struct.Struct(">I")
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
# The frame body carries the payload plus a little envelope.
ENVELOPE_ALLOWANCE = 1024


class MessageType(enum.IntEnum):
    """What a message is for."""

    AUTH_REQUEST = 1
    AUTH_RESPONSE = 2
    EXECUTE_REQUEST = 3
    EXECUTE_RESPONSE = 4
    SIGNAL = 5
    HEARTBEAT = 6
    ERROR = 7
    STREAM_DATA = 8
    CLOSE = 9


_TYPES = {int(t): t for t in MessageType}


class Message:
    """One protocol message; see the module docstring for the layout."""

    __slots__ = ("headers", "payload", "request_id", "timestamp", "type", "version")

    def __init__(
        self,
        type: MessageType,
        request_id: int = 0,
        payload: bytes = b"",
        headers: dict[str, Any] | None = None,
        timestamp: float | None = None,
        version: int = VERSION,
    ) -> None:
        self.type = type
        self.request_id = request_id
        self.payload = payload
        self.headers = headers
        self.timestamp = time.time() if timestamp is None else timestamp
        self.version = version

    def header(self, key: str, default: Any = None) -> Any:
        """Return one header, or ``default`` when the message has none by that key."""
        return default if self.headers is None else self.headers.get(key, default)

    def __repr__(self) -> str:
        return (
            f"Message({self.type.name}, request_id={self.request_id}, "
            f"payload={len(self.payload)} bytes, headers={self.headers!r})"
        )


_packers = threading.local()  # a Packer per thread: making one per call costs more


def pack(message: Message) -> bytes:
    """Encode a message body (without the length prefix)."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    try:
        return packer.pack(
            [
                message.version,
                int(message.type),
                message.request_id,
                message.timestamp,
                message.payload,
                message.headers,
            ]
        )
    except BaseException:
        packer.reset()  # a failed pack may leave part of the message buffered
        raise


def frame(message: Message, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Encode a message as one length-prefixed frame, refusing oversized ones."""
    body = pack(message)
    if len(body) > max_frame:
        raise too_large(message, len(body), max_frame)
    return LENGTH.pack(len(body)) + body


def too_large(message: Message, nbytes: int, max_frame: int) -> PayloadTooLarge:
    """The error for a message of ``nbytes`` over the frame limit, on any channel."""
    return PayloadTooLarge(
        f"the {message.type.name.lower()} message is {nbytes:,} bytes "
        f"({_size(nbytes)}), more than the maximum frame size of {max_frame:,} "
        f"bytes ({_size(max_frame)}); send less data per call or raise "
        "max_frame_size in the session's configuration"
    )


def unpack(body: bytes | memoryview) -> Message:
    """Decode and validate one message body."""
    try:
        fields = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"a frame body is not valid msgpack ({exc})") from exc
    if not isinstance(fields, list) or len(fields) != 6:
        raise ProtocolError("a message must be a msgpack array of 6 fields")
    version, kind, request_id, timestamp, payload, headers = fields
    if not isinstance(version, int) or version < 1:
        raise ProtocolError(f"a message has an invalid version {version!r}")
    if version > VERSION:
        raise ProtocolError(
            f"a peer speaks protocol version {version}, this side only {VERSION}; "
            "install the same spear_nb version on both sides"
        )
    message_type = _TYPES.get(kind) if isinstance(kind, int) else None
    if message_type is None:
        raise ProtocolError(f"a message has an unknown type {kind!r}")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise ProtocolError(f"a message has an invalid request id {request_id!r}")
    if not isinstance(timestamp, (int, float)):
        raise ProtocolError(f"a message has an invalid timestamp {timestamp!r}")
    if not isinstance(payload, bytes):
        raise ProtocolError("a message payload must be bytes")
    if headers is not None and not isinstance(headers, dict):
        raise ProtocolError("message headers must be a map or nil")
    return Message(
        message_type, request_id, payload, headers, float(timestamp), version
    )


def check_length(length: int, max_frame: int) -> None:
    """Refuse a frame length before its body is read."""
    if length > max_frame:
        raise PayloadTooLarge(
            f"a peer announced a frame of {_size(length)}, more than the maximum "
            f"frame size of {_size(max_frame)}; the connection is dropped"
        )


class FrameDecoder:
    """Split a byte stream into message bodies.

    ``feed`` takes any chunk of the stream and returns the complete message bodies
    it finished. A length over ``max_frame`` raises :class:`PayloadTooLarge` before
    any of that body is buffered.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` and return the bodies completed by it."""
        self._buffer += data
        bodies: list[bytes] = []
        while len(self._buffer) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self._buffer)
            check_length(length, self.max_frame)
            end = LENGTH.size + length
            if len(self._buffer) < end:
                break
            bodies.append(bytes(self._buffer[LENGTH.size : end]))
            del self._buffer[:end]
        return bodies

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole frame."""
        return len(self._buffer)


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} bytes"
