"""Progress bars for many calls: tqdm's notebook widget in Jupyter, text elsewhere."""

from __future__ import annotations

import warnings
from typing import Any


def progress_bar(description: str, total: int) -> Any:
    """A ``tqdm.auto`` bar counting ``total`` calls; None if tqdm is missing.

    The bar is created on the calling thread (where a notebook displays it) and
    may be advanced from the session loop: a notebook bar sends widget messages,
    which ipykernel accepts from any thread, and a text bar writes to stderr.
    """
    try:
        with warnings.catch_warnings():
            # Without ipywidgets tqdm.auto falls back to text and says so.
            warnings.simplefilter("ignore")
            from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, unit="call", leave=True)
