"""The memory channel on its own: request matching, stats and close, with a real
worker thread answering from its inbox."""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

import pytest

from spear_nb.communication.channel import ChannelState, ChannelType
from spear_nb.communication.memory import MemoryChannel
from spear_nb.communication.protocol import Message, MessageType
from spear_nb.errors import ChannelError


class Instance:
    """An instance side that answers requests in reverse order of arrival."""

    def __init__(self, batch: int) -> None:
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.batch = batch
        self.replied = threading.Event()
        self.thread = threading.Thread(target=self._main)
        self.thread.start()

    def _main(self) -> None:
        held: list[tuple[MemoryChannel, Message]] = []
        while True:
            item = self.inbox.get()
            if item is None:
                return
            held.append(item)
            if len(held) == self.batch:
                for channel, message in reversed(held):
                    reply = Message(
                        MessageType.EXECUTE_RESPONSE,
                        message.request_id,
                        message.payload.upper(),
                    )
                    channel.reply(reply)
                held.clear()
                self.replied.set()

    def put(self, item: tuple[MemoryChannel, Message]) -> None:
        self.inbox.put(item)

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join()


def test_requests_are_matched_and_counted() -> None:
    instance = Instance(batch=3)

    async def main() -> None:
        channel = MemoryChannel("mem-1", instance)
        assert channel.type is ChannelType.MEMORY
        assert channel.connected
        payloads = [b"one", b"three", b"seven"]
        replies = await asyncio.gather(
            *(
                channel.request(Message(MessageType.EXECUTE_REQUEST, 0, p))
                for p in payloads
            )
        )
        assert [r.payload for r in replies] == [p.upper() for p in payloads]
        stats = channel.stats
        assert stats.messages_sent == stats.messages_received == 3
        assert stats.bytes_sent == stats.bytes_received == 13
        assert len(stats.round_trips) == 3
        assert channel.in_flight == 0
        row = channel.describe()
        assert row["type"] == "memory"
        assert row["address"] == "memory:mem-1"

    try:
        asyncio.run(main())
    finally:
        instance.stop()


def test_close_fails_pending_requests_and_refuses_new_ones() -> None:
    instance = Instance(batch=2)

    async def main() -> None:
        channel = MemoryChannel("mem-2", instance)
        pending = channel.start_request(Message(MessageType.EXECUTE_REQUEST, 0, b"a"))
        channel.close()
        assert channel.state is ChannelState.CLOSED
        with pytest.raises(ChannelError, match="was lost"):
            await pending
        with pytest.raises(ChannelError):
            channel.start_request(Message(MessageType.EXECUTE_REQUEST, 0, b"b"))
        # a late answer from the instance side is dropped, not delivered: the
        # executor's wake-up is queued on the loop after the answer, so once it
        # is back the answer has been handled
        instance.put((channel, Message(MessageType.EXECUTE_REQUEST, 9, b"late")))
        await asyncio.get_running_loop().run_in_executor(None, instance.replied.wait)
        assert channel.stats.messages_received == 0
        assert not channel.stats.round_trips

    try:
        asyncio.run(main())
    finally:
        instance.stop()
