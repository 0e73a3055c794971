"""Binder: the environment built from binder/ alone runs every notebook.

Slow (a fresh virtual environment and every notebook, about 2-3 minutes with a
warm pip cache), so it runs when ``CI`` or ``SPEAR_NB_BINDER_CHECK`` is set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.binder
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    not (os.environ.get("CI") or os.environ.get("SPEAR_NB_BINDER_CHECK")),
    reason="slow: set CI or SPEAR_NB_BINDER_CHECK=1 to build the Binder environment",
)
def test_binder_environment_runs_every_notebook() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_binder.py")],
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for name in notebooks:
        assert f"ok {name}" in result.stdout, result.stdout[-4000:]
