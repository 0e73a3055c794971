"""Sample functions, scripts, data and WebAssembly modules for demos and notebooks."""

from __future__ import annotations

import os

__all__ = ["path"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def path(*parts: str) -> str:
    """The absolute path of a sample file, e.g. ``path("data", "x.txt")``."""
    full = os.path.join(_HERE, *parts)
    if not os.path.exists(full):
        raise FileNotFoundError(f"spear_nb ships no sample {os.path.join(*parts)!r}")
    return full
