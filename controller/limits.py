"""Every bound the controller puts on what it is asked to do, in one place.

A request field, an agent report, a page of a list, a gRPC message, a rate: each has a limit
here, and `docs/security.md` ("Limits") lists them with the same numbers. Validation
(`controller.usecases.validation`) refuses anything beyond a limit with INVALID_ARGUMENT naming
the field and the limit; nothing else in the controller hard-codes a bound.

The numbers are chosen so that no single stored object (a deployment, a node registration)
can make the controller grow without bound: a deployment's shard count and a node's
accelerator count bound what the solver builds, label and list counts bound what a response
carries, and page sizes bound every list.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- names and identifiers ---------------------------------------------------------------------
NAME_MAX = 63                 # deployment names (DNS label)
ID_MAX = 128                  # tenant, zone, row, rack and node ids (the database column's length)
TENANT_ID_MAX = ID_MAX - 1 - NAME_MAX  # 64: a deployment's key TENANT/NAME fits an interchange id
HOSTNAME_MAX = 253            # RFC 1035 hostname
MODEL_MAX = 64                # accelerator model names
AGENT_VERSION_MAX = 64
SESSION_ID_MAX = 64

# --- labels and lists --------------------------------------------------------------------------
LABELS_MAX = 64               # labels on one node
LABEL_KEY_MAX = 63
LABEL_VALUE_MAX = 256
EXCLUDES_MAX = 256            # tenants one tenant excludes
ZONES_MAX = 64                # zones a tenant may run in
MODELS_MAX = 16               # accelerator models a shard accepts
TOPOLOGY_ITEMS_MAX = 4096     # zones, rows or racks stored (and so in one ApplyTopology)
TENANTS_MAX = 1024            # tenants stored (GetClusterSummary lists them all)

# --- deployments: what the solver may be asked to place -----------------------------------------
REPLICAS_MAX = 4096
SHARDS_PER_REPLICA_MAX = 256
SHARDS_PER_DEPLOYMENT_MAX = 8192    # replicas x shards_per_replica
HOST_ONLY_SHARDS_MAX = 256          # shards needing no accelerator (nothing else bounds how many fit)
SHARD_ACCELERATORS_MAX = 64
PRIORITY_MAX = 1_000_000            # |priority|
DEPLOYMENTS_PER_TENANT_MAX = 512

# --- nodes -------------------------------------------------------------------------------------
NODE_ACCELERATORS_MAX = 64
SHARDS_PER_NODE_MAX = 4096          # one node's assignment set (and one heartbeat's shard list)
# Simulated nodes one maia-simnode process runs (--racks x --nodes-per-rack): the controller has no
# bound on nodes, so four times the largest cluster measured on one controller (16,384 nodes,
# docs/scaling.md), the size up to which agents may state their heartbeat interval
# (`domain.liveness.STATED_INTERVAL_NODES_MAX`). Each node is a task, a stream and a channel (one
# fleet's own without --shared-channel): a larger fleet is a typo, or several fleets' work.
SIMNODE_FLEET_NODES_MAX = 65_536

# --- quantities (finite, non-negative, at most) --------------------------------------------------
HBM_GIB_MAX = 65_536.0              # per accelerator
CPU_MILLI_MAX = 100_000_000         # 100,000 cores
MEMORY_MIB_MAX = 1 << 30            # 1 PiB
POWER_W_MAX = 10_000_000.0          # one node, one shard's accelerator, a rack or row budget
ACCELERATORS_QUANTITY_MAX = 10_000_000.0  # tenant reservations and caps
TENANT_POWER_W_MAX = 1e12

# --- agent reports -----------------------------------------------------------------------------
REPORT_MESSAGE_MAX = 1024           # a shard's status message
# C0 and C1 control characters (NUL included) and DEL: in no text the controller stores or takes
# from an agent (`usecases.validation`; maia-simnode's fault texts, which its agents report).
CONTROL_CHARACTERS = r"[\x00-\x1f\x7f-\x9f]"
# Names (deployments: a DNS label, at most NAME_MAX) and ids (tenants, zones, rows, racks, nodes):
# the controller's checks (usecases/validation.py) and its clients' (maiactl's manifests, maia-simnode).
NAME_PATTERN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
ID_PATTERN = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
FAULT_REASON_MAX = 256              # why an agent says an accelerator failed
REPORTS_PER_SECOND = 200.0          # per agent stream (token bucket)
# A full node's shards each reported LOADING and then RUNNING at once (an agent reports every phase
# change: the LOADING burst alone fitted, and its RUNNING reports ended the stream), and heartbeats.
REPORTS_BURST = 2 * SHARDS_PER_NODE_MAX + 100
# The bytes of one agent stream's messages a controller holds unread when the stream comes through
# an agent gateway (before the hub reads the stream: its Hello is being written, its first set read);
# past them the stream ends RESOURCE_EXHAUSTED. On the port HTTP/2's flow control stops an agent
# that sends faster than the controller reads after ~4.6 MiB; a relayed stream's requests had no
# window, and one agent with a node credential queued 67 MiB in the controller in 2 s. Now the
# gateway holds a stream's requests to `gateway.frames.REQUEST_WINDOW_BYTES` (8 MiB) ahead of what
# the handler took, plus one message: this is a backstop. An agent's messages before its Hello is
# answered are a few heartbeats (a full node's: ~0.4 MiB each).
RELAYED_UNREAD_BYTES_MAX = 16 * 1024 * 1024
# A Connect stream's first message (its Hello) must arrive this long after the stream opened, else the
# stream ends INVALID_ARGUMENT: without a bound any caller that may Connect held a stream (a handler,
# its buffers) open as long as it liked by saying nothing. An agent writes its Hello as the stream's
# first message, so one round trip brings it (~0.6 s over a satellite hop, a few seconds on a link
# that holds each read); the bound must outlast the controller's own stalls too, its event-loop lag
# in a join storm (p99 10 s seen on a starved controller, docs/benchmarks.md), else live agents are
# cut and reconnect into the storm. 20 s is twice that, and of the order of the silence a stream that
# said its Hello is allowed (three heartbeat intervals, at least --heartbeat-timeout: 10 s by default).
HELLO_TIMEOUT_S = 20.0
# Agent Registers and batches of Connect hellos let in at once (the Registers inside are committed
# in batches, controller/groupcommit.py), and queued beyond that; the rest are refused with a
# retry time (controller.admission). A Register inside waits for its batch, which the gate's
# deadline rule does not see: inside must stay about two batches' worth (with 256 inside, a
# 4,096-node join on a loaded machine timed out most Registers after they were let in).
AGENT_ADMISSION_CONCURRENCY = 64
AGENT_ADMISSION_QUEUE = 256
HELLO_BATCH_MAX = 500               # Connect hellos committed in one transaction (a join storm's)
REGISTER_BATCH_MAX = 64             # Registers committed in one transaction
# Register batches written at once on PostgreSQL (their reads overlap; only the generation bump and
# the audit append, their last statements, take turns). SQLite has one writer: one batch at a time.
REGISTER_WRITERS_POSTGRES = 2
FLUSH_CHUNK = 500                   # shard reports written per transaction (heartbeats: 4x, agents.reports)
# A client request id whose deployment was deleted is still remembered this long after the
# request (a retry then is refused rather than applied twice); while it exists, as long as it.
REQUEST_ID_RETENTION_S = 24 * 3600
# Template revisions kept a deployment, the current one included (`maiactl rollout history`;
# Kubernetes' revisionHistoryLimit is 10 too).
REVISION_HISTORY = 10
# Events are deleted this long after they were recorded (`--event-ttl`, controller/retention.py).
EVENT_TTL_S = 7 * 24 * 3600
# ListEvents after an id retention deleted past answers OUT_OF_RANGE with the highest id deleted in
# this trailing metadata (controller/usecases/events.py; `maiactl get events -w` resumes after it).
EVENTS_DELETED_THROUGH_METADATA_KEY = "maia-events-deleted-through"

# --- lists and messages ------------------------------------------------------------------------
PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 500
PAGE_TOKEN_MAX = 256
# Requests in one SubmitDeployments call. Each is ~0.1-1.6 KB on the wire (a spec at every field's
# limit), so a full call stays well within MAX_RECEIVE_MESSAGE_BYTES, and its answer (a deployment or
# an error of at most ERROR_MESSAGE_MAX characters each) within MAX_SEND_MESSAGE_BYTES: a new deployment
# has no placements yet. Not bounded: a replayed client_request_id answers its deployment as it is now,
# placements included (up to SHARDS_PER_DEPLOYMENT_MAX each), so a call replaying many large placed
# deployments can exceed it.
SUBMITS_PER_CALL_MAX = 1000
MAX_RECEIVE_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_SEND_MESSAGE_BYTES = 16 * 1024 * 1024
# gRPC channel and server options that apply the two message-size limits above.
GRPC_MESSAGE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
)
# Clients receive what the server may send.
GRPC_CLIENT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_SEND_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_RECEIVE_MESSAGE_BYTES),
)
# The reconnect back-off of every channel to the controller. gRPC's own starts at 1 s and grows
# x1.6 to 2 minutes (doc/connection-backoff.md): its attempts against a controller down since 0 s
# come at ~1, 2.6, 5.2, 9.3, 16, 26, 43, 70 s..., so one back after 45 s is reached 25 s later,
# and after a longer outage up to 2 minutes later. From 250 ms to at most 2 s (gRPC's 20 % jitter
# on top), a controller that is back is reached within ~2.4 s of listening again, and a dead
# address costs one connection attempt (a SYN answered by an RST) every ~2 s.
_RECONNECT_BACKOFF: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
# Agents (they fail over between controllers and retry forever; one channel per controller,
# `simnode.transport`). gRPC core reads `min_reconnect_backoff_ms` as the least time a connection
# attempt is given (its "min connect timeout", 20 s by default), not as a back-off; an attempt
# lasts max(that, the back-off), so AGENT_CONNECT_TIMEOUT_MS here, the back-off being at most 2 s.
# What it costs: an address that refuses (nothing listening, a killed controller: an RST) fails
# at once whatever it is, so failing over from it is as fast with any value; only an address
# where nothing answers keeps the agent this long before its Register fails UNAVAILABLE and it
# tries the next controller: a host down or cut off (SYNs unanswered), and a controller starting,
# which listens before it serves (`api.server`: the port is bound, then the schema is checked
# and authentication prepared, seconds on a loaded PostgreSQL host), so a restarted controller is
# such an address for a while after every failover. What it must cover: a live controller's TCP
# handshake and HTTP/2 SETTINGS over a slow link (2 round trips, 3 with TLS: ~1.2-1.8 s at the
# 600 ms of a satellite hop). 250 ms failed every first attempt over a link holding each read
# 300 ms. 2 s covers that link, and holds an agent on a starting controller no longer than the
# back-off's ceiling, well within a failover's lease (5 s by default: agents wait it out anyway);
# 5 s would hold it past the lease. It must stay under the Register's own timeout
# (`simnode.transport.REGISTER_TIMEOUT_S`, 10 s): an attempt outlasting it ends DEADLINE_EXCEEDED,
# on which the agent stays on that controller instead of failing over. A link that also loses a
# SYN (1 s more) fails its first attempt still; the next, after the back-off, gets 2 s again.
AGENT_CONNECT_TIMEOUT_MS = 2000
GRPC_FAILOVER_OPTIONS: tuple[tuple[str, int], ...] = (
    *_RECONNECT_BACKOFF, ("grpc.min_reconnect_backoff_ms", AGENT_CONNECT_TIMEOUT_MS))
# maiactl and the asyncio client (`cli.client`), one controller or several. A connection attempt
# keeps gRPC's 20 s: a command's first call waits for the first attempt, and one cut short fails
# the call UNAVAILABLE at once (with 250 ms, every first call through a proxy holding each read
# 300 ms failed: "timed out before receiving SETTINGS frame"). 20 s is above `--rpc-timeout`'s
# 15 s default, so a command against a host that answers nothing ends at its own deadline, which
# maiactl then reports as a controller not reached (`cli.client.Unreached`, exit 5).
GRPC_CLI_RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    *_RECONNECT_BACKOFF, ("grpc.min_reconnect_backoff_ms", 20_000))


@dataclass(frozen=True, slots=True)
class Keepalive:
    """HTTP/2 keepalive pings on the controller's connections and its clients' channels (agents,
    and maiactl's: `CLIENT_KEEPALIVE`) (gRPC core's channel arguments, grpc/doc/keepalive.md),
    so that a peer whose network died without a FIN or RST is found in `*_time_ms +
    *_timeout_ms` rather than when TCP gives up (~15 min): the controller frees the half-open
    transport and ends its streams (the node is then suspect, as when its stream drops); the agent
    reconnects (to the next leader); maiactl's next call connects again. A hung agent whose gRPC
    core still answers pings is found by the heartbeat timeout alone.

    The two sides must agree: the server counts a ping that comes sooner than
    `server_min_ping_interval_ms` after the last one (when it sent no data between) as a strike,
    and after two strikes ends the connection with GOAWAY "too_many_pings"; an agent stream can
    carry no controller data for hours. So the agents ping at most every `client_time_ms`, twice
    the server's minimum."""

    client_time_ms: int = 20_000      # an agent pings the controller after this long (its channel)
    client_timeout_ms: int = 10_000   # ... and gives the connection up without the ping's ack this long
    server_time_ms: int = 30_000      # the controller pings each connection after this long
    server_timeout_ms: int = 10_000
    server_min_ping_interval_ms: int = 10_000  # pings from a peer sooner than this are strikes

    def __post_init__(self) -> None:
        if self.server_min_ping_interval_ms > self.client_time_ms:
            raise ValueError(f"agents ping every {self.client_time_ms} ms, which the server counts as too many "
                             f"pings (its minimum is {self.server_min_ping_interval_ms} ms)")

    def server_options(self) -> tuple[tuple[str, int], ...]:
        return (
            ("grpc.keepalive_time_ms", self.server_time_ms),
            ("grpc.keepalive_timeout_ms", self.server_timeout_ms),
            # Any ping's ack, not only a keepalive's: gRPC's flow-control (BDP) pings wait a minute
            # by default, and a keepalive due while one is unanswered waits for it.
            ("grpc.http2.ping_timeout_ms", self.server_timeout_ms),
            ("grpc.http2.min_ping_interval_without_data_ms", self.server_min_ping_interval_ms),
            # An agent's channel with no call open (between streams, a Register's retry) may ping.
            ("grpc.keepalive_permit_without_calls", 1),
            # The controller's own pings go on however long it sends an agent nothing (0: no cap).
            ("grpc.http2.max_pings_without_data", 0),
        )

    def client_options(self) -> tuple[tuple[str, int], ...]:
        return (
            ("grpc.keepalive_time_ms", self.client_time_ms),
            ("grpc.keepalive_timeout_ms", self.client_timeout_ms),
            ("grpc.http2.ping_timeout_ms", self.client_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        )


AGENT_KEEPALIVE = Keepalive()
# maiactl's and the asyncio client's channels (`cli.client`) ping as agents do, which the
# controller and the gateways permit (their server side is `AGENT_KEEPALIVE`'s): a watch or a
# wait whose connection died without a FIN or RST gives it up within ~30 s (~10 s when a call is
# under way: gRPC's own pings with a call get the same 10 s) and connects again, where it would
# otherwise wait on the dead connection until TCP gives up (~15 min). A command done within 20 s
# sends no keepalive ping.
CLIENT_KEEPALIVE = AGENT_KEEPALIVE
ERROR_MESSAGE_MAX = 1024            # an error's message as sent to the caller
PARENT_REAPPLIED_RETRY_MS = 100     # retry time of a write whose rack, row or zone was deleted and re-applied under it
TOPOLOGY_CHANGED_RETRY_MS = 100     # ... of a topology apply whose rows or racks another apply changed since it read them
QUOTED_VALUE_MAX = 40               # a caller's value quoted in an error message

# --- rates (defaults of the controller flags) ------------------------------------------------------
# Heartbeats the whole cluster sends a second at most (agents are told longer intervals as it grows,
# `domain.liveness.HeartbeatPacing`): ~60-120 us of the controller's CPU each, mostly gRPC's.
# 500: at 4,096 nodes agents beat every ~8 s (1,235 -> 571 heartbeats/s measured) and a hung agent
# is found in ~25 s (Kubernetes' node-monitor grace: 40 s); with agents beating ~400 times a second
# instead of ~1,280 a saturated controller placed ~35 % more deployments a second (docs/benchmarks.md,
# 2026-12-02 morning). A new leader finds nodes that never came over at the end of its restart grace
# whatever the interval (`controller/nodelifecycle.py`), and judges each agent's stream by the
# interval its Hello states (`domain.liveness.HeartbeatPacing.stated`).
MAX_HEARTBEATS_PER_SECOND = 500.0
SUBMITS_PER_MINUTE = 120.0          # per tenant, burst the same
DRY_RUNS_PER_MINUTE = 30.0          # per tenant
CHANGES_PER_MINUTE = 120.0          # a tenant token's updates and deletions, per tenant, burst the same
DRY_RUN_TIME_LIMIT_MS = 2000        # a dry run's solve never runs longer
DRY_RUN_SLOTS = 1                   # dry runs solved at once (the machine's cores belong to the reconciler)
# Calls refused UNAUTHENTICATED that get an audit entry of their own: a bucket of 10, refilled at
# 10 a minute, for the whole controller; the others are counted into the next entry. Anonymous
# floods so add at most 14,400 rows a day, whatever their rate.
UNAUTHENTICATED_AUDITS_PER_MINUTE = 10.0
UNAUTHENTICATED_AUDITS_BURST = 10.0
# Log lines for refused credentials (gRPC's UNAUTHENTICATED calls; the console's 401s, a bucket of
# their own): a bucket of 10, refilled at 10 a minute; the next line says how many were left out.
UNAUTHENTICATED_LINES_PER_MINUTE = 10.0
# Streams one token may hold open on a controller at once (WatchDeployments, WatchDeploymentBatches,
# the console's event streams): each is a queue every deployment event is put on.
STREAMS_PER_TOKEN = 64
UNAUTHENTICATED_LINES_BURST = 10.0
# Calls refused with a retry time (busy, rate limited): audited at most this often, the rest counted,
# a tenant's callers' in a bucket of the tenant's own.
RETRY_LATER_AUDITS_PER_MINUTE = 60.0
RETRY_LATER_AUDITS_BURST = 20.0
# ... a bucket per tenant (and one for admins and agents): samplers kept at most (tenants: <= 1024).
RETRY_LATER_SAMPLERS_MAX = 4096
# Web console connections open at once, and from one address (`--console-max-connections`,
# `--console-max-connections-per-peer`; controller/console/server.py): one more is answered 503.
CONSOLE_MAX_CONNECTIONS = 256
CONSOLE_MAX_CONNECTIONS_PER_PEER = 32

# --- the reconciler ----------------------------------------------------------------------------
QUARANTINE_AFTER_FAILURES = 3       # solver failures of one deployment before it is set aside
# Head-of-line nominations (controller/scheduling/nominations.py): a deployment waiting this long
# for room others hold has nodes kept for it (30 s: longer than a rollout's or a drain's churn
# takes to settle, short against a gang's wait behind a stream of arrivals, which has no end), for
# at most NOMINATION_MAX_S (then the next in line; 10 minutes: most single-shard inference
# deployments of a busy cluster turn over well within it, docs/operations.md).
NOMINATE_AFTER_S = 30.0
NOMINATION_MAX_S = 600.0
ISOLATION_SOLVES_MAX = 16           # deployments solved alone to find the one a failed pass trips on
RECONCILE_FAILURES_UNHEALTHY = 3    # failed passes in a row before health says NOT_SERVING
RECONCILE_STUCK_S = 120.0           # one pass running longer: NOT_SERVING
MAX_RSS_MIB = 4096                  # resident memory above it: NOT_SERVING (0: no ceiling)
HEALTH_CHECK_INTERVAL_S = 1.0
