"""docs/cli.md is generated from maiactl's parser; this fails when a flag changed without it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cli_reference_is_up_to_date() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_cli_docs.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_exit_code_is_documented() -> None:
    from controller.cli.client import EXIT_MEANING, Exit

    assert set(EXIT_MEANING) == set(Exit)
    text = (ROOT / "docs" / "cli.md").read_text()
    for code in Exit:
        assert f"| {int(code)} | `{code.name}`" in text
