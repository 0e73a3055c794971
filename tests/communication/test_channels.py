"""Issue 3: the same calls over unix, tcp and grpc; size limits on every channel;
wire faults; many calls in flight over one channel; stream mode.

Everything here runs real instances, sockets and gRPC. Faults from an
authenticated peer are sent to a real StreamListener of the test's own (the
session only lets its own agents authenticate); the parser fuzz at the end feeds
a StreamChannel through the asyncio protocol interface the event loop itself uses.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import queue
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spear_nb
from spear_nb.communication.channel import ChannelState, ChannelType
from spear_nb.communication.protocol import (
    LENGTH,
    VERSION,
    Message,
    MessageType,
    frame,
    pack,
    unpack,
)
from spear_nb.communication.stream import StreamChannel, StreamListener
from spear_nb.errors import AuthenticationFailed, ProtocolError
from tests import _remote
from tests._support import read_messages, rows, wait_until, warm_grpc

CHANNELS = ["unix", "tcp", "grpc"]
MAX = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def _grpc_process_state() -> None:
    warm_grpc()


@pytest.fixture
def small_frames() -> Iterator[spear_nb.Session]:
    """A session whose maximum frame is 1 MiB."""
    s = spear_nb.Session(stop_grace=0.5, execution_timeout=60, max_frame_size=MAX)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def gate() -> Iterator[str]:
    """A directory whose files open the gates of ``_remote.gated_square``."""
    path = tempfile.mkdtemp(prefix="gate-")
    try:
        yield path
    finally:
        # Never leave a call stuck at a gate (the directory lives in the test
        # run's private temp root, removed at the end of the run).
        for name in ("go", "release-0"):
            open(os.path.join(path, name), "w").close()


def _open(gate: str, name: str) -> None:
    open(os.path.join(gate, name), "w").close()


# -- the same function over every channel type --------------------------------------


def test_the_same_function_gives_the_same_results_over_every_channel(
    session,
) -> None:
    values = [
        0,
        -1,
        2**70,
        1.5,
        "naïve ☃",
        b"\x00\xff",
        [1, (2, 3)],
        {"k": frozenset({1, 2})},
        None,
    ]
    for kind in CHANNELS:
        session.register(f"ident_{kind}", _remote.identity, channel=kind)
        session.register(f"add_{kind}", _remote.add, channel=kind)
    results = {
        kind: [session.invoke(f"ident_{kind}", v) for v in values]
        + [session.invoke(f"add_{kind}", 2, b=3, scale=4)]
        for kind in CHANNELS
    }
    assert results["unix"] == [*values, 20]
    assert results["tcp"] == results["unix"]
    assert results["grpc"] == results["unix"]

    instances = session.instances()
    table = session.channels()
    for kind in CHANNELS:
        for name in (f"ident_{kind}", f"add_{kind}"):
            (instance,) = rows(instances, function=name).to_dict("records")
            assert instance["channel"] == kind
            (row,) = rows(table, instance_id=instance["instance_id"]).to_dict("records")
            assert row["type"] == kind, row
            assert row["state"] == "connected"
            assert row["fallback_from"] == ""
            calls = len(values) if name.startswith("ident") else 1
            assert row["messages_sent"] >= calls
            assert row["messages_received"] >= calls
            assert row["bytes_sent"] > 0 and row["bytes_received"] > 0
            assert row["rtt_mean_ms"] > 0
            assert row["errors"] == 0


# -- the maximum frame size, on every channel type -----------------------------------


def _request_body(payload: bytes) -> int:
    """The size of the execute request that carries ``invoke(f, payload)``.

    It mirrors how the host encodes a call: pickled ``(args, kwargs)`` in a
    message without headers (request ids stay below 128: one msgpack byte).
    """
    arguments = pickle.dumps(((payload,), {}), protocol=5)
    return len(pack(Message(MessageType.EXECUTE_REQUEST, 1, arguments)))


def _response_body(result: bytes) -> int:
    """The size of the execute response that carries ``result``."""
    body = pickle.dumps(result, protocol=5)
    return len(pack(Message(MessageType.EXECUTE_RESPONSE, 1, body, {"status": "ok"})))


def _largest(body_size) -> int:
    """The largest ``n`` for which a message with ``b'x' * n`` fits in MAX."""
    probe = MAX - 4096
    n = MAX - (body_size(b"x" * probe) - probe)
    assert body_size(b"x" * n) == MAX
    return n


def _assert_ours(error: BaseException) -> None:
    """A spear_nb size error, not a transport's text."""
    assert isinstance(error, spear_nb.PayloadTooLarge), repr(error)
    text = str(error)
    assert "maximum frame size" in text
    assert "RESOURCE_EXHAUSTED" not in text and "StatusCode" not in text
    cause = error.__cause__
    assert cause is None or isinstance(cause, spear_nb.SpearError), repr(cause)


