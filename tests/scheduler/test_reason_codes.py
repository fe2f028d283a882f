"""One table of reason codes: the node filters' and tenant caps' codes, in reading order, are
exactly the codes the plan schema allows."""

from __future__ import annotations

import json
from pathlib import Path

from scheduler.filters import NODE_FILTERS, REASON_CODES, TENANT_CAPS, MaskFilter, SlotFilter

SCHEMA = Path(__file__).resolve().parents[2] / "scheduler" / "schemas" / "plan.schema.json"


def schema_codes() -> set[str]:
    plan = json.loads(SCHEMA.read_text())
    reason = plan["properties"]["unplaced"]["items"]["properties"]["reasons"]["items"]
    return set(reason["properties"]["code"]["enum"])


def test_every_code_is_in_the_plan_schema_and_the_schema_has_no_other() -> None:
    assert len(set(REASON_CODES)) == len(REASON_CODES)
    assert set(REASON_CODES) == schema_codes()


def test_each_filter_is_a_mask_or_a_slot_count_with_its_own_code() -> None:
    assert all(isinstance(f, (MaskFilter, SlotFilter)) and f.code for f in NODE_FILTERS)
    assert REASON_CODES[:len(NODE_FILTERS)] == tuple(f.code for f in NODE_FILTERS)
    assert [c.code for c in TENANT_CAPS] == ["QUOTA_ACCELERATORS", "QUOTA_POWER"]
