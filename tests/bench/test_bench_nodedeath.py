"""`python -m bench nodedeath` on a tiny cluster (real controller and simnode processes, short
graces): what it reports is about a run that happened (every killed node suspected, downed and
evicted, the work placed again, nothing else moved, the checker agrees); never its times."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.nodedeath import eviction_rates

REPO = Path(__file__).resolve().parents[2]


def test_nodedeath_kills_a_quarter_and_everything_is_placed_again_without_needless_moves(tmp_path: Path) -> None:
    out = tmp_path / "nodedeath.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "nodedeath", "--nodes", "32", "--fleets", "1", "--kill", "0.25",
         "--node-down-grace", "1", "--node-eviction-grace", "2", "--load-delay", "0.05", "--timeout", "120",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    [kill] = result["rounds"]
    assert kill["killed"] == kill["suspected"] == kill["downed"] == kill["evictions"] == 8
    assert kill["holding_work"] > 0 and kill["shards_hit"] == 2 * kill["replicas_hit"]
    assert kill["placed_again_s"] is not None and kill["running_again_s"] is not None and kill["errors"] == []
    assert kill["moved_needlessly"] == 0
    assert result["checker_violation_count"] == 0 and result["controller_exit"] == 0


def test_eviction_rates_count_the_busiest_second_per_zone() -> None:
    evicted = {"a1": 10.0, "a2": 10.5, "a3": 10.9, "a4": 12.0, "b1": 10.2}
    zones = {"a1": "za", "a2": "za", "a3": "za", "a4": "za", "b1": "zb"}
    assert eviction_rates(evicted, zones) == {"zones": 2, "peak_per_zone_per_s": 3, "span_s": 2.0,
                                              "overall_per_s": 2.5}
