"""The wire protocol: messages, frames and the frame decoder."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spear_nb import PayloadTooLarge, ProtocolError, SpearError
from spear_nb.communication.channel import remote_error
from spear_nb.communication.protocol import (
    LENGTH,
    VERSION,
    FrameDecoder,
    Message,
    MessageType,
    frame,
    pack,
    unpack,
)

# The autouse leak check is function-scoped; it needs no reset between examples.
fuzz = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def body(fields: list) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize("kind", list(MessageType))
def test_frame_unpack_roundtrip(kind: MessageType) -> None:
    message = Message(
        kind, 42, b"\x00payload\xff", {"status": "ok", "n": 3}, timestamp=12.5
    )
    data = frame(message)
    (length,) = LENGTH.unpack_from(data)
    assert length == len(data) - LENGTH.size
    back = unpack(data[LENGTH.size :])
    assert back.type is kind
    assert back.request_id == 42
    assert back.payload == b"\x00payload\xff"
    assert back.headers == {"status": "ok", "n": 3}
    assert back.timestamp == 12.5
    assert back.version == VERSION
    assert back.header("status") == "ok"
    assert back.header("missing", "d") == "d"


def test_message_without_headers_roundtrips() -> None:
    back = unpack(pack(Message(MessageType.HEARTBEAT)))
    assert back.headers is None
    assert back.header("x", 1) == 1
    assert back.payload == b""


def test_decoder_with_byte_by_byte_input() -> None:
    messages = [
        Message(MessageType.EXECUTE_REQUEST, i, bytes([i]) * i) for i in range(1, 6)
    ]
    stream = b"".join(frame(m) for m in messages)
    decoder = FrameDecoder()
    bodies: list[bytes] = []
    for i in range(len(stream)):
        bodies.extend(decoder.feed(stream[i : i + 1]))
    assert [unpack(b).request_id for b in bodies] == [1, 2, 3, 4, 5]
    assert [unpack(b).payload for b in bodies] == [m.payload for m in messages]
    assert decoder.pending == 0


def test_decoder_keeps_a_partial_frame_pending() -> None:
    data = frame(Message(MessageType.EXECUTE_REQUEST, 7, b"abcdef"))
    decoder = FrameDecoder()
    assert decoder.feed(data[:-2]) == []
    assert decoder.pending == len(data) - 2
    (done,) = decoder.feed(data[-2:] + data[:3])
    assert unpack(done).payload == b"abcdef"
    assert decoder.pending == 3


def test_oversized_length_is_refused_before_the_body() -> None:
    decoder = FrameDecoder(max_frame=1024)
    # Only the 4-byte length arrives: the refusal must not wait for the body.
    with pytest.raises(PayloadTooLarge, match="maximum frame size"):
        decoder.feed(LENGTH.pack(1025))
    # A frame of exactly the limit is fine.
    ok = FrameDecoder(max_frame=1024)
    assert ok.feed(LENGTH.pack(1024) + b"\x00" * 1024) == [b"\x00" * 1024]


def test_huge_length_is_refused_without_allocating() -> None:
    decoder = FrameDecoder(max_frame=1 << 20)
    with pytest.raises(PayloadTooLarge):
        decoder.feed(b"\xff\xff\xff\xff")


def test_frame_refuses_an_oversized_message() -> None:
    message = Message(MessageType.EXECUTE_REQUEST, 1, b"x" * 5000)
    with pytest.raises(PayloadTooLarge, match="maximum frame size"):
        frame(message, max_frame=4096)
    assert issubclass(PayloadTooLarge, ProtocolError)
    assert issubclass(ProtocolError, SpearError)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xc1", "not valid msgpack"),
        (b"\x93\x01", "not valid msgpack"),
        (msgpack.packb({"a": 1}), "array of 6"),
        (body([1, 1, 0, 0.0, b""]), "array of 6"),
        (body([1, 3, 0, 0.0, "text", None]), "payload must be bytes"),
        (body([1, 3, 0, 0.0, b"", [1]]), "headers"),
        (body([1, 3, "one", 0.0, b"", None]), "request id"),
        (body([1, 3, 0, "now", b"", None]), "timestamp"),
        (body([0, 3, 0, 0.0, b"", None]), "version"),
        (body(["1", 3, 0, 0.0, b"", None]), "version"),
    ],
)
def test_garbage_body_is_a_protocol_error(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        unpack(data)


@pytest.mark.parametrize("kind", [0, 10, 99, -1, "execute"])
def test_unknown_type_is_refused(kind: object) -> None:
    with pytest.raises(ProtocolError, match="unknown type"):
        unpack(body([VERSION, kind, 0, 0.0, b"", None]))


def test_newer_version_is_refused_with_advice() -> None:
    data = pack(Message(MessageType.HEARTBEAT, version=VERSION + 1))
    with pytest.raises(ProtocolError, match=f"version {VERSION + 1}") as info:
        unpack(data)
    assert "same spear_nb version" in str(info.value)


def test_remote_error_from_a_garbage_payload() -> None:
    err = remote_error(b"\xffnot msgpack")
    assert err.remote_type == "Exception"
    assert "not msgpack" in err.remote_message
    good = remote_error(
        msgpack.packb({"type": "KeyError", "message": "'k'", "traceback": "tb"})
    )
    assert (good.remote_type, good.remote_message, good.remote_traceback) == (
        "KeyError",
        "'k'",
        "tb",
    )


# -- fuzzing ---------------------------------------------------------------------


def _decode_all(chunks: list[bytes], max_frame: int) -> list[Message]:
    decoder = FrameDecoder(max_frame)
    out: list[Message] = []
    for chunk in chunks:
        for b in decoder.feed(chunk):
            out.append(unpack(b))
    return out


@fuzz
@given(st.lists(st.binary(max_size=300), max_size=12), st.sampled_from([16, 256, 4096]))
def test_fuzz_decoder_raises_only_protocol_errors(
    chunks: list[bytes], max_frame: int
) -> None:
    try:
        messages = _decode_all(chunks, max_frame)
    except ProtocolError:
        return
    for m in messages:
        assert isinstance(m.type, MessageType)
        assert isinstance(m.payload, bytes)


@fuzz
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=50))
def test_fuzz_well_framed_garbage_raises_only_protocol_errors(
    raw: bytes, cut: int
) -> None:
    data = LENGTH.pack(len(raw)) + raw
    chunks = [data[i : i + cut] for i in range(0, len(data), cut)]
    with contextlib.suppress(ProtocolError):
        _decode_all(chunks, 1 << 16)


_scalar = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_value = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=10,
)
_field_lists = st.one_of(
    st.lists(_value, min_size=6, max_size=6),
    st.tuples(
        st.sampled_from([1, 2, 0, True]),
        st.sampled_from([*range(-1, 11), True, "3"]),
        _value,
        _value,
        _value,
        _value,
    ).map(list),
    _value,
)


@fuzz
@given(_field_lists)
def test_fuzz_unpack_of_msgpack_values(fields: object) -> None:
    try:
        message = unpack(msgpack.packb(fields, use_bin_type=True))
    except ProtocolError:
        return
    assert isinstance(message.type, MessageType)
    assert isinstance(message.payload, bytes)
    assert isinstance(message.request_id, int)
    assert message.headers is None or isinstance(message.headers, dict)


@fuzz
@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(MessageType)),
            st.integers(min_value=0, max_value=2**32),
            st.binary(max_size=200),
        ),
        max_size=8,
    ),
    st.integers(min_value=1, max_value=64),
)
def test_fuzz_chunking_does_not_change_what_is_decoded(
    specs: list[tuple[MessageType, int, bytes]], cut: int
) -> None:
    messages = [Message(k, rid, payload, timestamp=1.0) for k, rid, payload in specs]
    stream = b"".join(frame(m) for m in messages)
    chunks = [stream[i : i + cut] for i in range(0, len(stream), cut)]
    decoded = _decode_all(chunks, 1 << 16)
    assert [(m.type, m.request_id, m.payload) for m in decoded] == specs
