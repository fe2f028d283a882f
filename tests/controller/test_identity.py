"""The principal of one RPC (controller/identity.py): its request id, fresh or the caller's."""

from __future__ import annotations

import dataclasses
import string
from datetime import datetime, timezone

from controller import identity
from controller.identity import Principal, Role, new_request_id, request_id_from_metadata


def test_fresh_request_ids_are_32_hex_characters_and_never_repeat():
    ids = [new_request_id() for _ in range(10_000)]
    assert all(len(i) == 32 and set(i) <= set(string.hexdigits.lower()) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_new_prefix_after_a_fork_keeps_a_child_from_repeating_its_parents_ids():
    ids = identity._RequestIds()
    before = {ids.next() for _ in range(3)}
    ids.restart()  # what a forked child runs (os.register_at_fork): its counter starts again at 0
    after = {ids.next() for _ in range(3)}
    assert not before & after


def test_the_callers_request_id_is_kept_and_a_fresh_one_made_otherwise():
    assert request_id_from_metadata([("x-request-id", b" abc-1 ")]) == "abc-1"
    assert len(request_id_from_metadata([("x-request-id", "x" * 65)])) == 32  # too long: a fresh one
    assert len(request_id_from_metadata(None)) == 32


def test_with_request_id_keeps_every_other_field():
    who = Principal("ops", Role.NODE, token_id="0123456789abcdef", tenant="t1", node="n1", request_id="old",
                    expires_at=datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert {f.name for f in dataclasses.fields(Principal)} == \
        {"name", "role", "token_id", "tenant", "node", "request_id", "expires_at"}, "with_request_id must copy a new field"
    assert who.with_request_id("new") == dataclasses.replace(who, request_id="new")