@pytest.mark.parametrize("kind", CHANNELS)
def test_arguments_just_under_and_just_over_the_limit(small_frames, kind) -> None:
    s = small_frames
    s.register("size", _remote.echo_len, channel=kind)
    fits = _largest(_request_body)
    # A request of exactly max_frame_size bytes goes through.
    assert s.invoke("size", b"x" * fits) == fits
    # One byte more, or far more (past gRPC's own limit), is refused by spear_nb.
    for size in (fits + 1, 2 * MAX):
        with pytest.raises(spear_nb.PayloadTooLarge) as info:
            s.invoke("size", b"x" * size)
        _assert_ours(info.value)
        assert "max_frame_size" in str(info.value)  # says what to change
    # The same from the loop (submit), where a sync call may take a lane.
    with pytest.raises(spear_nb.PayloadTooLarge):
        s.submit("size", b"x" * (fits + 1)).result(timeout=60)
    with pytest.raises(spear_nb.InvalidArguments):  # cannot be pickled
        s.invoke("size", threading.Lock())
    # Nothing broke: the same instance serves the next call.
    assert s.invoke("size", b"abc") == 3
    (row,) = rows(s.instances(), function="size").to_dict("records")
    assert row["status"] == "ready" and row["channel"] == kind
    statuses = s.executions()["status"].tolist()
    assert statuses == ["succeeded", *["failed"] * 4, "succeeded"]
    # The instance never saw the refused calls; the function's count has them.
    assert (row["requests_total"], row["requests_failed"]) == (2, 0)
    assert row["active"] == 0
    task = s.tasks().set_index("function").loc["size"]
    assert (task["requests_total"], task["requests_failed"]) == (6, 4)


@pytest.mark.parametrize("kind", CHANNELS)
def test_results_just_under_and_just_over_the_limit(small_frames, kind) -> None:
    s = small_frames
    s.register("big", _remote.make_bytes, channel=kind)
    fits = _largest(_response_body)
    assert s.invoke("big", fits) == b"x" * fits
    for size in (fits + 1, 2 * MAX):
        with pytest.raises(spear_nb.PayloadTooLarge) as info:
            s.invoke("big", size)
        _assert_ours(info.value)
        assert "too large to send back" in str(info.value)
    assert s.invoke("big", 3) == b"xxx"
    (row,) = rows(s.instances(), function="big").to_dict("records")
    assert row["status"] == "ready" and row["requests_total"] == 4
    (channel,) = rows(s.channels(), instance_id=row["instance_id"]).to_dict("records")
    assert channel["state"] == "connected" and channel["type"] == kind


