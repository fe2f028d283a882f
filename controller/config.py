"""The controller's settings, from the command line and the environment.

One frozen `Config` is built at start-up and passed down; nothing else reads `sys.argv` or
`os.environ`, so tests build a `Config` directly.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from controller import limits
from controller.domain.liveness import HeartbeatPacing, LivenessPolicy
from controller.domain.restarts import RestartPolicy
from controller.flagtypes import finite_number
from controller.store.rollout import DEFAULT_SURGE
from controller.store.db import DEFAULT_DB_URL
from controller.version import version_text

DB_URL_ENV = "MAIA_DB_URL"

_LIVENESS = LivenessPolicy()  # the defaults
_RESTARTS = RestartPolicy()  # the defaults


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:50051"
    db_url: str = DEFAULT_DB_URL
    migrate: bool = True
    # How long a start waits for a PostgreSQL server that cannot be reached yet (refused, starting
    # up, a name not resolved yet), answering every call "starting" meanwhile; 0: not at all.
    db_wait_s: float = 60.0
    reconcile_interval_s: float = 1.0
    heartbeat_timeout_s: float = 10.0
    # Heartbeats the whole cluster sends a second at most: agents are told longer intervals (and
    # given longer silence timeouts) as it grows (domain/liveness.py, `HeartbeatPacing`); 0: no cap.
    max_heartbeats_per_second: float = limits.MAX_HEARTBEATS_PER_SECOND
    # Node lifecycle (controller/domain/liveness.py): graces and eviction rates.
    node_down_grace_s: float = _LIVENESS.down_grace_s
    node_eviction_grace_s: float = _LIVENESS.eviction_grace_s
    restart_grace_s: float = _LIVENESS.restart_grace_s
    eviction_rate: float = _LIVENESS.eviction_rate
    unhealthy_zone_threshold: float = _LIVENESS.unhealthy_zone_threshold
    unhealthy_zone_eviction_rate: float = _LIVENESS.unhealthy_zone_rate
    solve_time_limit_ms: int = 2000
    # Stop preemptible work (whole replicas) to place higher-priority or reserved work.
    preemption: bool = True
    # The warm scheduling session in a process of its own (controller/scheduling/decider.py): on
    # by default, it halved submit -> committed on a quiet machine (docs/benchmarks.md, 2026-12-01).
    decide_process: bool = True
    max_surge: int = DEFAULT_SURGE  # replicas beyond the asked count while replicas are replaced
    # Head-of-line nominations (controller/scheduling/nominations.py): after how long a wait for
    # room, and for how long at most, nodes are kept for the deployments waiting longest.
    nominate_after_s: float = limits.NOMINATE_AFTER_S
    nomination_max_s: float = limits.NOMINATION_MAX_S
    # Replicas whose shards FAILED (controller/domain/restarts.py): back-off and the give-up limit.
    restart_backoff_s: float = _RESTARTS.initial_delay_s
    restart_backoff_max_s: float = _RESTARTS.max_delay_s
    restart_limit: int = _RESTARTS.limit
    # A shard a node's agent says nothing of (no LOADING, RUNNING or FAILED) this long after the
    # set that named it was sent fails (controller/agents/hub.py, `_fail_unacknowledged`); 0: never.
    assignment_ack_timeout_s: float = 60.0
    watchdog_interval_s: float = 2.0
    # Events are deleted this long after they were recorded (controller/retention.py); 0: never.
    event_ttl_s: float = limits.EVENT_TTL_S
    # Audit entries are deleted this long after they were recorded, the chain's base moved along
    # (controller/retention.py, controller/store/audit.py); 0: never (the default).
    audit_ttl_s: float = 0.0
    log_level: str = "INFO"
    # TLS: certificate and key of the server; a client CA turns on mutual TLS (see controller.api.tls).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # HOST:PORT of the Prometheus endpoint (/metrics); empty: not served.
    metrics_listen: str = ""
    # Authentication (docs/security.md): on unless insecure_no_auth; the bootstrap file receives
    # a new admin token when the database has none.
    bootstrap_admin_token_file: str | None = None
    insecure_no_auth: bool = False
    auth_cache_ttl_s: float = 30.0
    # HOST:PORT of the read-only web console (/); empty: not served.
    http_listen: str = ""
    # Console connections open at once, and from one address (beyond: 503, controller/console/server.py).
    console_max_connections: int = limits.CONSOLE_MAX_CONNECTIONS
    console_max_connections_per_peer: int = limits.CONSOLE_MAX_CONNECTIONS_PER_PEER
    agent_keepalive: limits.Keepalive = limits.AGENT_KEEPALIVE  # HTTP/2 pings (no flag: tests shorten them)
    agent_reports_per_second: float = limits.REPORTS_PER_SECOND
    agent_reports_burst: int = limits.REPORTS_BURST
    agent_admission_concurrency: int = limits.AGENT_ADMISSION_CONCURRENCY
    agent_admission_queue: int = limits.AGENT_ADMISSION_QUEUE
    submits_per_minute: float = limits.SUBMITS_PER_MINUTE
    changes_per_minute: float = limits.CHANGES_PER_MINUTE
    dry_runs_per_minute: float = limits.DRY_RUNS_PER_MINUTE
    dry_run_time_limit_ms: int = limits.DRY_RUN_TIME_LIMIT_MS
    dry_run_slots: int = limits.DRY_RUN_SLOTS
    quarantine_after_failures: int = limits.QUARANTINE_AFTER_FAILURES
    max_rss_mib: int = limits.MAX_RSS_MIB
    reconcile_stuck_s: float = limits.RECONCILE_STUCK_S
    health_interval_s: float = limits.HEALTH_CHECK_INTERVAL_S
    # Several controllers on one PostgreSQL (docs/operations.md): where agents reach this one when
    # it leads (empty: the bound --listen address), and the leader lease's timing.
    advertise_address: str = ""
    lease_ttl_s: float = 5.0
    lease_renew_s: float = 1.0
    lease_margin_s: float = 1.5
    # Agent gateways (controller/gateway/): N processes serving NodeAgentService on agent_listen
    # (SO_REUSEPORT), each relaying its agents' calls over one link; 0: agents call --listen alone.
    agent_gateways: int = 0
    agent_listen: str = ""
    agent_gateway_linger_ms: float = 5.0
    agent_gateway_restart_s: float = 1.0  # a gateway that exited is started again after (no flag: tests set it)
    # Where agents reach this controller's gateways when it leads (followers send them there; empty:
    # the gateways' bound agent_listen address).
    advertise_agent_address: str = ""

    @property
    def liveness(self) -> LivenessPolicy:
        return LivenessPolicy(
            heartbeat_timeout_s=self.heartbeat_timeout_s, down_grace_s=self.node_down_grace_s,
            eviction_grace_s=self.node_eviction_grace_s, restart_grace_s=self.restart_grace_s,
            eviction_rate=self.eviction_rate, unhealthy_zone_threshold=self.unhealthy_zone_threshold,
            unhealthy_zone_rate=self.unhealthy_zone_eviction_rate)

    @property
    def restarts(self) -> RestartPolicy:
        return RestartPolicy(initial_delay_s=self.restart_backoff_s,
                             max_delay_s=max(self.restart_backoff_s, self.restart_backoff_max_s),
                             reset_after_s=_RESTARTS.reset_after_s, limit=self.restart_limit)

    @property
    def heartbeat_pacing(self) -> HeartbeatPacing:
        """What agents are told: three heartbeats per timeout, fewer as the cluster grows past
        `max_heartbeats_per_second` (each stream then judged silent by three of its intervals)."""
        return HeartbeatPacing(timeout_s=self.heartbeat_timeout_s, max_per_second=self.max_heartbeats_per_second)


def _positive_float(text: str) -> float:
    value = finite_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


EVENT_TTL_MIN_S = 3600.0              # an hour: less would cut what rollouts and operators read back
AUDIT_TTL_MIN_S = 24 * 3600.0         # a day: less would leave an incident nothing to read back
TTL_MAX_S = 3650 * 24 * 3600.0        # ten years


def _ttl(kept: str, minimum_s: float, minimum_words: str) -> Callable[[str], float]:
    """A time-to-live flag's parser: 0 (keep every one of `kept`) or `minimum_s` to ten years."""
    def parse(text: str) -> float:
        value = finite_number(text)
        if value != 0 and not minimum_s <= value <= TTL_MAX_S:
            raise argparse.ArgumentTypeError(
                f"0 (keep every {kept}) or {minimum_s:.0f} to {TTL_MAX_S:.0f} seconds ({minimum_words} to ten "
                f"years), got {text}")
        return value
    return parse


