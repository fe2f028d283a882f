"""The controller's histograms find an observation's bucket by bisection (`metrics._Histogram`):
the same bucket as prometheus_client's walk over the bounds (the first at or above the value), on
a bound, between two, past the last, at the infinities and for NaN, labelled or not, and with an
exemplar; every controller histogram is of that class."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from controller.observability import metrics

BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.1, 1.0, 10.0)
VALUES = (-math.inf, -1.0, 0.0, 0.0005, *BOUNDS, *(b * 1.0001 for b in BOUNDS), *(b * 0.9999 for b in BOUNDS),
          1e9, math.inf, math.nan)


def _exposed(histogram_class: type[Histogram], *, labelled: bool, exemplar: bool = False) -> bytes:
    registry = CollectorRegistry()
    histogram = histogram_class("maia_test_seconds", "A test histogram.", ["stage"] if labelled else [],
                                buckets=BOUNDS, registry=registry)
    observed = histogram.labels("submit") if labelled else histogram
    for value in VALUES:
        observed.observe(value, {"trace": "t1"} if exemplar and value == 0.05 else None)
    return generate_latest(registry)


def _buckets_only(exposition: bytes) -> list[bytes]:
    return [line for line in exposition.splitlines() if line.startswith(b"maia_test_seconds_") and b"created" not in line]


@pytest.mark.parametrize("labelled", [False, True])
def test_every_value_lands_in_the_bucket_the_librarys_walk_finds(labelled: bool) -> None:
    assert _buckets_only(_exposed(metrics._Histogram, labelled=labelled)) == \
        _buckets_only(_exposed(Histogram, labelled=labelled))


def test_an_exemplar_is_kept_as_the_library_keeps_it() -> None:
    registry = CollectorRegistry()
    histogram = metrics._Histogram("maia_test_seconds", "A test histogram.", buckets=BOUNDS, registry=registry)
    histogram.observe(0.05, {"trace": "t1"})
    samples = {s.labels["le"]: s for s in next(iter(registry.collect())).samples if s.name.endswith("_bucket")}
    assert samples["0.1"].value == 1 and samples["0.1"].exemplar is not None
    assert samples["0.1"].exemplar.labels == {"trace": "t1"}


def test_every_controller_histogram_bisects() -> None:
    controller = metrics.ControllerMetrics()
    histograms = [value for value in vars(controller).values() if isinstance(value, Histogram)]
    assert len(histograms) >= 9
    assert all(isinstance(h, metrics._Histogram) for h in histograms)
    assert isinstance(controller._labelled(controller.rpc_duration, "maia.v1.DeploymentService", "Submit"),
                      metrics._Histogram)
