"""ListEvents over gRPC as a follower reads it (`maiactl get events -w`, `controller/cli/follow.py`):
oldest first after an id, or from the start with `oldest_first`; the newest without either."""

from __future__ import annotations

from pathlib import Path

from controller.store.repositories import NewEvent, record_events
from grpc_harness import Stubs, admin_token_of, running_controller
from maia.v1 import admin_pb2


async def test_a_follower_reads_a_burst_from_the_start_in_full(db_url: str, tmp_path: Path) -> None:
    async with running_controller(db_url, tmp_path) as app:
        async with app.db.unit_of_work() as uow:
            await record_events(uow.session, [NewEvent(actor="test", kind="node.down", object_kind="node",
                                                       object_id=f"burst-{i:04}") for i in range(1500)])
            await uow.commit()
        stubs = Stubs.connect(app.address, admin_token_of(app))
        try:
            async def ask(**fields: object) -> list[str]:
                reply = await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", limit=1000, **fields))
                return [e.object_id for e in reply.events]

            newest = await ask()
            assert newest[0] == "burst-0500" and newest[-1] == "burst-1499"  # the newest 1,000
            first = await ask(oldest_first=True)
            assert first[0] == "burst-0000" and first[-1] == "burst-0999"
            reply = await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", limit=1000,
                                                                             oldest_first=True))
            rest = await ask(after_id=reply.events[-1].id)
            assert rest == [f"burst-{i:04}" for i in range(1000, 1500)]
        finally:
            await stubs.channel.close()
