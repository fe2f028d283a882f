"""The running controller: database, agent hub, reconciler and the gRPC server, started and
stopped together.

`ControllerApp.start()` checks (or migrates) the schema, binds the gRPC server with the one
interceptor chain, health checking and reflection, starts the background loops and reports
SERVING; `stop()` undoes it in order: NOT_SERVING, end agent and watch streams, stop the server
with a grace period, release the leader lease, cancel the loops, dispose of the engine. Tests
run it in-process on port 0.

Several controllers may share one PostgreSQL: each runs a `LeaderElection`; the leader's
reconciler, agent hub and watchdog write through the fenced database, followers serve the API
and reach the leader through `maia_cluster` notifications (`controller.store.notify`; what a
controller does on hearing them: `controller.api.peers`). On SQLite one controller holds the
file (`controller.store.exclusive`); a second one refuses.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controller import limits
from controller.agents import NODE_DELETED, AgentHub
from controller.admission import agent_admission_gate
from controller.aio import cancel_and_wait, within
from controller.authn import AUTHORIZATION_KEY, BOOTSTRAP_HINT, Authenticator
from controller.api.admin import AdminServicer
from controller.api.agents import REGISTER_METHOD, NodeAgentServicer
from controller.api.audit import AuditServicer
from controller.api.auditing import AuditInterceptor, UnauthenticatedAuditor
from controller.api.deployments import DeploymentServicer
from controller.api.deps import ServiceDeps
from controller.api.interceptors import LoadShedInterceptor, interceptor_chain
from controller.api.peers import (
    DEPLOYMENTS, LEASE_RELEASED, NODE_REMOVED, NODES, TOKENS_REVOKED, WAKE, PeerMessages, deployment_item,
)
from controller.api.tls import NodeCertificateInterceptor, TlsSettings
from controller.config import Config
from controller.observability.cluster import ClusterGauges, UsageCounters, read_cluster_gauges, read_usage_counters
from controller.observability.loop import watch_event_loop
from controller.observability.metrics import ControllerMetrics
from controller.errors import Unauthenticated, Unavailable
from controller.gateway.children import GatewayProcesses, GatewaySettings, GatewayStartError
from controller.gateway.frames import link_ping_times, link_server_options
from controller.gateway.relay import RelayServicer, method_handlers
from controller.gcpolicy import CollectionPacer, WarmHeapFreezer
from controller.health import LIVENESS_SERVICE, HealthMonitor, resident_mib
from controller.identity import CONTROLLER, Principal, Role
from controller.nodelifecycle import NodeLifecycle
from controller.preflight import StartupError
from controller.ratelimit import KeyedRateLimiter, SubmitLimits
from controller.leadership import STARTING_STATE, STATE_METADATA_KEY, LeaderElection, LeaseSettings
from controller.reconcile import Reconciler, waits_on_report
from controller.retention import AuditRetention, EventRetention
from controller.scheduling.decider import DecideProcess
from controller.store.db import Database, unreachable
from controller.store.checkpoints import WalCheckpointer
from controller.store.exclusive import DatabaseInUse, SqliteLock, sqlite_path
from controller.store.notify import RESYNC, ClusterChannel, LocalChannel, PgChannel
from controller.tokenstreams import TokenStreams
from controller.usecases import tokens
from controller.usecases.capacity import CapacityCache, CapacityRefresher
from controller.usecases.deletes import DeleteBatcher
from controller.usecases.submits import SubmitBatcher, SubmittedRows
from controller.usecases.deployments import views_of
from controller.domain.liveness import FlapDamper
from controller.domain.values import DeploymentEvent, DeploymentView
from controller.usecases.watch import DeploymentEventBus
from controller.watchdog import IsolationWatchdog
from maia.v1 import (
    admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, audit_pb2, audit_pb2_grpc, deployments_pb2, deployments_pb2_grpc,
    relay_pb2_grpc,
)

if TYPE_CHECKING:
    from controller.console.server import ConsoleServer

log = logging.getLogger("maia.server")
T = TypeVar("T")
CONSOLE_VIEWERS = (Role.ADMIN, Role.TENANT)
DB_WAIT_FIRST_PAUSE_S = 0.5  # between tries at a database that cannot be reached yet, doubling
DB_WAIT_MAX_PAUSE_S = 5.0

SERVICE_NAMES: tuple[str, ...] = (
    deployments_pb2.DESCRIPTOR.services_by_name["DeploymentService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    agent_pb2.DESCRIPTOR.services_by_name["NodeAgentService"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
)


class ListenError(OSError):
    """An address of the controller could not be bound: the gRPC server's (before the database is
    touched), or the metrics' or the console's (checked free by `preflight`, taken since)."""


class StartAbandoned(Exception):
    """The controller was told to stop while it waited for its database: to be reachable (--db-wait),
    or for the migration lock another controller held."""


async def _unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T:
    """`await work`, unless `stop` is set first: then `work` is cancelled and `StartAbandoned` raised."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not task.done():
        await cancel_and_wait([task])
        raise StartAbandoned()
    return task.result()


