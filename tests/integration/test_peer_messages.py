"""What another controller's message starts here ends with this controller's stop: a handling
still reading the database when the controller stops is cancelled and waited for before the
engine it reads with is disposed (`PeerMessages.close`, called by `ControllerApp.stop`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import controller.api.peers as peers_module
from controller.api.peers import NODE_REMOVED
from grpc_harness import running_controller


async def test_a_message_still_being_handled_ends_with_the_stop(migrated_db_url: str, tmp_path: Path, monkeypatch) -> None:
    reading = asyncio.Event()
    ended: list[str] = []

    async def slow_read(uow, node_ids):  # noqa: ANN001, ANN202
        reading.set()
        try:
            await asyncio.Event().wait()  # a read that does not come back before the stop
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise
        return {}

    monkeypatch.setattr(peers_module, "registered_sessions", slow_read)
    async with running_controller(migrated_db_url, tmp_path) as app:
        app.peers.notified(NODE_REMOVED, "node-gone")  # as another controller's deletion is heard
        await asyncio.wait_for(reading.wait(), timeout=10)
        handling = set(app.peers._handling)
        assert len(handling) == 1
    assert ended == ["cancelled"]
    assert all(task.done() for task in handling) and not app.peers._handling
