"""`/metrics` of a real controller (gRPC on a socket, simulated nodes, placed and pending
deployments), scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from controller.api.interceptors import SENT_AT_METADATA_KEY
from controller.api.server import ControllerApp
from controller.config import Config
from controller.usecases.submits import SubmitStages
from grpc_harness import PENDING, RUNNING, SimFleet, Stubs, admin_token_of, issue_token, eventually, spec, topology
from maia.v1 import admin_pb2, common_pb2, deployments_pb2

RACKS = {"rack-00": "row-a", "rack-01": "row-a"}
RACK_BUDGET_W = 20_000.0
IDLE_W = 600.0  # maia-simnode's default idle power per node
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_text(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=15) as reply:
        assert reply.status == 200
        return reply.read().decode()


async def scrape(address: str) -> Samples:
    """Every sample by (name, sorted labels). The HTTP fetch runs in a thread: the endpoint
    asks this very event loop for the cluster state."""
    text = await asyncio.to_thread(scrape_text, address)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every sample of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@pytest.fixture
async def app(migrated_db_url: str, tmp_path: Path) -> AsyncIterator[ControllerApp]:
    app = ControllerApp(Config(listen="127.0.0.1:0", db_url=migrated_db_url, reconcile_interval_s=0.2,
                               heartbeat_timeout_s=5.0, solve_time_limit_ms=1000, metrics_listen="127.0.0.1:0",
                               bootstrap_admin_token_file=str(tmp_path / "admin.token")))
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace_s=1.0)


async def test_metrics_follow_the_scenario(app: ControllerApp, tmp_path: Path) -> None:
    stubs = Stubs.connect(app.address, admin_token_of(app))
    channel = stubs.channel
    topo = topology(RACKS, rack_budget_w=RACK_BUDGET_W)
    topo.rows[0].power_budget_w = 50_000.0
    await stubs.admin.ApplyTopology(topo)
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab", max_accelerators=6))
    fleet = SimFleet(app.address, racks=2, nodes_per_rack=2, token=await issue_token(app.db, "node-bootstrap"),
                     log_dir=tmp_path)
    try:
        await eventually(lambda: stubs.admin.ListNodes(admin_pb2.ListNodesRequest()),
                         lambda r: sum(n.connected and n.state == common_pb2.NODE_STATE_READY for n in r.nodes) == 4,
                         what="4 agents connected")
        # Placed: one replica of 2 shards x 2 accelerators (400 W each) in one rack.
        await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
            spec=spec("svc", replicas=1, shards=2, accelerators=2)))
        await eventually(lambda: stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc")),
                         lambda d: d.phase == RUNNING, what="svc running")
        # Pending: 4 more accelerators would pass the tenant's cap of 6. Sent saying when (the bench's way).
        await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
            spec=spec("odd", shards=1, accelerators=4)), metadata=((SENT_AT_METADATA_KEY, f"{time.time():.6f}"),))
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="nope"))
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND

        async def phases() -> dict[str, int]:
            listed = await stubs.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest())
            return {d.spec.name: d.phase for d in listed.deployments}

        await eventually(phases, lambda p: p == {"svc": RUNNING, "odd": PENDING}, what="svc running, odd pending")
        svc = await stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc"))
        loaded_rack = svc.placements[0].rack

        async def reasons_and_samples() -> tuple[set[str], Samples]:
            odd = await stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="odd"))
            return {r.code for r in odd.reasons}, await scrape(app.metrics_address)

        def agree(read: tuple[set[str], Samples]) -> bool:
            """The scrape counts odd's reasons as the API tells them (a pass between the two reads
            may judge it again, e.g. add TIME_LIMIT on a loaded host: read both again)."""
            reasons, samples = read
            return bool(reasons) and total(samples, "maia_deployments_unplaced") == len(reasons) and all(
                value(samples, "maia_deployments_unplaced", reason=code) == 1 for code in reasons)

        odd_reasons, samples = await eventually(reasons_and_samples, agree,
                                                what="odd's reasons, the same in the API and the metrics")
    finally:
        await fleet.stop()
        await channel.close()

    assert value(samples, "maia_deployments", phase="running") == 1
    assert value(samples, "maia_deployments", phase="pending") == 1
    assert "QUOTA_ACCELERATORS" in odd_reasons
    assert value(samples, "maia_nodes", state="ready") == 4
    assert value(samples, "maia_nodes", state="down") == 0
    assert value(samples, "maia_accelerators_allocated", tenant="lab", model="maia-100") == 4
    assert value(samples, "maia_accelerators_free", model="maia-100", zone="z1") == 4 * 4 - 4

    # Power: every up node's idle power, plus 4 loaded accelerators x 400 W in the loaded rack.
    for rack in RACKS:
        used = 2 * IDLE_W + (4 * 400.0 if rack == loaded_rack else 0.0)
        assert value(samples, "maia_rack_power_used_watts", rack=rack, row="row-a") == pytest.approx(used)
        assert value(samples, "maia_rack_power_budget_watts", rack=rack, row="row-a") == RACK_BUDGET_W
    assert value(samples, "maia_row_power_used_watts", row="row-a", zone="z1") == pytest.approx(4 * IDLE_W + 1600)
    assert value(samples, "maia_row_power_budget_watts", row="row-a", zone="z1") == 50_000.0
    assert 0 <= value(samples, "maia_node_heartbeat_lag_max_seconds", rack=loaded_rack) < 10

    # Events: solves by status, the first placement's latency, gRPC calls by method and code.
    assert total(samples, "maia_solves_total") >= 1
    assert total(samples, "maia_solve_duration_seconds_count") == total(samples, "maia_solves_total")
    assert value(samples, "maia_deployment_submit_to_placed_seconds_count") == 1
    submit = {"service": "maia.v1.DeploymentService", "method": "SubmitDeployment"}
    assert value(samples, "maia_grpc_server_handled_total", code="OK", **submit) == 2
    assert value(samples, "maia_grpc_server_handled_total", code="NOT_FOUND",
                 service="maia.v1.DeploymentService", method="GetDeployment") == 1
    assert value(samples, "maia_grpc_server_handling_seconds_count", **submit) == 2
    assert value(samples, "maia_grpc_server_queued_seconds_count", **submit) == 1  # the one that said when it was sent
    for stage, _ in SubmitStages().items():  # both submits went in a batch: each stage observed for each
        assert value(samples, "maia_submit_stage_seconds_count", stage=stage) == 2
    assert total(samples, "maia_grpc_server_handled_total", service="maia.v1.NodeAgentService",
                 method="Register", code="OK") == 4
    # Usage meters run from the placement on: svc's 4 accelerators (4 x 400 W load + 4 x 150 W idle share).
    lab = {"tenant": "lab", "model": "maia-100", "zone": "z1"}
    accelerator_s = value(samples, "maia_usage_accelerator_seconds_total", **lab)
    assert accelerator_s > 0
    assert value(samples, "maia_usage_energy_joules_total", **lab) == pytest.approx(accelerator_s * (400 + 150))
    # No unbounded labels: no deployment name appears as a label value.
    assert not any(v in ("svc", "odd") for _, labels in samples for _, v in labels)


DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "maia-dashboard.json"
# The series a family exposes, by type (histogram: _bucket/_count/_sum; counter: _total).
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported_series(text: str) -> set[str]:
    """Every series name the exposition declares, whether or not it has samples yet."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SERIES_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


