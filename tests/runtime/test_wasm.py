"""The WebAssembly runtime on real wasmtime: both guest conventions, the disk
cache, limits, host imports, warm reuse, threads, and every fault of issue 4."""

from __future__ import annotations

import glob
import logging
import os
import struct
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
import wasmtime

import spear_nb
from spear_nb import samples
from spear_nb.communication.protocol import Message, MessageType
from spear_nb.runtime import wasm as wasm_runtime
from tests._support import rows, wait_until

UPPER = samples.path("wasm", "upper.wat")
SPIN = samples.path("wasm", "spin.wat")
WORDFREQ = samples.path("wasm", "wordfreq.wasm")
PHASES = {"request", "artifact", "task", "instance", "channel", "execute"}


def chapter() -> bytes:
    with open(samples.path("data", "tale_of_two_cities_ch1.txt"), "rb") as f:
        return f.read()


def reactor(body: str, imports: str = "", pages: int = 1) -> str:
    """A spear ABI v1 reactor whose spear_handle runs ``body``."""
    return f"""(module
  {imports}
  (memory (export "memory") {pages})
  (global $bump (mut i32) (i32.const 1024))
  (func (export "spear_alloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump) (local.get $n)))
    (local.get $p))
  (func (export "spear_reset") (global.set $bump (i32.const 1024)))
  (func (export "spear_handle") (param $ptr i32) (param $len i32) (result i64)
    {body}))
"""


# Echoes its payload, except: "u..." hits unreachable, "o..." reads out of bounds,
# "b..." returns a result outside its memory.
FAULTY = reactor(
    """
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 117)) (then unreachable))
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 111))
      (then (drop (i32.load (i32.const 0x7fff0000)))))
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 98))
      (then (return (i64.const 0x7fff000000000004))))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len)))"""
)

# Returns its whole first page (65,536 bytes) whatever the payload.
PAGE = reactor("(i64.const 65536)")

# Grows its memory a page at a time until refused, then traps.
GREEDY = reactor(
    """
    (block $full
      (loop $more
        (br_if $full (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br $more)))
    unreachable"""
)

# Returns spear.now_ns() as 8 little-endian bytes.
CLOCK = reactor(
    "(i64.store (i32.const 0) (call $now)) (i64.const 8)",
    imports='(import "spear" "now_ns" (func $now (result i64)))',
)

# A WASI command writing 64 x 64 KiB = 4 MiB of 'z' to stdout.
MEGABYTES = """(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "\\00\\00\\01\\00\\00\\00\\01\\00")
  (func (export "_start")
    (local $i i32)
    (memory.fill (i32.const 65536) (i32.const 122) (i32.const 65536))
    (loop $more
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 64))))))
"""


# A WASI command that spins for ever.
SPIN_COMMAND = (
    '(module (memory (export "memory") 1) (func (export "_start") (loop br 0)))'
)


def new_session(cache: str, **settings: object) -> spear_nb.Session:
    return spear_nb.Session(
        cache_dir=cache, stop_grace=0.5, execution_timeout=60, **settings
    )


@pytest.fixture(scope="module", autouse=True)
def wasi_started() -> None:
    """Run one WASI program before the per-test leak check starts counting.

    wasmtime's WASI layer makes a process-wide async runtime (an epoll and an
    eventfd) the first time a WASI program runs, and keeps it for good: that is
    one-time set-up of the library, not descriptors a session leaks.
    """
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    store.set_wasi(wasmtime.WasiConfig())
    instance = linker.instantiate(store, wasmtime.Module.from_file(engine, WORDFREQ))
    start = instance.exports(store)["_start"]
    assert isinstance(start, wasmtime.Func)
    start(store)
    store.close()


