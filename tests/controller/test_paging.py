"""Page bounds and tokens (the keyset paging every list RPC uses)."""

from __future__ import annotations

import base64
import json

import pytest

from controller import limits
from controller.errors import InvalidArgument
from controller.domain.paging import PageBounds
from controller.usecases.paging import PageRequest, bounds, decode_token, encode_token, page_of, scope_of

NODES = scope_of("nodes", rack="")


def test_page_size_defaults_and_is_capped_at_the_maximum():
    assert bounds(PageRequest(), NODES).limit == limits.PAGE_SIZE_DEFAULT
    assert bounds(PageRequest(size=7), NODES).limit == 7
    assert bounds(PageRequest(size=10**6), NODES).limit == limits.PAGE_SIZE_MAX


def test_a_token_round_trips_the_last_key():
    token = encode_token(("chat", 42), NODES)
    assert decode_token(token, (str, int), NODES) == ("chat", 42)
    assert bounds(PageRequest(size=2, token=token), NODES, (str, int)) == PageBounds(2, ("chat", 42), NODES)


def test_a_token_of_a_controller_before_fingerprints_is_taken_for_now() -> None:
    """During a rolling upgrade a client's pages may be served by controllers of both versions."""
    legacy = base64.urlsafe_b64encode(json.dumps(["chat", 42]).encode()).decode()
    assert decode_token(legacy, (str, int), NODES) == ("chat", 42)


@pytest.mark.parametrize("other", [scope_of("nodes", rack="r1"), scope_of("tenants"), scope_of("tokens", rack="")])
def test_a_token_of_another_list_or_filter_is_refused(other):
    """It was read as a place to start: the rows before it in the other list were skipped."""
    with pytest.raises(InvalidArgument, match="page_token was returned for another list or other filters"):
        decode_token(encode_token(("n7",), NODES), (str,), other)


@pytest.mark.parametrize("token", [
    "%%%", encode_token(("a",)), encode_token(("a", True)), "e30=",
    # Forged keys of the right length: each reached the database (2**63: OverflowError, INTERNAL).
    encode_token(("a", 2**63)), encode_token(("a", -(2**63) - 1)), encode_token(("a", "b")), encode_token((1, 2)),
    encode_token(("a", 1.5)),
])
def test_foreign_tokens_are_refused(token):
    with pytest.raises(InvalidArgument, match="page_token is not a token this list returned"):
        decode_token(token, (str, int))


def test_page_of_uses_the_extra_row_only_to_say_more_follow():
    page = PageBounds(limit=2, after=None, scope=NODES)
    full = page_of(["a", "b", "c"], page, key=lambda x: (x,))
    assert full.items == ("a", "b") and decode_token(full.next_token, (str,), NODES) == ("b",)
    last = page_of(["a", "b"], page, key=lambda x: (x,))
    assert last.items == ("a", "b") and last.next_token == ""
