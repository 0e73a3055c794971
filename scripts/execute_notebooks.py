"""Execute notebooks in place to refresh their stored outputs (what nbval compares).

    python scripts/execute_notebooks.py [notebooks/01-quickstart.ipynb ...]

Run it after editing a notebook, look at the diff, and commit the notebook.
"""

from __future__ import annotations

import pathlib
import sys

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(paths: list[str]) -> None:
    targets = [pathlib.Path(p).resolve() for p in paths] or sorted(
        (ROOT / "notebooks").glob("*.ipynb")
    )
    for path in targets:
        notebook = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(
            notebook,
            timeout=300,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
        nbformat.write(notebook, path)
        sys.stdout.write(f"executed {path.relative_to(ROOT)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
