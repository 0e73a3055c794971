"""The memory channel: for instances that live inside the host process.

A WebAssembly instance runs on a worker thread of the session's own process, so
nothing needs encoding or a socket. The channel is a pair of queues: requests go
into the instance's inbox (a thread-safe queue its worker reads), responses come
back through the event loop's thread-safe callback queue. Request matching, round
trips and traffic counters are :class:`Channel`'s, exactly as for the socket
channels; bytes count payload bytes, since no envelope is ever encoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

from spear_nb.communication.channel import Channel, ChannelState, ChannelType
from spear_nb.communication.protocol import Message
from spear_nb.errors import ChannelError


class Inbox(Protocol):
    """Where the instance side takes requests from (``queue.SimpleQueue`` fits)."""

    def put(self, item: tuple[MemoryChannel, Message]) -> None: ...


class MemoryChannel(Channel):
    """A channel to an instance in this process, connected from the start.

    ``inbox`` receives ``(channel, message)`` for every message the host sends;
    the instance answers from any thread with :meth:`reply`.
    """

    type = ChannelType.MEMORY

    def __init__(
        self,
        instance_id: str,
        inbox: Inbox,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(instance_id, f"memory:{instance_id}")
        self._inbox: Inbox | None = inbox
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self.state = ChannelState.CONNECTED
        self.stats.connected_at = time.time()

    def _write(self, message: Message) -> int:
        inbox = self._inbox
        if inbox is None:
            raise ChannelError(
                f"the memory channel to instance {self.instance_id} is closed"
            )
        inbox.put((self, message))
        return len(message.payload)

    def _close_transport(self) -> None:
        self._inbox = None

    def reply(self, message: Message) -> None:
        """Send a response to the host; safe to call from any thread."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
            self._loop.call_soon_threadsafe(self._arrived, message)

    def _arrived(self, message: Message) -> None:
        if self.state is ChannelState.CONNECTED:
            self._deliver(message, len(message.payload))
