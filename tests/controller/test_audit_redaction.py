"""An audit entry as a tenant token reads it: the isolation watchdog's entry for bravo names alpha,
its deployment and every tenant of the alarm; bravo reads them redacted, an admin whole. A
deleted tenant's id is redacted like a current one's (the redactor knows every tenant ever had)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from controller.identity import Principal, Role
from controller.usecases.audit import AuditEventView, as_seen_by_tenant
from controller.usecases.redaction import NOTHING, redactor_for

BRAVO = Principal("bravo-ci", Role.TENANT, tenant="bravo")
KNOWN = ("alpha", "bravo", "delta-labs")  # delta-labs: deleted, still known
ALARM = AuditEventView(
    seq=7, at=datetime(2026, 12, 6, tzinfo=timezone.utc), request_id="", actor="isolation-watchdog",
    role="controller", tenant="bravo", action="isolation.violation", object_kind="node", object_id="rack-00-n00",
    outcome="VIOLATION", prev_hash="a" * 64, hash="b" * 64,
    detail={"message": "accelerator rack-00-n00[0] is held by a whole-accelerator shard and shared with others: "
                       "alpha/secret-model-alpha, bravo/chat",
            "rule": "ACCELERATOR", "scope": "node rack-00-n00[0]", "tenants": ["alpha", "bravo"],
            "reasons": [{"code": "ISOLATION", "message": "rack rack-00 holds delta-labs (dedicated_rack)",
                         "scope": "delta-labs"}]})


def test_a_tenant_reads_its_alarm_without_the_other_tenants() -> None:
    seen = as_seen_by_tenant(ALARM, redactor_for(BRAVO, KNOWN))
    assert seen.detail == {
        "message": "accelerator rack-00-n00[0] is held by a whole-accelerator shard and shared with others: "
                   "another tenant's deployment, bravo/chat",
        "rule": "ACCELERATOR", "scope": "node rack-00-n00[0]", "tenants": ["bravo"],
        "reasons": [{"code": "ISOLATION", "message": "rack rack-00 holds another tenant", "scope": ""}]}
    assert (seen.hash, seen.prev_hash) == ("", "")  # no hash to test guesses of what was redacted against
    assert replace(seen, detail=ALARM.detail, hash=ALARM.hash, prev_hash=ALARM.prev_hash) == ALARM
    assert ALARM.detail["tenants"] == ["alpha", "bravo"]  # the entry itself is left as it was


def test_other_tenants_ids_anywhere_in_an_entry_are_redacted() -> None:
    entry = replace(ALARM, actor="alpha", object_id="alpha/chat", request_id="for alpha",
                    detail={"alpha/chat": {"nodes": ["n1", "delta-labs"]}, "count": 2, "ok": True, "none": None})
    seen = as_seen_by_tenant(entry, redactor_for(BRAVO, KNOWN))
    assert (seen.actor, seen.object_id, seen.request_id) == ("another tenant", "another tenant's deployment",
                                                             "for another tenant")
    assert seen.detail == {"another tenant's deployment": {"nodes": ["n1", "another tenant"]}, "count": 2,
                           "ok": True, "none": None}


def test_an_admin_reads_the_detail_whole() -> None:
    assert NOTHING.detail(ALARM.detail) == ALARM.detail
    assert redactor_for(Principal("root", Role.ADMIN), KNOWN).detail(ALARM.detail) == ALARM.detail
