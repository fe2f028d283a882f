"""Times to protobuf Timestamps (`controller/api/convert.py`): the value `Timestamp.FromDatetime`
gives, aware or naive (taken as UTC), before and after the epoch, at the ends of the range."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from controller.api import convert

EAST = timezone(timedelta(hours=5, minutes=30))


@pytest.mark.parametrize("value", [
    datetime(2026, 12, 1, 19, 30, 12, 345678, tzinfo=timezone.utc),
    datetime(2026, 12, 1, 19, 30, 12, 345678),                       # naive: UTC
    datetime(2026, 12, 2, 1, 0, 12, 345678, tzinfo=EAST),             # another offset
    datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=timezone.utc),  # before the epoch
    datetime(1, 1, 1, tzinfo=timezone.utc),
    datetime(9999, 12, 31, 23, 59, 59, 999999),
])
def test_a_time_is_the_timestamp_from_datetime_gives(value: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(value)
    got = convert.timestamp(value)
    assert got == expected
    assert got is not None and got.ToDatetime(tzinfo=timezone.utc) == value.replace(
        tzinfo=value.tzinfo or timezone.utc)


def test_no_time_is_no_timestamp() -> None:
    assert convert.timestamp(None) is None
