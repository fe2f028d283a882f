"""A scrape's read of the cluster failing: counted, and logged as one line when the database is
down (it logged two tracebacks of ~8 KB a scrape for the whole outage), a traceback otherwise."""

from __future__ import annotations

import concurrent.futures
import logging

import pytest
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.exc import OperationalError

from controller.observability.metrics import _waited


def _failed(exc: BaseException) -> concurrent.futures.Future[int]:
    future: concurrent.futures.Future[int] = concurrent.futures.Future()
    future.set_exception(exc)
    return future


def test_a_read_failed_by_the_database_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    errors = Counter("read_errors", "test", registry=CollectorRegistry())
    down = OperationalError("SELECT", None, ConnectionRefusedError("connection refused"))
    with caplog.at_level(logging.WARNING, logger="maia.metrics"):
        assert _waited(_failed(down), 1.0, errors, "the cluster state") is None
        assert _waited(_failed(RuntimeError("a bug")), 1.0, errors, "the cluster state") is None
    assert errors._value.get() == 2
    outage, bug = caplog.records
    assert outage.exc_info is None and outage.getMessage().startswith(
        "metrics: reading the cluster state failed: the database failed: OperationalError: "
        "(builtins.ConnectionRefusedError) connection refused; the scrape answers with the last read")
    assert bug.exc_info is not None and bug.getMessage() == "metrics: reading the cluster state failed"
