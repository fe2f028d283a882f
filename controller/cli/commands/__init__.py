"""maiactl subcommands, one module per command family; each exposes `register(subparsers)`."""
from __future__ import annotations

from controller.cli.commands import (
    apply, audit, completion, config, delete, describe, devca, explain, get, map, nodes, placements, rollout, snapshot,
    solve, summary, token, usage, version, wait,
)

MODULES = (version, apply, get, describe, explain, map, summary, snapshot, placements, delete, nodes, wait, rollout,
           solve, config, token, audit, devca, usage, completion)
