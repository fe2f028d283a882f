"""The statistics over what was measured, as pure functions: a histogram's quantile as a bucket's
bound or interpolated as Prometheus's histogram_quantile does, and the steady rate (the middle of
the Running times), so that they are tested apart from any run."""

from __future__ import annotations


def bucket_quantile(buckets: dict[float, float], before: dict[float, float], q: float) -> float | None:
    """The upper bound of the histogram bucket `q` of the observations since `before` fell in
    (None: none observed)."""
    counts = sorted((le, n - before.get(le, 0.0)) for le, n in buckets.items())
    total = counts[-1][1] if counts else 0.0
    return next((le for le, n in counts if n >= q * total), None) if total else None


def interpolated_quantile(buckets: dict[float, float], before: dict[float, float], q: float) -> float | None:
    """Prometheus's histogram_quantile: the `q` quantile of the observations since `before`,
    linear within the bucket it falls in (the bucket below +Inf's bound when it falls there;
    None: none observed)."""
    counts = sorted((le, n - before.get(le, 0.0)) for le, n in buckets.items())
    total = counts[-1][1] if counts else 0.0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le, n in counts:
        if n >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * ((rank - below) / (n - below) if n > below else 1.0)
        lower, below = le, n
    return lower


# The steady rate: deployments that reached Running in the middle of the run, over the time
# between the first and the last of them. The sustained rate (first submit to last Running) also
# holds the pipeline's filling (the first submit's ~1-2 s to Running) and draining, a quarter of a
# run of a few thousand deployments; this one is the rate the pipeline keeps once full.
MIDDLE_SHARE = 0.8


def middle_rate(running_at: list[float], share: float = MIDDLE_SHARE) -> float | None:
    """Deployments a second over the middle `share` of these Running times (None: too few)."""
    times = sorted(running_at)
    skip = round(len(times) * (1 - share) / 2)
    first, last = skip, len(times) - 1 - skip
    if last - first < 1 or times[last] <= times[first]:
        return None
    return (last - first) / (times[last] - times[first])
