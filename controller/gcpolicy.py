"""The cyclic garbage collector's thresholds for the long-running processes (`maia-controller`,
`maia-simnode`).

Both keep a large, long-lived heap (a controller: ORM rows, agent sessions, a warm cluster; a fleet:
hundreds of simulated nodes) and allocate many short-lived objects per request. With CPython's
default thresholds (700, 10, 10) a young-generation collection runs every 700 net allocations, so
the objects of every request in flight at that moment survive it and are promoted; promotions
pile up and force a full collection, which walks the whole heap, every few seconds. Measured on
the end-to-end benchmark (1,024 simulated nodes, SQLite, 64 clients, load ~9): about 14 % of the
controller's CPU went to collections, full ones taking up to 0.16 s of event-loop time each; with
the thresholds below, 0.22 s in all over the whole run. A request's objects are freed by reference
counting long before a collection: only cycles wait for one, and these thresholds still collect
them every 20,000 (young) and 1,000,000 (middle) net allocations.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000  # net allocations between young-generation collections (CPython: 700)
MIDDLE_EVERY = 50         # young collections per middle-generation collection (CPython: 10)
OLD_EVERY = 20            # middle collections before a full one is considered (CPython: 10)


def configure_gc() -> None:
    """Set the collector's thresholds for a long-running, request-serving process."""
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_EVERY, OLD_EVERY)
