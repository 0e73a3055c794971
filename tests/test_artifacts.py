"""The three kinds of artifact on the process runtime."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap

import pytest

import spear_nb
from tests import _remote
from tests._support import rows, warm_grpc


def test_callable(session) -> None:
    info = session.register("add", _remote.add)
    assert info.kind == "callable"
    assert session.invoke("add", 2, 3, scale=2) == 10


def test_lambda_and_closure(session) -> None:
    offset = 100
    assert session.invoke(lambda x: x + offset, 1) == 101


def test_handler_from_a_module_in_cwd(session, tmp_path) -> None:
    (tmp_path / "spear_test_handlers.py").write_text(
        textwrap.dedent(
            """
            import os

            def shout(text, times=1):
                return text.upper() * times

            def where():
                return os.getcwd()
            """
        )
    )
    info = session.register("shout", handler="spear_test_handlers:shout", cwd=tmp_path)
    assert info.kind == "handler"
    assert session.invoke("shout", "hi", times=2) == "HIHI"
    session.register("where", handler="spear_test_handlers:where", cwd=tmp_path)
    assert session.invoke("where") == str(tmp_path)
    assert session.inspect("shout")["target"] == "spear_test_handlers:shout"


@pytest.mark.parametrize(
    "start_method",
    [
        pytest.param("fork"),
        "spawn",
    ],
)
def test_handler_found_through_pythonpath(tmp_path, start_method) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "spear_test_pp.py").write_text("def neg(x):\n    return -x\n")
    with spear_nb.Session(stop_grace=0.5, start_method=start_method) as s:
        s.register("neg", handler="spear_test_pp:neg", env={"PYTHONPATH": str(lib)})
        assert s.invoke("neg", 3) == -3


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_relative_cwd_is_the_hosts_and_a_missing_one_is_refused(
    tmp_path, monkeypatch, start_method
) -> None:
    (tmp_path / "pkgdir").mkdir()
    (tmp_path / "pkgdir" / "spear_test_rel.py").write_text(
        "import os\n\ndef fn(x):\n    return x * 2, os.getcwd()\n"
    )
    monkeypatch.chdir(tmp_path)
    with spear_nb.Session(stop_grace=0.5, start_method=start_method) as s:
        s.register("rel", handler="spear_test_rel:fn", cwd="pkgdir")
        assert s.invoke("rel", 21) == (42, str(tmp_path / "pkgdir"))
        with pytest.raises(spear_nb.InvalidSpec, match="'nope' is not a directory"):
            s.register("gone", handler="spear_test_rel:fn", cwd="nope")


def test_a_relative_script_is_found_in_cwd(session, tmp_path, monkeypatch) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "serve_me.py").write_text(
        "import os\nfrom spear_nb.agent import serve\n\n"
        "def where(x):\n    return x, os.getcwd()\n\n"
        "if __name__ == '__main__':\n    serve(where)\n"
    )
    monkeypatch.chdir(tmp_path)
    session.register("sc", script="serve_me.py", cwd="proj")
    assert session.invoke("sc", 1) == (1, str(proj))
    with pytest.raises(spear_nb.InvalidSpec, match="nor in cwd='proj'"):
        session.register("gone", script="missing.py", cwd="proj")


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_spear_nbs_own_modules_do_not_hide_the_users(start_method) -> None:
    """An instance imports spear_nb from the directory that holds it: the
    package's own modules (config, errors, notebook...) are not top-level
    modules there, where they would hide installed ones of those names."""
    with spear_nb.Session(stop_grace=0.5, start_method=start_method) as s:
        path, found = s.invoke(_remote.import_path, ["config", "errors", "notebook"])
    package = os.path.dirname(spear_nb.__file__)
    assert package not in path
    assert not [o for o in found.values() if o and o.startswith(package + os.sep)]


@pytest.fixture(scope="module")
def grpc_state() -> None:
    warm_grpc()  # gRPC's process-wide pollers are no test's leak


@pytest.mark.parametrize("channel", ["unix", "grpc"])
def test_handler_that_cannot_be_imported(
    session, tmp_path, channel, grpc_state
) -> None:
    """The module is there, but importing it fails inside the instance."""
    (tmp_path / "broken_handler.py").write_text("import no_such_module_xyz\n")
    session.register(
        "missing", handler="broken_handler:fn", cwd=tmp_path, channel=channel
    )
    with pytest.raises(spear_nb.InstanceStartFailed) as info:
        session.invoke("missing", 1)
    message = str(info.value)
    assert "no_such_module_xyz" in message
    # The agent said why on its stderr, and did not exit as if all was well.
    assert "cannot load the function" in message
    assert "exited with code 0" not in message
    assert session.invoke(_remote.inc, 1) == 2


def test_handler_whose_module_is_nowhere_is_refused_at_register(
    session, tmp_path
) -> None:
    """Not at its first call: the module is looked up (not imported) where an
    instance would look for it."""
    with pytest.raises(spear_nb.InvalidSpec) as info:
        session.register("missing", handler="no_such_module_xyz:fn", cwd=tmp_path)
    message = str(info.value)
    assert "'no_such_module_xyz'" in message and str(tmp_path) in message
    assert "cwd=" in message  # says what to do
    assert "missing" not in session.functions
    # Found in cwd=, in a package, or installed: registered (nothing imported yet).
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mod.py").write_text("def twice(x):\n    return 2 * x\n")
    session.register("pkg", handler="pkg.mod:twice", cwd=tmp_path)
    session.register("dumps", handler="json:dumps")
    assert session.invoke("pkg", 4) == 8 and session.invoke("dumps", [1]) == "[1]"
    with pytest.raises(spear_nb.InvalidSpec, match=r"package\.module:function"):
        session.register("bad", handler="no-such.module:fn")
    # A missing function is found only by importing: at the first call, which
    # says what to check first, then the remote traceback.
    session.register("noattr", handler="json:no_such_function")
    with pytest.raises(spear_nb.InstanceStartFailed) as info:
        session.invoke("noattr", 1)
    first, _, _ = str(info.value).partition("\n")
    assert "has no attribute 'no_such_function'" in first
    assert "check the function's name after the ':' in 'json:no_such_function'" in first


def test_script_using_the_agent_library(session, tmp_path) -> None:
    script = tmp_path / "word_service.py"
    script.write_text(
        textwrap.dedent(
            """
            from spear_nb.agent import serve

            def count_words(text):
                return {"words": len(text.split()), "script": __file__}

            if __name__ == "__main__":
                serve(count_words)
            """
        )
    )
    info = session.register("words", script=script)
    assert info.kind == "script"
    for _ in range(3):
        assert session.invoke("words", "one two three") == {
            "words": 3,
            "script": str(script),
        }
    instances = rows(session.instances(), function="words")
    assert len(instances) == 1
    assert instances["requests_total"].tolist() == [3]


def test_script_that_does_not_exist(session, tmp_path) -> None:
    with pytest.raises(spear_nb.InvalidSpec, match="does not exist"):
        session.register("nope", script=tmp_path / "nope.py")


def test_command_bytes_in_bytes_out(session) -> None:
    info = session.register("wc", command=["wc", "-w"])
    assert info.kind == "command"
    assert session.invoke("wc", b"a b c") == b"3\n"
    assert session.invoke("wc", bytearray(b"one two")) == b"2\n"
    (row,) = rows(session.instances(), function="wc").to_dict("records")
    assert row["channel"] == "stdio"
    assert row["requests_total"] == 2


def test_command_str_payload_is_utf8(session) -> None:
    session.register("bytes", command=["wc", "-c"])
    assert session.invoke("bytes", "héllo") == b"6\n"  # é is two bytes in UTF-8
    session.register("cat", command="cat")  # a string is split like a shell would
    assert session.invoke("cat", "naïve ☃") == "naïve ☃".encode()


def test_command_env_and_cwd(session, tmp_path) -> None:
    session.register(
        "env",
        command=[
            "sh",
            "-c",
            'cat >/dev/null; printf "%s %s" "$SPEAR_TEST_VALUE" "$(pwd)"',
        ],
        env={"SPEAR_TEST_VALUE": "seen"},
        cwd=tmp_path,
    )
    assert session.invoke("env", b"") == f"seen {tmp_path}".encode()


def test_command_takes_exactly_one_bytes_payload(session) -> None:
    session.register("wc", command=["wc", "-w"])
    with pytest.raises(spear_nb.InvalidArguments, match="one bytes payload"):
        session.invoke("wc", b"a", b"b")
    with pytest.raises(spear_nb.InvalidArguments, match="takes bytes"):
        session.invoke("wc", 42)
    with pytest.raises(spear_nb.InvalidArguments, match="only Python functions"):
        list(session.stream("wc", b"a"))
    assert session.invoke("wc", b"still works") == b"2\n"


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_function_from_a_directory_the_session_put_on_sys_path(
    tmp_path, start_method
) -> None:
    """A notebook's ``sys.path.insert(0, "src")`` reaches the instances (the
    function is pickled by reference: its instance imports its module)."""
    name = f"added_path_module_{start_method}"
    (tmp_path / f"{name}.py").write_text("def thrice(x):\n    return 3 * x\n")
    try:
        with spear_nb.Session(stop_grace=0.5, start_method=start_method) as s:
            assert s.invoke(_remote.inc, 1) == 2  # instances (a fork's zygote) run
            sys.path.insert(0, str(tmp_path))  # after they started
            module = importlib.import_module(name)
            assert s.invoke(module.thrice, 2) == 6
            if start_method == "fork":  # the forking process keeps its path
                return
            # Taken off sys.path again: a new instance says where it looked.
            sys.path.remove(str(tmp_path))
            s.register("again", module.thrice)
            with pytest.raises(spear_nb.InstanceStartFailed) as info:
                s.invoke("again", 2)
            assert f"No module named '{name}'" in str(info.value)
            assert "cwd=" in str(info.value) and "PYTHONPATH" in str(info.value)
    finally:
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_pythonpath_in_env_comes_before_installed_packages(
    session, tmp_path, monkeypatch
) -> None:
    """As in any Python: a PYTHONPATH entry shadows site-packages (here an
    installed tqdm), and the standard library still comes before site-packages
    (an installed spear_nb's directory, site-packages, is not put first)."""
    import site

    from spear_nb.runtime import process

    env = {"PYTHONPATH": str(tmp_path)}
    monkeypatch.setattr(process, "_PACKAGE_ROOT", site.getsitepackages()[0])
    process._add_python_path(env, "/the/cwd")
    parts = env["PYTHONPATH"].split(os.pathsep)
    assert parts[:2] == ["/the/cwd", str(tmp_path)]
    assert not [p for p in parts if process._interpreters_own(p)], parts
    monkeypatch.undo()

    (tmp_path / "tqdm").mkdir()
    (tmp_path / "tqdm" / "__init__.py").write_text("SHADOW = 'ours'\n")
    session.register(
        "which", _remote.module_attribute, env={"PYTHONPATH": str(tmp_path)}
    )
    assert session.invoke("which", "tqdm", "SHADOW") == "ours"
    path = session.invoke("which", "sys", "path")
    stdlib = os.path.dirname(os.__file__)
    first_site = min(i for i, p in enumerate(path) if "site-packages" in p)
    assert path.index(stdlib) < first_site, path
