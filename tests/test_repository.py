"""Repository-level contracts: generated code matches proto/, and the layering holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_protobuf_code_matches_proto_sources() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_import_contracts_hold() -> None:
    """Every import-linter contract in pyproject.toml: scheduler/ is pure (no controller, grpc,
    sqlalchemy or the generated API); the controller's layers (api -> usecases -> store -> domain)
    are never crossed upwards; maiactl and maia-simnode speak only gRPC; use cases build no SQL;
    the modules of each split package (the plan applier, the reconciler, the agent hub, the
    warm cluster cache, the interceptor chain, the end-to-end bench) import one way."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "KEPT" in result.stdout and "BROKEN" not in result.stdout
