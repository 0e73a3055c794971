"""Command line: ``python -m spear_nb demo`` runs the demo; ``version`` prints it."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spear_nb",
        description="Run functions in warm task instances and watch the flow.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log lifecycle")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo", help="run each kind of process function on a chapter of Dickens"
    )
    commands.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.command == "version":
        from spear_nb import __version__

        sys.stdout.write(f"spear_nb {__version__}\n")
        return 0
    from spear_nb import _demo

    _demo.run(sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
