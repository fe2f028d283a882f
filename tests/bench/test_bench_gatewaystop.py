"""`bench/gatewaystop.py` (a real gateway process stopping with many agent streams): every agent
gets the controller's status and the gateway exits itself; a run that fails leaves no gateway."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import gatewaystop  # noqa: E402


def test_a_stop_ends_every_stream_with_the_controllers_status_and_the_gateway_exits_itself(tmp_path: Path) -> None:
    out = tmp_path / "stop.json"
    done = subprocess.run([sys.executable, "bench/gatewaystop.py", "--streams", "64", "--per-channel", "16",
                           "--settle", "0.2", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    run = json.loads(out.read_text())
    assert run["agents_ends"] == {"OK": 64}
    assert run["gateway_exit_code"] == 0 and not run["killed"]


def _gateway_children() -> list[int]:
    """The live `controller.gateway` processes this process started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"controller.gateway" in cmdline:
            found.append(int(entry.name))
    return found


async def test_a_run_whose_agents_fail_stops_its_gateway_before_it_raises() -> None:
    args = argparse.Namespace(streams=4, per_channel=0, linger_ms=5.0, settle=0.0, relay_grace=1.0, grace=None)
    with pytest.raises(RuntimeError, match="the agents exited"):  # per_channel 0: the agents' process fails
        await gatewaystop._controller(args)
    assert _gateway_children() == []
