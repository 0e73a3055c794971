"""The session as a notebook uses it: widget callbacks, long temp paths, display."""

from __future__ import annotations

import logging
import tempfile

import ipywidgets
import pytest

import spear_nb
from tests import _remote
from tests._support import warm_grpc


def test_invoke_from_an_ipywidgets_callback(session) -> None:
    results: list[int] = []
    errors: list[BaseException] = []
    button = ipywidgets.Button(description="run")

    def on_click(_: ipywidgets.Button) -> None:
        try:
            results.append(session.invoke(_remote.inc, 41))
        except BaseException as exc:
            errors.append(exc)

    button.on_click(on_click)
    button.click()  # runs the handler as the kernel would, on the calling thread
    button.click()

    assert errors == []
    assert results == [42, 42]
    assert len(session.instances()) == 1


@pytest.fixture
def long_tmpdir(tmp_path):
    """A temp root so deep that a socket path under it cannot fit in sun_path."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    previous = tempfile.tempdir
    tempfile.tempdir = str(deep)
    try:
        yield deep
    finally:
        tempfile.tempdir = previous


def test_socket_path_too_long_falls_back_to_tcp(long_tmpdir, caplog) -> None:
    caplog.set_level(logging.INFO, logger="spear_nb")
    with spear_nb.Session(stop_grace=0.5) as s:
        assert s.invoke(_remote.inc, 1) == 2
        channels = s.channels()
        events = s.events()

    assert channels["type"].tolist() == ["tcp"]
    assert channels["fallback_from"].tolist() == ["unix"]
    fallbacks = events[events["phase"] == "channel_fallback"]
    assert len(fallbacks) == 1
    assert "longer than" in fallbacks["detail"].iloc[0]
    assert any("uses tcp" in r.getMessage() for r in caplog.records)
    assert not any(p.name.startswith("spear_nb-") for p in long_tmpdir.iterdir())


@pytest.fixture(scope="module")
def grpc_state() -> None:
    warm_grpc()  # gRPC's process-wide pollers are no test's leak


@pytest.mark.timeout(60)
def test_grpc_with_a_socket_path_too_long_serves_on_loopback_tcp(
    grpc_state, long_tmpdir
) -> None:
    # A gRPC server given a Unix path over the OS limit hung the session.
    name = "a_function_name_of_sixty_characters_that_pushes_its_path_over"
    with spear_nb.Session(stop_grace=0.5) as s:
        s.register(name, _remote.inc, channel="grpc")
        assert s.invoke(name, 1) == 2
        channel = s.channels().iloc[0]
        events = s.events()

    assert channel["type"] == "grpc" and channel["fallback_from"] == ""
    # Its standby dial-in could not use unix either, but it was not used: no
    # fallback to tell of.
    assert "channel_fallback" not in events["phase"].tolist()
    assert channel["address"].startswith("127.0.0.1:")
    assert not any(p.name.startswith("spear_nb-") for p in long_tmpdir.iterdir())


def test_reprs_and_html(session) -> None:
    info = session.register("inc", _remote.inc)
    session.invoke("inc", 1)
    assert "inc" in repr(info) and "callable" in repr(info)
    html = session._repr_html_()
    assert "<table" in html and "inc" in html
    assert "var(--jp-" in html  # follows the JupyterLab theme
    inspection = session.inspect("inc-1")
    assert "instance inc-1" in repr(inspection)
    assert "<table" in inspection._repr_html_()


def test_remote_error_renders_the_remote_traceback(session) -> None:
    def broken(x):
        return 1 / x

    with pytest.raises(spear_nb.RemoteError) as info:
        session.invoke(broken, 0)
    error = info.value
    assert error.remote_type == "ZeroDivisionError"
    rendered = "\n".join(error._render_traceback_())
    assert "in broken" in rendered and "ZeroDivisionError" in rendered
    assert "spear_nb/agent" not in rendered  # the agent's own frames are hidden
    assert "Remote traceback" in str(error)


def test_a_remote_error_without_frames_says_its_message_once() -> None:
    bare = spear_nb.RemoteError("TypeError", "no frames", "TypeError: no frames\n")
    assert str(bare) == "TypeError: no frames"


def test_remote_source_lines_come_from_the_host() -> None:
    """A notebook function travels without its source; the kernel fills it in."""
    import inspect

    import msgpack

    from spear_nb.communication.channel import remote_error

    here = inspect.currentframe()
    assert here is not None
    line = here.f_lineno  # this very line is the "remote" frame
    payload = msgpack.packb(
        {
            "type": "ValueError",
            "message": "bad",
            "traceback": "Traceback (most recent call last):\n  ...\n",
            "frames": [[__file__, line, "cell", ""]],
        }
    )
    error = remote_error(payload)
    assert "line = here.f_lineno" in error.remote_traceback
    assert error.remote_traceback.rstrip().endswith("ValueError: bad")
