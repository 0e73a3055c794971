"""The benchmark scripts import and parse their arguments.

The benchmarks themselves run for minutes and report figures, not pass/fail;
these checks only catch a script that no longer starts (a broken import of the
shared ``benchmarks/_timing.py`` or of the package).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


def test_every_benchmark_is_listed() -> None:
    assert {"bench_process.py", "bench_peers.py", "run_all.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_the_document_flags_a_slow_echo_baseline(monkeypatch) -> None:
    """The unix ratios divide by the blocking echo; a run whose echo was slow in
    one benchmark says so next to the table."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run_all

    def results(here: float, there: float) -> dict:
        return {
            "bench_process": {"raw_unix_echo": {"median_us": here}},
            "bench_channels": {"raw_blocking_unix_echo": {"median_us": there}},
        }

    slow = " ".join(run_all.echo_note(results(13, 36)))
    assert "13 µs in `bench_process` and 36 µs in `bench_channels`" in slow
    assert "look better than they are" in slow
    steady = " ".join(run_all.echo_note(results(13, 14)))
    assert "13 µs" in steady and "look better" not in steady
    assert run_all.echo_note({}) == []
