"""Generate the Python protobuf/gRPC code for proto/maia/v1 into the same folder.

`python tools/gen_proto.py` rewrites the committed *_pb2*.py files;
`python tools/gen_proto.py --check` exits 1 when they differ from what proto/ would generate
(the test suite runs the check, so a .proto change without regenerated code fails CI).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc
import grpc_tools
from google.rpc import status_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
API_DIR = PROTO_ROOT / "maia" / "v1"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for every .proto under proto/maia/v1, writing into out_dir (mirrored paths)."""
    sources = sorted(API_DIR.glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # google/rpc/*.proto (google.rpc.Status in SubmitDeploymentsResponse) ship with
    # googleapis-common-protos (a dependency of grpcio-status), beside their generated modules.
    googleapis = Path(status_pb2.__file__).resolve().parents[2]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"-I{googleapis}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(s.relative_to(PROTO_ROOT)) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "maia" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        if args.check:
            stale = [
                g.name
                for g in generated
                if not (API_DIR / g.name).exists() or not filecmp.cmp(g, API_DIR / g.name, shallow=False)
            ]
            committed = {p.name for p in API_DIR.glob("*_pb2*.py*")}
            extra = sorted(committed - {g.name for g in generated})
            if stale or extra:
                print(f"generated code is stale: {stale + extra}; run `make proto`", file=sys.stderr)
                return 1
            print(f"generated code matches proto/ ({len(generated)} files)")
            return 0
        for g in generated:
            (API_DIR / g.name).write_bytes(g.read_bytes())
        print(f"wrote {len(generated)} files to {API_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
