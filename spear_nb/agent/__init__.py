"""The instance side of a channel.

``python -m spear_nb.agent`` is what a process instance runs. A script that wants
to be an instance itself calls :func:`serve` with its function::

    from spear_nb.agent import serve

    def handle(text):
        return text.upper()

    serve(handle)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["serve"]


def serve(fn: Callable[..., Any]) -> None:
    """Serve ``fn`` to the spear_nb session that started this script, then exit."""
    import sys

    from spear_nb.agent._serve import run

    sys.exit(run(fn))
