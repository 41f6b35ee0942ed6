"""Regenerate common/proto/hat_pb2.py and hat_pb2_grpc.py from protos/hat.proto.

The generated files are committed (so installing needs no grpcio-tools); tests/common/test_proto_fresh.py
regenerates into a temporary folder and fails when the committed files are stale.
Usage: python scripts/generate_protos.py [OUT_DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos"
DEFAULT_OUT = ROOT / "common" / "proto"


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}",
                        f"--grpc_python_out={out_dir}", str(PROTO_DIR / "hat.proto")])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    grpc_file = out_dir / "hat_pb2_grpc.py"
    # protoc writes an absolute import; the generated pair lives inside the hat.common.proto package
    grpc_file.write_text(grpc_file.read_text().replace("import hat_pb2 as hat__pb2", "from . import hat_pb2 as hat__pb2"))
    return [out_dir / "hat_pb2.py", grpc_file]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT):
        print(f"wrote {path}")