@pytest.mark.parametrize("kind", CHANNELS)
def test_a_streamed_chunk_over_the_limit(small_frames, kind) -> None:
    s = small_frames
    s.register("chunks", _remote.sized_chunks, channel=kind)
    seen: list[bytes] = []
    with pytest.raises(spear_nb.PayloadTooLarge) as info:
        for chunk in s.stream("chunks", [10, MAX // 2, MAX + 10, 5]):
            seen.append(chunk)
    _assert_ours(info.value)
    assert seen == [b"y" * 10, b"y" * (MAX // 2)]  # the chunks that fit came through
    assert list(s.stream("chunks", [3, 1])) == [b"yyy", b"y"]
    assert len(s.instances()) == 1
    assert s.executions()["status"].tolist() == ["failed", "succeeded"]


NOT_UTF8 = bytes(range(256)) * 10


@pytest.mark.parametrize("kind", CHANNELS)
def test_non_utf8_bytes_come_back_unchanged(session, kind) -> None:
    with pytest.raises(UnicodeDecodeError):
        NOT_UTF8.decode("utf-8")
    session.register("ident", _remote.identity, channel=kind)
    back = session.invoke("ident", NOT_UTF8)
    assert type(back) is bytes and back == NOT_UTF8
    session.register("chunks", _remote.byte_chunks, channel=kind)
    chunks = list(session.stream("chunks", NOT_UTF8, 100))  # stream data too
    assert len(chunks) == 26 and b"".join(chunks) == NOT_UTF8
    (row,) = rows(session.instances(), function="chunks").to_dict("records")
    assert row["channel"] == kind


def test_non_utf8_bytes_from_a_command_come_back_unchanged(session) -> None:
    session.register("cat", command=["cat"])
    back = session.invoke("cat", NOT_UTF8)
    assert type(back) is bytes and back == NOT_UTF8


# -- wire faults on the session's listener --------------------------------------------


def _dial(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    return sock


def _raw(fields: list) -> bytes:
    body = msgpack.packb(fields, use_bin_type=True)
    return LENGTH.pack(len(body)) + body


STRANGERS = {
    # One byte over the limit: refused from the length alone, no body sent.
    "length one over": (LENGTH.pack(MAX + 1), b"maximum frame size"),
    # Exactly the limit: the body is read, and it is garbage.
    "garbage body at the limit": (LENGTH.pack(MAX) + b"\xc1" * MAX, b"msgpack"),
    "not an array": (_raw({"a": 1}), b"6 fields"),
    "unknown type": (_raw([VERSION, 42, 0, 1.0, b"", None]), b"unknown type 42"),
    "newer version": (
        _raw([VERSION + 1, int(MessageType.AUTH_REQUEST), 0, 1.0, b"", None]),
        f"protocol version {VERSION + 1}".encode(),
    ),
}


def test_corrupt_frames_from_strangers_are_dropped_and_counted(
    small_frames, ready
) -> None:
    s = small_frames
    s.register("block", _remote.report_and_block)
    handle = s.submit("block", ready.port, "done")
    ready.wait()  # a call is running on a live channel meanwhile
    factory = s._manager.factory
    path = factory.listener_addresses()["unix"]
    before = factory.stats.auth_failures
    for name, (data, reason) in STRANGERS.items():
        with _dial(path) as sock:
            sock.sendall(data)
            replies = read_messages(sock, 2 * MAX)  # returns once the host closed it
        assert len(replies) == 1, name
        (reply,) = replies
        assert reply.type is MessageType.AUTH_RESPONSE and reply.header("ok") is False
        assert reason in reply.payload, (name, reply.payload)
    assert factory.stats.auth_failures == before + len(STRANGERS)
    refused = rows(s.events(), phase="auth_refused")
    assert len(refused) == len(STRANGERS)
    # The call that was running is untouched, on the same channel.
    ready.release()
    assert handle.result(timeout=30) == "done"
    (instance_id,) = s.instances()["instance_id"]
    (row,) = rows(s.channels(), instance_id=instance_id).to_dict("records")
    assert row["state"] == "connected" and row["errors"] == 0
    assert s.invoke("block", None, "next") == "next"
    assert len(s.instances()) == 1


# -- wire faults from an authenticated peer (a listener of our own) -----------------


class _Host:
    """A real StreamListener on a Unix socket, accepting one secret."""

    def __init__(self, max_frame: int = 4096, bootstrap: bytes = b"welcome") -> None:
        self.dir = tempfile.mkdtemp(prefix="sn-")
        self.path = os.path.join(self.dir, "h.sock")
        self.bootstrap = bootstrap
        self.channels: list[StreamChannel] = []
        self.arrivals: asyncio.Queue[StreamChannel] = asyncio.Queue()
        self.listener = StreamListener(
            ChannelType.UNIX, self._authenticate, max_frame=max_frame
        )

    def _authenticate(self, channel: StreamChannel, instance_id: str, secret: str):
        if secret != "s3cret":
            raise AuthenticationFailed("wrong secret")
        self.channels.append(channel)
        self.arrivals.put_nowait(channel)
        return self.bootstrap

    async def __aenter__(self) -> _Host:
        await self.listener.start_unix(self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for channel in self.channels:
            channel.close()
        await self.listener.close()
        os.rmdir(self.dir)


async def _read_frame(reader: asyncio.StreamReader) -> Message | None:
    try:
        header = await asyncio.wait_for(reader.readexactly(LENGTH.size), 10)
        (length,) = LENGTH.unpack(header)
        return unpack(await asyncio.wait_for(reader.readexactly(length), 10))
    except asyncio.IncompleteReadError:
        return None


async def _peer(host: _Host, instance_id: str):
    """Dial the host and authenticate; return (reader, writer, host channel)."""
    reader, writer = await asyncio.open_unix_connection(host.path)
    writer.write(
        frame(
            Message(
                MessageType.AUTH_REQUEST,
                0,
                headers={"instance_id": instance_id, "secret": "s3cret"},
            )
        )
    )
    reply = await _read_frame(reader)
    assert reply is not None and reply.header("ok") is True
    assert reply.payload == b"welcome"
    return reader, writer, host.channels[-1]


BAD_FROM_A_PEER = {
    "unknown type": (_raw([VERSION, 99, 1, 1.0, b"", None]), "unknown type 99"),
    "newer version": (
        _raw([VERSION + 1, int(MessageType.EXECUTE_RESPONSE), 1, 1.0, b"", None]),
        f"protocol version {VERSION + 1}",
    ),
    "corrupt length": (LENGTH.pack(4097), "maximum frame size"),
    "garbage body": (LENGTH.pack(3) + b"\xc1\xc1\xc1", "msgpack"),
}


@pytest.mark.parametrize("name", list(BAD_FROM_A_PEER))
def test_a_peer_breaking_the_protocol_is_dropped_with_a_clear_error(name) -> None:
    data, reason = BAD_FROM_A_PEER[name]

    async def main() -> None:
        async with _Host() as host:
            bad_reader, bad_writer, bad = await _peer(host, "bad-1")
            good_reader, good_writer, good = await _peer(host, "good-1")
            # A call is pending on the channel that is about to break.
            pending = bad.start_request(Message(MessageType.EXECUTE_REQUEST, 0, b"w"))
            request = await _read_frame(bad_reader)
            assert request is not None and request.payload == b"w"
            bad_writer.write(data)
            with pytest.raises(spear_nb.ChannelError) as info:
                await asyncio.wait_for(pending, 10)
            assert reason in str(info.value), str(info.value)
            assert "bad-1" in str(info.value)
            assert bad.state is ChannelState.DISCONNECTED
            assert reason in bad.close_reason
            assert bad.stats.errors == 1
            assert bad.describe()["errors"] == 1
            # The host closed the connection.
            assert await asyncio.wait_for(bad_reader.read(), 10) == b""
            # The other channel of the same listener still works, both ways.
            call = good.start_request(Message(MessageType.EXECUTE_REQUEST, 0, b"q"))
            seen = await _read_frame(good_reader)
            assert seen is not None
            good_writer.write(
                frame(
                    Message(
                        MessageType.EXECUTE_RESPONSE,
                        seen.request_id,
                        b"a",
                        {"status": "ok"},
                    )
                )
            )
            answer = await asyncio.wait_for(call, 10)
            assert answer.payload == b"a"
            assert good.connected and good.stats.errors == 0
            for writer in (bad_writer, good_writer):
                writer.close()
                await writer.wait_closed()

    asyncio.run(main())


def _agent_given_a_newer_version() -> tuple[int, bytes]:
    """Start a real agent against a listener of ours, send it a version-2 request,
    and return its exit code and stderr."""
    # The agent loads os.path:basename as its function.
    spec = msgpack.packb({"kind": "handler", "target": "os.path:basename"})

    async def main() -> tuple[int, bytes]:
        async with _Host(bootstrap=spec) as host:
            env = dict(os.environ)
            env.update(
                {
                    "SPEAR_CHANNEL": "unix",
                    "SPEAR_ADDRESS": host.path,
                    "SPEAR_INSTANCE_ID": "agent-1",
                    "SPEAR_SECRET": "s3cret",
                    "SPEAR_HEARTBEAT": "0",
                }
            )
            env.pop("SPEAR_HOST_PID", None)
            agent = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "spear_nb.agent",
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                channel = await asyncio.wait_for(host.arrivals.get(), 30)
                await asyncio.wait_for(asyncio.shield(channel.expect_ready()), 30)
                newer = Message(
                    MessageType.EXECUTE_REQUEST, 0, b"", version=VERSION + 1
                )
                channel.start_request(newer)
                assert agent.stderr is not None
                stderr = await asyncio.wait_for(agent.stderr.read(), 30)
                code = await asyncio.wait_for(agent.wait(), 30)
            finally:
                if agent.returncode is None:
                    agent.kill()
                    await agent.wait()
            return code, stderr

    return asyncio.run(main())


def test_an_agent_sent_a_newer_protocol_version_stops_and_says_why() -> None:
    """The agent side of a version mismatch: it stops, naming the versions, and
    does not hang or serve on."""
    code, stderr = _agent_given_a_newer_version()
    assert code != 0
    assert f"protocol version {VERSION + 1}".encode() in stderr, stderr
    assert b"install the same spear_nb version" in stderr


def test_an_agent_sent_a_newer_protocol_version_does_not_crash() -> None:
    _, stderr = _agent_given_a_newer_version()
    assert b"Traceback" not in stderr, stderr.decode()
    assert stderr.startswith(b"spear_nb agent: "), stderr.decode()


# -- many calls in flight over one channel -------------------------------------------


def _in_flight(s: spear_nb.Session) -> int:
    return int(s.channels()["in_flight"].sum())


@pytest.fixture
def wide() -> Iterator[spear_nb.Session]:
    s = spear_nb.Session(stop_grace=0.5, execution_timeout=60)
    try:
        yield s
    finally:
        s.close()


def test_1000_calls_in_flight_over_one_channel_from_asyncio(wide, gate) -> None:
    s = wide
    s.register("sq", _remote.gated_square, max_concurrency=1000, max_instances=1)
    s.scale("sq", 1)  # the instance is up before the burst

    async def main() -> tuple[list[int], list[int]]:
        handles = [await s.asubmit("sq", x, gate) for x in range(1000)]
        # Every call is on the wire at once before any may finish.
        assert wait_until(lambda: _in_flight(s) == 1000), _in_flight(s)
        finished: list[int] = []

        async def one(x: int) -> int:
            value = await handles[x]
            finished.append(x)
            return value

        tasks = [asyncio.create_task(one(x)) for x in range(1000)]
        _open(gate, "go")
        assert await asyncio.wait_for(tasks[1], 30) == 1
        _open(gate, "release-0")  # call 0 answers only after call 1 has
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return results, finished

    results, finished = asyncio.run(main())
    assert results == [x * x for x in range(1000)]
    assert sorted(finished) == list(range(1000))
    assert finished.index(1) < finished.index(0)  # replies came out of order
    assert len(s.instances()) == 1
    (row,) = s.channels().to_dict("records")
    assert row["in_flight"] == 0 and row["errors"] == 0
    assert row["messages_received"] >= 1000
    (total,) = s.instances()["requests_total"]
    assert total == 1000


def test_1000_calls_in_flight_over_one_channel_from_threads(wide, gate) -> None:
    s = wide
    s.register("sq", _remote.gated_square, max_concurrency=1000, max_instances=1)
    s.scale("sq", 1)
    barrier = threading.Barrier(10)

    def submit(first: int) -> list:
        barrier.wait(30)
        return [s.submit("sq", x, gate) for x in range(first, first + 100)]

    with ThreadPoolExecutor(10) as pool:
        batches = list(pool.map(submit, range(0, 1000, 100)))
    handles = [h for batch in batches for h in batch]
    assert wait_until(lambda: _in_flight(s) == 1000), _in_flight(s)
    _open(gate, "go")
    assert handles[1].result(timeout=30) == 1
    assert not handles[0].done()
    _open(gate, "release-0")

    def collect(batch: list) -> list[int]:
        return [h.result(timeout=60) for h in batch]

    with ThreadPoolExecutor(10) as pool:
        results = [v for part in pool.map(collect, batches) for v in part]
    assert results == [x * x for x in range(1000)]
    assert len(s.instances()) == 1
    assert set(s.executions()["status"]) == {"succeeded"}


def test_calls_queued_behind_a_cold_start_all_reach_the_new_instance(
    wide, gate
) -> None:
    s = wide
    s.register("sq", _remote.gated_square, max_concurrency=50, max_instances=1)
    handles = [s.submit("sq", x, gate) for x in range(2, 52)]  # cold: no instance yet
    try:
        assert wait_until(lambda: _in_flight(s) == 50, timeout=2), _in_flight(s)
    finally:
        _open(gate, "go")
    assert [h.result(timeout=60) for h in handles] == [x * x for x in range(2, 52)]


def test_pipelined_calls_return_the_right_results() -> None:
    # 64 in flight to the one instance, the other 1,936 wait in the queue.
    with spear_nb.Session(stop_grace=0.5, max_queue=4096) as s:
        s.register(
            "add", _remote.add, max_concurrency=64, max_instances=1, pipeline=True
        )
        s.scale("add", 1)

        async def main() -> list[int]:
            handles = await asyncio.gather(
                *(s.asubmit("add", x, b=1, scale=3) for x in range(2000))
            )
            return list(await asyncio.wait_for(asyncio.gather(*handles), 120))

        assert asyncio.run(main()) == [(x + 1) * 3 for x in range(2000)]
        assert len(s.instances()) == 1
        (row,) = s.tasks().to_dict("records")
        assert row["requests_ok"] == 2000 and row["max_concurrency"] == 64


# -- stream mode: chunks travel as they are produced ---------------------------------


def test_stream_chunks_arrive_as_they_are_produced(session, ready) -> None:
    session.register("steps", _remote.two_steps)
    got: queue.Queue[object] = queue.Queue()

    def consume() -> None:
        try:
            for chunk in session.stream("steps", ready.port):
                got.put(chunk)
            got.put("end")
        except BaseException as exc:  # reported to the test thread
            got.put(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        # Chunk 0 arrives while the function has not produced chunk 1: it is
        # blocked (it told us so) until we let it go.
        assert got.get(timeout=15) == 0
        ready.wait()
        assert got.empty()
        ready.release()
        assert got.get(timeout=15) == 1
        assert got.get(timeout=15) == "end"
    finally:
        ready.release()
        consumer.join(30)
    assert session.executions()["status"].tolist() == ["succeeded"]


def test_astream_chunks_arrive_as_they_are_produced(session, ready) -> None:
    session.register("steps", _remote.two_steps)

    async def main() -> tuple[object, list[object]]:
        chunks = session.astream("steps", ready.port)
        first = await asyncio.wait_for(chunks.__anext__(), 15)
        await asyncio.get_running_loop().run_in_executor(None, ready.wait)
        ready.release()
        rest = [c async for c in chunks]
        return first, rest

    assert asyncio.run(main()) == (0, [1])
    assert session.executions()["mode"].tolist() == ["stream"]


def test_executions_list_every_mode(session) -> None:
    session.register("inc", _remote.inc)
    session.register("count", _remote.count_up)
    assert session.invoke("inc", 1) == 2
    assert session.submit("inc", 2).result(timeout=30) == 3
    assert list(session.stream("count", 3)) == [0, 1, 4]

    async def main() -> tuple[int, list[int]]:
        value = await (await session.asubmit("inc", 3))
        return value, [c async for c in session.astream("count", 2)]

    assert asyncio.run(main()) == (4, [0, 1])
    table = session.executions()
    assert table["mode"].tolist() == ["sync", "async", "stream", "async", "stream"]
    assert table["function"].tolist() == ["inc", "inc", "count", "inc", "count"]
    assert set(table["status"]) == {"succeeded"}


# -- the frame parser of the socket channels, fuzzed ---------------------------------


class _Recording(StreamChannel):
    """A host-side socket channel that records what it delivers."""

    def __init__(self, max_frame: int) -> None:
        super().__init__(ChannelType.UNIX, lambda ch, i, s: b"", max_frame=max_frame)
        self.delivered: list[tuple[MessageType, int, bytes]] = []
        self.lost: asyncio.Future[None] | None = None

    def _deliver(self, message: Message, nbytes: int) -> None:
        self.delivered.append(
            (message.type, message.request_id, bytes(message.payload))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)


def _reference(data: bytes, max_frame: int) -> tuple[list, bool]:
    """Decode a byte stream frame by frame, as the protocol module defines it.

    Returns the messages decoded before the first violation, and whether there
    was one.
    """
    out = []
    pos = 0
    while len(data) - pos >= LENGTH.size:
        (length,) = LENGTH.unpack_from(data, pos)
        if length > max_frame:
            return out, True
        if len(data) - pos - LENGTH.size < length:
            break
        try:
            m = unpack(data[pos + LENGTH.size : pos + LENGTH.size + length])
        except ProtocolError:
            return out, True
        out.append((m.type, m.request_id, m.payload))
        pos += LENGTH.size + length
    return out, False


def _pattern(n: int, seed: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(min(n, 251))) * (n // 251 + 1)


_part = st.one_of(
    st.tuples(
        st.sampled_from(list(MessageType)),
        st.integers(min_value=0, max_value=2**40),
        st.one_of(
            st.integers(min_value=0, max_value=64),
            st.sampled_from([255, 4096, 65_536, 262_100, 262_144, 300_001]),
        ),
    ),
    st.binary(min_size=1, max_size=12),  # garbage (a bad length, a torn header...)
)


@settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(_part, max_size=8),
    st.lists(st.integers(min_value=1, max_value=400_000), max_size=10),
)
def test_fuzz_the_socket_channel_parser_against_the_protocol(parts, cuts) -> None:
    """Whatever the bytes and however they are split into reads, the channel
    delivers exactly the messages the protocol defines, then drops the link on
    the first violation, counting it, and never raises into the event loop."""
    max_frame = 1 << 20
    auth = frame(
        Message(
            MessageType.AUTH_REQUEST, 0, headers={"instance_id": "f", "secret": "x"}
        )
    )
    stream = bytearray()
    for i, part in enumerate(parts):
        if isinstance(part, bytes):
            stream += part
        else:
            kind, rid, size = part
            stream += frame(Message(kind, rid, _pattern(size, i), timestamp=1.0))
    stream = bytes(stream)
    expected, violated = _reference(stream, max_frame)

    async def feed() -> _Recording:
        loop = asyncio.get_running_loop()
        channel = _Recording(max_frame)
        channel.lost = loop.create_future()
        ours, theirs = socket.socketpair()
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: channel, ours)
            data = auth + stream
            sizes = cuts or [len(data) or 1]
            pos = i = 0
            while pos < len(data) and not transport.is_closing():
                chunk = data[pos : pos + sizes[i % len(sizes)]]
                i += 1
                while chunk and not transport.is_closing():
                    buffer = channel.get_buffer(-1)  # what the loop calls
                    n = min(len(buffer), len(chunk))
                    buffer[:n] = chunk[:n]
                    channel.buffer_updated(n)
                    pos += n
                    chunk = chunk[n:]
            state = channel.state
            transport.close()
            await asyncio.wait_for(channel.lost, 10)
            channel.state_before_close = state  # type: ignore[attr-defined]
        finally:
            theirs.close()
        return channel

    channel = asyncio.run(feed())
    assert channel.delivered == expected
    if violated:
        assert channel.state_before_close is ChannelState.DISCONNECTED
        assert channel.stats.errors == 1
    else:
        assert channel.state_before_close is ChannelState.CONNECTED
        assert channel.stats.errors == 0
