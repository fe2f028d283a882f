"""One bad deployment never stalls the others.

Two ways a stored deployment can stop every solve: it is beyond today's limits (stored before
they existed: the solver would build arrays its size), or the solver raises on it. The
reconciler asks `Quarantine` which ones to take out (`repo.quarantine_deployment` writes it):
- `beyond_limits`: each deployment is judged once, on the first pass that sees it after
  start-up or after becoming leader (submissions are validated already, by whichever controller
  took them, with its limits); not those a fast pass reads as this process's submit validated
  and inserted them (`usecases.submits.SubmittedRows`: the same fields, the same limits);
- `isolate`: when the solver raised on the whole cluster, the deployments new since the last
  good pass are solved alone (at most `limits.ISOLATION_SOLVES_MAX` of them, newest first);
  one the solver fails on `quarantine_after` times is a culprit, with why.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import replace
from typing import Any

from controller import limits
from controller.domain.values import split_deployment_key
from controller.errors import InvalidArgument
from controller.store.rollout import stored_key
from controller.usecases import planning
from controller.usecases.deployments import validate_spec

Solve = Callable[..., Awaitable[Any]]


class Quarantine:
    def __init__(self, quarantine_after: int = limits.QUARANTINE_AFTER_FAILURES) -> None:
        self.quarantine_after = quarantine_after
        self.within: set[str] = set()  # deployments the limits have passed
        self.good: set[str] = set()    # deployments of the last committed plan
        self._failures: dict[str, int] = {}  # solver failures per deployment (solved alone)

    def beyond_limits(self, problem: dict[str, Any]) -> dict[str, str]:
        """Stored deployments today's validation would refuse, with why; names no longer in
        `problem` are forgotten."""
        docs = problem.get("deployments", ())
        beyond = self.judge(docs)
        self.within.intersection_update(doc["id"] for doc in docs)  # forget the gone
        return beyond

    def judge(self, docs: Iterable[dict[str, Any]], validated: Collection[str] = ()) -> dict[str, str]:
        """`beyond_limits` of some deployments (those passed before are not judged again, nor
        those `validated`: ids whose documents this process's validation passed already)."""
        beyond: dict[str, str] = {}
        for doc in docs:
            solver_id = doc["id"]
            if solver_id in self.within:
                continue
            if solver_id in validated:
                self.within.add(solver_id)
                continue
            key = stored_key(solver_id)
            try:
                spec = planning.spec_of_doc(doc)
                if key != solver_id:  # an outgoing revision (TENANT/NAME~REVISION): under its deployment's name
                    spec = replace(spec, name=split_deployment_key(key)[1])
                validate_spec(spec)
            except InvalidArgument as exc:
                beyond[doc["id"]] = f"exceeds the controller's limits: {exc.message}; submit it again within them"
            else:
                self.within.add(doc["id"])
        return beyond

    async def isolate(self, problem: dict[str, Any], solve: Solve, *, time_limit_ms: int) -> dict[str, str]:
        """Solve suspects alone; those the solver fails on `quarantine_after` times, with why."""
        docs = list(reversed(problem.get("deployments", ())))  # newest first
        suspects = [d["id"] for d in docs if d["id"] not in self.good] or [d["id"] for d in docs]
        culprits: dict[str, str] = {}
        for name in suspects[:limits.ISOLATION_SOLVES_MAX]:
            alone = planning.with_options(planning.with_only(problem, name), time_limit_ms=time_limit_ms)
            error: Exception | None = None
            while self._failures.get(name, 0) < self.quarantine_after:
                try:
                    await solve(alone, time_limit_ms=time_limit_ms)
                except Exception as exc:
                    self._failures[name] = self._failures.get(name, 0) + 1
                    error = exc
                else:
                    break
            if error is not None and self._failures.get(name, 0) >= self.quarantine_after:
                culprits[name] = (f"the solver failed on it {self._failures[name]} times "
                                  f"({type(error).__name__}: {str(error)[:200]}); submit it again or delete it")
        return culprits

    def quarantined(self, names: Iterable[str]) -> None:
        for name in names:
            self._failures.pop(name, None)
