"""The committed generated code matches proto/, and the check notices when it does not."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "proto" / "tools"))

import check_generated  # noqa: E402


def copy_workspace(dest: Path) -> Path:
    shutil.copytree(REPO / "proto", dest / "proto")
    shutil.copy(REPO / "buf.yaml", dest / "buf.yaml")
    return dest


def test_committed_generated_code_is_fresh() -> None:
    assert check_generated.stale(REPO, REPO / "clients" / "python") == []


def test_a_proto_change_without_make_proto_is_caught(tmp_path: Path) -> None:
    workspace = copy_workspace(tmp_path)
    proto = workspace / "proto" / "webshard" / "recovery" / "v1" / "recovery.proto"
    text = proto.read_text()
    proto.write_text(
        text.replace(
            "message ListBreakersRequest {}",
            "message ListBreakersRequest {\n"
            "  // scope restricts the list.\n"
            "  BreakerScope scope = 1;\n"
            "}",
        )
    )
    problems = check_generated.stale(workspace, REPO / "clients" / "python")
    assert "stale: webshard/recovery/v1/recovery_pb2.py" in problems
    assert "stale: webshard/recovery/v1/recovery_pb2.pyi" in problems


def test_a_new_proto_file_without_make_proto_is_caught(tmp_path: Path) -> None:
    workspace = copy_workspace(tmp_path)
    extra = workspace / "proto" / "webshard" / "common" / "v1" / "extra.proto"
    extra.write_text(
        'syntax = "proto3";\n\npackage webshard.common.v1;\n\n'
        "// Extra is new.\nmessage Extra {\n  // id is new.\n  string id = 1;\n}\n"
    )
    problems = check_generated.stale(workspace, REPO / "clients" / "python")
    assert "missing: webshard/common/v1/extra_pb2.py" in problems
