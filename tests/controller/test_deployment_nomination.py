"""GetDeployment shows the nodes kept for a deployment at the head of the waiting line, as the
leader stored them (controller/store/nominations.py): its current revision's over a rollout's
outgoing one's, to its own tenant as to an operator, and nothing for a deployment that holds none."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from controller.api import convert
from controller.identity import Principal, Role
from controller.store import models as m
from controller.store.db import Database
from controller.store.nominations import StoredNomination, nomination_view, write_nominations
from controller.usecases.deployments import get_deployment
from uc_builders import WHO, add_tenant, deployment, submit

AT = datetime(2026, 12, 6, 21, 0, tzinfo=timezone.utc)


async def test_get_deployment_carries_the_stored_nomination_of_its_current_revision(cluster: Database) -> None:
    await add_tenant(cluster, "t2")
    for name, tenant in (("gang", "t1"), ("other", "t2")):
        await submit(cluster, deployment(name, tenant, accelerators=2))
    async with cluster.unit_of_work() as uow:
        ids = {d.name: d.id for d in (await uow.session.scalars(select(m.Deployment))).all()}
        await write_nominations(uow.session, [
            # A rollout's outgoing revision, nominated first; then the current one.
            StoredNomination("t1/gang~1", ids["gang"], 5, ("rack-a-n1",), AT - timedelta(seconds=30), AT, 1),
            StoredNomination("t1/gang", ids["gang"], 5, ("rack-a-n0", "rack-b-n0"), AT, AT - timedelta(seconds=40), 2),
        ])
        await uow.commit()
    tenant = Principal("t1-user", Role.TENANT, tenant="t1")
    for who in (WHO, tenant):
        async with cluster.unit_of_work() as uow:
            view = await get_deployment(uow, who, "gang", tenant="t1")
        msg = convert.deployment_msg(view)
        assert msg.HasField("nomination")
        assert list(msg.nomination.nodes) == ["rack-a-n0", "rack-b-n0"] and msg.nomination.missing_replicas == 2
        assert msg.nomination.nominated_at.ToDatetime(tzinfo=timezone.utc) == AT
        assert msg.nomination.waiting_since.ToDatetime(tzinfo=timezone.utc) == AT - timedelta(seconds=40)
    async with cluster.unit_of_work() as uow:
        plain = await get_deployment(uow, WHO, "other", tenant="t2")
    assert plain.nomination is None and not convert.deployment_msg(plain).HasField("nomination")


async def test_an_outgoing_revisions_nomination_alone_is_shown_while_replicas_are_being_replaced(
        cluster: Database) -> None:
    """Once no replica is being replaced, the rollout is over: its outgoing revision's row (which
    can outlive it a while) is not the deployment's nomination."""
    await submit(cluster, deployment("gang", "t1", accelerators=2))
    async with cluster.unit_of_work() as uow:
        dep_id = (await uow.session.scalars(select(m.Deployment.id))).one()
        await write_nominations(uow.session, [StoredNomination("t1/gang~1", dep_id, 5, ("rack-a-n1",), AT, AT, 1)])
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        assert (await get_deployment(uow, WHO, "gang", tenant="t1")).nomination is None
        rolling = await nomination_view(uow.session, dep_id, rolling=True)
    assert rolling is not None and rolling.nodes == ("rack-a-n1",)
