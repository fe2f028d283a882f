"""Benchmarks for the Maia placement solver.

`python -m bench fgd ...` replays the FGD paper's protocol on the Alibaba GPU trace and prints our
unallocated-GPU share beside the paper's six policies; `python -m bench synthetic ...` measures
decision latency, placed demand and memory on Maia-shaped clusters against an independent
best-fit greedy (`bench.greedy`). Traces are read in place from the shared data directory
(`MAIA_DATA_DIR`, default /work/shared/data) and never copied into the repository.
"""
