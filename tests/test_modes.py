"""Async mode (submit) and stream mode, on top of the same flow."""

from __future__ import annotations

import asyncio

import pytest

import spear_nb
from tests import _remote


def test_submit_returns_a_handle_with_the_result(session) -> None:
    session.register("inc", _remote.inc)
    handles = [session.submit("inc", i) for i in range(5)]
    assert [h.result(timeout=60) for h in handles] == [1, 2, 3, 4, 5]
    assert all(h.done() and h.status == "succeeded" for h in handles)
    modes = set(session.executions()["mode"])
    assert modes == {"async"}


def test_submit_carries_the_remote_error(session) -> None:
    handle = session.submit(_remote.explode_on_purpose, 3)
    with pytest.raises(spear_nb.RemoteError) as info:
        handle.result(timeout=60)
    assert info.value.remote_type == "ValueError"
    assert handle.status == "failed"


def test_cancel_a_submitted_call(session, ready) -> None:
    session.register("block", _remote.report_and_block)
    handle = session.submit("block", ready.port, "never")
    ready.wait()
    handle.cancel()
    with pytest.raises(spear_nb.ExecutionCancelled):
        handle.result(timeout=60)
    assert ready.wait_closed()  # the call stopped inside the instance
    assert handle.status == "cancelled"
    assert session.invoke("block", None, "next") == "next"


def test_await_a_handle(session) -> None:
    async def main() -> int:
        handle = await session.asubmit(_remote.inc, 10)
        return await handle

    assert asyncio.run(main()) == 11


def test_stream_yields_each_chunk(session) -> None:
    assert list(session.stream(_remote.count_up, 5)) == [0, 1, 4, 9, 16]
    (status,) = session.executions()["status"]
    assert status == "succeeded"
    assert session.executions()["mode"].tolist() == ["stream"]


def test_leaving_a_stream_early_cancels_it(session) -> None:
    session.register("numbers", _remote.numbers, max_instances=1)
    stream = session.stream("numbers")  # endless
    seen = []
    for chunk in stream:
        seen.append(chunk)
        if len(seen) == 3:
            break
    stream.close()  # what dropping the iterator does; it cancels the call
    assert seen == [0, 1, 2]
    # One instance only: this call gets it once the cancelled one has let go.
    assert list(session.stream("numbers", 4)) == [0, 1, 2, 3]
    assert session.executions()["status"].tolist() == ["cancelled", "succeeded"]


def test_astream(session) -> None:
    async def main() -> list[int]:
        return [c async for c in session.astream(_remote.count_up, 4)]

    assert asyncio.run(main()) == [0, 1, 4, 9]
