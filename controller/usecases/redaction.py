"""What a tenant may read of the solver's words: other tenants' ids and deployments redacted.

The solver explains a "no" for people, with the names that bind: "rack r0 holds lab-b
(dedicated_rack)", "1 more replica fits after preempting 2 replicas of lab-b/chat"; the isolation
watchdog's alarms name every tenant involved. Admins read that as it is. A tenant token must never
learn another tenant's id, its deployments or its contract from it (the customers are competing
labs), so every reason text, preemption hint, event message and audit entry a tenant reads passes
through one `Redactor` here, at the use cases' output:

- a deployment key of another tenant, `OTHER/NAME` -> "another tenant's deployment";
- another tenant's id (with the isolation level the solver adds in parentheses) -> "another
  tenant"; a run of them ("a, b (shared)") -> "other tenants";
- a reason whose scope is another tenant's id keeps no scope;
- in an audit entry's `detail` (JSON), every string is redacted so, and a list of `tenants` keeps
  the viewer's own only.

The solver names tenants and deployments by id only (deployments as `TENANT/NAME`), so the
redaction works on the ids the cluster has had, as whole tokens: an id that is also an ordinary
word ("a", "node") is redacted wherever it stands as a word, which costs readability, never
secrecy. "Has had": stored text outlives the tenants it names (a deployment's reasons, events,
audit entries are kept after a tenant is deleted), so the ids come from `known_tenants`, which a
database trigger fills from `tenants` and nothing empties (migration 0027): one read of a small
table per call, as reading `tenants` was, and no search of the stored text for ids.
Racks, rows and nodes stay named: they are the scope a tenant needs to act on a reason (change
its locality, ask for capacity), and they are shared infrastructure, not another tenant's.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import replace
from typing import Any

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
    """Redacts, for one viewer (tenant `viewer`), the ids of `others` (every tenant but the viewer's)."""

    def __init__(self, others: Collection[str], *, viewer: str = "") -> None:
        self._viewer = viewer
        ids = sorted({t for t in others if t}, key=len, reverse=True)  # longest first: no prefix wins
        self._active = bool(ids)
        alternation = "|".join(re.escape(t) for t in ids) or "(?!)"
        self._keys = re.compile(rf"{_BEFORE}(?:{alternation})/{_NAME}{_AFTER}")
        self._tenants = re.compile(rf"{_BEFORE}(?:{alternation}){_AFTER}{_ISOLATION}")
        self._others = frozenset(ids)

    @property
    def viewer(self) -> str:
        """The tenant it redacts for ("" for none)."""
        return self._viewer

    def text(self, message: str) -> str:
        if not self._active or not message:
            return message
        message = self._keys.sub(ANOTHER_DEPLOYMENT, message)
        message = self._tenants.sub(ANOTHER_TENANT, message)
        return _RUN.sub("other tenants", message)

    def reason(self, reason: ReasonView) -> ReasonView:
        """Its message redacted; its scope dropped when it names another tenant or its deployment."""
        return ReasonView(reason.code, self.text(reason.message), self._scope(reason.scope))

    def _scope(self, scope: str) -> str:
        """A reason's scope, dropped ("") when it names another tenant or one of its deployments."""
        return "" if scope in self._others or self.text(scope) != scope else scope

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

    def detail(self, value: Any, key: str = "") -> Any:
        """A JSON value (an audit entry's `detail`) as the viewer may read it: strings (keys too)
        through `text`, a `scope` naming another tenant or its deployment emptied (as `reason`'s), and a
        list of `tenants` (the tenants an alarm involves) keeping the viewer's own only."""
        if isinstance(value, str):
            return self._scope(value) if key == "scope" else self.text(value)
        if isinstance(value, list):
            if key == "tenants":
                value = [t for t in value if t == self._viewer or (not self._viewer and t not in self._others)]
            return [self.detail(item) for item in value]
        if isinstance(value, dict):
            return {self.text(k) if isinstance(k, str) else k: self.detail(v, k) for k, v in value.items()}
        return value


NOTHING = Redactor(())


def redactor_for(who: Principal, tenant_ids: Iterable[str]) -> Redactor:
    """Admins (and callers with no tenant) read everything; a tenant token reads its own tenant's
    words and nothing of the others in `tenant_ids`."""
    if who.is_admin or not who.tenant:
        return NOTHING
    return Redactor([t for t in tenant_ids if t != who.tenant], viewer=who.tenant)


async def redactor_of(uow: UnitOfWork, who: Principal) -> Redactor:
    """`redactor_for` over every tenant the cluster ever had, the deleted ones included (no read
    for admins): text stored while a tenant existed still names it after its deletion."""
    if who.is_admin or not who.tenant:
        return NOTHING
    return redactor_for(who, await repo.known_tenant_ids(uow.session))


async def as_seen_by(uow: UnitOfWork, who: Principal, view: DeploymentView) -> DeploymentView:
    """One deployment view as `who` may read it (reasons redacted for a tenant token)."""
    if not view.reasons:
        return view
    return (await redactor_of(uow, who)).deployment(view)
