"""End to end: a real `maia-controller`, real `maia-simnode` fleets, concurrent gRPC clients.

What a lab sees, measured at the client: N concurrent clients submit single-shard, node-local
deployments and, spread among them, gangs (one replica of 8..64 shards, row-local), and delete
some of their own running deployments as they go. A watcher on `WatchDeploymentBatches` timestamps
when each deployment is committed (every replica placed) and when it runs. The controller is
its own process (authentication on: the bootstrap admin token, as `make demo` runs it), its
CPU seconds and peak RSS read from /proc. On SQLite and on a throwaway PostgreSQL started the
way the tests start theirs (`bench/pgserver.py`).

Ends by grading the committed state, read from the database once the controller has stopped,
with the independent checker of the test suite (`tests/scheduler/checker.py`).

`--preload N` starts from a cluster already holding N running single-shard deployments
(`bench.preload`: written into the database before the controller starts, the nodes as the
fleets describe them; the fleets then join as existing nodes and are handed their shards):
"4,096 nodes holding 10,000 placements" in seconds instead of an hour of submits. The submitted
workload then asks for `--fill` of the accelerators the preload left free. Tenants are as many
as keep each under `PER_TENANT` deployments (`limits.DEPLOYMENTS_PER_TENANT_MAX`).

    python -m bench e2e --nodes 256 --db sqlite postgres
    python -m bench e2e --nodes 4096 --preload 10000 --db sqlite
    python -m bench e2e --nodes 4096 --preload 10000 --db sqlite --rate 250   # open loop
    python -m bench e2e --nodes 16384 --db sqlite --shared-channel --fleets 32 --fleets-at-once --stagger 1 \
        --fleet-nice 19 --heartbeat-timeout 30 --join-timeout 840   # the 16,384-node join of `bench join`

Two ways to offer the load. Closed loop (`--clients N`, the default): N clients, each sending its
next submit once the last was answered; at saturation a submit's latency is N / the rate (the
clients' own queue), not the submit's work. Open loop (`--rate R`): submits sent at arrival times
R a second apart on average (`--arrivals poisson|even`), whatever the earlier ones' answers, so
the latency is that of a submit at that offered load; the bench reports how late it sent
(a client too busy to keep to the arrivals measures less than it offers).

`--submit-batch K` (closed loop): each client sends its next up to K single-shard deployments in
one SubmitDeployments call (a gang still alone, in a SubmitDeployment), each deployment's submit
latency that of its call; the controller's submit histogram then counts calls of either kind.
K = 1, the default, is one SubmitDeployment a deployment, as before the flag.

The package, one concern a module, each importing only those below it (a contract in
pyproject.toml):
- `runner.py`: the run from start to end (`main`, `one_run`): database, controller, fleets,
  load, waiting, stopping everything it started, grading, the reports and the JSON;
- `reporting.py`: `report`, the lines printed for a run;
- `summary.py`: `summarize`, a run as the result dict (`--json`);
- `measuring.py`: `Bench`, one run as it goes: CPU, RSS, the controller's /metrics, progress;
- `watching.py`: the WatchDeploymentBatches stream: commits, Running and deletions timestamped;
- `load.py`: `Times` and `Run`, the closed- and open-loop submits and the deleters;
- `cluster.py`: `Shape`, the workload, the admin setup and the wait for the nodes to join;
- `databases.py`: SQLite or a throwaway PostgreSQL, pg_stat_statements, the checker's `grade`;
  `processes.py`: `Process`, `stop_all`, py-spy, the machine's CPU; `stats.py`: quantiles of
  histograms and the steady rate; `options.py`: the command line.
"""

from bench.e2e.cluster import NODES_PER_RACK, TENANTS, Shape, admin_setup, wait_connected
from bench.e2e.databases import database, grade
from bench.e2e.load import Run, Times, arrival_offsets, deleter, open_loop
from bench.e2e.options import add_arguments
from bench.e2e.processes import Process, _profile, run_until_interrupted, stop_all
from bench.e2e.runner import main
from bench.e2e.stats import bucket_quantile, interpolated_quantile, middle_rate
from bench.e2e.watching import _seen, watch_listed

# The names other code imports from `bench.e2e` (the other benches, `bench/__main__.py`, the tests).
__all__ = [
    "NODES_PER_RACK", "TENANTS", "Process", "Run", "Shape", "Times", "_profile", "_seen", "add_arguments",
    "admin_setup", "arrival_offsets", "bucket_quantile", "database", "deleter", "grade", "interpolated_quantile",
    "main", "middle_rate", "open_loop", "run_until_interrupted", "stop_all", "wait_connected", "watch_listed",
]
