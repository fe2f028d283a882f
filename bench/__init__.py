"""Benchmarks for the Maia placement solver and controller.

`python -m bench fgd ...` replays the FGD paper's protocol on the Alibaba GPU trace and prints our
unallocated-GPU share beside the paper's six policies; `python -m bench synthetic ...` measures
decision latency, placed demand and memory on Maia-shaped clusters against an independent
best-fit greedy (`bench.greedy`). Traces are read in place from the shared data directory
(`MAIA_DATA_DIR`, default /work/shared/data) and never copied into the repository.

The controller's: `python -m bench e2e` (a real controller, real simnode fleets, concurrent gRPC
clients: issue 8's end-to-end figures), `failover`, `join`, `nodedeath`, `submit`, `unary`,
`reconcile`, `commit`, `session`; and modules run alone (`python -m bench.heartbeats`, ...) that
time one part in process. Every command, and what it measured, is in docs/benchmarks.md.
"""