_event_ttl = _ttl("event", EVENT_TTL_MIN_S, "an hour")
_audit_ttl = _ttl("audit entry", AUDIT_TTL_MIN_S, "a day")


def _non_negative_float(text: str) -> float:
    value = finite_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _seconds(text: str) -> float:
    """A duration of more than 0, at most ten years (`TTL_MAX_S`): a time that far ahead of now
    overflows a datetime (--restart-backoff 1e12 failed every reconcile pass with OverflowError
    from the first failed shard on)."""
    value = _positive_float(text)
    if value > TTL_MAX_S:
        raise argparse.ArgumentTypeError(f"must be at most {TTL_MAX_S:.0f} seconds (ten years), got {text}")
    return value


def _seconds_or_zero(text: str) -> float:
    """`_seconds`, or 0."""
    return 0.0 if _non_negative_float(text) == 0 else _seconds(text)


HEARTBEAT_TIMEOUT_MAX_S = 86_400.0  # a day: the interval agents are told (a third) fits int32 milliseconds


def _heartbeat_timeout(text: str) -> float:
    """Positive, at most `HEARTBEAT_TIMEOUT_MAX_S`: agents are told a third of it in the int32
    milliseconds of `heartbeat_interval_ms`, and a larger one failed every Register INTERNAL
    (after the node's row was written)."""
    value = _positive_float(text)
    if value > HEARTBEAT_TIMEOUT_MAX_S:
        raise argparse.ArgumentTypeError(f"must be at most {HEARTBEAT_TIMEOUT_MAX_S:g} s, got {text}")
    return value


