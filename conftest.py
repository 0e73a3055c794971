"""Repository-wide pytest setup: how nbval compares notebook outputs."""

from __future__ import annotations

from typing import Any


def pytest_collectstart(collector: Any) -> None:
    # DataFrames show as text and HTML; the text form is compared, the HTML twin
    # (and widget views, whose model ids are random) is not.
    if getattr(collector, "fspath", None) and collector.fspath.ext == ".ipynb":
        collector.skip_compare += (
            "text/html",
            "application/javascript",
            "application/vnd.jupyter.widget-view+json",
            "application/vnd.jupyter.widget-state+json",
        )
