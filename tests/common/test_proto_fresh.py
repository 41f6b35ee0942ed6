"""The committed protobuf code matches protos/hat.proto: regenerating it gives the same bytes."""
from __future__ import annotations

from pathlib import Path

import pytest

from script_loader import load_script

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "common" / "proto"


def test_committed_proto_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates the proto code")
    written = load_script("generate_protos").generate(tmp_path / "proto")
    assert sorted(p.name for p in written) == ["hat_pb2.py", "hat_pb2_grpc.py"]
    for path in written:
        fresh, committed = path.read_bytes(), (COMMITTED / path.name).read_bytes()
        assert fresh == committed, (f"common/proto/{path.name} is stale: run `python scripts/generate_protos.py` "
                                    "after editing protos/hat.proto")
