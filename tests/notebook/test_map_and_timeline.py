"""Session.map (order, bounds, progress, errors) and Session.timeline."""

from __future__ import annotations

import asyncio
import re

import pytest

import spear_nb
from spear_nb.notebook.timeline import COLOURS, Timeline
from tests.notebook import _functions


def test_map_returns_results_in_input_order(session) -> None:
    session.register("square", _functions.square, max_instances=3)
    results = session.map("square", range(12), progress=False)
    assert results == [x * x for x in range(12)]
    # The default bound is the capacity: three calls at once, three instances.
    instances = session.instances()
    assert len(instances) == 3
    assert instances["requests_total"].sum() == 12


def test_map_of_a_single_value_says_it_takes_an_iterable(session) -> None:
    session.register("square", _functions.square)
    with pytest.raises(spear_nb.InvalidArguments, match="takes an iterable of inputs"):
        session.map("square", 5, progress=False)
    with pytest.raises(spear_nb.InvalidArguments, match="map\\(f, \\[x\\]\\)"):
        asyncio.run(session.amap("square", 5, progress=False))
    with pytest.raises(spear_nb.InvalidArguments, match="one call per byte"):
        session.map("square", b"abc", progress=False)
    assert session.map("square", [5], progress=False) == [25]


def test_map_respects_max_in_flight(session) -> None:
    session.register("square", _functions.square, max_instances=4)
    assert session.map("square", [1, 2, 3, 4, 5], max_in_flight=1) == [1, 4, 9, 16, 25]
    assert len(session.instances()) == 1
    with pytest.raises(spear_nb.ConfigurationError):
        session.map("square", [1], max_in_flight=0)
    assert session.map("square", [], progress=True) == []


def test_map_registers_a_callable_and_shows_progress(session, capsys) -> None:
    assert session.map(_functions.square, [3, 4]) == [9, 16]
    err = capsys.readouterr().err
    assert "square" in err and "2/2" in err
    assert session.functions == ["square"]


def test_map_raises_the_first_error_and_runs_nothing_after_it(session) -> None:
    session.register("fail_on_three", _functions.fail_on_three)
    with pytest.raises(spear_nb.RemoteError) as info:
        session.map("fail_on_three", range(10), max_in_flight=1, progress=False)
    assert "three is not allowed" in str(info.value)
    executions = session.executions()
    assert executions["status"].tolist() == ["succeeded"] * 3 + ["failed"]


def test_map_cancels_calls_in_flight_after_an_error(session, ready) -> None:
    session.register("block_or_fail", _functions.block_or_fail)
    inputs = [("block", ready.port), ("fail", 1), ("block", ready.port)]
    with pytest.raises(spear_nb.RemoteError):
        session.map("block_or_fail", inputs, max_in_flight=2, progress=False)
    statuses = session.executions().set_index("execution_id")["status"]
    assert statuses.to_dict() == {"ex-1": "cancelled", "ex-2": "failed"}
    # The session carries on.
    assert (
        session.map("block_or_fail", [("fail", 2)], return_exceptions=True)[
            0
        ].remote_type
        == "ValueError"
    )


def test_map_return_exceptions_keeps_every_result(session) -> None:
    results = session.map(
        _functions.fail_on_three, range(6), return_exceptions=True, progress=False
    )
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]
    assert isinstance(results[3], spear_nb.RemoteError)
    assert results[3].remote_type == "ValueError"


def test_amap_is_the_coroutine_twin(session) -> None:
    session.register("square", _functions.square, max_instances=2)

    async def main() -> list[int]:
        return await session.amap("square", [5, 6, 7], progress=False)

    assert asyncio.run(main()) == [25, 36, 49]


def test_timeline_of_one_execution(session) -> None:
    session.invoke(_functions.square, 3)
    timeline = session.timeline("ex-1")
    assert isinstance(timeline, Timeline)
    assert len(timeline) == 1
    frame = timeline.to_frame()
    assert frame["phase"].tolist() == [
        "request",
        "artifact",
        "task",
        "instance",
        "channel",
        "execute",
    ]
    assert (frame["duration_ms"] >= 0).all()
    assert frame["start_ms"].is_monotonic_increasing

    html = timeline._repr_html_()
    assert html.count("<svg") == 1
    for colour in COLOURS.values():  # a bar segment per step of the flow
        assert f'fill="{colour}"' in html
    assert "var(--jp-" in html
    text = repr(timeline)
    assert "ex-1 square succeeded" in text and "square-1 (new)" in text
    assert "artifact/task" in text


def test_timeline_stacks_executions(session) -> None:
    session.register("square", _functions.square, max_instances=2)
    session.map("square", range(4), progress=False)
    timeline = session.timeline()
    assert [r.execution_id for r in timeline.rows] == ["ex-1", "ex-2", "ex-3", "ex-4"]
    assert timeline.align == "time"  # the calls overlapped
    html = timeline._repr_html_()
    assert len(re.findall(r'class="spear-nb-timeline-row"', html)) == 4

    session.invoke("square", 9)
    one_by_one = session.timeline(session.executions().tail(1))
    assert [r.execution_id for r in one_by_one.rows] == ["ex-5"]
    assert session.timeline(["ex-1", "ex-5"], align="start").align == "start"


def test_timeline_takes_handles_and_shows_failures(session) -> None:
    handle = session.submit(_functions.fail_on_three, 3)
    with pytest.raises(spear_nb.RemoteError):
        handle.result(timeout=30)
    timeline = session.timeline(handle)
    row = timeline.rows[0]
    assert row.status == "failed"
    assert row.segments[-1].phase == "execute"
    assert "failed" in timeline._repr_html_()
    with pytest.raises(spear_nb.FunctionNotFound):
        session.timeline("ex-999")
    with pytest.raises(spear_nb.ConfigurationError):
        session.timeline(align="sideways")


def test_timeline_of_a_running_call_has_an_open_segment(session, ready) -> None:
    session.register("block", _functions.block_or_fail)
    handle = session.submit("block", ("block", ready.port))
    ready.wait()
    row = session.timeline(handle).rows[0]
    assert row.status == "running"
    assert row.segments[-1].phase == "execute" and row.segments[-1].running
    ready.release()
    handle.result(timeout=30)
    assert not session.timeline(handle).rows[0].segments[-1].running
