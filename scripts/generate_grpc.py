"""Regenerate the gRPC modules from spear_nb/communication/_grpc/spear.proto.

    python scripts/generate_grpc.py          # rewrite the generated modules
    python scripts/generate_grpc.py --check  # exit 1 if they are stale

Needs grpcio-tools (a test extra). The generated modules are committed, so users
never need it; tests/communication/test_grpc.py runs ``--check``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "spear_nb" / "communication" / "_grpc"
OUTPUTS = ("spear_pb2.py", "spear_pb2_grpc.py", "spear_pb2.pyi")


def generate(into: pathlib.Path) -> None:
    """Run protoc on the .proto, writing the modules into ``into``."""
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PACKAGE}",
            f"--python_out={into}",
            f"--pyi_out={into}",
            f"--grpc_python_out={into}",
            str(PACKAGE / "spear.proto"),
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with code {code}")
    # protoc writes a top-level import; make it relative to the package.
    grpc_module = into / "spear_pb2_grpc.py"
    text = grpc_module.read_text()
    grpc_module.write_text(
        text.replace(
            "import spear_pb2 as spear__pb2", "from . import spear_pb2 as spear__pb2"
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report staleness")
    args = parser.parse_args()
    if not args.check:
        generate(PACKAGE)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = pathlib.Path(tmp)
        generate(fresh)
        stale = [
            name
            for name in OUTPUTS
            if (fresh / name).read_text() != (PACKAGE / name).read_text()
        ]
    if stale:
        sys.stderr.write(
            f"stale generated gRPC code: {', '.join(stale)}; "
            "run python scripts/generate_grpc.py\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
