"""bench/calibrate.py: the host-speed reading each end-to-end run records beside its figures."""

from __future__ import annotations

import pytest

from bench import calibrate as calibration


def test_the_workload_is_the_fixed_one() -> None:
    """Readings of different days compare only while the work timed is the same: a change to the
    workload changes its checksum, and must change CHECKSUM (and be said in docs/benchmarks.md)."""
    assert calibration.workload() == calibration.CHECKSUM


def test_a_reading_is_the_least_cpu_time_of_its_runs() -> None:
    reading = calibration.calibrate(repeats=3)
    assert 0 < reading.best_ms <= reading.median_ms


def test_a_workload_that_computes_something_else_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "workload", lambda: calibration.CHECKSUM + 1)
    with pytest.raises(AssertionError, match="not the fixed one"):
        calibration.calibrate(repeats=1)
