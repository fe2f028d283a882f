"""maiactl subcommands, one module per command family; each exposes `register(subparsers, common)`.

The modules are imported when a parser is built (`modules`), not with this package: maiactl
builds its parser with the one module of the subcommand it runs (`controller.cli.main`), so a
command pays neither for the others' modules nor for what only they import.
"""
from __future__ import annotations

from importlib import import_module
from types import ModuleType

# Each module and the subcommands it registers, in the order of `maiactl --help`
# (tests/cli/test_cli_lazy_commands.py checks the names against what `register` adds).
COMMANDS: dict[str, tuple[str, ...]] = {
    "version": ("version",), "apply": ("apply", "diff", "submit"), "get": ("get",), "describe": ("describe",),
    "explain": ("explain",), "map": ("map",), "summary": ("summary",), "snapshot": ("snapshot",),
    "placements": ("placements",), "delete": ("delete",), "nodes": ("cordon", "uncordon", "drain", "node"),
    "wait": ("wait",), "rollout": ("scale", "rollout"), "solve": ("solve",), "config": ("config",),
    "token": ("token",), "audit": ("audit",), "devca": ("dev-ca",), "usage": ("usage",),
    "completion": ("completion",),
}


def modules(command: str | None = None) -> list[ModuleType]:
    """The command modules, imported: the one registering subcommand `command`, else (None, or
    a word no module registers) all of them in order."""
    names = [name for name, commands in COMMANDS.items() if command in commands] or list(COMMANDS)
    return [import_module(f"{__name__}.{name}") for name in names]