class AppSignals:
    """`Signals` wired to the live reconciler, agent hub and event bus."""

    def __init__(self, app: ControllerApp) -> None:
        self._app = app

    def wake_reconciler(self) -> None:
        self._app.reconciler.wake()
        if not self._app.election.should_run():
            self._app.channel.send(WAKE)

    def assignments_changed(self, node_ids: Iterable[str]) -> None:
        node_ids = list(node_ids)
        self._app.hub.notify(node_ids)
        if not self._app.election.should_run():
            self._app.channel.send(NODES, node_ids)

    def publish(self, *events: DeploymentEvent) -> None:
        """To this controller's watchers, and in one message to the others' (a batch of submits:
        one notification, not one round trip each)."""
        for event in events:
            self._app.bus.publish(event)
        self._app.channel.send(DEPLOYMENTS, [deployment_item(e.type, e.deployment) for e in events])

    def tokens_revoked(self, token_ids: Sequence[str]) -> None:
        """Refused here at once, and the streams here opened with them end now (UNAUTHENTICATED):
        agent streams (a deleted node's ended first, as deleted: `node_removed`), deployment watches
        and the console's event streams (`TokenStreams`), without a read; the other controllers do
        both as they hear it (`PeerMessages.revoked_elsewhere`)."""
        self._app.peers.forget_tokens(token_ids)
        self._app.hub.revoke_credentials(token_ids)
        self._app.streams.revoke(token_ids)
        self._app.channel.send(TOKENS_REVOKED, token_ids)

    def node_removed(self, node_id: str) -> None:
        self._app.hub.disconnect(node_id, NODE_DELETED)
        self._app.channel.send(NODE_REMOVED, [node_id])


# Every call's answer while the controller starts (`ControllerApp.start`): clients retry it (RetryInfo).
STARTING = Unavailable("the controller is starting (checking its database schema, reading its tokens); nothing "
                       "was written; call again shortly", retry_after_ms=500,
                       metadata=((STATE_METADATA_KEY, STARTING_STATE),))


