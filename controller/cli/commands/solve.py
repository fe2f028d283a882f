"""`maiactl solve PROBLEM.json`: run the scheduler library locally, no controller involved.

With `-o json` stdout carries exactly one JSON document, plan_to_dict(plan); everything else
(progress, errors) goes to stderr. A problem the library rejects (ProblemError) exits 2.
The solve lists the existing placements the plan keeps that break a hard rule
(`stats.kept_violations`, `solve(check_kept=True)`); the table output warns of them.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from controller.cli.client import CliError, Exit
from controller.cli.config import not_utf8
from controller.cli.context import Context
from controller.cli.loading import JsonError, json_document
from controller.cli.plan_view import plan_text


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("solve", parents=[common], help="solve a placement problem file locally")
    p.add_argument("problem", metavar="PROBLEM.json", help="problem in the interchange format ('-' for stdin)")
    p.add_argument("--time-limit-ms", type=int, metavar="N", help="override options.time_limit_ms")
    p.set_defaults(handler=run, offline=True)


def load_problem(path: str) -> dict[str, Any]:
    import sys

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror or exc}", 2) from None
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: cannot read: {not_utf8(exc)}", 2) from None
    try:
        doc = json_document(text, "problem document")
    except JsonError as exc:
        raise CliError(f"{path}: {exc}", 2) from None
    if not isinstance(doc, dict):
        raise CliError(f"{path}: expected a JSON object, got {type(doc).__name__}", 2)
    return doc


def run(args: argparse.Namespace, ctx: Context) -> int:
    try:
        from scheduler import ProblemError, plan_to_dict, problem_from_dict, solve
    except ImportError as exc:
        raise CliError(f"the scheduler library is not available: {exc}", 1) from None
    if ctx.output == "name":  # before the solve, not after it
        raise CliError("-o name is not supported by solve: a plan names no objects (-o json|yaml|table)", Exit.USAGE)
    doc = load_problem(args.problem)
    if args.time_limit_ms is not None:
        if args.time_limit_ms < 1:
            raise CliError("--time-limit-ms must be at least 1", 2)
        options = doc.get("options", {})
        if isinstance(options, dict):  # anything else is the problem's mistake, said as it is below
            doc["options"] = {**options, "time_limit_ms": args.time_limit_ms}
    try:
        problem = problem_from_dict(doc)
    except ProblemError as exc:
        raise CliError(str(exc), 2) from None
    plan_doc = plan_to_dict(solve(problem, check_kept=True))  # a file's reader is told what it keeps broken
    ctx.emit(lambda: plan_doc, lambda: plan_text(plan_doc, doc))
    return 0
