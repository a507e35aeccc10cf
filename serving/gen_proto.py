"""Generate the Python stubs of the wire contract (proto/milroi/v1/scoring.proto).

    python -m serving.gen_proto            # regenerate into proto/milroi/v1/ (committed)
    python -m serving.gen_proto --out DIR  # into DIR/milroi/v1/ (the drift test compares)

grpc_tools.protoc writes scoring_pb2.py, scoring_pb2.pyi (type hints) and scoring_pb2_grpc.py.
protoc names the message module after the proto path, so the grpc module would say
`from milroi.v1 import scoring_pb2 as ...` only when the include root is `proto/`; we run it
that way and then check (and normalise) that import, so the stubs import as the installed
package `milroi.v1` wherever they are used.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILES = ("milroi/v1/scoring.proto",)
GENERATED = ("scoring_pb2.py", "scoring_pb2.pyi", "scoring_pb2_grpc.py")
# What protoc may write for the message import in scoring_pb2_grpc.py, depending on the include root.
_BARE_IMPORT = re.compile(r"^import scoring_pb2 as (\w+)$", re.MULTILINE)
_PACKAGE_IMPORT = "from milroi.v1 import scoring_pb2 as"


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the stubs of every proto into out_root/milroi/v1/; returns the written paths."""
    import grpc_tools
    from grpc_tools import protoc

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    # protoc needs the well-known types (google/protobuf/*.proto) shipped inside grpc_tools.
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}",
            f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}",
            *PROTO_FILES]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILES} under {proto_root}")
    written = [out_root / "milroi" / "v1" / name for name in GENERATED]
    grpc_module = written[2]
    text = _BARE_IMPORT.sub(lambda m: f"{_PACKAGE_IMPORT} {m.group(1)}", grpc_module.read_text())
    if _PACKAGE_IMPORT not in text:
        raise RuntimeError(f"{grpc_module}: unexpected message import, expected {_PACKAGE_IMPORT!r}")
    grpc_module.write_text(text)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT,
                        help="output root; stubs go to OUT/milroi/v1/ (default: proto/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
