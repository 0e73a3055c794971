"""The README's first command: ``python -m spear_nb demo`` on real input."""

from __future__ import annotations

import subprocess
import sys


def test_the_demo_runs_every_kind_of_function_and_prints_the_tables() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "spear_nb", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # The chapter's word counts from the callable and the handler, wc's count
    # of its words, the script's shout of its first line.
    assert out.count("[('the', 79), ('of', 56), ('and', 42)") == 2
    assert "3. a plain command (wc -w): b'1015\\n'" in out
    assert "'A TALE OF TWO CITIES, BY CHARLES DICKENS." in out
    assert "comes back as RemoteError(" in out
    for heading in ("Instances:", "Channels:", "Metrics per function:"):
        assert heading in out
    assert "direct_calls" in out and "word_counts-1" in out
    assert "Session closed" in out
    assert done.stderr == ""  # nothing logged or warned on the way
