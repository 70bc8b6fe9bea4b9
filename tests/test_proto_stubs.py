"""The committed gRPC stubs must be exactly what protoc makes from proto/."""

from __future__ import annotations

from pathlib import Path

from biolit_id.cli.protogen import PROTO_ROOT, generate


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert written, "protoc wrote nothing"
    for path in written:
        committed = PROTO_ROOT / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} missing: run `biolit-id protogen`"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run `biolit-id protogen` and commit the result"
        )
