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


def _reasons(node: dict, tenant: dict, shard: dict) -> list[str]:
    from scheduler import problem_from_dict, solve

    doc = {"version": 1, "zones": [{"id": "z1"}], "rows": [{"id": "w1", "zone": "z1"}],
           "racks": [{"id": "r1", "row": "w1"}], "nodes": [{"id": "n1", "rack": "r1", "accelerators": 4, **node}],
           "tenants": [{"id": "t", **tenant}],
           "deployments": [{"id": "t/d", "tenant": "t", "replicas": 1, "shards_per_replica": 1,
                            "shard": {"accelerators": 1, **shard}}]}
    return [r.message for u in solve(problem_from_dict(doc)).unplaced for r in u.reasons]


def test_empty_lists_and_undeclared_models_are_worded_not_left_blank() -> None:
    """An empty `accelerator_models` (no model allowed), a node that declares no model and an
    empty tenant `zones` list read "needs , nodes have m", "nodes have None", "may only run in
    zones " (blank where the value was)."""
    assert _reasons({"accelerator_model": "m"}, {}, {"accelerator_models": []})[0].endswith(
        "needs no model (its accelerator_models list is empty), nodes have m")
    assert _reasons({}, {}, {"accelerator_models": ["m"]})[0].endswith("needs m, nodes have no model declared")
    assert _reasons({}, {"zones": []}, {})[0].endswith("tenant t may run in no zone (its zones list is empty)")


def test_a_full_own_zone_leads_with_capacity_though_more_nodes_are_out_of_zone() -> None:
    """The tenant may run in z1 only, where its one node is full; z2 has three empty nodes. The
    first reason (the CLI's REASON column) was ZONE, the rule failing on most nodes, though the
    tenant chose its zone and what it can act on is the full one. Both are still listed."""
    from scheduler import problem_from_dict, solve

    doc = {"version": 1, "zones": [{"id": "z1"}, {"id": "z2"}],
           "rows": [{"id": "w1", "zone": "z1"}, {"id": "w2", "zone": "z2"}],
           "racks": [{"id": "r1", "row": "w1"}, {"id": "r2", "row": "w2"}],
           "nodes": [{"id": "n1", "rack": "r1", "accelerators": 4},
                     *({"id": f"m{i}", "rack": "r2", "accelerators": 4} for i in range(3))],
           "tenants": [{"id": "t", "zones": ["z1"]}],
           "deployments": [{"id": "t/d", "tenant": "t", "replicas": 2, "shards_per_replica": 1,
                            "shard": {"accelerators": 4}}]}
    [unplaced] = solve(problem_from_dict(doc)).unplaced
    assert [r.code for r in unplaced.reasons] == ["CAPACITY", "ZONE"]
    assert unplaced.reasons[0].message.startswith("0/4 nodes fit a shard: 3 ZONE, 1 CAPACITY")
