"""The notebook-layer tests' remote functions travel by value."""

from __future__ import annotations

import cloudpickle

from tests.notebook import _functions

cloudpickle.register_pickle_by_value(_functions)