async def test_the_dashboard_queries_only_metrics_the_controller_exports(app: ControllerApp) -> None:
    exported = exported_series(await asyncio.to_thread(scrape_text, app.metrics_address))
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(?:maia|process)_[a-z0-9_]+", target["expr"])}  # process_: the process's own
    assert len(queried) >= 15
    assert queried <= exported, f"the dashboard queries series nobody exports: {sorted(queried - exported)}"
    # Every metric family the controller exports is on the dashboard somewhere (`_created`:
    # prometheus_client's creation timestamps of counters and histograms, not for graphing).
    families = {f.name for f in text_string_to_metric_families(await asyncio.to_thread(scrape_text, app.metrics_address))
                if not f.name.endswith("_created")}
    on_dashboard = {f for f in families if any(q.startswith(f) for q in queried)}
    assert families - on_dashboard <= {"maia_metrics_cluster_read_errors", "maia_metrics_usage_read_errors"}


ALERTS = DASHBOARD.parents[1] / "prometheus" / "alerts.yml"
PROMETHEUS = ALERTS.parent / "prometheus.yml"
# Series Prometheus makes itself for every target it scrapes, that a rule may use besides the
# controller's: `up` (1 when the scrape succeeded), to tell that no controller answers at all.
PROMETHEUS_SERIES = {"up"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan"}


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def series_in(expr: str) -> set[str]:
    """The series names a PromQL expression selects: its identifiers less functions and
    aggregations (followed by a parenthesis), keywords, label matchers, grouping labels, ranges."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    return {name for name in re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", bare)
            if name.lower() not in PROMQL_WORDS}


def matchers_in(expr: str) -> list[tuple[str, str, str, str]]:
    """(series, label, operator, value) of every label matcher on a named series."""
    return [(name, label, op, value) for name, body in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr)
            for label, op, value in re.findall(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"', body)]


async def test_readiness_and_the_processs_memory_are_exported(app: ControllerApp) -> None:
    """A controller NOT_SERVING, or nearing --max-rss-mib, showed nowhere but its log and probes."""
    def scraped() -> dict[str, float]:
        return {s.name: s.value for f in text_string_to_metric_families(scrape_text(app.metrics_address))
                for s in f.samples if not s.labels}

    samples = await asyncio.to_thread(scraped)
    assert samples["maia_serving"] == 1.0 and samples["process_resident_memory_bytes"] > 10 * 2**20
    app.monitor.serving = False
    try:
        assert (await asyncio.to_thread(scraped))["maia_serving"] == 0.0
    finally:
        app.monitor.serving = True


async def test_the_metrics_port_serves_metrics_at_their_path_only(app: ControllerApp) -> None:
    """prometheus_client's server answered every path with the metrics: an HTTP liveness probe
    pointed at /healthz on this port read 200 whatever the controller's health."""
    def status(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{app.metrics_address}{path}", timeout=15) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    for path in ("/healthz", "/", "/metrics/extra"):
        code, body = await asyncio.to_thread(status, path)
        assert code == 404 and "serves /metrics only" in body and "maia_serving" not in body, (path, code)
    code, body = await asyncio.to_thread(status, "/metrics")
    assert code == 200 and "maia_serving" in body


async def test_the_alert_rules_use_only_metrics_the_controller_exports(app: ControllerApp) -> None:
    """deploy/prometheus/alerts.yml (compose loads it): every rule is named, labelled with a
    severity, and queries series the controller exports (or Prometheus's own `up`, of the job
    prometheus.yml scrapes the controllers in), with label values the controller exports; the
    scrapes' read errors are among them, and a whole outage, which leaves no controller series to
    compare, fires a critical rule."""
    text = await asyncio.to_thread(scrape_text, app.metrics_address)
    exported = exported_series(text)
    rules = _rules()
    assert rules and all(rule["alert"] and rule["labels"]["severity"] in ("critical", "warning") for rule in rules)
    used = {name for rule in rules for name in series_in(rule["expr"])}
    assert used <= exported | PROMETHEUS_SERIES, f"alert rules query series nobody exports: {sorted(used - exported)}"
    assert {"maia_metrics_cluster_read_errors_total", "maia_metrics_usage_read_errors_total"} <= used

    samples = {(s.name, tuple(sorted(s.labels.items())))
               for family in text_string_to_metric_families(text) for s in family.samples}
    jobs = {job["job_name"] for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    for rule in rules:
        for name, label, op, value in matchers_in(rule["expr"]):
            if name in PROMETHEUS_SERIES:
                assert (label, op, value in jobs) == ("job", "=", True), f"{rule['alert']}: {name} of no scraped job"
                continue
            assert op in ("=", "=~"), f"{rule['alert']}: {label}{op}{value!r}"
            for one in value.split("|") if op == "=~" else (value,):
                assert any(n == name and (label, one) in ls for n, ls in samples), \
                    f"{rule['alert']}: no {name}{{{label}={one!r}}} exported"

    # No controller scraped: every maia_ series goes stale, so only a rule on `up` or an absent()
    # can fire then (MaiaNoLeader's max(maia_leader) < 1 is no series, not true).
    outage = [rule for rule in rules if rule["labels"]["severity"] == "critical"
              and ("up" in series_in(rule["expr"]) or "absent(maia_leader)" in rule["expr"].replace(" ", ""))]
    assert outage, "no critical rule fires when no controller answers a scrape"


def _seconds(duration: str) -> float:
    return sum(float(n) * {"s": 1, "m": 60, "h": 3600}[unit] for n, unit in re.findall(r"(\d+)([smh])", duration))


EVERY_S = _seconds(yaml.safe_load(PROMETHEUS.read_text())["global"]["evaluation_interval"])


def fires(rule: dict, gauge: Callable[[float], float | None], *, for_s: float = 3600) -> bool:
    """Whether `rule` fires within `for_s` on one gauge whose value at t is `gauge(t)` (None: no
    sample), scraped and evaluated every `EVERY_S`. The rules this reads are an aggregation over
    that gauge, or over its `max_over_time(...[W])`, compared `> N`, held for their `for`."""
    expr = rule["expr"]
    threshold = float(re.search(r">\s*([0-9.]+)\s*$", expr).group(1))
    window = re.search(r"max_over_time\([^\[]*\[(\w+)\]\)", expr)
    window_s = _seconds(window.group(1)) if window else 0.0
    hold_s = _seconds(rule.get("for", "0s"))
    times = [i * EVERY_S for i in range(int(for_s / EVERY_S) + 1)]
    values = {t: gauge(t) for t in times}
    pending_since = None
    for t in times:
        seen = [v for u, v in values.items() if t - window_s <= u <= t and v is not None]
        if not seen or max(seen) <= threshold:
            pending_since = None
            continue
        pending_since = t if pending_since is None else pending_since
        if t - pending_since >= hold_s:
            return True
    return False


def _rules_over(series: str, **labels: str) -> list[dict]:
    found = [rule for rule in _rules() if series in series_in(rule["expr"])
             and all((series, label, "=", value) in matchers_in(rule["expr"]) for label, value in labels.items())]
    assert found, f"no alert rule reads {series} {labels or ''}"
    return found


def test_the_heartbeat_lag_rule_fires_on_nodes_that_keep_going_silent_not_on_one_death() -> None:
    """The lag gauge covers up (and suspect) nodes: a node silent past --node-down-grace is down
    and leaves it, so a threshold or a `for` the gauge cannot hold with the defaults never fires
    (the rule was `> 30` for 2m: a silent node is down at 30 s)."""
    timeout, down, grace = Config.heartbeat_timeout_s, Config.node_down_grace_s, Config.restart_grace_s

    def healthy(t: float) -> float:
        return t % (timeout / 3)  # 3 heartbeats per timeout

    def silent_from(start: float, until: float) -> Callable[[float], float]:
        return lambda t: t - start if start <= t <= start + until else healthy(t)

    for rule in _rules_over("maia_node_heartbeat_lag_max_seconds"):
        assert not fires(rule, healthy), rule["alert"]
        assert not fires(rule, silent_from(100, down)), f"{rule['alert']}: one node's death (MaiaNodesDown's)"
        assert not fires(rule, silent_from(100, grace + timeout)), f"{rule['alert']}: a failover's restart grace"
        # The rack's nodes go silent past their timeout in turn, each down in its grace.
        assert fires(rule, lambda t: t % 120 if t % 120 <= down else healthy(t)), \
            f"{rule['alert']}: never fires on nodes that keep going silent"


def test_a_node_suspect_for_minutes_fires_a_rule_one_going_down_does_not() -> None:
    """A silent node is suspect from --heartbeat-timeout until --node-down-grace; a flapping one
    stays suspect while damped (a node suspect and damped for over 5 minutes fired nothing)."""
    timeout, down = Config.heartbeat_timeout_s, Config.node_down_grace_s
    for rule in _rules_over("maia_nodes", state="suspect"):
        assert not fires(rule, lambda t: 1.0 if 100 + timeout <= t <= 100 + down else 0.0), rule["alert"]
        assert fires(rule, lambda t: 1.0 if 100 <= t <= 100 + 600 else 0.0), rule["alert"]


def test_an_accelerator_failed_for_minutes_fires_a_rule_a_brief_fault_does_not() -> None:
    """A failed accelerator its agent keeps listing is worth a look; one repaired within minutes is not."""
    for rule in _rules_over("maia_accelerators_failed"):
        assert not fires(rule, lambda t: 1.0 if 100 <= t <= 160 else 0.0), rule["alert"]
        assert fires(rule, lambda t: 1.0 if t >= 100 else 0.0), rule["alert"]


async def test_a_sqlite_controller_checkpoints_its_log_off_the_commit_path(tmp_path: Path) -> None:
    """store/checkpoints.py: the controller's checkpointer copies the log into the database file
    (its commits do not, below a large bound) and says so in its metrics; the stop's last
    checkpoint leaves the file whole."""
    app = ControllerApp(Config(listen="127.0.0.1:0", db_url=f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}",
                               metrics_listen="127.0.0.1:0", bootstrap_admin_token_file=str(tmp_path / "admin.token")))
    assert app.checkpointer is not None
    app.checkpointer.checkpoint_frames = 1  # a round for a few pages (by default: once 1,000 are not copied)
    await app.start()
    try:
        stubs = Stubs.connect(app.address, admin_token_of(app))
        try:
            await stubs.admin.ApplyTopology(topology(RACKS))
        finally:
            await stubs.channel.close()
        # Both in one scrape, eventually: a round can run while a reader's snapshot still needs the
        # latest frames of a background write (the lease's renewal), and leave them to the next poll.
        await eventually(lambda: scrape(app.metrics_address),
                         lambda s: total(s, "maia_sqlite_wal_checkpoint_seconds_count", outcome="complete") > 0
                         and total(s, "maia_sqlite_wal_frames_uncopied") == 0,
                         what="a complete checkpoint counted, nothing left uncopied")
    finally:
        await app.stop(grace_s=1.0)
    wal = tmp_path / "maia.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    conn = sqlite3.connect(tmp_path / "maia.db")
    try:
        assert conn.execute("SELECT count(*) FROM racks").fetchone()[0] == len(RACKS)
    finally:
        conn.close()
