"""Maia placement library: a pure function from a cluster snapshot to a placement plan.

    problem = problem_from_dict(doc)          # validated interchange document
    plan = solve(problem, time_limit_ms=500)  # never raises for a valid problem
    doc = plan_to_dict(plan)                  # valid against plan.schema.json

No I/O, no controller, no grpc or database imports (an import-linter contract checks it).
"""

from scheduler.errors import ProblemError
from scheduler.interchange import deployment_to_dict, plan_to_dict, problem_from_dict, problem_to_dict
from scheduler.model import (Deployment, Move, Node, Options, Placement, Plan, Preemption,
                             Problem, Rack, Reason, Row, ShardSpec, Spread, Tenant, Unplaced,
                             Zone)
from scheduler.solve import solve

__all__ = ["Deployment", "Move", "Node", "Options", "Placement", "Plan", "Preemption", "Problem",
           "ProblemError", "Rack", "Reason", "Row", "ShardSpec", "Spread", "Tenant", "Unplaced",
           "Zone", "deployment_to_dict", "plan_to_dict", "problem_from_dict", "problem_to_dict", "solve"]
