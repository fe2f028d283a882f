"""Redaction of the solver's words for tenants: a scenario whose reasons name other tenants, their
deployments and the racks they hold, read by a third tenant (redacted) and by an admin (whole)."""

from __future__ import annotations

import re

from controller.identity import Principal, Role
from controller.domain.values import EventView, ReasonView
from controller.usecases.redaction import Redactor, redactor_for
from scheduler import problem_from_dict, solve

NODE = {"accelerators": 4, "accelerator_model": "maia-100", "state": "ready"}
# lab-a holds rack r0 (dedicated_rack); lab-b's preemptible burst fills rack r1; lab-c's chat needs
# a whole rack: r0 is refused for isolation, r1 only after preempting lab-b's work.
PROBLEM = {
    "version": 1,
    "zones": [{"id": "z"}], "rows": [{"id": "row", "zone": "z"}],
    "racks": [{"id": "r0", "row": "row"}, {"id": "r1", "row": "row"}],
    "nodes": [{"id": "n0", "rack": "r0", **NODE}, {"id": "n1", "rack": "r1", **NODE}],
    "tenants": [{"id": "lab-a", "isolation": "dedicated_rack"}, {"id": "lab-b"}, {"id": "lab-c"}],
    "deployments": [
        {"id": "lab-a/big", "tenant": "lab-a", "replicas": 1, "shards_per_replica": 1,
         "shard": {"accelerators": 1}, "locality": "rack"},
        {"id": "lab-b/burst", "tenant": "lab-b", "replicas": 1, "shards_per_replica": 4,
         "shard": {"accelerators": 1}, "locality": "rack", "preemptible": True},
        {"id": "lab-c/chat", "tenant": "lab-c", "replicas": 1, "shards_per_replica": 4,
         "shard": {"accelerators": 1}, "locality": "rack", "priority": 100},
    ],
    "placements": [
        {"deployment": "lab-a/big", "replica": 0, "shard": 0, "node": "n0", "accelerator_indices": [0]},
        *({"deployment": "lab-b/burst", "replica": 0, "shard": s, "node": "n1", "accelerator_indices": [s]}
          for s in range(4)),
    ],
    "options": {"mode": "batch", "time_limit_ms": 20000, "allow_preemption": False},
}
TENANTS = ("lab-a", "lab-b", "lab-c")


def _reasons_of_chat() -> tuple[ReasonView, ...]:
    plan = solve(problem_from_dict(PROBLEM), time_limit_ms=20000)  # a bound, not a duration: it proves in well under 1 s
    (unplaced,) = [u for u in plan.unplaced if u.deployment == "lab-c/chat"]
    return tuple(ReasonView(r.code, r.message, r.scope or "") for r in unplaced.reasons)


def test_a_tenant_reads_no_other_tenant_in_the_solvers_reasons() -> None:
    reasons = _reasons_of_chat()
    whole = " ".join(r.message for r in reasons)
    # The scenario does produce the leaks: the dedicated rack's holder and the preemption victim.
    assert "lab-a" in whole and "lab-b/burst" in whole, whole

    admin = redactor_for(Principal("root", Role.ADMIN), TENANTS)
    assert admin.reasons(reasons) == reasons

    mine = redactor_for(Principal("c", Role.TENANT, tenant="lab-c"), TENANTS).reasons(reasons)
    text = " ".join(f"{r.message} {r.scope}" for r in mine)
    assert not re.search(r"lab-a|lab-b|burst|big|dedicated_rack\)", text), text
    assert "another tenant" in text and "another tenant's deployment" in text
    assert "r0" in text  # the rack stays named: it is where the tenant's work cannot go
    assert [r.code for r in mine] == [r.code for r in reasons]


def test_whole_ids_only_and_runs_collapse() -> None:
    redactor = Redactor(["lab", "b"])
    assert redactor.text("node n1 holds lab (shared), b (dedicated_node)") == "node n1 holds other tenants"
    # Longer ids and keys that merely start or end like an id are left alone.
    assert redactor.text("lab-c/chat on lab-c-rack, b.2, c/b") == "lab-c/chat on lab-c-rack, b.2, c/b"
    assert redactor.text("after preempting 2 replicas of lab/chat.") == \
        "after preempting 2 replicas of another tenant's deployment."
    assert redactor.reason(ReasonView("TENANT_QUOTA", "tenant lab holds 4", "lab")) == \
        ReasonView("TENANT_QUOTA", "tenant another tenant holds 4", "")
    event = EventView(1, None, "controller", "deployment.unplaceable", "deployment", "c/x", "rack r0 holds b")
    assert redactor.event(event).message == "rack r0 holds another tenant"
