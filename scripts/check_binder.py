"""Build the Binder environment from binder/ alone and execute every notebook in it.

    python scripts/check_binder.py [--keep] [notebooks/NAME.ipynb ...]

What mybinder does, without mybinder: a fresh virtual environment, then
``pip install -r binder/requirements.txt``, then ``binder/postBuild`` from a copy
of the repository. Binder's base image brings Jupyter itself; of that, the check
installs only what executing notebooks needs (``ipykernel``, ``nbclient``). Then
every notebook runs, top to bottom, in a kernel of that environment: a notebook
that needs something binder/ does not install fails here. pip's wheel cache is
reused, so a second run takes a minute or two.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import venv

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What repo2docker's base environment provides and executing notebooks needs.
BASE = ["ipykernel", "nbclient", "nbformat"]
SKIP = {".git", ".venv", "build", "dist", "test-output", "__pycache__", ".mypy_cache"}

EXECUTE = """
import pathlib, sys, time
import nbclient, nbformat
failed = []
for name in sys.argv[1:]:
    path = pathlib.Path(name)
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except Exception as exc:
        failed.append(path.name)
        print(f"FAILED {path.name}: {type(exc).__name__}: {exc}", flush=True)
        continue
    print(f"ok {path.name} in {time.perf_counter() - start:.1f} s", flush=True)
sys.exit(1 if failed else 0)
"""


def run(command: list[str], **kwargs: object) -> None:
    sys.stdout.write("$ " + " ".join(command) + "\n")
    sys.stdout.flush()
    subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*")
    parser.add_argument("--keep", action="store_true", help="keep the environment")
    args = parser.parse_args()
    started = time.perf_counter()
    work = pathlib.Path(tempfile.mkdtemp(prefix="spear-nb-binder-"))
    try:
        repo = work / "repo"
        shutil.copytree(
            ROOT, repo, ignore=lambda _d, names: [n for n in names if n in SKIP]
        )
        env_dir = work / "env"
        venv.EnvBuilder(with_pip=True).create(env_dir)
        python = str(env_dir / "bin" / "python")
        environ = dict(os.environ)
        environ["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{environ.get('PATH', '')}"
        environ["VIRTUAL_ENV"] = str(env_dir)
        environ.pop("PYTHONPATH", None)
        pip = [python, "-m", "pip", "--disable-pip-version-check", "-q"]
        run([*pip, "install", "-r", str(repo / "binder" / "requirements.txt")])
        run(["bash", str(repo / "binder" / "postBuild")], cwd=repo, env=environ)
        run([*pip, "install", *BASE])
        built = time.perf_counter() - started
        sys.stdout.write(f"environment built in {built:.0f} s\n")

        names = args.notebooks or sorted(
            str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("*.ipynb")
        )
        targets = [str(repo / name) for name in names]
        # Run from a directory outside the copy, so that only the installed
        # spear_nb (not the source tree) can be imported.
        result = subprocess.run(
            [python, "-c", EXECUTE, *targets], cwd=work, env=environ, check=False
        )
        total = time.perf_counter() - started
        sys.stdout.write(f"binder check finished in {total:.0f} s\n")
        return result.returncode
    finally:
        if args.keep:
            sys.stdout.write(f"kept {work}\n")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
