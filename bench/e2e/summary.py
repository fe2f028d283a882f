"""A run summarised: `summarize` turns a `Bench` into the result dict, the one `--json` writes and
the report prints (latencies as p50/p99 ms, rates, CPU, the controller's histograms, the
checker's verdict and the errors)."""

from __future__ import annotations

from typing import Any

from bench.e2e.cluster import GANG_SIZES
from bench.e2e.measuring import Bench
from bench.e2e.stats import bucket_quantile, interpolated_quantile, middle_rate
from bench.fgd import percentile


def lag_quantile(bench: Bench, q: float) -> float | None:
    """The event-loop lag below which `q` of the ticks since the submits started fell (a bucket's
    upper bound; None: unknown)."""
    return bucket_quantile(bench.lag, bench.lag_at_start, q)


def _ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(values, 50), 1), "p99_ms": round(percentile(values, 99), 1)}


SLOW_SUBMIT_MS = (20, 50)  # the submits slower than each, counted (the submit p99 target is 20 ms)


def _slow(values: list[float]) -> dict[str, int]:
    return {f"over_{limit}_ms": sum(1 for v in values if v > limit) for limit in SLOW_SUBMIT_MS}


def summarize(bench: Bench) -> dict[str, Any]:
    works, run, shape = bench.works, bench.run, bench.shape
    singles = [w.name for w in works if w.shards == 1]
    gangs = [w.name for w in works if w.shards > 1]
    gangs64 = [w.name for w in works if w.shards == max(GANG_SIZES)]
    t = run.times

    def stage(names: list[str], a: str, b: str) -> list[float]:
        return [(getattr(t[n], b) - getattr(t[n], a)) * 1000 for n in names
                if n in t and getattr(t[n], a) and getattr(t[n], b)]

    def commit_seen(names: list[str]) -> list[float]:
        return [ms for n in names if n in t and (ms := t[n].commit_seen_ms) is not None]

    def recorded(names: list[str]) -> list[float]:  # the commit -> the flush that recorded Running, controller clock
        return [(t[n].running_at - t[n].commit_at) * 1000 for n in names if n in t and t[n].commit_at and t[n].running_at]

    ran = [n for n in (singles + gangs) if n in t and t[n].running]
    span = max(t[n].running for n in ran) - min(t[n].submitted for n in ran) if ran else 0.0
    steady = middle_rate([t[n].running for n in ran])
    violations = bench.violations or []
    return {
        "db": bench.kind, "nodes": shape.nodes, "fleets": shape.fleets, "preloaded": shape.preloaded,
        "preload_s": round(bench.preload_s, 1), "tenants": bench.tenants, "deployments": len(works),
        "singles": len(singles), "gangs": len(gangs), "gang_shards": sum(w.shards for w in works if w.shards > 1),
        "submitted": sum(1 for x in t.values() if x.submitted),
        "deletes": sum(1 for x in t.values() if x.delete_sent), "deleters": run.deleters,
        "submit": _ms(stage(singles + gangs, "submitted", "acknowledged")),
        "submit_slow": _slow(stage(singles + gangs, "submitted", "acknowledged")),
        "single_committed": _ms(stage(singles, "submitted", "committed")),
        "single_running": _ms(stage(singles, "submitted", "running")),
        "gang_committed": _ms(stage(gangs, "submitted", "committed")),
        "gang_running": _ms(stage(gangs, "submitted", "running")),
        "gangs64": len(gangs64), "gang64_committed": _ms(stage(gangs64, "submitted", "committed")),
        # after the submit was answered: the wait for a reconcile pass, and the pass
        "gang64_answered_committed": _ms(stage(gangs64, "acknowledged", "committed")),
        "single_answered_committed": _ms(stage(singles, "acknowledged", "committed")),
        # the controller's commit (the deployment's updated_at) -> the bench's watch saw it: the
        # delivery part of submit -> committed
        "single_commit_seen": _ms(commit_seen(singles)), "gang_commit_seen": _ms(commit_seen(gangs)),
        "watch_listed_s": round(bench.listed_s, 2),
        # committed -> Running, stage by stage: the controller's commit -> its flush recording Running
        # (updated_at to updated_at), that flush -> seen on the watch, and the controller's histograms
        "single_running_recorded": _ms(recorded(singles)),
        "single_running_seen": _ms([ms for n in singles if n in t and (ms := t[n].running_seen_ms) is not None]),
        "shard_start": {stage: {f"p{q}_ms": None if (v := interpolated_quantile(
                                    buckets, bench.shard_start_at_start.get(stage, {}), q / 100)) is None
                                else round(v * 1000, 1) for q in (50, 99)}
                        for stage, buckets in sorted(bench.shard_start.items())},
        "bench_loop_lag": _ms(run.loop_lag_ms),
        "delete_rpc": _ms(run.delete_rpc_ms),
        "delete_gone": _ms(stage(list(t), "delete_sent", "deleted")),
        # from picked to answered: the RPC and the wait for a free deleter (one deleter: every
        # delete due while one is at the controller waits in the bench, which the RPC's time hides)
        "delete_due_answered": _ms(stage(list(t), "delete_due", "delete_answered")),
        "delete_due_gone": _ms(stage(list(t), "delete_due", "deleted")),
        # sent once every submit was answered: to a controller no longer saturated
        "deletes_after_submits": sum(1 for x in t.values()
                                     if x.delete_sent and x.delete_sent > bench.started + bench.submitted_s),
        "running": len(ran),
        "deployments_per_s": round(len(ran) / span, 1) if span else 0.0,
        "steady_per_s": None if steady is None else round(steady, 1),
        "submit_phase_s": round(bench.submitted_s, 2), "elapsed_s": round(bench.elapsed_s, 2),
        "controller_cpu_s": round(bench.cpu_s, 1), "controller_peak_rss_mib": round(bench.rss_mib),
        "controller_children_cpu_s": round(bench.child_cpu_s, 1),
        "controller_gateways_cpu_s": round(bench.gateway_cpu_s, 1), "agent_gateways": bench.gateways,
        "others_cpus": None if bench.others_cpus is None else sorted(bench.others_cpus),
        "gateways_peak_rss_mib": round(bench.gateway_rss_mib),
        # the whole machine over the same span: the fleets are most of busy - controller - bench
        "machine_busy_cpu_s": round(bench.machine_busy_s, 1), "machine_cpu_s": round(bench.machine_all_s, 1),
        "bench_cpu_s": round(bench.own_cpu_s, 1),
        "db_server_cpu_s": round(bench.db_cpu_s, 2) if bench.db_server is not None else None,
        "db_transactions": bench.db_xacts if bench.db_server is not None else None,
        "pg_statements": bench.pg_statements,
        "heartbeat_rows_per_s": None if (rows := bench.beat_rows_per_s()) is None else round(rows, 1),
        "nodes_joined_s": round(bench.joined_s, 1), "controller_exit": bench.controller_exit,
        "watches": run.watches, "graded": bench.violations is not None, "reconcile_passes": dict(bench.passes),
        "loop_lag_p50_le_s": lag_quantile(bench, 0.5), "loop_lag_p99_le_s": lag_quantile(bench, 0.99),
        # the preloaded bench submits nothing before the submit phase: the histogram is the run's
        "submit_server_p50_le_s": bucket_quantile(bench.submit_rpc, {}, 0.5),
        "submit_server_p99_le_s": bucket_quantile(bench.submit_rpc, {}, 0.99),
        "submit_server": _interpolated_ms(bench.submit_rpc),
        # before the handler ran (the bench's send time in the call's metadata), and by stage inside
        "submit_queued": _interpolated_ms(bench.submit_queued),
        "submit_stages": {stage: _interpolated_ms(buckets) for stage, buckets in bench.submit_stages.items()},
        "load": bench.load,
        "host_calibration_ms": list(bench.calibration_ms),
        "offered_per_s": round(len(run.send_late_ms) / run.sending_s, 1) if run.sending_s else None,
        "send_late": _ms(run.send_late_ms) if run.send_late_ms else None,
        "checker_violations": violations[:10], "checker_violation_count": len(violations),
        "errors": run.errors[:10], "error_count": len(run.errors),
    }


def _interpolated_ms(buckets: dict[float, float]) -> dict[str, float | None]:
    """p50 and p99 (ms) of a histogram's observations (the run's: the bench submits nothing before)."""
    return {f"p{q}_ms": None if (v := interpolated_quantile(buckets, {}, q / 100)) is None else round(v * 1000, 1)
            for q in (50, 99)}