@pytest.fixture
def cache(tmp_path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture
def s(cache: str) -> Iterator[spear_nb.Session]:
    session = new_session(cache)
    try:
        yield session
    finally:
        session.close()


def lifecycle(session: spear_nb.Session, phase: str):  # -> DataFrame
    events = session.events()
    return events[events["phase"] == phase]


def last_execution(session: spear_nb.Session):  # -> Series
    return session.executions().iloc[-1]


# -- both conventions ------------------------------------------------------------------


def test_reactor_transforms_bytes(s) -> None:
    info = s.register("upper", wasm=UPPER)
    assert (info.runtime, info.kind) == ("wasm", "wasm")
    assert s.invoke("upper", b"It was the best of times") == b"IT WAS THE BEST OF TIMES"
    assert s.invoke("upper", "str goes as UTF-8") == b"STR GOES AS UTF-8"
    assert s.invoke("upper", b"") == b""
    details = s.inspect("upper-1")
    assert details["convention"] == "reactor"
    assert details["channel"] == "memory"


def test_calls_handed_to_one_instance_at_once_wait_there_in_order(s) -> None:
    """max_concurrency=N: an instance takes up to N calls; its one thread runs
    them one after another, each with its own result."""
    s.register("upper", wasm=UPPER, max_concurrency=4, max_instances=1)
    handles = [s.submit("upper", f"call {i}") for i in range(12)]
    assert [h.result(timeout=60) for h in handles] == [
        f"CALL {i}".encode() for i in range(12)
    ]
    (row,) = rows(s.instances(), function="upper").to_dict("records")
    assert (row["capacity"], row["requests_total"], row["requests_ok"]) == (4, 12, 12)


def test_reactor_given_as_bytes_and_inline_wat(s) -> None:
    with open(UPPER, encoding="utf-8") as f:
        text = f.read()
    s.register("inline", wasm=text)
    s.register("raw", wasm=text.encode())
    assert s.invoke("inline", b"abc") == b"ABC"
    assert s.invoke("raw", b"abc") == b"ABC"


def test_command_word_frequencies(s) -> None:
    s.register("wordfreq", wasm=WORDFREQ)
    out = s.invoke("wordfreq", chapter())
    lines = out.decode().splitlines()
    assert lines[0] == "79 the"
    assert len(lines) == 10
    assert s.invoke("wordfreq", b"") == b""
    assert s.inspect("wordfreq-1")["last_exit_code"] == 0
    assert s.inspect("wordfreq-1")["convention"] == "command"


def test_command_nonzero_exit_carries_code_and_stderr(s) -> None:
    s.register("wordfreq", wasm=WORDFREQ)
    with pytest.raises(spear_nb.CommandFailed) as info:
        s.invoke("wordfreq", b"binary\0input")
    assert isinstance(info.value, spear_nb.ExecutionError)
    assert info.value.returncode == 3
    assert info.value.stderr_tail == "wordfreq: binary input"
    assert "exited with code 3" in str(info.value)
    assert s.invoke("wordfreq", b"again and again") == b"2 again\n1 and\n"


def test_command_fresh_instantiation_per_call(s) -> None:
    s.register("wordfreq", wasm=WORDFREQ)
    for text in (b"a a b", b"c"):
        s.invoke("wordfreq", text)
    # one warm instance slot, and each call saw only its own stdin
    assert s.invoke("wordfreq", b"z") == b"1 z\n"
    assert len(rows(s.instances(), function="wordfreq")) == 1
    assert s.inspect("wordfreq-1")["calls"] == 3


def test_convention_can_be_forced_and_is_checked(s) -> None:
    with pytest.raises(spear_nb.InvalidSpec, match="_start"):
        s.register("upper_cmd", wasm=UPPER, convention="command")
    with pytest.raises(spear_nb.InvalidSpec, match="convention"):
        s.register("upper_x", wasm=UPPER, convention="sideways")


# -- bad input at registration ---------------------------------------------------------


def test_bytes_that_are_not_wasm(s) -> None:
    with pytest.raises(spear_nb.InvalidSpec, match="neither WebAssembly"):
        s.register("junk", wasm=b"\x7fELF\x02\x01\x01 not a module")
    with pytest.raises(spear_nb.InvalidSpec, match="not a valid WebAssembly module"):
        s.register("broken", wasm=b"\0asm\x01\0\0\0\xff\xff")
    assert s.functions == []


def test_invalid_wat_names_the_line(s) -> None:
    bad = '(module\n  (func (export "f")\n    i32.add2))\n'
    with pytest.raises(spear_nb.InvalidSpec) as info:
        s.register("bad_wat", wasm=bad)
    assert "line 3, column 5" in str(info.value)
    assert "i32.add2" in str(info.value)


def test_module_without_handler_export(s) -> None:
    with pytest.raises(spear_nb.InvalidSpec, match="no handler export") as info:
        s.register("nothing", wasm='(module (func (export "other")))')
    assert "other" in str(info.value)
    with pytest.raises(spear_nb.InvalidSpec, match="spear_alloc"):
        s.register(
            "half",
            wasm='(module (memory (export "memory") 1) (func (export "spear_handle")'
            " (param i32 i32) (result i64) i64.const 0))",
        )


def test_missing_import_is_named(s) -> None:
    module = reactor("(i64.const 0)", imports='(import "env" "secret" (func))')
    with pytest.raises(spear_nb.InvalidSpec, match=r"env\.secret") as info:
        s.register("needs_env", wasm=module)
    assert "spear.log" in str(info.value)
    unknown_wasi = reactor(
        "(i64.const 0)", imports='(import "wasi_snapshot_preview1" "no_such" (func))'
    )
    with pytest.raises(spear_nb.InvalidSpec, match="no_such"):
        s.register("bad_wasi", wasm=unknown_wasi)
    mistyped = reactor("(i64.const 0)", imports='(import "spear" "log" (func))')
    with pytest.raises(spear_nb.InvalidSpec, match=r"spear\.log with the wrong type"):
        s.register("mistyped", wasm=mistyped)


def test_bad_options_and_channel(s) -> None:
    with pytest.raises(spear_nb.InvalidSpec, match="memroy_limit_mb"):
        s.register("typo", wasm=UPPER, memroy_limit_mb=1)
    with pytest.raises(spear_nb.InvalidSpec, match="fuel"):
        s.register("nofuel", wasm=UPPER, fuel=-5)
    with pytest.raises(spear_nb.InvalidSpec, match="memory"):
        s.register("tcp", wasm=UPPER, channel="tcp")
    # What wasm= takes, all of it, when it gets something else.
    with pytest.raises(spear_nb.InvalidSpec, match="WAT text or the module's bytes"):
        s.register("number", wasm=123)


def test_missing_wasmtime_says_what_to_install(cache, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wasmtime", None)
    monkeypatch.delitem(sys.modules, "spear_nb.runtime.wasm")
    with (
        new_session(cache) as session,
        pytest.raises(spear_nb.ConfigurationError, match=r"spear_nb\[wasm\]"),
    ):
        session.register("upper", wasm=UPPER)


# -- faults during calls ---------------------------------------------------------------


def test_trap_unreachable_replaces_the_instance(s) -> None:
    s.register("faulty", wasm=FAULTY)
    assert s.invoke("faulty", b"fine") == b"fine"
    with pytest.raises(spear_nb.RemoteError) as info:
        s.invoke("faulty", b"unreachable please")
    err = info.value
    assert isinstance(err, spear_nb.ExecutionError)
    assert err.remote_type == "Trap"
    assert "unreachable" in str(err)
    assert "instance is replaced" in str(err)
    assert "wasm backtrace" in err.remote_traceback
    old = rows(s.instances(), instance_id="faulty-1").iloc[0]
    assert old["status"] in ("failed", "stopped")
    assert "unreachable" in old["failure"]
    assert s.invoke("faulty", b"fine again") == b"fine again"
    assert last_execution(s)["instance_id"] == "faulty-2"


def test_trap_out_of_bounds(s) -> None:
    s.register("faulty", wasm=FAULTY)
    with pytest.raises(spear_nb.RemoteError, match="out of bounds memory access"):
        s.invoke("faulty", b"oob")
    assert s.invoke("faulty", b"fine") == b"fine"
    assert last_execution(s)["instance_id"] == "faulty-2"


def test_result_outside_memory_breaks_the_abi(s) -> None:
    s.register("faulty", wasm=FAULTY)
    with pytest.raises(spear_nb.ProtocolError, match="spear ABI"):
        s.invoke("faulty", b"bad result")
    assert s.invoke("faulty", b"fine") == b"fine"
    assert last_execution(s)["instance_id"] == "faulty-2"


def test_memory_cap(s) -> None:
    s.register("greedy", wasm=GREEDY, memory_limit_mb=2)
    with pytest.raises(spear_nb.RemoteError, match="memory_limit_mb of 2 MiB"):
        s.invoke("greedy", b"")
    s.register("upper_capped", wasm=UPPER, memory_limit_mb=1)
    assert s.invoke("upper_capped", b"a" * 200_000) == b"A" * 200_000
    with pytest.raises(spear_nb.RemoteError, match="memory_limit_mb of 1 MiB"):
        s.invoke("upper_capped", b"a" * 600_000)  # payload and result: > 1 MiB
    assert s.invoke("upper_capped", b"small") == b"SMALL"
    assert s.inspect("upper_capped-2")["memory_limit_mb"] == 1


def test_memory_cap_below_the_initial_memory(s) -> None:
    s.register("big", wasm=reactor("(i64.const 0)", pages=40), memory_limit_mb=1)
    with pytest.raises(spear_nb.InstanceStartFailed, match="memory"):
        s.invoke("big", b"")


def test_command_writing_megabytes(cache) -> None:
    with new_session(cache) as session:
        session.register("mega", wasm=MEGABYTES)
        out = session.invoke("mega", b"")
        assert len(out) == 4 * 2**20
        assert set(out) == {ord("z")}
    with new_session(cache, max_frame_size=2**20) as session:
        session.register("mega", wasm=MEGABYTES)
        with pytest.raises(spear_nb.PayloadTooLarge, match="4194304 bytes"):
            session.invoke("mega", b"")


def test_reactor_output_and_input_over_the_frame_limit(cache) -> None:
    with new_session(cache, max_frame_size=4096) as session:
        session.register("page", wasm=PAGE)
        with pytest.raises(spear_nb.PayloadTooLarge, match="65536 bytes"):
            session.invoke("page", b"")
        session.register("upper", wasm=UPPER)
        with pytest.raises(spear_nb.PayloadTooLarge):
            session.invoke("upper", b"x" * 5000)
        assert session.invoke("upper", b"x" * 4000) == b"X" * 4000


def test_non_utf8_output_is_returned_unchanged(s) -> None:
    s.register("upper", wasm=UPPER)
    payload = bytes(range(256))
    expected = bytes(c - 32 if 97 <= c <= 122 else c for c in payload)
    assert s.invoke("upper", payload) == expected
    s.register("faulty", wasm=FAULTY)
    assert s.invoke("faulty", b"\xff\xfe\x00\x80") == b"\xff\xfe\x00\x80"


def test_infinite_loop_ends_at_the_deadline(s) -> None:
    s.register("spin", wasm=SPIN, timeout=0.3)
    s.register("upper", wasm=UPPER)
    started = time.perf_counter()
    with pytest.raises(spear_nb.ExecutionTimeout, match=r"timeout of 0\.3 s") as info:
        s.invoke("spin", b"")
    elapsed = time.perf_counter() - started
    assert isinstance(info.value, TimeoutError)
    assert 0.3 <= elapsed < 0.3 + wasm_runtime.EXPIRY_GRACE
    assert last_execution(s)["status"] == "timed_out"
    assert s.invoke("upper", b"still here") == b"STILL HERE"
    with pytest.raises(spear_nb.ExecutionTimeout):
        s.invoke("spin", b"")
    assert last_execution(s)["instance_id"] == "spin-2"


def test_fuel_limit(s) -> None:
    s.register("spin", wasm=SPIN, fuel=100_000)
    with pytest.raises(spear_nb.ExecutionTimeout, match="fuel of 100000 units"):
        s.invoke("spin", b"")
    s.register("upper", wasm=UPPER, fuel=1_000_000)
    for _ in range(3):  # the fuel is refilled for every call
        assert s.invoke("upper", b"x" * 1000) == b"X" * 1000
    with pytest.raises(spear_nb.ExecutionTimeout, match="fuel"):
        s.invoke("upper", b"x" * 200_000)


def test_long_guest_does_not_freeze_the_session_and_close_interrupts_it(
    cache,
) -> None:
    session = new_session(cache)
    try:
        session.register("spin", wasm=SPIN, timeout=60)
        session.register("upper", wasm=UPPER)
        handle = session.submit("spin", b"")
        for i in range(20):
            assert session.invoke("upper", f"call {i}") == f"CALL {i}".encode()
        # Its instance may still be starting on a busy machine: wait for the run.
        assert wait_until(lambda: handle.status == "running")
        assert not handle.done()
    finally:
        started = time.perf_counter()
        session.close()
        closing = time.perf_counter() - started
    assert closing < 10  # the guest had 60 s left: close interrupted it
    with pytest.raises(spear_nb.SpearError):
        handle.result(timeout=10)


def _guest_spins(instance_id: str) -> bool:
    """Whether the worker thread of ``instance_id`` has been running a guest (it
    used CPU time for it): the call has started, it is not waiting in the inbox."""
    name = f"spear_nb-wasm-{instance_id}"
    ident = next((t.native_id for t in threading.enumerate() if t.name == name), None)
    for thread in psutil.Process().threads():
        if thread.id == ident:
            return thread.user_time + thread.system_time > 0.05
    return False


def test_cancelling_a_running_call_replaces_the_instance(s) -> None:
    s.register("spin", wasm=SPIN, timeout=30)
    s.register("upper", wasm=UPPER)
    handle = s.submit("spin", b"")
    for i in range(20):  # other instances serve meanwhile
        assert s.invoke("upper", f"{i}") == f"{i}".encode()
    assert wait_until(lambda: _guest_spins("spin-1"))
    assert handle.cancel()
    with pytest.raises(spear_nb.ExecutionCancelled):
        handle.result(timeout=10)
    spin = rows(s.instances(), instance_id="spin-1").iloc[0]
    assert spin["status"] in ("failed", "stopped")
    assert "cancelled while it ran" in spin["failure"]
    # The guest itself was stopped (at the next epoch tick), not left to spin
    # until its 30 s deadline: its worker thread ends.
    assert wait_until(
        lambda: not any(t.name == "spear_nb-wasm-spin-1" for t in threading.enumerate())
    )
    assert s.invoke("upper", b"fine") == b"FINE"


def test_cancelling_a_running_wasi_command_keeps_its_instance(s) -> None:
    # A command's store lives for one call: stopping its guest leaves nothing
    # half-done, so the instance serves the next call.
    s.register("spin_cmd", wasm=SPIN_COMMAND, timeout=30)
    handle = s.submit("spin_cmd", b"")
    assert wait_until(lambda: _guest_spins("spin_cmd-1"))
    assert handle.cancel()
    with pytest.raises(spear_nb.ExecutionCancelled):
        handle.result(timeout=10)
    # The guest stopped (its call ended long before the 30 s deadline), and the
    # instance serves on.
    assert wait_until(lambda: s.inspect("spin_cmd-1")["calls"] == 1, timeout=10)
    assert s.instances()[["instance_id", "status"]].values.tolist() == [
        ["spin_cmd-1", "ready"]
    ]


def test_cancelling_a_queued_call_drops_it(s) -> None:
    # two calls on one instance: the second waits in the instance's inbox while
    # the first spins to its timeout
    s.register("spin", wasm=SPIN, timeout=2.0, max_instances=1, max_concurrency=2)
    first = s.submit("spin", b"")
    assert wait_until(lambda: first.status == "running")  # its instance is up
    second = s.submit("spin", b"")
    assert wait_until(lambda: second.status == "running")  # in the inbox
    assert second.cancel()
    with pytest.raises(spear_nb.ExecutionCancelled):
        second.result(timeout=30)
    with pytest.raises(spear_nb.ExecutionTimeout):
        first.result(timeout=30)
    assert s.inspect("spin-1")["calls"] == 1  # the cancelled call never ran


# -- host imports ----------------------------------------------------------------------


def test_host_log_becomes_a_session_event(s) -> None:
    s.register("upper", wasm=UPPER)
    s.invoke("upper", b"hello")
    logs = lifecycle(s, "guest_log")
    assert list(logs["detail"]) == ["upper: 5 bytes"]
    row = logs.iloc[0]
    assert row["instance_id"] == "upper-1"
    assert row["execution_id"] == last_execution(s)["execution_id"]


def test_host_clock_is_monotonic_ns(s) -> None:
    s.register("clock", wasm=CLOCK)
    before = time.monotonic_ns()
    (first,) = struct.unpack("<q", s.invoke("clock", b""))
    (second,) = struct.unpack("<q", s.invoke("clock", b""))
    after = time.monotonic_ns()
    assert before <= first <= second <= after


# -- the disk cache --------------------------------------------------------------------


def test_second_session_loads_the_module_from_the_cache(cache) -> None:
    with new_session(cache) as first:
        first.register("upper", wasm=UPPER)
        compiled = lifecycle(first, "module_compiled")
        assert len(compiled) == 1
        assert "saved to the disk cache" in compiled.iloc[0]["detail"]
        assert len(lifecycle(first, "module_loaded")) == 0
    files = glob.glob(os.path.join(cache, "wasm", "*.cwasm"))
    assert len(files) == 1
    assert wasm_runtime.WASMTIME_VERSION in os.path.basename(files[0])
    with new_session(cache) as second:
        second.register("upper", wasm=UPPER)
        assert len(lifecycle(second, "module_compiled")) == 0
        assert len(lifecycle(second, "module_loaded")) == 1
        assert second.invoke("upper", b"cached") == b"CACHED"
        assert second.inspect("upper-1")["module_source"] == "disk cache"


def test_same_module_twice_compiles_once(s) -> None:
    s.register("a", wasm=UPPER)
    s.register("b", wasm=UPPER)
    assert len(lifecycle(s, "module_compiled")) == 1
    assert s.invoke("a", b"a") == b"A"
    assert s.invoke("b", b"b") == b"B"


def test_cache_directory_from_the_environment(tmp_path, monkeypatch) -> None:
    root = tmp_path / "from_env"
    monkeypatch.setenv("SPEAR_NB_CACHE", str(root))
    with spear_nb.Session(stop_grace=0.5) as session:
        session.register("upper", wasm=UPPER)
    assert len(glob.glob(str(root / "wasm" / "*.cwasm"))) == 1


def test_unwritable_cache_only_warns(tmp_path, caplog) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    caplog.set_level(logging.WARNING, logger="spear_nb.runtime.wasm")
    with new_session(str(blocker / "cache")) as session:
        session.register("upper", wasm=UPPER)
        assert session.invoke("upper", b"ok") == b"OK"
        detail = lifecycle(session, "module_compiled").iloc[0]["detail"]
        assert "disk cache is unavailable" in detail
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("going on without it" in r.getMessage() for r in warnings)


def test_corrupt_cache_file_is_replaced(cache, caplog) -> None:
    with new_session(cache) as session:
        session.register("upper", wasm=UPPER)
    (path,) = glob.glob(os.path.join(cache, "wasm", "*.cwasm"))
    with open(path, "wb") as f:
        f.write(b"definitely not a compiled module")
    caplog.set_level(logging.WARNING, logger="spear_nb.runtime.wasm")
    with new_session(cache) as session:
        session.register("upper", wasm=UPPER)
        assert len(lifecycle(session, "module_compiled")) == 1
        assert session.invoke("upper", b"ok") == b"OK"
    assert any("unusable cache file" in r.getMessage() for r in caplog.records)
    with new_session(cache) as session:
        session.register("upper", wasm=UPPER)
        assert len(lifecycle(session, "module_loaded")) == 1


# -- warm reuse, the channel, threads --------------------------------------------------


def test_warm_reuse_over_one_memory_channel(s) -> None:
    s.register("upper", wasm=UPPER)
    payload = b"warm" * 25
    for _ in range(100):
        assert s.invoke("upper", payload) == payload.upper()
    instances = rows(s.instances(), function="upper")
    assert len(instances) == 1
    assert instances.iloc[0]["requests_total"] == 100
    assert instances.iloc[0]["channel"] == "memory"
    assert s.inspect("upper-1")["calls"] == 100
    channels = rows(s.channels(), instance_id="upper-1")
    assert len(channels) == 1
    channel = channels.iloc[0]
    assert channel["type"] == "memory"
    assert channel["state"] == "connected"
    assert channel["messages_sent"] == channel["messages_received"] == 100
    assert channel["bytes_sent"] == channel["bytes_received"] == 100 * 100
    assert channel["errors"] == 0
    assert channel["rtt_mean_ms"] > 0
    assert channel["rtt_p99_ms"] >= channel["rtt_mean_ms"] * 0.5
    executions = s.executions()
    assert set(executions["status"]) == {"succeeded"}
    assert executions["new_instance"].sum() == 1


def test_heartbeats_are_answered_and_never_run_the_guest(cache) -> None:
    with new_session(cache, heartbeat_interval=3600) as session:
        session.register("upper", wasm=UPPER)
        session.invoke("upper", b"first")
        channel = session._manager.factory.pooled("upper-1")
        assert channel is not None

        async def beat() -> None:
            channel.send(Message(MessageType.HEARTBEAT, 0))

        session._loop.run(beat())
        # the instance answers in order: the heartbeat before this call
        assert session.invoke("upper", b"second") == b"SECOND"
        row = rows(session.channels(), instance_id="upper-1").iloc[0]
        assert row["heartbeats_sent"] == row["heartbeats_received"] == 1
        assert row["messages_sent"] == row["messages_received"] == 2
        assert session.inspect("upper-1")["calls"] == 2


def test_calls_from_several_threads(s) -> None:
    s.register("upper", wasm=UPPER)
    failures: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(25):
                text = f"thread {t} call {i}"
                assert s.invoke("upper", text) == text.upper().encode()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    executions = s.executions()
    assert len(executions) == 100
    assert set(executions["status"]) == {"succeeded"}
    assert 1 <= len(rows(s.instances(), function="upper")) <= 4


def test_public_api_call_path(cache, monkeypatch) -> None:
    monkeypatch.setattr(wasm_runtime, "FAST_CALLS", False)
    monkeypatch.setattr(wasm_runtime, "_ffi", None)  # stdin through a file too
    with new_session(cache) as session:
        session.register("wordfreq", wasm=WORDFREQ)
        assert session.invoke("wordfreq", b"b a b").splitlines() == [b"2 b", b"1 a"]
        session.register("upper", wasm=UPPER)
        for _ in range(10):
            assert session.invoke("upper", b"slow path") == b"SLOW PATH"
        assert list(lifecycle(session, "guest_log")["detail"])[-1] == "upper: 9 bytes"
        session.register("faulty", wasm=FAULTY)
        with pytest.raises(spear_nb.RemoteError, match="unreachable"):
            session.invoke("faulty", b"u")
        with pytest.raises(spear_nb.ProtocolError):
            session.invoke("faulty", b"b")


def test_events_show_the_flow(s) -> None:
    s.register("upper", wasm=UPPER)
    s.invoke("upper", b"x")
    events = s.events()
    phases = list(events[events["phase"].isin(PHASES)]["phase"])
    assert phases == ["request", "artifact", "task", "instance", "channel", "execute"]
    channel = events[events["phase"] == "channel"].iloc[0]
    assert channel["detail"] == "memory"