def _heartbeat_rate(text: str) -> float:
    """0 (no cap) or at least one heartbeat a second: a smaller cap would tell agents intervals
    of days, past the int32 milliseconds of `RegisterResponse.heartbeat_interval_ms`."""
    value = _non_negative_float(text)
    if 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be 0 (no cap) or at least 1 heartbeat a second, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _whole_number(text: str, *, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, least=1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, least=0)


def _advertise_agent_address(parser: argparse.ArgumentParser, flag: str | None, gateways: int,
                             env: Mapping[str, str]) -> str:
    """--advertise-agent-address, else MAIA_ADVERTISE_AGENT_ADDRESS; only where gateways serve the
    agents. Without them the flag is a usage error (it names gateways there are none of), while the
    variable, often set alike for every controller of a deployment, is ignored with a warning:
    agents reach --listen then, and followers send them to the leader's --advertise-address (a
    stale gateway address in the lease would send them to a port nothing serves)."""
    if flag is not None:
        if flag and not gateways:
            parser.error("--advertise-agent-address is where agents reach --agent-gateways: give --agent-gateways "
                         "N too (without gateways agents reach --listen, advertised by --advertise-address)")
        return flag
    from_env = env.get("MAIA_ADVERTISE_AGENT_ADDRESS", "")
    if from_env and not gateways:
        print(f"{parser.prog}: warning: MAIA_ADVERTISE_AGENT_ADDRESS={from_env} ignored: no --agent-gateways, so "
              "agents reach --listen (followers send them to the leader's --advertise-address)", file=sys.stderr)
        return ""
    return from_env


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def _check_from_env(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """What argparse does not check of a default taken from the environment (its `type` and
    `choices` judge only what is on the command line): the log level, the advertised addresses."""
    if ns.log_level not in LOG_LEVELS:
        parser.error(f"--log-level (or MAIA_LOG_LEVEL) {ns.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    for flag, attr in (("--advertise-address", "advertise_address"),
                       ("--advertise-agent-address", "advertise_agent_address")):
        value = getattr(ns, attr)
        if value:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                parser.error(f"{flag} {value!r} is not HOST:PORT (where agents and clients reach this controller)")
            if ":" in host and not (host.startswith("[") and host.endswith("]")):
                # An IPv6 address unbracketed ("$(POD_IP):50051" in an IPv6 cluster): told to agents
                # as it was, they dialled a host "fd00::7:50051" with no port. Bracketed; any
                # other host with a colon is refused.
                if not _is_ipv6(host):
                    parser.error(f"{flag} {value!r} is not HOST:PORT "
                                 f"(an IPv6 address goes in brackets: [ADDRESS]:PORT)")
                setattr(ns, attr, f"[{host}]:{port}")


def _check_lease(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    if not ns.lease_renew_interval < ns.lease_ttl - Config.lease_margin_s:
        parser.error(f"--lease-renew-interval ({ns.lease_renew_interval:g}) must be below --lease-ttl "
                     f"({ns.lease_ttl:g}) minus the {Config.lease_margin_s:g} s safety margin")


def _check_node_graces(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    if ns.node_eviction_grace < ns.node_down_grace:
        parser.error("--node-eviction-grace must not be shorter than --node-down-grace")


def _check_tls(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    if (ns.tls_cert is None) != (ns.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if ns.tls_client_ca is not None and ns.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")


def _check_agent_gateways(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    if ns.agent_gateways and not ns.agent_listen:
        parser.error("--agent-gateways needs --agent-listen HOST:PORT (where the gateways serve the agents)")
    if ns.agent_listen and not ns.agent_gateways:
        parser.error("--agent-listen is where --agent-gateways listen: give --agent-gateways N (N >= 1) too")
    if ns.agent_gateways and ns.tls_client_ca is not None:
        parser.error("--agent-gateways cannot carry mutual-TLS agent identities (a client certificate ends at the "
                     "gateway, and the controller checks it names the node): use bearer tokens with TLS, or "
                     "--agent-gateways 0")


def _check_console(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    if ns.console_max_connections_per_peer > ns.console_max_connections:
        parser.error(f"--console-max-connections-per-peer ({ns.console_max_connections_per_peer}) must not exceed "
                     f"--console-max-connections ({ns.console_max_connections})")


def _check_authentication(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    if ns.insecure_no_auth and ns.bootstrap_admin_token_file:
        parser.error("--insecure-no-auth and --bootstrap-admin-token-file contradict each other")


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """maia-controller's flags, one --help section per concern; `env` gives the defaults of the
    flags an environment variable sets."""
    parser = argparse.ArgumentParser(
        prog="maia-controller", description="Maia placement controller (gRPC server + reconciler). "
        "Checks --listen and --db before touching the database; a bad value exits 2 with one line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version_text()}")
    _api_flags(parser)
    _database_flags(parser, env)
    _reconcile_flags(parser)
    _node_lifecycle_flags(parser)
    _restart_flags(parser)
    _leadership_flags(parser, env)
    _agent_flags(parser)
    _tenant_flags(parser)
    _observability_flags(parser, env)
    return parser


def _api_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("API, TLS and authentication")
    group.add_argument("--listen", default=Config.listen, metavar="HOST:PORT",
                       help="address to serve gRPC on; port 0 picks a free port (printed on start)")
    group.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve TLS with this certificate (chain)")
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert")
    group.add_argument(
        "--tls-client-ca", type=Path, metavar="PEM",
        help="mutual TLS: require client certificates signed by this CA from every client; a node agent's "
             "certificate must name its node id (maiactl dev-ca makes a development CA)",
    )
    group.add_argument(
        "--bootstrap-admin-token-file", metavar="PATH",
        help="if the database has no active admin token, create one: the token PATH holds (one you made, e.g. "
             "from a secret store), else a new one written to PATH (mode 0600); otherwise leave PATH alone",
    )
    group.add_argument(
        "--insecure-no-auth", action="store_true",
        help="turn authentication off: every caller is an admin (trusted test setups only; warns every minute)",
    )


def _database_flags(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    group = parser.add_argument_group("database")
    group.add_argument(
        "--db", default=env.get(DB_URL_ENV, DEFAULT_DB_URL), metavar="URL",
        help=f"SQLAlchemy async database URL: sqlite+aiosqlite:///FILE or "
             f"postgresql+asyncpg://USER@HOST:PORT/DB (env {DB_URL_ENV})",
    )
    group.add_argument(
        "--migrate", action=argparse.BooleanOptionalAction, default=True,
        help="apply pending migrations on start; --no-migrate refuses to start on an old schema",
    )
    group.add_argument(
        "--db-wait", type=_seconds_or_zero, default=Config.db_wait_s, metavar="SECONDS",
        help="on start, keep trying a PostgreSQL server that cannot be reached yet (refused, starting up, "
             "its name not resolved yet) for this long, every call answered 'starting' meanwhile, before "
             "exiting 2; 0: exit at once. A wrong password or database name exits at once",
    )


def _reconcile_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reconcile and solver")
    group.add_argument("--reconcile-interval", type=_seconds, default=Config.reconcile_interval_s,
                       metavar="SECONDS", help="seconds between reconcile passes when nothing wakes the loop")
    group.add_argument("--solve-time-limit-ms", type=_positive_int, default=Config.solve_time_limit_ms,
                       metavar="MS", help="milliseconds the solver may spend on one reconcile pass")
    group.add_argument("--preemption", action=argparse.BooleanOptionalAction, default=Config.preemption,
                       help="stop preemptible replicas to place higher-priority work or a tenant's reservation; "
                            "--no-preemption never does (the reasons then say what preempting would place)")
    group.add_argument("--decide-process", action=argparse.BooleanOptionalAction, default=Config.decide_process,
                       help="decide arrivals on the warm scheduling session in a child process of its own, off "
                            "the controller's interpreter (its event loop holds the GIL under load); same decisions. "
                            "On by default; --no-decide-process decides in a thread of the controller")
    group.add_argument("--max-surge", type=_positive_int, default=Config.max_surge, metavar="REPLICAS",
                       help="replicas a rolling update or a drain may place beyond the replicas asked "
                            "(make-before-break): more rolls faster but holds more capacity meanwhile")
    group.add_argument("--nominate-after", type=_seconds_or_zero, default=Config.nominate_after_s,
                       metavar="SECONDS",
                       help="keep nodes for the deployments that have waited this long for room others hold (the "
                            "highest priority, then the longest wait, one a zone), so that what frees there goes to "
                            "them and not to newer work of their priority or lower; 0: never (docs/operations.md)")
    group.add_argument("--nomination-max", type=_seconds, default=Config.nomination_max_s,
                       metavar="SECONDS",
                       help="the longest nodes stay nominated for one deployment that does not fit there; then it "
                            "goes to the back of the line")
    group.add_argument("--quarantine-after-failures", type=_positive_int, default=Config.quarantine_after_failures,
                       help="solver failures of one deployment before it is quarantined")
    group.add_argument("--watchdog-interval", type=_seconds, default=Config.watchdog_interval_s,
                       metavar="SECONDS", help="how often committed placements are re-checked for isolation")


def _node_lifecycle_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("node lifecycle and heartbeats")
    group.add_argument("--heartbeat-timeout", type=_heartbeat_timeout, default=Config.heartbeat_timeout_s,
                       metavar="SECONDS", help="seconds without a heartbeat before a node is suspect: it keeps its "
                                               "shards, takes no new ones (agents are told to beat 3 times per timeout, "
                                               "less often past --max-heartbeats-per-second; a live stream's last "
                                               "heartbeat is written every 3 timeouts)")
    group.add_argument("--max-heartbeats-per-second", type=_heartbeat_rate,
                       default=Config.max_heartbeats_per_second, metavar="RATE",
                       help="heartbeats all agents together send a second at most: past RATE x timeout/3 "
                            "connected nodes each agent is told an interval of nodes/RATE seconds, and its stream "
                            "is judged silent after 3 such intervals instead of --heartbeat-timeout (agents "
                            "connected earlier are told the longer interval on their stream once it grew 1.5x, "
                            "so the cluster sends at most 1.5 x RATE; it shrinks again only when they register "
                            "again). 0: no cap (every agent beats 3 times per timeout)")
    group.add_argument("--node-down-grace", type=_seconds, default=Config.node_down_grace_s,
                       metavar="SECONDS", help="seconds of silence before a suspect node is down (it still keeps "
                                               "its shards)")
    group.add_argument("--node-eviction-grace", type=_seconds, default=Config.node_eviction_grace_s,
                       metavar="SECONDS", help="seconds of silence before a down node's work is evicted (placed "
                                               "again elsewhere); longer than --node-down-grace")
    group.add_argument("--restart-grace", type=_seconds_or_zero, default=Config.restart_grace_s,
                       metavar="SECONDS", help="after a start, seconds the nodes get to reconnect before any is "
                                               "suspected (silence counts from the start at the earliest)")
    group.add_argument("--eviction-rate", type=_non_negative_float, default=Config.eviction_rate,
                       metavar="NODES_PER_S", help="nodes whose work may be evicted a second, per zone")
    group.add_argument("--unhealthy-zone-threshold", type=_fraction, default=Config.unhealthy_zone_threshold,
                       metavar="FRACTION", help="share of a zone's nodes not up at which the zone counts as "
                                                "unhealthy (evictions slow to --unhealthy-zone-eviction-rate; none "
                                                "at all while no zone has a node up)")
    group.add_argument("--unhealthy-zone-eviction-rate", type=_non_negative_float,
                       default=Config.unhealthy_zone_eviction_rate, metavar="NODES_PER_S",
                       help="evictions a second in an unhealthy zone")


def _restart_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("restarts of failed replicas")
    group.add_argument("--restart-backoff", type=_seconds_or_zero, default=Config.restart_backoff_s,
                       metavar="SECONDS", help="a replica whose shard FAILED is placed again (other nodes first) "
                                               "after this long, doubling with each failure in a row of its "
                                               "deployment (reset after 10 min without one)")
    group.add_argument("--restart-backoff-max", type=_seconds_or_zero, default=Config.restart_backoff_max_s,
                       metavar="SECONDS", help="the longest back-off before a failed replica is placed again")
    group.add_argument("--restart-limit", type=_positive_int, default=Config.restart_limit, metavar="FAILURES",
                       help="times in a row failed replicas are placed again; the next failure makes the deployment "
                            "Failed: not placed again until updated")
    group.add_argument("--assignment-ack-timeout", type=_seconds_or_zero,
                       default=Config.assignment_ack_timeout_s, metavar="SECONDS",
                       help="a shard a connected node's agent says nothing of (no LOADING, RUNNING or FAILED "
                            "report) this long after the assignment set that named it reached its stream fails "
                            "like a shard the agent reported FAILED (placed again after the back-off, other "
                            "nodes first); 0: wait for ever")


def _leadership_flags(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    group = parser.add_argument_group("leadership (several controllers on one PostgreSQL)")
    group.add_argument("--advertise-address", default=env.get("MAIA_ADVERTISE_ADDRESS", ""), metavar="HOST:PORT",
                       help="where agents and clients reach this controller (followers send agents to the "
                            "leader's); default: the bound --listen address (env MAIA_ADVERTISE_ADDRESS)")
    group.add_argument("--lease-ttl", type=_seconds, default=Config.lease_ttl_s, metavar="SECONDS",
                       help="leader lease time: a leader not renewing for this long is replaced")
    group.add_argument("--lease-renew-interval", type=_seconds, default=Config.lease_renew_s,
                       metavar="SECONDS", help="how often the leader renews its lease (and followers try to "
                                               "take it); must be below --lease-ttl minus 1.5 s")


def _agent_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("agents and agent gateways")
    group.add_argument("--agent-reports-per-second", type=_positive_float, default=Config.agent_reports_per_second,
                       help="shard reports and heartbeats one agent stream may send a second (token bucket)")
    group.add_argument("--agent-reports-burst", type=_positive_int, default=Config.agent_reports_burst,
                       help="the bucket's size: reports one stream may send at once")
    group.add_argument("--agent-admission-concurrency", type=_positive_int,
                       default=Config.agent_admission_concurrency,
                       help="agent Registers (committed in batches) and batches of Connect hellos let in at "
                            "once; a join storm beyond it queues")
    group.add_argument("--agent-admission-queue", type=_non_negative_int, default=Config.agent_admission_queue,
                       help="agent Registers and hellos queued beyond that; the rest are refused UNAVAILABLE "
                            "with a retry time that grows with the queue")
    group.add_argument("--agent-gateways", type=_non_negative_int, default=Config.agent_gateways, metavar="N",
                       help="serve the node agents (Register, Connect) from N gateway processes on "
                            "--agent-listen (they share the port with SO_REUSEPORT); each relays its agents' "
                            "calls to this controller over one local link, many messages a frame, so gRPC's "
                            "per-message work leaves the controller's interpreter. Authentication, liveness and "
                            "every decision stay here. 0: agents connect to --listen only. Not with "
                            "--tls-client-ca (client certificates end at the gateway)")
    group.add_argument("--agent-listen", default=Config.agent_listen, metavar="HOST:PORT",
                       help="where the agent gateways listen (with --agent-gateways; port 0 picks a free port, "
                            "printed on start as 'maia-controller agents on HOST:PORT'); --listen keeps serving "
                            "agents too")
    group.add_argument("--advertise-agent-address", default=None,
                       metavar="HOST:PORT", help="where agents reach this controller's gateways (with --agent-gateways): "
                                                 "followers send agents there while it leads; default: the gateways' "
                                                 "bound --agent-listen address (env MAIA_ADVERTISE_AGENT_ADDRESS, "
                                                 "ignored without --agent-gateways)")
    group.add_argument("--agent-gateway-linger-ms", type=_non_negative_float, default=Config.agent_gateway_linger_ms,
                       metavar="MS", help="how long a message waits on a gateway's link for others to share its "
                                          "frame (either way); 0: those of the same event-loop turn")


def _tenant_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tenants' rates and dry runs")
    group.add_argument("--submits-per-minute", type=_non_negative_float, default=Config.submits_per_minute,
                       help="deployments one tenant may submit a minute, bursting to the same (0: unlimited)")
    group.add_argument("--changes-per-minute", type=_non_negative_float, default=Config.changes_per_minute,
                       help="updates and deletions of deployments one tenant's tokens may make a minute, bursting "
                            "to the same (an admin token's are not counted; 0: unlimited)")
    group.add_argument("--dry-runs-per-minute", type=_non_negative_float, default=Config.dry_runs_per_minute,
                       help="dry runs one tenant may ask for a minute (0: unlimited)")
    group.add_argument("--dry-run-time-limit-ms", type=_positive_int, default=Config.dry_run_time_limit_ms,
                       help="the longest a dry run's solve may take")
    group.add_argument("--dry-run-slots", type=_positive_int, default=Config.dry_run_slots,
                       help="dry runs solved at once (more are refused with RESOURCE_EXHAUSTED)")


def _observability_flags(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    group = parser.add_argument_group("observability and health")
    group.add_argument("--log-level", default=env.get("MAIA_LOG_LEVEL", "INFO"), type=str.upper,
                       choices=LOG_LEVELS,
                       help="log level of the JSON lines on stderr (env MAIA_LOG_LEVEL)")
    group.add_argument("--metrics-listen", default="", metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port)")
    group.add_argument("--http-listen", default="", metavar="HOST:PORT",
                       help="serve the read-only web console at http://HOST:PORT/ (port 0: any free port)")
    group.add_argument("--console-max-connections", type=_positive_int, default=Config.console_max_connections,
                       metavar="N", help="console connections open at once; one more is answered 503 with "
                                         "Retry-After and closed")
    group.add_argument("--console-max-connections-per-peer", type=_positive_int,
                       default=Config.console_max_connections_per_peer, metavar="N",
                       help="console connections open at once from one address, at most --console-max-connections "
                            "(behind a proxy every viewer is its address: raise it)")
    group.add_argument("--max-rss-mib", type=_non_negative_int, default=Config.max_rss_mib,
                       help="health says NOT_SERVING above this resident memory, the decide process's "
                            "included (0: no ceiling)")
    group.add_argument("--reconcile-stuck-s", type=_positive_float, default=Config.reconcile_stuck_s,
                       help="health says NOT_SERVING when one reconcile pass runs longer than this")
    group.add_argument("--event-ttl", type=_event_ttl, default=Config.event_ttl_s, metavar="SECONDS",
                       help="the leader deletes events recorded longer ago than this, but the isolation "
                            "watchdog's alarms and the nodes' drains (default 7 days, at least an hour; 0: keep "
                            "every event)")
    group.add_argument("--audit-ttl", type=_audit_ttl, default=Config.audit_ttl_s, metavar="SECONDS",
                       help="the leader deletes audit entries recorded longer ago than this, oldest first, and "
                            "`maiactl audit verify` checks the chain from the first one kept (default 0: keep "
                            "the whole audit log; else at least a day)")


def _config(ns: argparse.Namespace) -> Config:
    """The parsed flags, section by section as --help lists them (a field names its unit where the
    flag does not)."""
    return Config(
        # API, TLS and authentication
        listen=ns.listen, tls_cert=ns.tls_cert, tls_key=ns.tls_key, tls_client_ca=ns.tls_client_ca,
        bootstrap_admin_token_file=ns.bootstrap_admin_token_file, insecure_no_auth=ns.insecure_no_auth,
        # database
        db_url=ns.db, migrate=ns.migrate, db_wait_s=ns.db_wait,
        # reconcile and solver
        reconcile_interval_s=ns.reconcile_interval, solve_time_limit_ms=ns.solve_time_limit_ms,
        preemption=ns.preemption, decide_process=ns.decide_process, max_surge=ns.max_surge,
        nominate_after_s=ns.nominate_after, nomination_max_s=ns.nomination_max,
        quarantine_after_failures=ns.quarantine_after_failures, watchdog_interval_s=ns.watchdog_interval,
        # node lifecycle and heartbeats
        heartbeat_timeout_s=ns.heartbeat_timeout, max_heartbeats_per_second=ns.max_heartbeats_per_second,
        node_down_grace_s=ns.node_down_grace, node_eviction_grace_s=ns.node_eviction_grace,
        restart_grace_s=ns.restart_grace, eviction_rate=ns.eviction_rate,
        unhealthy_zone_threshold=ns.unhealthy_zone_threshold,
        unhealthy_zone_eviction_rate=ns.unhealthy_zone_eviction_rate,
        # restarts of failed replicas
        restart_backoff_s=ns.restart_backoff, restart_backoff_max_s=ns.restart_backoff_max,
        restart_limit=ns.restart_limit, assignment_ack_timeout_s=ns.assignment_ack_timeout,
        # leadership
        advertise_address=ns.advertise_address, lease_ttl_s=ns.lease_ttl, lease_renew_s=ns.lease_renew_interval,
        # agents and agent gateways
        agent_reports_per_second=ns.agent_reports_per_second, agent_reports_burst=ns.agent_reports_burst,
        agent_admission_concurrency=ns.agent_admission_concurrency, agent_admission_queue=ns.agent_admission_queue,
        agent_gateways=ns.agent_gateways, agent_listen=ns.agent_listen,
        advertise_agent_address=ns.advertise_agent_address, agent_gateway_linger_ms=ns.agent_gateway_linger_ms,
        # tenants' rates and dry runs
        submits_per_minute=ns.submits_per_minute, dry_runs_per_minute=ns.dry_runs_per_minute,
        changes_per_minute=ns.changes_per_minute,
        dry_run_time_limit_ms=ns.dry_run_time_limit_ms, dry_run_slots=ns.dry_run_slots,
        # observability and health
        log_level=ns.log_level.upper(), metrics_listen=ns.metrics_listen, http_listen=ns.http_listen,
        console_max_connections=ns.console_max_connections,
        console_max_connections_per_peer=ns.console_max_connections_per_peer,
        max_rss_mib=ns.max_rss_mib, reconcile_stuck_s=ns.reconcile_stuck_s, event_ttl_s=ns.event_ttl,
        audit_ttl_s=ns.audit_ttl,
    )


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """maia-controller's flags as one Config. `env` (os.environ unless given) supplies the defaults
    of MAIA_DB_URL, MAIA_LOG_LEVEL, MAIA_ADVERTISE_ADDRESS and MAIA_ADVERTISE_AGENT_ADDRESS; a bad
    value, or flags that disagree, exit 2 with argparse's usage and one line."""
    env = os.environ if env is None else env
    parser = _parser(env)
    ns = parser.parse_args(argv)
    # Flags that must agree, in this order: the first rule broken is the one reported.
    _check_lease(parser, ns)
    _check_node_graces(parser, ns)
    _check_tls(parser, ns)
    _check_agent_gateways(parser, ns)
    _check_console(parser, ns)
    ns.advertise_agent_address = _advertise_agent_address(parser, ns.advertise_agent_address, ns.agent_gateways, env)
    _check_from_env(parser, ns)
    _check_authentication(parser, ns)
    return _config(ns)
