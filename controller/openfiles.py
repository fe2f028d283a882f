"""The process's limit on open files, raised to what the system allows it.

A controller holds a connection per agent (and per client, watch and gateway link), and a
`maia-simnode` fleet a connection per node: 4,096 nodes need 4,096 descriptors on each side, over
the common soft limit of 1,024, where the hard limit is usually far higher (what nginx's
`worker_rlimit_nofile` and systemd's `LimitNOFILE` are for). Each process raises its own soft
limit to its hard one at start; beyond that is the operator's (`ulimit -Hn`, a unit's
`LimitNOFILE=`).
"""

from __future__ import annotations

import resource

# What the soft limit is raised to at most when the hard one is unlimited (Linux refuses more than
# its `fs.nr_open`, 1,048,576 by default).
UNLIMITED_TARGET = 1 << 20


def raise_open_files_limit() -> int:
    """The soft limit on open files raised to the hard one (or `UNLIMITED_TARGET`), never lowered;
    the soft limit now (as it was, if the system refused)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft
