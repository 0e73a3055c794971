"""Reprs of everything a user can hold, IPython's view of remote errors, and the
dashboard where ipywidgets is missing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

import spear_nb
from spear_nb.notebook.snapshot import StaticDashboard
from tests.notebook import _functions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )


def test_every_object_has_a_text_and_an_html_repr(session) -> None:
    info = session.register("square", _functions.square)
    session.invoke("square", 2)
    handle = session.submit("square", 3)
    assert handle.result(timeout=30) == 9
    channel_id = session.channels()["channel_id"].iloc[0]
    objects = {
        "session": session,
        "function": info,
        "task": session.inspect(info.task_id),
        "artifact": session.inspect(info.artifact_id),
        "instance": session.inspect("square-1"),
        "channel": session.inspect(channel_id),
        "execution": session.inspect("ex-1"),
        "handle": handle,
        "timeline": session.timeline(),
        "static dashboard": session.dashboard(widgets=False),
    }
    for name, obj in objects.items():
        text = repr(obj)
        html = obj._repr_html_()
        assert text and "\n" not in text[:1], name
        assert "var(--jp-" in html, name  # follows the JupyterLab theme
        assert "<script" not in html, name

    assert repr(objects["artifact"]).startswith(f"artifact {info.artifact_id}")
    assert objects["artifact"]["tasks"] == [info.task_id]
    assert objects["channel"]["instance_id"] == "square-1"
    assert objects["channel"]["type"] == "unix"
    assert objects["channel"]["reconnects"] == 0  # the same row as channels()
    for when in ("connected_at", "last_activity"):  # times read as in the tables
        assert isinstance(objects["channel"][when], pd.Timestamp), when
    assert "<svg" in objects["execution"]._repr_html_()
    assert "<svg" in handle._repr_html_() and "succeeded" in handle._repr_html_()
    assert "square" in info._repr_html_() and info.artifact_id in info._repr_html_()

    # Reprs read what the objects hold: they still work once the session is gone.
    session.close()
    for name, obj in objects.items():
        assert repr(obj), name
        if name != "session":
            assert obj._repr_html_(), name
    assert "closed" in session._repr_html_()


def test_inspect_names_what_it_can_find(session) -> None:
    with pytest.raises(spear_nb.FunctionNotFound) as info:
        session.inspect("nothing-here")
    assert "artifact, instance, channel or execution" in str(info.value)


def test_static_dashboard_shows_the_same_information(session) -> None:
    session.invoke(_functions.square, 4)
    static = session.dashboard(widgets=False)
    assert isinstance(static, StaticDashboard)
    html = static._repr_html_()
    for part in ("spear-nb-instances", "spear-nb-channels", "spear-nb-tasks"):
        assert part in html
    assert 'data-instance="square-1"' in html and "<svg" in html
    text = repr(static)
    assert "square-1" in text and "ready" in text and "ex-1 square" in text
    session.invoke(_functions.square, 5)
    assert static.refresh().snapshot.executions == 2


def test_dashboard_without_ipywidgets_falls_back_to_html_and_text() -> None:
    result = _run_python(
        """
        import sys
        sys.modules["ipywidgets"] = None  # import ipywidgets now fails
        import spear_nb

        def square(x):
            return x * x

        with spear_nb.Session(stop_grace=0.5) as s:
            s.invoke(square, 3)
            assert s.map(square, [1, 2], progress=True) == [1, 4]
            view = s.dashboard()
            print(type(view).__name__)
            print("HTML", 'data-instance="square-1"' in view._repr_html_())
            print(repr(view))
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "StaticDashboard"
    assert lines[1] == "HTML True"
    assert any("square-1" in line and "ready" in line for line in lines)


def test_ipython_shows_the_remote_traceback() -> None:
    result = _run_python(
        """
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config

        config = Config()
        config.HistoryManager.enabled = False
        shell = InteractiveShell.instance(config=config)
        shell.run_cell('''
        import spear_nb
        def broken(x):
            return 1 / x
        s = spear_nb.Session(stop_grace=0.5)
        try:
            s.invoke(broken, 0)
        finally:
            s.close()
        ''')
        """
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "RemoteError: the function raised inside its instance." in out
    assert "in broken" in out and "ZeroDivisionError" in out
    assert "_bridge.py" not in out  # the local frames are not shown
