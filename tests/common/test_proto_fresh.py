"""The committed protobuf code matches protos/hat.proto: regenerating it gives the same bytes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "common" / "proto"


def load_generator():
    spec = importlib.util.spec_from_file_location("hat_generate_protos", ROOT / "scripts" / "generate_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_proto_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates the proto code")
    written = load_generator().generate(tmp_path / "proto")
    assert sorted(p.name for p in written) == ["hat_pb2.py", "hat_pb2_grpc.py"]
    for path in written:
        fresh, committed = path.read_bytes(), (COMMITTED / path.name).read_bytes()
        assert fresh == committed, (f"common/proto/{path.name} is stale: run `python scripts/generate_protos.py` "
                                    "after editing protos/hat.proto")
