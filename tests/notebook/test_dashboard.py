"""The live dashboard: refreshes from the session loop, controls, closing."""

from __future__ import annotations

import threading

import pytest

import spear_nb
from spear_nb.notebook.dashboard import Dashboard
from tests.notebook import _functions


@pytest.fixture
def dash(session):
    board = session.dashboard(interval=0.05)
    try:
        yield board
    finally:
        board.close()


def test_dashboard_is_a_cached_widget(session, dash) -> None:
    import ipywidgets

    assert isinstance(dash, Dashboard)
    assert isinstance(dash, ipywidgets.VBox)
    assert session.dashboard() is dash  # built once per session
    assert session.dashboard(interval=0.5) is dash
    assert dash.interval == 0.5
    with pytest.raises(spear_nb.ConfigurationError):
        dash.interval = 0
    dash.interval_picker.value = 0.25  # as the front end does
    assert dash.interval == 0.25


def test_values_change_after_invokes_without_being_asked(session, dash) -> None:
    session.register("square", _functions.square)
    assert "No instances yet" in dash.views["instances"].value
    for x in range(3):
        assert session.invoke("square", x) == x * x

    # No explicit refresh: the dashboard's own task picks the calls up.
    assert dash.wait_for(
        lambda: (
            'data-instance="square-1"' in dash.views["instances"].value
            and dash.snapshot.executions == 3
        ),
        timeout=30,
    )
    row = dash.snapshot.instances[0]
    assert row["requests_total"] == 3
    assert 'data-execution="ex-3"' in dash.views["timeline"].value
    assert 'data-function="square"' in dash.views["tasks"].value
    channel_id = session.channels()["channel_id"].iloc[0]
    assert f">{channel_id}<" in dash.views["channels"].value

    before = dash.views["instances"].value
    session.invoke("square", 4)
    dash.refresh()
    assert dash.views["instances"].value != before
    assert dash.snapshot.instances[0]["requests_total"] == 4


def test_refreshes_run_on_the_session_loop_while_the_caller_waits(
    session, dash, ready
) -> None:
    session.register("block", _functions.block_or_fail)
    threads: list[str] = []
    dash.views["header"].observe(
        lambda _: threads.append(threading.current_thread().name), "value"
    )
    handle = session.submit("block", ("block", ready.port))
    ready.wait()
    # The call is in flight: the dashboard shows it without any call from here.
    assert dash.wait_for(lambda: dash.snapshot.running == 1, timeout=30)
    ready.release()
    assert handle.result(timeout=30) == ready.port
    assert dash.wait_for(lambda: dash.snapshot.running == 0, timeout=30)
    assert threads and all(name.startswith("spear_nb-") for name in threads)


def test_unchanged_views_send_nothing(session, dash) -> None:
    session.invoke(_functions.square, 2)
    dash.refresh()
    changes: list[object] = []
    dash.views["instances"].observe(changes.append, "value")
    dash.views["tasks"].observe(changes.append, "value")
    for _ in range(3):
        dash.refresh()
    assert changes == []


def test_pause_stops_updates_and_resume_restarts_them(session, dash) -> None:
    session.register("square", _functions.square)
    dash.refresh()
    dash.pause_button.value = True  # as a click in the front end does
    assert dash.paused
    assert dash.pause_button.description == "Resume"
    ticks = dash.ticks
    # Two ticks: a refresh running as the button was pressed has finished.
    assert dash.wait_for(lambda: dash.ticks >= ticks + 2)
    refreshes = dash.refreshes
    frozen = dash.views["instances"].value

    session.invoke("square", 3)
    ticks = dash.ticks
    assert dash.wait_for(lambda: dash.ticks >= ticks + 3)
    assert dash.refreshes == refreshes
    assert dash.views["instances"].value == frozen
    assert "paused" in dash.views["header"].value

    dash.pause_button.value = False
    assert dash.wait_for(
        lambda: 'data-instance="square-1"' in dash.views["instances"].value
    )
    assert dash.refreshes > refreshes


