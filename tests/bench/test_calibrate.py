"""bench/calibrate.py: the host-speed reading each end-to-end run records beside its figures."""

from __future__ import annotations

import gc

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


def test_the_collector_is_off_while_timing_and_as_it_was_after(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    monkeypatch.setattr(calibration, "workload", lambda: seen.append(gc.isenabled()) or calibration.CHECKSUM)
    calibration.calibrate(repeats=2)
    assert seen == [False, False] and gc.isenabled()
    gc.disable()
    try:
        calibration.calibrate(repeats=1)
        assert not gc.isenabled()
    finally:
        gc.enable()
