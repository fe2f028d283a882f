"""Resetting a node's credential: the node id is checked as every node call checks it."""

from __future__ import annotations

import pytest

from controller.errors import InvalidArgument
from controller.usecases import agents
from controller.usecases.ports import RecordingSignals
from uc_builders import WHO


async def test_a_node_id_with_a_nul_is_invalid_on_every_database(database):
    """PostgreSQL refuses a NUL in text with an error of its own (the fuzz test found it)."""
    signals = RecordingSignals()
    async with database.unit_of_work() as uow:
        with pytest.raises(InvalidArgument, match="node"):
            await agents.reset_node_credential(uow, WHO, "n\x00", signals)
    assert signals.events == []
