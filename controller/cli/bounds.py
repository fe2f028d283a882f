"""The numbers maiactl accepts, checked before they reach protobuf or a clock.

Protobuf raises ValueError ("Value out of range") for an integer its field's type cannot hold,
`time.sleep` refuses a negative pause, and a call's timeout of 0 ends before it starts: a
manifest's `replicas: 99999999999` or a flag's `--interval -1` would end maiactl with a
traceback or a misleading DEADLINE_EXCEEDED. These checks make them usage errors (exit 2) that
name the field or the flag: the range of a proto integer field, read from its descriptor (so it
follows the .proto), and argparse types for durations and counts (argparse names the flag).
"""
from __future__ import annotations

import argparse
import math
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from google.protobuf.descriptor import FieldDescriptor

_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-2**31, 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-2**63, 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def int_range(field: FieldDescriptor) -> tuple[int, int] | None:
    """The values an integer field can hold (int32, uint32, int64, uint64); None: not an integer."""
    return _INT_RANGES.get(field.cpp_type)


def int_max(field: FieldDescriptor) -> int:
    """The largest value of an integer field."""
    limits = int_range(field)
    if limits is None:
        raise TypeError(f"{field.full_name} is not an integer field")
    return limits[1]


# The longest duration a flag may give: ten years. Python's locks and queues take ~292 years
# (`time.sleep` of a longer one overflows), but a call's gRPC deadline overflowed from ~5e9 s:
# every call of `--rpc-timeout 9000000000` failed at once as "cannot reach the controller".
SECONDS_MAX = min(threading.TIMEOUT_MAX, 10 * 365.25 * 86_400)


def seconds(minimum: float | None = None) -> Callable[[str], float]:
    """An argparse type: a duration in seconds, more than 0 (and at least `minimum`) and at most
    `SECONDS_MAX`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
        if math.isnan(value) or value <= 0 or (minimum is not None and value < minimum):
            floor = f"at least {minimum:g}" if minimum is not None else "more than 0"
            raise argparse.ArgumentTypeError(f"must be {floor} seconds, got {text!r}")
        if value > SECONDS_MAX:  # infinity too ('1e400'): it was told "must be more than 0"
            raise argparse.ArgumentTypeError(f"must be at most {SECONDS_MAX:.0f} seconds, got {text!r}")
        return value

    return parse


def count(maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number of at least 1 (and at most `maximum`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


def non_empty(text: str) -> str:
    """An argparse type: a value with something in it. An empty one (`--controller "$UNSET"`)
    would otherwise be taken as not given, and the environment's or the context's used instead."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def back_from(now: datetime, seconds: float, text: str) -> datetime:
    """`now` less `seconds` (a `--since` given as a duration, `text`), refused as an argparse
    error when it reaches back before year 1 or beyond what a timedelta holds."""
    try:
        return now - timedelta(seconds=seconds)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} reaches back before any date") from None