class ControllerApp:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.db = Database(config.db_url)
        self.sqlite_lock = SqliteLock(config.db_url)
        self.metrics = ControllerMetrics()
        # SQLite: the log checkpointed from a thread of its own, not by the commits (store/checkpoints.py).
        file = sqlite_path(config.db_url)
        self.checkpointer = None if file is None else WalCheckpointer(file, observer=self.metrics)
        self.bus = DeploymentEventBus()
        # The watches and console event streams open here, by token: ended when it is revoked or expires.
        self.streams = TokenStreams()
        self.signals = AppSignals(self)
        self.election = LeaderElection(
            self.db, address=config.advertise_address, force=self.db.is_sqlite,
            settings=LeaseSettings(ttl_s=config.lease_ttl_s, renew_every_s=config.lease_renew_s,
                                   retry_every_s=config.lease_renew_s, margin_s=config.lease_margin_s),
            on_elected=self._elected, on_deposed=self._deposed, observer=self.metrics,
        )
        self.channel: ClusterChannel = (
            LocalChannel() if self.db.is_sqlite else PgChannel(config.db_url, self.election.holder, self._notified))
        # The leader's writers: every commit checks the fencing token first.
        leader_db = self.db.fenced(self.election)
        damper = FlapDamper.of(config.liveness)
        self.hub = AgentHub(
            leader_db, heartbeat_timeout_s=config.heartbeat_timeout_s,
            on_liveness_change=self.signals.wake_reconciler, on_deployments_changed=self._publish_changed,
            reports_per_second=config.agent_reports_per_second, reports_burst=config.agent_reports_burst,
            leading=self.election.should_run, damper=damper, observer=self.metrics,
            max_heartbeats_per_second=config.max_heartbeats_per_second,
            admission=agent_admission_gate(config.agent_admission_concurrency, config.agent_admission_queue,
                                           observer=self.metrics),
            revoked=self.streams.revoked_lately, ack_timeout_s=config.assignment_ack_timeout_s,
        )
        self.metrics.watch_admission(lambda: self.hub.admission.waiting)
        # The warm session in a process of its own (--decide-process), stopped with the controller.
        self.decider = DecideProcess() if config.decide_process else None
        # What this process's submit batches validated and inserted: its reconciler does not judge it again.
        self.submitted = SubmittedRows()
        # Once the agents have joined, and each time the warm cluster is built whole, the heap it
        # made goes out of the collector's walks (gcpolicy).
        self.freezer = WarmHeapFreezer(lambda: len(self.hub.connected()))
        self.reconciler = Reconciler(
            leader_db, push=self.hub.notify, publish=self._publish_deployments, read_views=views_of,
            decider=self.decider, submitted=self.submitted, on_warm_built=self.freezer.built,
            interval_s=config.reconcile_interval_s, solve_time_limit_ms=config.solve_time_limit_ms,
            lease=self.election, observer=self.metrics,
            quarantine_after=config.quarantine_after_failures, allow_preemption=config.preemption,
            max_surge=config.max_surge, restart_policy=config.restarts,
            nominate_after_s=config.nominate_after_s, nomination_max_s=config.nomination_max_s,
        )
        self.lifecycle = NodeLifecycle(
            leader_db, config.liveness, connected=self.hub.connected, damper=damper,
            on_change=self.signals.wake_reconciler, is_leader=self.election.should_run, released=self.hub.released,
            silence_timeout_s=self.hub.longest_silence_timeout_s, streams=self.hub.streams_changed,
            greeting=self.hub.greeting, interval_s=min(1.0, config.heartbeat_timeout_s / 4),
            publish=self.signals.publish, restate=self.hub.restate,
        )
        self.throttle = SubmitLimits(
            submits=KeyedRateLimiter(config.submits_per_minute, "submits"),
            dry_runs=KeyedRateLimiter(config.dry_runs_per_minute, "dry runs"),
            changes=KeyedRateLimiter(config.changes_per_minute, "updates and deletions"),
            dry_run_slots=config.dry_run_slots, dry_run_time_limit_ms=config.dry_run_time_limit_ms,
        )
        self.authn = Authenticator(self.db, enabled=not config.insecure_no_auth, cache_ttl_s=config.auth_cache_ttl_s,
                                   hears_revocations=self.channel.listening)
        # What the other controllers on this database say, handled here (controller/api/peers.py).
        self.peers = PeerMessages(db=self.db, hub=self.hub, reconciler=self.reconciler, authn=self.authn,
                                  bus=self.bus, streams=self.streams, election=self.election)
        self.watchdog = IsolationWatchdog(leader_db, interval_s=config.watchdog_interval_s,
                                          should_run=self.election.should_run)
        self.metrics.watch_alarms(lambda: self.watchdog.alarms_total, lambda: self.watchdog.active_violations)
        self.retention = (EventRetention(leader_db, ttl_s=config.event_ttl_s, should_run=self.election.should_run,
                                         on_pruned=self.metrics.events_pruned.inc)
                          if config.event_ttl_s > 0 else None)
        self.audit_retention = (AuditRetention(leader_db, ttl_s=config.audit_ttl_s, should_run=self.election.should_run,
                                               on_pruned=self.metrics.audit_entries_pruned.inc)
                                if config.audit_ttl_s > 0 else None)
        self.console: ConsoleServer | None = None  # --http-listen: made as it starts (`_serve_console`)
        self.health = health.aio.HealthServicer()
        self.monitor = HealthMonitor(
            self.health, ("", *SERVICE_NAMES), db=self.db, reconciler=self.reconciler,
            max_rss_mib=config.max_rss_mib, stuck_s=config.reconcile_stuck_s,
            failures_unhealthy=limits.RECONCILE_FAILURES_UNHEALTHY, interval_s=config.health_interval_s,
            rss_mib=lambda: resident_mib(self.decider.pid if self.decider is not None else None),
        )
        self.metrics.watch_health(lambda: self.monitor.serving)
        self.server: aio.Server | None = None
        self.deps: ServiceDeps | None = None  # what the servicers were given (its group commits), once started
        self.address = ""
        # --agent-gateways: the processes, and the private server of their links (controller/gateway/).
        self.gateways: GatewayProcesses | None = None
        self.relay: RelayServicer | None = None
        self.relay_server: aio.Server | None = None
        self.agent_address = ""
        self.metrics_address = ""
        self.console_address = ""
        self._tasks: list[asyncio.Task] = []
        self._channel_task: asyncio.Task | None = None

    async def _serve_console(self, listen: str) -> str:
        """Serve the web console on `listen`; the address it took. Imported here: its HTTP server
        (aiohttp) took ~0.2 s of every controller's start, and most serve no console."""
        from controller.console.server import ConsoleServer

        config = self.config
        self.console = ConsoleServer(self.db, self.bus, streams=self.streams,
                                     resolve_token=self._console_viewer if self.authn.enabled else None,
                                     max_connections=config.console_max_connections,
                                     max_connections_per_peer=config.console_max_connections_per_peer)
        return await self.console.start(listen)

    async def _console_viewer(self, token: str) -> Principal:
        """The console's viewers: admin and tenant tokens (a tenant sees its own view); any other
        credential is refused `Unauthenticated`, saying why for the console's log."""
        who = await self.authn.authenticate([(AUTHORIZATION_KEY, f"Bearer {token}")])
        if who.role not in CONSOLE_VIEWERS:
            raise Unauthenticated(f"a {who.role.value} token cannot view the console (admin and tenant tokens can)")
        return who

    def _elected(self, token: int) -> None:
        self.lifecycle.lead()
        self.watchdog.lead()
        self.reconciler.resync()
        # The leader before may have died between a commit and its NOTIFY (killed, its host
        # lost): the watches here and on the other controllers never heard of those changes
        # (one showed a deployment Pending for good, stored Running). They watch again from the
        # stored state, as when notifications were dropped (RESYNC).
        if self.bus.subscriber_count:
            self.peers.resync()
        self.channel.send(RESYNC)  # held, and dropped, while no other controller listens

    def _deposed(self, why: str) -> None:
        self.hub.follow(why, self.election.not_leader(stepped_down=why))

    def _notified(self, kind: str, data: str) -> None:
        """A message from another controller on the same database: `PeerMessages.notified`. The
        channel is given this at its construction, before the authenticator (which asks the
        channel whether it listens) and so before `peers`, which needs the authenticator."""
        self.peers.notified(kind, data)

    async def _publish_changed(self, views: Mapping[str, DeploymentView]) -> None:
        """Agents' reports changed these deployments (their views as committed, by key). The
        reconciler is woken only when one of them may give a pass work (`waits_on_report`: a
        replacement that now runs lets a rollout or drain stop an old replica, a failed shard is
        counted and placed again); a new deployment's shards going LOADING -> RUNNING, almost
        every report under load, give it none."""
        if any(map(waits_on_report, views.values())):
            self.reconciler.wake()
        await self._publish_deployments(set(views), [], list(views.values()))

    async def _publish_deployments(self, keys: set[str], deleted: list[DeploymentView],
                                   views: list[DeploymentView] | None = None) -> None:
        """Tell watchers about deployments (by key, TENANT/NAME) that changed or were deleted
        (`views`: theirs, read by the caller already)."""
        for view in deleted:
            self.bus.publish(DeploymentEvent("deleted", view))
        if deleted:
            self.channel.send(DEPLOYMENTS, [deployment_item("deleted", view) for view in deleted])
        if keys:
            if views is None:
                async with self.db.unit_of_work() as uow:
                    views = await views_of(uow, keys)
            for view in views:
                self.bus.publish(DeploymentEvent("modified", view))
            self.channel.send(DEPLOYMENTS, [f"modified:{key}" for key in sorted(keys)])

    def _tls(self) -> TlsSettings | None:
        if self.config.tls_cert is None or self.config.tls_key is None:
            return None
        return TlsSettings(self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca)

    async def start(self, stop: asyncio.Event | None = None) -> str:
        """Bind, serve, check (or migrate) the schema, start the loops; returns the bound HOST:PORT.

        The port is bound before the database is touched, so a busy port leaves the database as
        it was. SO_REUSEPORT is off (grpc turns it on by default): a second controller on the
        same port fails instead of sharing it. Until the schema is checked and the tokens read,
        every call is answered `STARTING` (UNAVAILABLE with a retry time), the health check too;
        a PostgreSQL server that cannot be reached yet is waited for meanwhile (`_schema_ready`),
        unless `stop` is set (`StartAbandoned`).
        """
        tls = self._tls()
        auditor = AuditInterceptor(self.db)
        checks: list[aio.ServerInterceptor] = [auditor]
        if tls is not None and tls.client_ca is not None:
            checks.append(NodeCertificateInterceptor())  # inside the audit: a refused agent is audited
        self.unauthenticated_audit = UnauthenticatedAuditor(self.db)
        # A join storm's Registers the gate would refuse are refused before the chain (cheaply).
        shed = LoadShedInterceptor({REGISTER_METHOD: self.hub.shed_register}, on_shed=self.metrics.rpc_shed)
        chain = interceptor_chain(self.authn, *checks, observer=self.metrics, shed=shed,
                                  on_refused=self.unauthenticated_audit.refused,
                                  database_retry_ms=self.db.failures.retry_after_ms)
        server = aio.server(interceptors=chain,
                            options=[*limits.GRPC_MESSAGE_OPTIONS, ("grpc.so_reuseport", 0),
                                     *self.config.agent_keepalive.server_options()])
        host, _, _ = self.config.listen.rpartition(":")
        try:
            if tls is None:
                port = server.add_insecure_port(self.config.listen)
            else:
                port = server.add_secure_port(self.config.listen, tls.server_credentials())
        except RuntimeError as exc:  # grpcio raises when the address cannot be bound
            raise ListenError(f"cannot listen on {self.config.listen}: {exc}") from exc
        if not port:
            raise ListenError(f"cannot listen on {self.config.listen}")

        try:
            self.sqlite_lock.acquire()
        except DatabaseInUse as exc:
            await server.stop(None)
            raise ListenError(str(exc)) from exc  # the same one-line refusal, before the database is touched

        capacity = CapacityCache()
        deps = ServiceDeps(
            db=self.db, signals=self.signals, bus=self.bus, hub=self.hub, streams=self.streams,
            solve_time_limit_ms=self.config.solve_time_limit_ms,
            throttle=self.throttle, allow_preemption=self.config.preemption,
            require_leader=self.election.require_leader, leads=self.election.should_run,
            advertised=lambda: self.election.address, leader_address=lambda: self.election.leader.api,
            capacity=capacity,
            submits=SubmitBatcher(self.db, self.signals, observer=self.metrics, submitted=self.submitted),
            deletes=DeleteBatcher(self.db, self.signals),
            audit=auditor,
        )
        self.deps = deps
        deployments_pb2_grpc.add_DeploymentServiceServicer_to_server(DeploymentServicer(deps), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(deps), server)
        agents = NodeAgentServicer(deps)
        agent_pb2_grpc.add_NodeAgentServiceServicer_to_server(agents, server)
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(deps), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        # Served at once, every call refused "starting, call again" until the schema is checked and
        # the tokens read: a client meets a controller that answers, not a port that never does.
        shed.refuse_all(STARTING)
        try:
            await server.start()
            revision = await self._schema_ready(stop or asyncio.Event())
            await self.db.check_writable()
            log.info("schema ready revision=%s db=%s", revision,
                     self.db.engine.url.render_as_string(hide_password=True))
            await self._prepare_authentication()
        except BaseException:
            await server.stop(None)
            self.sqlite_lock.release()
            raise
        shed.refuse_all(None)
        self.server = server
        self.address = f"{host}:{port}"
        try:  # whatever fails from here stops what was started (the server, the SQLite lock, ...)
            return await self._start_serving(agents, chain, capacity)
        except BaseException:
            await self.stop(grace_s=0.0)
            raise

    async def _start_serving(self, agents: NodeAgentServicer, chain: list[aio.ServerInterceptor],
                             capacity: CapacityCache) -> str:
        """What `start` starts once the schema is ready and the API serves: the listeners,
        the gateways, the election, the background loops; the address served."""
        try:  # free when `preflight` checked them; taken since by another program
            if self.config.metrics_listen:
                self.metrics.watch_cluster(asyncio.get_running_loop(), self.read_cluster, self.read_usage,
                                           leading=self.election.should_run)
                self.metrics_address = self.metrics.serve(self.config.metrics_listen)
            if self.config.http_listen:
                self.console_address = await self._serve_console(self.config.http_listen)
        except OSError as exc:
            raise ListenError(str(exc)) from exc
        if self.config.agent_gateways:
            try:
                await self._start_gateways(agents, chain)
            except GatewayStartError as exc:
                raise ListenError(str(exc)) from exc
        self.election.address = self.config.advertise_address or reachable(self.address, "--advertise-address")
        self.election.agent_address = self.config.advertise_agent_address or (
            reachable(self.agent_address, "--advertise-agent-address") if self.agent_address else "")
        try:  # lead at once when the lease is free (a lone controller schedules from the start)
            await self.election.step()
        except Exception as exc:
            log.warning("first try at the leader lease failed (%s); retrying in the background", exc)
        if not self.election.leading:
            log.info("following: the leader is at %s", self.election.leader.api or "<none yet>")
        self._channel_task = asyncio.create_task(self.channel.run(), name="cluster-channel")
        if not await self.channel.wait_ready(CHANNEL_READY_TIMEOUT_S):
            log.warning("not yet listening to the other controllers; retrying in the background")
        if self.decider is not None:  # its interpreter starts while the agents join
            try:
                await asyncio.to_thread(self.decider.start)
            except OSError as exc:  # not the database's OSError, which `maia-controller` would say it was
                raise StartupError(f"cannot start the decide process: {exc}",
                                   "check the limits on processes and open files (ulimit -u, -n), or run it "
                                   "in the controller's process with --no-decide-process") from exc
        if self.checkpointer is not None:
            self.checkpointer.start()
        self._tasks = [
            asyncio.create_task(self.election.run(), name="leader-election"),
            asyncio.create_task(self.hub.run(), name="agent-hub"),
            asyncio.create_task(self.reconciler.run(), name="reconciler"),
            asyncio.create_task(self.lifecycle.run(), name="node-lifecycle"),
            asyncio.create_task(self.watchdog.run(), name="isolation-watchdog"),
            asyncio.create_task(self.monitor.run(), name="health"),
            asyncio.create_task(watch_event_loop(self._loop_lagged), name="event-loop-lag"),
            asyncio.create_task(self.freezer.run(), name="gc-freeze"),
            asyncio.create_task(CollectionPacer().run(), name="gc-pace"),  # young collections by time (gcpolicy)
            # the capacity index rebuilt after node changes, not by the submit that first needs it
            asyncio.create_task(CapacityRefresher(self.db, capacity).run(), name="capacity-refresh"),
        ]
        if self.retention is not None:
            self._tasks.append(asyncio.create_task(self.retention.run(), name="event-retention"))
        if self.audit_retention is not None:
            self._tasks.append(asyncio.create_task(self.audit_retention.run(), name="audit-retention"))
        if self.config.insecure_no_auth:
            self._tasks.append(asyncio.create_task(_warn_insecure_forever(), name="insecure-warning"))
        for name in ("", *SERVICE_NAMES, LIVENESS_SERVICE):  # the monitor toggles all but the last
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.reconciler.wake()
        return self.address

    async def _schema_ready(self, stop: asyncio.Event) -> str:
        """`ensure_schema`, tried again while the database server cannot be reached yet
        (`db.unreachable`: refused, starting up, its name not resolved) for at most --db-wait,
        pausing 0.5 s doubling to 5 s, each try logged; on PostgreSQL only (a SQLite file is there
        or not). Past the wait, the last failure is raised; `StartAbandoned` once `stop` is set,
        also during a try: one can wait for long (another controller's migration holds the
        migration lock; a connect to an address that drops packets), and an operator's ^C must
        not wait with it (the try is cancelled: its transaction rolls back, nothing half-done)."""
        from controller.store.migrate import ensure_schema

        give_up = time.monotonic() + (0.0 if self.db.is_sqlite else self.config.db_wait_s)
        pause = DB_WAIT_FIRST_PAUSE_S
        while True:
            try:
                return await _unless_stopped(ensure_schema(self.db, migrate=self.config.migrate), stop)
            except Exception as exc:
                left = give_up - time.monotonic()
                if not unreachable(exc) or left <= 0:
                    raise
                log.warning("the database at %s cannot be reached yet (%s); trying again in %.1f s, for %.1f s "
                            "more (--db-wait)", self.db.engine.url.render_as_string(hide_password=True),
                            str(getattr(exc, "orig", None) or exc).splitlines()[0], min(pause, left), left)
                try:
                    await asyncio.wait_for(stop.wait(), min(pause, left))
                    raise StartAbandoned() from exc
                except TimeoutError:
                    pass
                pause = min(pause * 2, DB_WAIT_MAX_PAUSE_S)

    async def _start_gateways(self, agents: NodeAgentServicer, chain: list[aio.ServerInterceptor]) -> None:
        """The agent gateways (--agent-gateways) and the private server of their links: each relayed
        call is served by `agents` through this server's interceptor chain (controller/gateway/relay.py).
        The links are pinged as the agents' connections are (`agent_keepalive`), and in the relay
        protocol itself, which the gateway's event loop answers (`frames.link_ping_times`): a gateway
        that stops answering (hung, or its loop stuck, not exited) loses its link, and is killed and
        started again (`link_lost`).
        A failure stops what was started (`GatewayProcesses.start`; `start` stops the rest)."""
        config = self.config
        self.gateways = GatewayProcesses(GatewaySettings(
            count=config.agent_gateways, listen=config.agent_listen, linger_ms=config.agent_gateway_linger_ms,
            tls_cert=config.tls_cert, tls_key=config.tls_key, log_level=config.log_level,
            restart_after_s=config.agent_gateway_restart_s, keepalive=config.agent_keepalive))
        self.relay = RelayServicer(config.agent_gateway_linger_ms / 1000, link_ping_times(config.agent_keepalive))
        self.relay.handlers = await method_handlers(agents, chain)
        self.relay.link_lost = self.gateways.link_lost
        self.relay_server = aio.server(options=link_server_options(config.agent_keepalive))
        relay_pb2_grpc.add_AgentRelayServicer_to_server(self.relay, self.relay_server)
        self.relay_server.add_insecure_port(self.gateways.link_address)
        await self.relay_server.start()
        self.agent_address = await self.gateways.start()
        log.info("agents served by %d gateway processes on %s (pids %s)", config.agent_gateways,
                 self.agent_address, self.gateways.pids())

    def _loop_lagged(self, seconds: float) -> None:
        self.metrics.loop_lagged(seconds)
        self.hub.admission.loop_lagged(seconds)  # its answers are that late: it keeps time for it

    async def read_cluster(self) -> ClusterGauges:
        """The cluster's state for the metrics, read in this loop (the heartbeat lag on the leader only)."""
        async with self.db.unit_of_work() as uow:
            return await read_cluster_gauges(uow.session, heard=self.hub.last_heard(), lag=self.election.should_run())

    async def read_usage(self) -> UsageCounters:
        """The usage meter's counters for the metrics, read in this loop beside `read_cluster`."""
        async with self.db.unit_of_work() as uow:
            return await read_usage_counters(uow.session)


    async def _prepare_authentication(self) -> None:
        """The bootstrap admin token, and a clear word on how to get in when there is none."""
        if self.config.insecure_no_auth:
            return
        path = self.config.bootstrap_admin_token_file
        if path:
            try:
                created = await tokens.bootstrap_admin_token(self.db, Path(path), CONTROLLER)
            except tokens.TokenFileError as exc:
                raise StartupError(f"--bootstrap-admin-token-file: {exc}",
                                   "name a file (not a folder) where this user may write, or one holding a token "
                                   "to adopt; no token was created") from exc
            if created is not None and created.adopted:
                log.warning("bootstrap: created admin token %s from the token in %s", created.view.id, path)
            elif created is not None:
                log.warning("bootstrap: created admin token %s and wrote it to %s (mode 0600)", created.view.id, path)
            else:
                log.warning("bootstrap: the database already has an active admin token; %s left alone", path)
        elif not await tokens.has_active_admin(self.db):
            log.warning("authentication is on and the database has no active admin token: every call will be "
                        "UNAUTHENTICATED; %s", BOOTSTRAP_HINT)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Graceful shutdown; safe to call twice. Bounded whatever the number of agent streams:

        1. NOT_SERVING, and the background loops end first (reconciler, node lifecycle, the agent
           hub's flushes, watchdog, health, election): while thousands of streams end, nothing
           judges liveness, writes their last heartbeats or schedules (that work competed with the
           streams' ending for the event loop: 8,192 streams took 15 s to end on a loaded machine);
           what the agents reported and was not written yet they report again to whichever
           controller they reach (a stream's first heartbeat writes every shard's state);
        2. the admission gate refuses the queued Registers and hellos UNAVAILABLE (nothing of
           theirs was written), every agent stream ends ("controller shutting down": the agents go
           to the next controller; a gateway's link ends once its calls sent their statuses, and the
           gateway ends the rest as for a controller gone), the server takes no new call and gives
           the calls in flight `grace_s` to finish, then cancels them; waited for at most `STREAMS_END_TIMEOUT_S` more;
        3. the agent gateways, told to stop, are given until a deadline set at the stop's start that
           grows with the streams they hold (`children.stop_grace_s`), then killed;
        4. the leader lease released, the cluster channel closed, the other controllers' messages
           still being handled cancelled, the engine disposed, SQLite's log checkpointed into the
           database file (each bounded).
        """
        started = time.monotonic()
        streams = len(self.hub.connected())
        log.info("stopping: %d agent streams open", streams)
        if self.gateways is not None:  # no gateway started again; their deadline grows with their streams
            self.gateways.stopping(self.relay.open_calls() if self.relay is not None else 0)
        await self.health.enter_graceful_shutdown()
        await cancel_and_wait(self._tasks)
        self._tasks = []
        self.hub.admission.close("the controller is shutting down")
        self.hub.close_all()
        if self.relay is not None:  # the gateways' links end once their calls sent their statuses
            self.relay.end_links()
        self.bus.close()
        servers = [s for s in (self.server, self.relay_server) if s is not None]
        self.server = self.relay_server = None
        try:
            await within(asyncio.gather(*(s.stop(grace_s) for s in servers)), grace_s + STREAMS_END_TIMEOUT_S)
        except TimeoutError:
            log.warning("%d agent streams and calls still ending %.0fs after the stop began; going on",
                        len(self.hub.connected()), time.monotonic() - started)
        if self.gateways is not None:  # their links ended with the relay server: they are exiting
            await self.gateways.stop()
        log.info("%d agent streams ended in %.1fs", streams, time.monotonic() - started)
        await asyncio.to_thread(self.metrics.stop)
        if self.console is not None:
            await self.console.stop()
        if self.decider is not None:
            await asyncio.to_thread(self.decider.stop)
        if self.election.leading:
            try:  # bounded: if it cannot be released now, it expires after --lease-ttl anyway
                await within(self.election.release(), RELEASE_TIMEOUT_S)
            except TimeoutError:
                log.warning("could not release the leader lease within %.0fs; it expires on its own", RELEASE_TIMEOUT_S)
            self.channel.send(LEASE_RELEASED)  # a follower takes over now, not after the expiry
        await self.channel.close()
        if self._channel_task is not None:
            await cancel_and_wait([self._channel_task])
            self._channel_task = None
        await self.peers.close()  # no message arrives now: the handlings under way end before the dispose
        try:  # bounded: a connection whose statement waits on a lock (SQLite's busy timeout is 30 s)
            await within(self.db.dispose(), DISPOSE_TIMEOUT_S)  # must not hold up the stop
        except TimeoutError:
            log.warning("database connections still busy after %.0fs; stopping without waiting for them",
                        DISPOSE_TIMEOUT_S)
        if self.checkpointer is not None:  # the last checkpoint: the database file holds everything
            await asyncio.to_thread(self.checkpointer.stop)
        self.sqlite_lock.release()
        log.info("stopped")

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


INSECURE_WARNING_INTERVAL_S = 60.0
RELEASE_TIMEOUT_S = 2.0
DISPOSE_TIMEOUT_S = 5.0
# How long past the grace the stop waits for the server's calls to end (the handlers of thousands of
# agent streams run their endings on the event loop); then it goes on, and the process exits anyway.
STREAMS_END_TIMEOUT_S = 8.0
CHANNEL_READY_TIMEOUT_S = 5.0


async def _warn_insecure_forever() -> None:
    while True:
        log.warning("authentication is OFF (--insecure-no-auth): every caller is an admin; "
                    "never run it like this where anyone else can reach the port")
        await asyncio.sleep(INSECURE_WARNING_INTERVAL_S)


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


def reachable(address: str, flag: str) -> str:
    """`address` (HOST:PORT, as bound) as others may reach it: a wildcard host (listening on every
    interface) is no address another machine can call, and the leader's is what followers send
    agents and clients to, so this machine's name stands for it (with a warning naming `flag`,
    which says it for certain)."""
    host, _, port = address.rpartition(":")
    if host not in WILDCARD_HOSTS:
        return address
    name = socket.getfqdn()
    log.warning("listening on %s: advertising %s:%s to the other controllers and the agents; give %s "
                "if they reach this controller by another name", address, name, port, flag)
    return f"{name}:{port}"
