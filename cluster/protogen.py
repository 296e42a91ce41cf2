"""Generate the Python gRPC code for protos/ with grpcio-tools.

The generated modules live in the top-level package `gptoss` (mirroring the proto package
`gptoss.v1`), so a proto that imports another (`import "gptoss/v1/common.proto"`) produces
`from gptoss.v1 import common_pb2`, which resolves without path tricks.

Regenerate after editing a proto:  python -m cluster.protogen
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
# Generated files per .proto: messages, type stubs, service stubs.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """All .proto files under proto_root, relative to it, in a stable order."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def generated_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Paths (relative to the output root) of every file generate() writes."""
    return [proto.with_suffix("").with_name(proto.stem + suffix)
            for proto in proto_files(proto_root) for suffix in GENERATED_SUFFIXES]


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc on every proto under proto_root, writing the Python code into out_dir."""
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    protos = [str(p) for p in proto_files(proto_root)]
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    return [out_dir / f for f in generated_files(proto_root)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
