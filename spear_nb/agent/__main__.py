"""Entry point of a process instance: ``python -m spear_nb.agent``."""

import sys

from spear_nb.agent._serve import run

sys.exit(run())
