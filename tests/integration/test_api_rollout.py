"""Changing running work, end to end with real agents (`maia-simnode` subprocesses): updates in
place with a resource version, scaling, rolling updates and drains that are make-before-break
from the agents' own log, idempotent submits, and what is refused with nothing written.
Every scenario ends with the committed state passing the independent plan checker."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.checking import check_state
from controller.api.dryrun import DRY_RUN_METADATA_KEY, DRY_RUN_ALL
from grpc_harness import RUNNING, SimFleet, Stubs, eventually, issue_token, running_fleet, spec
from controller.store.snapshot import load_snapshot
from maia.v1 import admin_pb2, common_pb2, deployments_pb2


RACKS = {"rack-00": "row-a", "rack-01": "row-a"}
P = deployments_pb2


async def _get(stubs: Stubs, name: str) -> P.Deployment:
    return await stubs.deployments.GetDeployment(P.GetDeploymentRequest(name=name))


async def _update(stubs: Stubs, msg: P.DeploymentSpec, version: int, request_id: str = "") -> P.UpdateDeploymentResponse:
    return await stubs.deployments.UpdateDeployment(
        P.UpdateDeploymentRequest(spec=msg, resource_version=version, client_request_id=request_id))


async def _events(stubs: Stubs, name: str) -> list[admin_pb2.EventRecord]:
    return list((await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="deployment",
                                                                          object_id=name))).events)


def _rolled_out(d: P.Deployment) -> bool:
    return d.outgoing_replicas == 0 and d.updated_replicas >= d.spec.replicas and d.phase == RUNNING


async def committed_violations(app: Any) -> list[str]:
    """The committed placements graded by the independent checker (bench/checking.py)."""
    async with app.db.unit_of_work() as uow:
        problem = (await load_snapshot(uow.session)).problem
    return [f"{v.rule}: {v.message}" for v in check_state(problem, problem["placements"])]


_SHARD_LINE = re.compile(r"(?P<dep>[a-z0-9-]+)/(?P<replica>\d+)/(?P<shard>\d+) (?P<phase>running|stopped|failed)\b")


def running_timeline(log: str, deployment: str, shards_per_replica: int) -> list[int]:
    """Replaying the agents' log: how many replicas of `deployment` ran (every shard running)
    after each of its shard reports."""
    running: set[tuple[int, int]] = set()
    counts = []
    for m in _SHARD_LINE.finditer(log):
        if m["dep"] != deployment:
            continue
        key = (int(m["replica"]), int(m["shard"]))
        if m["phase"] == "running":
            running.add(key)
        else:
            running.discard(key)
        per_replica: dict[int, int] = defaultdict(int)
        for replica, _ in running:
            per_replica[replica] += 1
        counts.append(sum(1 for n in per_replica.values() if n >= shards_per_replica))
    return counts


def never_below(counts: list[int], floor: int) -> bool:
    """From the first moment `floor` replicas ran, never fewer."""
    started = next(i for i, c in enumerate(counts) if c >= floor)
    return min(counts[started:]) >= floor


@pytest.fixture
async def fleet(stubs: Stubs, controller_app, tmp_path: Path) -> AsyncIterator[SimFleet]:
    """Topology, tenant `lab`, and 2 racks x 4 nodes of real agents, all connected and ready."""
    async with running_fleet(stubs, controller_app, tmp_path, RACKS) as sim:
        yield sim


def _svc(**kw: Any) -> P.DeploymentSpec:
    kw.setdefault("replicas", 2)
    kw.setdefault("min_replicas", 2)
    return spec("svc", shards=2, accelerators=1,
                spread=common_pb2.Spread(domain=common_pb2.DOMAIN_NODE, max_per_domain=1), **kw)


async def test_rolling_update_is_make_before_break_from_the_agents_view(stubs: Stubs, fleet: SimFleet,
                                                                         controller_app):
    first = await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=_svc()))
    assert first.deployment.resource_version == 1 and first.deployment.revision == 1
    await eventually(lambda: _get(stubs, "svc"), lambda d: d.phase == RUNNING, what="svc running")

    changed = _svc()
    changed.shard.hbm_gib = 24  # what a replica is: a rolling update
    answer = await _update(stubs, changed, 1)
    assert answer.rolling and list(answer.changes) == ["shard.hbm_gib: 16 -> 24"]
    assert answer.deployment.resource_version == 2 and answer.deployment.revision == 2
    done = await eventually(lambda: _get(stubs, "svc"), _rolled_out, timeout=60, what="svc rolled out")
    assert {p.revision for p in done.placements} == {2} and len(done.placements) == 4
    assert done.spec.shard.hbm_gib == 24

    # The agents' own log: once both replicas ran, never fewer than 2 (min_replicas) ran.
    counts = running_timeline(fleet.log_path.read_text(errors="replace"), "svc", 2)
    assert never_below(counts, 2), counts
    assert max(counts) == 3, counts  # the surge replica ran beside the old ones
    kinds = [e.kind for e in await _events(stubs, "svc")]
    assert "deployment.updated" in kinds and kinds.count("deployment.replica_retired") == 2
    assert await committed_violations(controller_app) == []


async def test_replica_changes_scale_at_once_without_a_rollout(stubs: Stubs, fleet: SimFleet, controller_app):
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=_svc()))
    running = await eventually(lambda: _get(stubs, "svc"), lambda d: d.phase == RUNNING, what="svc running")
    answer = await _update(stubs, _svc(replicas=3), running.resource_version)
    assert not answer.rolling and list(answer.changes) == ["replicas: 2 -> 3"]
    three = await eventually(lambda: _get(stubs, "svc"), lambda d: d.phase == RUNNING and d.running_replicas == 3,
                             what="3 replicas running")
    kept = {(p.replica, p.shard, p.node) for p in running.placements}
    assert kept <= {(p.replica, p.shard, p.node) for p in three.placements}  # nothing restarted
    answer = await _update(stubs, _svc(replicas=2, min_replicas=1), three.resource_version)
    assert list(answer.changes) == ["replicas: 3 -> 2", "min_replicas: 2 -> 1"]
    two = await eventually(lambda: _get(stubs, "svc"), lambda d: len(d.placements) == 4 and d.phase == RUNNING,
                           what="scaled down to 2")
    assert {p.replica for p in two.placements} == {0, 1} and two.revision == 1
    assert await committed_violations(controller_app) == []


async def test_stale_and_contract_breaking_updates_are_refused_with_nothing_written(stubs: Stubs, fleet: SimFleet,
                                                                                    controller_app):
    await stubs.admin.UpdateTenant(admin_pb2.Tenant(id="lab", max_accelerators=6))
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=_svc()))
    running = await eventually(lambda: _get(stubs, "svc"), lambda d: d.phase == RUNNING, what="svc running")
    events = await _events(stubs, "svc")

    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await _update(stubs, _svc(replicas=3), running.resource_version + 1)
    assert stale.value.code() == grpc.StatusCode.ABORTED
    assert stale.value.details() == ("deployment svc has no resource version 2 (it is at 1): "  # "changed since 2"
                                     "read it again and re-apply the change")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await _update(stubs, _svc(replicas=3), 0)
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "resource_version is required" in \
        missing.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as quota:
        await _update(stubs, _svc(replicas=4), running.resource_version)  # 8 accelerators > 6
    assert quota.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota.value.details() == ("deployment svc: 4 replicas need 8 accelerators; tenant lab holds "
                                     "0 accelerators elsewhere, 8 accelerators > max_accelerators 6 accelerators")
    # Another tenant is owed 28 of the 28 free accelerators: growing non-preemptible work would take them.
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="owed", reserved_accelerators=28))
    with pytest.raises(grpc.aio.AioRpcError) as reserved:
        await _update(stubs, _svc(replicas=3), running.resource_version)
    assert reserved.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reserved.value.details() == ("deployment svc: growing by 2 accelerators would take capacity reserved "
                                        "for other tenants: 28 free on ready nodes, 28 still owed (owed 28)")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await _update(stubs, spec("nope"), 1)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    after = await _get(stubs, "svc")
    assert after.resource_version == running.resource_version and after.spec == running.spec
    assert [e.id for e in await _events(stubs, "svc")] == [e.id for e in events]
    assert await committed_violations(controller_app) == []


async def test_an_update_asking_no_more_is_taken_while_the_tenant_is_above_its_cap(stubs: Stubs, fleet: SimFleet,
                                                                                  controller_app):
    """A tenant above its cap (lowered under what it holds, or a submit beyond it, which waits with
    QUOTA): every update of its deployments was refused RESOURCE_EXHAUSTED, a scale-down too, so
    the only way down was a delete. An update asking no more is taken; one asking more is not."""
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=_svc()))  # 4 accelerators
    running = await eventually(lambda: _get(stubs, "svc"), lambda d: d.phase == RUNNING, what="svc running")
    await stubs.admin.UpdateTenant(admin_pb2.Tenant(id="lab", max_accelerators=2))
    prioritised = await _update(stubs, _svc(priority=5), running.resource_version)
    assert list(prioritised.changes) == ["priority: 0 -> 5"]
    smaller = await _update(stubs, _svc(replicas=1, min_replicas=1, priority=5),
                            prioritised.deployment.resource_version)
    assert list(smaller.changes) == ["replicas: 2 -> 1", "min_replicas: 2 -> 1"]
    with pytest.raises(grpc.aio.AioRpcError) as quota:
        await _update(stubs, _svc(priority=5), smaller.deployment.resource_version)  # 4 accelerators again
    assert quota.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_accelerators 2" in quota.value.details()


def _reasons(refused: grpc.aio.AioRpcError) -> list[tuple[str, str, str]]:
    """The structured reasons a refusal carries (trailing metadata `maia-reason-bin`)."""
    return [(r.code, r.message, r.scope) for r in (common_pb2.Reason.FromString(value)
                                                   for key, value in refused.trailing_metadata() or ()
                                                   if key == "maia-reason-bin")]


DRY_RUN = ((DRY_RUN_METADATA_KEY, DRY_RUN_ALL),)


async def test_a_waiting_deployment_is_refused_only_the_growth_of_its_ask_into_reserved_capacity(
        stubs: Stubs, fleet: SimFleet, controller_app):
    """`m` (3 whole-node replicas, min_replicas 3) waits: `blk` holds 6 of the 8 nodes. alpha and
    beta are owed the 8 free accelerators. A new priority and a scale-down ask no more than `m`
    asked while it waited: taken, by lab's token too (they were refused, its whole unplaced ask
    counted as growth). A scale-up is refused, dry run or not, with what the ask grows by."""
    node = {"shards": 1, "accelerators": 4, "locality": common_pb2.DOMAIN_NODE}
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=spec("blk", replicas=6, priority=50,
                                                                                  **node)))
    await eventually(lambda: _get(stubs, "blk"), lambda d: d.phase == RUNNING, what="blk running")
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(
        spec=spec("m", replicas=3, min_replicas=3, priority=10, **node)))
    waiting = await eventually(lambda: _get(stubs, "m"), lambda d: len(d.reasons) > 0 and not d.placements,
                               what="m waiting with reasons")
    for owed in ("alpha", "beta"):
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id=owed, reserved_accelerators=4))

    lab = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant="lab"))
    try:
        dry = await lab.deployments.UpdateDeployment(P.UpdateDeploymentRequest(
            spec=spec("m", replicas=2, min_replicas=2, priority=10, **node),
            resource_version=waiting.resource_version), metadata=DRY_RUN)
        assert list(dry.changes) == ["replicas: 3 -> 2", "min_replicas: 3 -> 2"]
        prioritised = await _update(lab, spec("m", replicas=3, min_replicas=3, priority=11, **node),
                                    waiting.resource_version)
        assert list(prioritised.changes) == ["priority: 10 -> 11"]
        for metadata in ((), DRY_RUN):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stubs.deployments.UpdateDeployment(P.UpdateDeploymentRequest(
                    spec=spec("m", replicas=4, min_replicas=3, priority=11, **node),
                    resource_version=prioritised.deployment.resource_version), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert refused.value.details() == (
                "deployment m: growing by 4 accelerators (16 not placed yet) would take capacity reserved for "
                "other tenants: 8 free on ready nodes, 8 still owed (alpha 4, beta 4)")
        smaller = await _update(lab, spec("m", replicas=2, min_replicas=2, priority=11, **node),
                                prioritised.deployment.resource_version)
        assert list(smaller.changes) == ["replicas: 3 -> 2", "min_replicas: 3 -> 2"]
    finally:
        await lab.channel.close()
    assert await committed_violations(controller_app) == []


async def test_a_reservation_refusal_names_the_owed_tenants_to_an_admin_only(stubs: Stubs, fleet: SimFleet,
                                                                            controller_app):
    """alpha and beta are owed the 28 free accelerators; growing `svc` would take 2 of them. lab's
    token reads the refusal, dry run or not, its message and RESERVATION reason alike, with the
    total owed to "other tenants" where an admin reads alpha's and beta's (docs/security.md)."""
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=_svc()))
    running = await eventually(lambda: _get(stubs, "svc"), lambda d: d.phase == RUNNING, what="svc running")
    for owed in ("alpha", "beta"):
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id=owed, reserved_accelerators=14))
    lab = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant="lab"))
    try:
        for who, owed_text, owed_to in ((stubs, "(alpha 14, beta 14)", "alpha 14, beta 14"),
                                        (lab, "to them", "other tenants")):
            for metadata in ((), DRY_RUN):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await who.deployments.UpdateDeployment(P.UpdateDeploymentRequest(
                        spec=_svc(replicas=3), resource_version=running.resource_version), metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert refused.value.details() == (
                    "deployment svc: growing by 2 accelerators would take capacity reserved for other tenants: "
                    f"28 free on ready nodes, 28 still owed {owed_text}")
                assert _reasons(refused.value) == [("RESERVATION", f"28 accelerators owed to {owed_to}", "")]
    finally:
        await lab.channel.close()
    assert (await _get(stubs, "svc")).resource_version == running.resource_version


async def test_making_a_preemptible_deployment_non_preemptible_is_a_claim_on_reserved_capacity(
        stubs: Stubs, fleet: SimFleet, controller_app):
    """`svc` (preemptible) holds 4 of the 32 accelerators; alpha and beta are owed 32. Made
    non-preemptible (no growth), it would keep 4 they may preempt now for good: it was taken
    (found by exploratory testing: a tenant placed burst work over others' reservations and
    flipped it, and the owed tenant waited for ever). Refused, dry run or not; taken once
    what is free covers what is owed."""
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=_svc(preemptible=True)))
    running = await eventually(lambda: _get(stubs, "svc"), lambda d: d.phase == RUNNING, what="svc running")
    for owed in ("alpha", "beta"):
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id=owed, reserved_accelerators=16))
    for metadata in ((), DRY_RUN):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.deployments.UpdateDeployment(P.UpdateDeploymentRequest(
                spec=_svc(preemptible=False), resource_version=running.resource_version), metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.details() == (
            "deployment svc: becoming non-preemptible would keep 4 placed accelerators (of 4) from capacity "
            "reserved for other tenants, who may preempt them now: 28 free on ready nodes, 32 still owed "
            "(alpha 16, beta 16)")
    await stubs.admin.UpdateTenant(admin_pb2.Tenant(id="beta", reserved_accelerators=12))
    firmed = await _update(stubs, _svc(preemptible=False), running.resource_version)
    assert list(firmed.changes) == ["preemptible: True -> False"]


async def test_a_new_non_preemptible_deployment_may_not_take_capacity_owed_to_others(stubs: Stubs, fleet: SimFleet,
                                                                                     controller_app):
    """alpha and beta are owed all 32 free accelerators. A new non-preemptible `svc` would take 4
    they could never take back: it was taken and placed (only an update's growth was checked;
    found by exploratory testing). Refused alone and in a SubmitDeployments batch, dry run or
    not; a preemptible one is taken (it yields to them), and beyond what is owed a new one is too."""
    for owed in ("alpha", "beta"):
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id=owed, reserved_accelerators=16))
    message = ("deployment svc: 4 accelerators, not preemptible, would take capacity reserved for other tenants: "
               "32 free on ready nodes, 32 still owed (alpha 16, beta 16)")
    for dry_run in (False, True):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=_svc(), dry_run=dry_run))
        assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.FAILED_PRECONDITION, message)
        assert _reasons(refused.value) == [("RESERVATION", "32 accelerators owed to alpha 16, beta 16", "")]
    batch = await stubs.deployments.SubmitDeployments(P.SubmitDeploymentsRequest(requests=[
        P.SubmitDeploymentRequest(spec=_svc()), P.SubmitDeploymentRequest(spec=spec("burst", preemptible=True))]))
    assert (batch.results[0].error.code, batch.results[0].error.message) == (
        grpc.StatusCode.FAILED_PRECONDITION.value[0], message)
    assert batch.results[1].deployment.spec.name == "burst"
    assert [d.spec.name for d in (await stubs.deployments.ListDeployments(P.ListDeploymentsRequest())).deployments] \
        == ["burst"]
    # 27 owed: 4 fit beside them whether or not `burst`'s accelerator is taken yet (32 or 31 free;
    # with 28 owed the test raced the reconciler placing it).
    await stubs.admin.UpdateTenant(admin_pb2.Tenant(id="beta", reserved_accelerators=11))
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=_svc()))
    assert await committed_violations(controller_app) == []


async def test_a_retried_submit_returns_the_first_result_and_writes_nothing(stubs: Stubs, fleet: SimFleet,
                                                                            controller_app):
    request = P.SubmitDeploymentRequest(spec=spec("once", replicas=1), client_request_id="req-1")
    first = await stubs.deployments.SubmitDeployment(request)
    await eventually(lambda: _get(stubs, "once"), lambda d: d.phase == RUNNING, what="once running")
    again = await stubs.deployments.SubmitDeployment(request)
    assert again.deployment.spec == first.deployment.spec and again.deployment.created_at == first.deployment.created_at
    assert [e.kind for e in await _events(stubs, "once")].count("deployment.submitted") == 1
    listed = await stubs.deployments.ListDeployments(P.ListDeploymentsRequest())
    assert [d.spec.name for d in listed.deployments] == ["once"]

    other = P.SubmitDeploymentRequest(spec=spec("once", replicas=2), client_request_id="req-1")
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await stubs.deployments.SubmitDeployment(other)
    assert reused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reused.value.details() == ("client_request_id 'req-1' was already used by tenant lab to submit "
                                      "deployment once with a different spec; use a new id for a different request")
    # An update retried with its id is answered once, even though its version is stale by then.
    current = await _get(stubs, "once")
    bigger = spec("once", replicas=2)
    await _update(stubs, bigger, current.resource_version, "req-2")
    retried = await _update(stubs, bigger, current.resource_version, "req-2")
    assert retried.deployment.resource_version == current.resource_version + 1
    assert [e.kind for e in await _events(stubs, "once")].count("deployment.updated") == 1
    assert await committed_violations(controller_app) == []


async def test_drain_replaces_make_before_break_from_the_agents_view(stubs: Stubs, fleet: SimFleet,
                                                                     controller_app):
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=_svc()))
    running = await eventually(lambda: _get(stubs, "svc"), lambda d: d.phase == RUNNING, what="svc running")
    victim = running.placements[0].node
    drained = await stubs.admin.DrainNode(admin_pb2.NodeRequest(id=victim))
    assert drained.state == common_pb2.NODE_STATE_CORDONED
    moved = await eventually(lambda: _get(stubs, "svc"),
                             lambda d: _rolled_out(d) and victim not in {p.node for p in d.placements},
                             timeout=60, what="svc replaced off the drained node")
    by_replica: dict[int, set[str]] = defaultdict(set)
    for p in moved.placements:
        by_replica[p.replica].add(p.node)
    first, second = by_replica.values()
    assert not first & second  # spread: at most one replica per node, still
    assert (await stubs.admin.GetNode(admin_pb2.GetNodeRequest(id=victim))).shards == 0
    counts = running_timeline(fleet.log_path.read_text(errors="replace"), "svc", 2)
    assert never_below(counts, 2) and max(counts) == 3, counts  # min_replicas 2, from the agents' view
    kinds = [e.kind for e in await _events(stubs, "svc")]
    assert kinds.count("deployment.replica_retired") == 1
    assert await committed_violations(controller_app) == []

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stubs.admin.DrainNode(admin_pb2.NodeRequest(id="no-such-node"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
