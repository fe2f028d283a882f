"""What a process imports before it needs the solver: the solver (OR-Tools, and pandas through it)
costs ~0.8 s of a process's start, and `maia-controller`'s settings, the store and the domain
values need only the model's dataclasses, and a serving controller decides arrivals in its decide
process (which imports the solver) and solves in its own only when there is something to place
(its dry runs, its full passes over deployments). Each check runs in a fresh interpreter, so what the
test process imported already does not count."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOLVER = ("ortools", "pandas", "scheduler.solve", "scheduler.session")


def imported_after(code: str) -> set[str]:
    """The top-level packages and `scheduler` modules in sys.modules after running `code` in a
    fresh interpreter."""
    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True,
                         timeout=120)
    names = out.stdout.split()
    return {n.split(".")[0] for n in names} | {n for n in names if n.startswith("scheduler.")}


@pytest.mark.parametrize("code", [
    # What `maia-controller` imports before it parses a flag (--help, --version, and the
    # refusals of a bad --db or --listen exit there).
    "import controller.main",
    # Every module of the store and of the domain values.
    "import importlib, pkgutil, controller.store as s, controller.domain as d\n"
    "for pkg in (s, d):\n"
    "    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.'):\n"
    "        importlib.import_module(m.name)",
    # The library's model and interchange, through the package.
    "from scheduler import Problem, Plan, problem_from_dict, plan_to_dict, ProblemError",
    # A serving controller's modules: it decides arrivals in its decide process, which imports
    # the solver itself (controller/scheduling/decider.py).
    "import controller.api.server",
    # ... and its first full pass, on a cluster without deployments yet (planning.nothing_to_place).
    "import asyncio\nfrom controller.usecases import planning\nfrom scheduler import Problem, problem_to_dict\n"
    "doc = planning.with_options(problem_to_dict(Problem(nodes=(), deployments=())), time_limit_ms=100)\n"
    "assert not asyncio.run(planning.solve_online_first(doc, time_limit_ms=100)).placements",
], ids=["maia-controller before its flags", "the store and the domain", "the model through the package",
        "a serving controller's modules", "a full pass without deployments"])
def test_the_solver_is_not_imported_by_what_only_needs_the_model(code: str) -> None:
    assert imported_after(code).isdisjoint(SOLVER)


@pytest.mark.parametrize("module", ["controller.cli.main", "controller.simnode.main"])
def test_maiactl_and_maia_simnode_start_without_the_certificate_library(module: str) -> None:
    # Only `maiactl dev-ca` and `maia-simnode --cert-dir` use controller.devca (cryptography,
    # ~0.1 s); every maiactl command and every simulated fleet would pay it at start.
    assert imported_after(f"import {module}").isdisjoint({"cryptography", *SOLVER})


def test_a_controller_imports_its_consoles_http_server_only_to_serve_it() -> None:
    # aiohttp (~0.2 s of a start) for `--http-listen` alone: the controllers of an HA group, the
    # tests' and the demo's, mostly serve no console (`ControllerServer._serve_console`).
    assert "aiohttp" not in imported_after("import controller.api.server")


def test_the_package_still_gives_the_solver_and_its_function_stays_a_function() -> None:
    # `scheduler.solve` names a submodule and the function: importing the submodule first (as
    # the session does) must not make the package's `solve` the module.
    code = ("import scheduler.session, scheduler\n"
            "from scheduler import solve, Problem\n"
            "import scheduler.solve as also\n"
            "assert callable(solve) and solve is scheduler.solve is also and solve.__module__ == 'scheduler.solve'\n"
            "assert Problem.__module__ == 'scheduler.model'")
    assert "ortools" in imported_after(code)
