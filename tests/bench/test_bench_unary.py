"""`python -m bench unary` on a tiny cluster: every submit and every deletion answered OK, the
controller's CPU and SQL statements per call reported for both phases (no timing judged)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_unary_submits_then_deletes_and_reports_cpu_and_statements_per_call() -> None:
    run = subprocess.run([sys.executable, "-m", "bench", "unary", "--nodes", "16", "--placements", "8",
                          "--submits", "24", "--warmup", "8", "--clients", "4"],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    for phase in ("submit", "delete"):
        line = next(line for line in run.stdout.splitlines() if line.startswith(f"{phase}:"))
        cpu, loop, statements = re.search(
            r"CPU ([\d.]+) ms/call .*event loop's thread ([\d.]+) .* SQL ([\d.]+) statements/call", line).groups()
        assert float(cpu) >= float(loop) > 0 and float(statements) > 0, line
        assert line.endswith("errors: 0"), line
