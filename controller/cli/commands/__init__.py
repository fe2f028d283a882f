"""maiactl subcommands, one module per command family; each exposes `register(subparsers)`."""
from __future__ import annotations

from controller.cli.commands import (
    apply, audit, config, delete, devca, get, nodes, placements, solve, summary, token, usage, wait,
)

MODULES = (apply, get, summary, placements, delete, nodes, wait, solve, config, audit, devca, usage, token)
