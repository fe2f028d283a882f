"""Maia placement library: a pure function from a cluster snapshot to a placement plan.

    problem = problem_from_dict(doc)          # validated interchange document
    plan = solve(problem, time_limit_ms=500)  # never raises for a valid problem
    doc = plan_to_dict(plan)                  # valid against plan.schema.json

No I/O, no controller, no grpc or database imports (an import-linter contract checks it).

The public names are imported on first use (PEP 562), not with the package: the solver pulls
OR-Tools and, through it, pandas (~0.8 s of a process's start), and the interchange jsonschema,
while many importers want only the model's dataclasses (`scheduler.model`: the controller's
configuration, store and command-line tools). `from scheduler import solve` imports the solver
then, once per process (Python's module cache).
"""

from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.errors import ProblemError
    from scheduler.interchange import deployment_to_dict, plan_to_dict, problem_from_dict, problem_to_dict
    from scheduler.model import (Deployment, Move, Node, Nomination, Options, Placement, Plan, Preemption,
                                 Problem, Rack, Reason, Row, ShardSpec, Spread, Tenant, Unplaced,
                                 Zone)
    from scheduler.solve import solve

_MODEL_NAMES = ("Deployment", "Move", "Node", "Nomination", "Options", "Placement", "Plan", "Preemption", "Problem",
                "Rack", "Reason", "Row", "ShardSpec", "Spread", "Tenant", "Unplaced", "Zone")
_INTERCHANGE_NAMES = ("deployment_to_dict", "plan_to_dict", "problem_from_dict", "problem_to_dict")
# Where each public name lives.
_HOMES: dict[str, str] = {
    **dict.fromkeys(_MODEL_NAMES, "scheduler.model"),
    **dict.fromkeys(_INTERCHANGE_NAMES, "scheduler.interchange"),
    "ProblemError": "scheduler.errors",
    "solve": "scheduler.solve",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value  # found here from now on, without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


class _Package(ModuleType):
    """The package's `solve` stays the function: importing the submodule `scheduler.solve` (the
    solver's own modules do) makes the import system set the package's attribute of that name to
    the module, which would make a later `from scheduler import solve` the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "solve" and isinstance(value, ModuleType):
            value = value.solve
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
