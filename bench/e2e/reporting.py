"""A run's result for people: `report` renders `summarize`'s dict as the lines `bench e2e` prints
(after each run, and for a run stopped part way)."""

from __future__ import annotations

from typing import Any

from bench.e2e.stats import MIDDLE_SHARE
from bench.e2e.summary import SLOW_SUBMIT_MS


def _stages_line(r: dict[str, Any]) -> str:
    """Where a submit's time went in the controller, p50/p99 ms a stage (empty: not reported)."""
    parts = [f"{stage} {v['p50_ms']:.1f}/{v['p99_ms']:.1f}" for stage, v in r["submit_stages"].items()
             if v["p50_ms"] is not None]
    queued = r["submit_queued"]
    if queued["p50_ms"] is not None:
        parts.insert(0, f"before the handler {queued['p50_ms']:.1f}/{queued['p99_ms']:.1f}")
    return f"\n  submit stages p50/p99 ms (interpolated): {', '.join(parts)}" if parts else ""


def _per_deployment_ms(r: dict[str, Any], key: str) -> float:
    """CPU ms a deployment that ran (0.0: none ran)."""
    return round(r[key] * 1000 / r["running"], 2) if r["running"] else 0.0


def _pg_statements_lines(r: dict[str, Any]) -> str:
    """--pg-statements: the totals and the top statements by the server's execution time, each
    with its mean and longest execution."""
    pg = r.get("pg_statements")
    if not pg:
        return ""
    return (f"\n  pg_stat_statements since the first submit: {pg['calls']} calls of {pg['statements']} statements, "
            f"{pg['exec_ms']} ms executing; by time:"
            + "".join(f"\n    {s['exec_ms']:>9.1f} ms {s['calls']:>7} calls {s['rows']:>8} rows"
                      f" (mean {s['mean_ms']:.2f}, max {s['max_ms']:.1f} ms)  {s['query']}"
                      for s in pg["top"]))


def report(r: dict[str, Any]) -> str:
    def pp(key: str) -> str:
        return f"{r[key]['p50_ms']:.0f}/{r[key]['p99_ms']:.0f}"
    preloaded = (f"{r['preloaded']} placements preloaded in {r['preload_s']} s, " if r["preloaded"] else "")
    checker = (f"{r['checker_violation_count']} violations" if r["graded"] else "not run")
    rewatched = f" (the watch was cut off {r['watches'] - 1} times)" if r["watches"] > 1 else ""
    server = r["submit_server"]
    in_controller = (f"{server['p50_ms']:.1f}/{server['p99_ms']:.1f} ms interpolated, "
                     if server["p50_ms"] is not None else "")
    slow = ", ".join(f"{n} > {limit} ms" for limit in SLOW_SUBMIT_MS
                     if (n := r.get("submit_slow", {}).get(f"over_{limit}_ms")) is not None)
    sent = (f", sent at {r['offered_per_s']}/s, late p50/p99 {pp('send_late')} ms" if r["send_late"] else "")
    return (f"{r['db']:8} {r['nodes']:>6} nodes  {preloaded}{r['submitted']}/{r['deployments']} deployments "
            f"submitted by {r['tenants']} tenants ({r['singles']} single, "
            f"{r['gangs']} gangs = {r['gang_shards']} shards, {r['deletes']} deleted by {r.get('deleters', 1)} "
            f"deleter(s)); {r['load']}{sent}\n"
            f"  submit p50/p99 {pp('submit')} ms ({slow}; in the controller {in_controller}"
            f"<= {r['submit_server_p50_le_s']}/"
            f"{r['submit_server_p99_le_s']} s) | submit->committed single {pp('single_committed')} ms, "
            f"gang {pp('gang_committed')} ms ({r['gangs64']} of 64 shards: {pp('gang64_committed')} ms) | "
            f"answered->committed single {pp('single_answered_committed')} ms, "
            f"64-shard gang {pp('gang64_answered_committed')} ms | "
            f"commit->seen on the watch single {pp('single_commit_seen')} ms, gang {pp('gang_commit_seen')} ms "
            f"(the watch listed {r['preloaded']} existing deployments in {r['watch_listed_s']} s) | "
            f"submit->Running single {pp('single_running')} ms, "
            f"gang {pp('gang_running')} ms{rewatched}\n"
            f"  committed->Running recorded single {pp('single_running_recorded')} ms, ->seen on the watch "
            f"{pp('single_running_seen')} ms | shard start stages p50/p99 ms: "
            + ", ".join(f"{stage} {v['p50_ms']}/{v['p99_ms']}" for stage, v in r["shard_start"].items()) + "\n"
            f"  delete rpc {pp('delete_rpc')} ms (due->answered {pp('delete_due_answered')} ms; "
            f"{r['deletes_after_submits']} sent after the submits), "
            f"delete->gone {pp('delete_gone')} ms (due->gone {pp('delete_due_gone')} ms) | "
            f"{r['deployments_per_s']} deployments/s sustained ({r['running']} running in {r['elapsed_s']} s; "
            f"{r['steady_per_s']}/s steady: the middle {round(MIDDLE_SHARE * 100)} % of them) | "
            f"controller CPU {r['controller_cpu_s']} s (decide process "
            f"{round(r['controller_children_cpu_s'] - r['controller_gateways_cpu_s'], 1)} s"
            + (f", {r['agent_gateways']} agent gateways {r['controller_gateways_cpu_s']} s" if r["agent_gateways"] else "")
            + "), "
            f"peak RSS {r['controller_peak_rss_mib']} MiB (the controller's process, not the decide process"
            + (f"; the gateways {r['gateways_peak_rss_mib']} MiB" if r["agent_gateways"] else "") + ") | "
            f"machine busy {r['machine_busy_cpu_s']} of {r['machine_cpu_s']} CPU s (this bench "
            f"{r['bench_cpu_s']} s; the fleets and anything else most of the rest"
            + (f"; {'the database server, ' if r['db'] != 'sqlite' else ''}the fleets and this bench on CPUs "
               f"{','.join(map(str, r['others_cpus']))}, the controller on any" if r.get("others_cpus") else "")
            + ") | "
            + (f"database server CPU {r['db_server_cpu_s']} s, {_per_deployment_ms(r, 'db_server_cpu_s')} ms a "
               f"deployment ({r['db_transactions']} transactions) | " if r.get("db_server_cpu_s") is not None else "")
            + f"controller CPU {_per_deployment_ms(r, 'controller_cpu_s')} ms a deployment | "
            f"heartbeat node-row writes {r['heartbeat_rows_per_s']}/s since the submits began | "
            f"nodes joined in {r['nodes_joined_s']} s | {_calibration(r)}reconcile passes "
            f"{', '.join(f'{k} {v}' for k, v in sorted(r['reconcile_passes'].items())) or '?'} | "
            f"event-loop lag p50/p99 <= {r['loop_lag_p50_le_s']}/{r['loop_lag_p99_le_s']} s "
            f"(the bench's own {pp('bench_loop_lag')} ms)"
            f"{_stages_line(r)}{_pg_statements_lines(r)}\n"
            f"  checker: {checker}; errors: {r['error_count']}"
            + "".join(f"\n    {e}" for e in r["errors"] + r["checker_violations"]))


def _calibration(r: dict[str, Any]) -> str:
    """The host's speed before and after the run (bench/calibrate.py), where measured."""
    readings = r.get("host_calibration_ms") or []
    if not readings:
        return ""
    when = "before/after" if len(readings) > 1 else "before (the run stopped)"
    return f"host calibration {'/'.join(f'{ms:g}' for ms in readings)} ms {when} (higher: a slower host) | "