def test_close_stops_the_refresh_task_and_leaves_no_thread(session) -> None:
    threads_before = set(threading.enumerate())
    log = session._manager.events
    board = session.dashboard(interval=0.05)
    assert board.refreshing
    assert len(log._execution_listeners) == 1
    board.close()

    assert board.closed
    assert not board.refreshing
    assert log._execution_listeners == []
    assert set(threading.enumerate()) <= threads_before
    refreshes = board.refreshes
    session.invoke(_functions.square, 5)
    assert board.refreshes == refreshes
    # A closed dashboard is not reused.
    fresh = session.dashboard(interval=0.05)
    assert fresh is not board and fresh.refreshing
    fresh.close()


def test_closing_the_session_stops_the_dashboard() -> None:
    with spear_nb.Session(stop_grace=0.5) as s:
        board = s.dashboard(interval=0.05)
        s.invoke(_functions.square, 1)
    assert not board.refreshing
    assert "closed" in board.views["header"].value
    assert board.scale_up.disabled and board.stop_button.disabled
    with pytest.raises(spear_nb.SessionClosed):
        s.dashboard()
    board.close()


def test_scale_controls(session, dash) -> None:
    session.register("square", _functions.square, max_instances=3)
    dash.refresh()
    assert dash.scale_function.options == ("square",)
    assert dash.scale_function.value == "square"  # picked, so buttons just work
    assert dash.scale_count.max == 3

    dash.scale_up.click()
    assert dash.pending is not None and dash.pending.result(timeout=30) == 1
    dash.scale_up.click()
    assert dash.pending.result(timeout=30) == 2
    assert len(session.instances().query("status == 'ready'")) == 2

    dash.scale_down.click()
    assert dash.pending.result(timeout=30) == 1
    dash.scale_count.value = 3
    dash.scale_button.click()
    assert dash.pending.result(timeout=30) == 3
    dash.refresh()
    assert len(dash.snapshot.live_instances) == 3
    texts = [o["text"] for o in dash.messages.outputs]
    assert "scaled square to 3 instance(s)\n" in texts


def test_stop_instance_control(session, dash) -> None:
    session.invoke(_functions.square, 2)
    dash.refresh()
    assert dash.stop_picker.options == ("square-1",)
    dash.stop_picker.value = "square-1"
    dash.stop_button.click()
    assert dash.pending is not None
    assert dash.pending.result(timeout=30) == "square-1"
    dash.refresh()
    assert dash.snapshot.live_instances == []
    assert dash.stop_picker.options == ()
    assert dash.stop_button.disabled
    status = session.instances().set_index("instance_id").loc["square-1", "status"]
    assert status == "stopped"


def test_control_errors_show_in_the_dashboard(session, dash) -> None:
    session.invoke(_functions.square, 2)
    dash.refresh()
    # A callback that raises on the kernel's thread ...
    dash.stop_picker.value = None
    dash.stop_button.click()
    # ... and work that fails on the session loop.
    failing = dash.stop_instance("nope-1")
    with pytest.raises(spear_nb.FunctionNotFound):
        failing.result(timeout=30)
    assert dash.wait_for(lambda: len(dash.messages.outputs) == 2)
    errors = [o for o in dash.messages.outputs if o["name"] == "stderr"]
    assert "choose an instance first" in errors[0]["text"]
    assert "no instance 'nope-1'" in errors[1]["text"]


def test_reprs_of_the_widget(session, dash) -> None:
    session.invoke(_functions.square, 2)
    dash.refresh()
    text = repr(dash)
    assert "square-1" in text and "instances" in text and "channels" in text
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "square-1" in bundle["text/plain"]
    assert 'data-instance="square-1"' in bundle["text/html"]
    assert "var(--jp-" in bundle["text/html"]


def test_adashboard_is_the_coroutine_twin(session) -> None:
    import asyncio

    async def main() -> Dashboard:
        board = await session.adashboard(interval=0.05)
        assert isinstance(board, Dashboard)
        return board

    board = asyncio.run(main())
    assert board.refreshing
    board.close()
    assert not board.refreshing


def test_a_dashboard_refused_for_its_interval_leaves_no_noise(session, capfd) -> None:
    """The widget that failed to build is collected without a traceback from
    ipywidgets on stderr."""
    import gc

    with pytest.raises(spear_nb.ConfigurationError, match="refresh interval"):
        session.dashboard(interval=0)
    gc.collect()
    assert "Exception ignored" not in capfd.readouterr().err
    assert isinstance(session.dashboard(interval=0.5), Dashboard)
    session.dashboard().close()
