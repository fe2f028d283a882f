"""What a tenant may read of the solver's words: other tenants' ids and deployments redacted.

The solver explains a "no" for people, with the names that bind: "rack r0 holds lab-b
(dedicated_rack)", "1 more replica fits after preempting 2 replicas of lab-b/chat". Admins read
that as it is. A tenant token must never learn another tenant's id, its deployments or its
contract from it (the customers are competing labs), so every reason text, preemption hint and
event message a tenant reads passes through one `Redactor` here, at the use cases' output:

- a deployment key of another tenant, `OTHER/NAME` -> "another tenant's deployment";
- another tenant's id (with the isolation level the solver adds in parentheses) -> "another
  tenant"; a run of them ("a, b (shared)") -> "other tenants";
- a reason whose scope is another tenant's id keeps no scope.

The solver names tenants and deployments by id only (deployments as `TENANT/NAME`), so the
redaction works on the ids the cluster has, as whole tokens: an id that is also an ordinary word
("a", "node") is redacted wherever it stands as a word, which costs readability, never secrecy.
Racks, rows and nodes stay named: they are the scope a tenant needs to act on a reason (change
its locality, ask for capacity), and they are shared infrastructure, not another tenant's.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import replace

from controller.identity import Principal
from controller.store import repositories as repo
from controller.store.db import UnitOfWork
from controller.domain.values import DeploymentEvent, DeploymentView, EventView, ReasonView

_ID_CHAR = r"A-Za-z0-9_"
# Not inside a longer id or key: no id character, '-', '.' or '/' right before; no id character
# or '-' right after, nor a '.' that continues the id.
_BEFORE = rf"(?<![{_ID_CHAR}.\-/])"
_AFTER = rf"(?![{_ID_CHAR}\-/]|\.[{_ID_CHAR}])"
_NAME = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_ISOLATION = r"(?: \((?:shared|dedicated_node|dedicated_rack)\))?"
ANOTHER_TENANT = "another tenant"
ANOTHER_DEPLOYMENT = "another tenant's deployment"
_RUN = re.compile(rf"{ANOTHER_TENANT}(?:, {ANOTHER_TENANT})+")


class Redactor:
    """Redacts, for one viewer, the ids of `others` (every tenant but the viewer's)."""

    def __init__(self, others: Collection[str]) -> None:
        ids = sorted({t for t in others if t}, key=len, reverse=True)  # longest first: no prefix wins
        self._active = bool(ids)
        alternation = "|".join(re.escape(t) for t in ids) or "(?!)"
        self._keys = re.compile(rf"{_BEFORE}(?:{alternation})/{_NAME}{_AFTER}")
        self._tenants = re.compile(rf"{_BEFORE}(?:{alternation}){_AFTER}{_ISOLATION}")
        self._others = frozenset(ids)

    def text(self, message: str) -> str:
        if not self._active or not message:
            return message
        message = self._keys.sub(ANOTHER_DEPLOYMENT, message)
        message = self._tenants.sub(ANOTHER_TENANT, message)
        return _RUN.sub("other tenants", message)

    def reason(self, reason: ReasonView) -> ReasonView:
        scope = "" if reason.scope in self._others else reason.scope
        return ReasonView(reason.code, self.text(reason.message), scope)

    def reasons(self, reasons: Iterable[ReasonView]) -> tuple[ReasonView, ...]:
        return tuple(self.reason(r) for r in reasons)

    def deployment(self, view: DeploymentView) -> DeploymentView:
        if not self._active or not view.reasons:
            return view
        return replace(view, reasons=self.reasons(view.reasons))

    def deployment_event(self, event: DeploymentEvent) -> DeploymentEvent:
        return replace(event, deployment=self.deployment(event.deployment))

    def event(self, event: EventView) -> EventView:
        return replace(event, message=self.text(event.message)) if self._active else event


NOTHING = Redactor(())


def redactor_for(who: Principal, tenant_ids: Iterable[str]) -> Redactor:
    """Admins (and callers with no tenant) read everything; a tenant token reads its own tenant's
    words and nothing of the others in `tenant_ids`."""
    if who.is_admin or not who.tenant:
        return NOTHING
    return Redactor([t for t in tenant_ids if t != who.tenant])


async def redactor_of(uow: UnitOfWork, who: Principal) -> Redactor:
    """`redactor_for` over the tenants stored now (no read for admins)."""
    if who.is_admin or not who.tenant:
        return NOTHING
    return redactor_for(who, await repo.tenant_ids(uow.session))


async def as_seen_by(uow: UnitOfWork, who: Principal, view: DeploymentView) -> DeploymentView:
    """One deployment view as `who` may read it (reasons redacted for a tenant token)."""
    if not view.reasons:
        return view
    return (await redactor_of(uow, who)).deployment(view)
