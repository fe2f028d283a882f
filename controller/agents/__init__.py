"""Live agent sessions: one Connect stream per node, assignment pushes, liveness, batched reports.

The hub is the only place that knows which agents are connected right now. It
- accepts a stream after its Hello matched the node's current session (a newer stream for the
  same node supersedes the older one),
- sends the node's complete AssignmentSet when the stream opens and whenever `notify` says it
  changed (coalesced: an agent gets the latest set, never a backlog); the sets of every stream
  woken together (a commit's changed nodes) are read in one batch (`repo.assignment_sets`), not
  one transaction per node,
- checks every report as it arrives (bounded fields and batch sizes, a per-stream rate limit;
  a violation ends the stream with INVALID_ARGUMENT or RESOURCE_EXHAUSTED) and refuses reports
  for shards the node was never given on this stream (an event per node and flush),
- buffers heartbeats and shard reports and writes them per flush interval in chunks of at most
  `limits.FLUSH_CHUNK` shard reports and `BEATS_PER_CHUNK` heartbeats (not one commit per
  heartbeat per node), the nodes with shard reports first, each chunk published once written;
  a chunk that fails is retried node by node, so one node's bad data never drops every other node's heartbeats; of
  the full shard state a heartbeat repeats, only the shards whose state changed since the
  stream's last heartbeat are written (all of them every `FULL_REPORTS_EVERY_S`); a heartbeat
  that omits its shards under the version of the state this stream's last full heartbeat carried
  costs no shard at all, and one that names a version the stream does not hold (never received,
  or its write failed), or comes when every shard is due again, asks the agent for its full state
  (`ShardStateRequest`) and counts for liveness meanwhile; and a node's last-heartbeat time at
  most every `LivenessPolicy.contact_write_every_for` (three of the longest silence timeouts
  told) while its stream lives (at once when its power draw changed or its stream ended): a live
  stream is the node's liveness, and the node lifecycle judges a node whose stream ended here by
  the last heartbeat the hub saw (`released`), a new leader by the restart grace,
- tells each agent its heartbeat interval (`HeartbeatPacing`: a third of the heartbeat timeout,
  longer as the connected nodes grow past `max_heartbeats_per_second`), at Register, and judges
  its stream by three of the intervals it told that agent (`AgentSession.timeout_s`, never less
  than `heartbeat_timeout_s`), or of the one its agent states in its Hello it follows (told by
  another leader, or before a restart), bounded (`HeartbeatPacing.stated`; an agent stating more
  is told the bound); once the cluster's interval grew `PACING_STEP` times past the
  shortest one told, every connected agent told less is told the cluster's on its stream
  (`HeartbeatPolicy`, `_pace_grown`), so the cluster sends at most that many times the cap. An
  agent that ignores it beats more often than it is judged by, which is safe. Intervals shrink
  when nodes leave only as agents register again;
- marks a node suspect when its stream ends or its heartbeats stop for its stream's silence
  timeout (silent at two checks in a row: `_expire`; it keeps its shards;
  `controller/nodelifecycle.py` takes it further: down, evicted), counts the drop against the
  node's flap penalty, and on Hello marks it up again (suspect while it flaps), waking the
  reconciler either way;
- says whether a live stream holds a node (`holds_live_session`): a second agent registering
  the same node id meanwhile is refused;
- ends a stream UNAUTHENTICATED when the token it was opened with is revoked (`revoke_credentials`)
  or expires (a timer per stream whose token expires), and takes nothing its agent sends after
  the stream was closed.
Only the leader talks to agents (`follow` ends every stream when it loses the lead): a
follower's hub holds no streams and judges no node's liveness.

The package, one concern a module, each importing only those below it (a contract in
pyproject.toml):
- `hub.py`: `AgentHub`, which holds the streams: `converse` (Hello, the pushes of assignment
  sets, the stream's end and the node's suspect mark), expiry, credentials, what others ask;
- `joins.py`: `Joins`, the Registers and Hellos committed in batches behind the admission gate;
- `reports.py`: `ReportBuffer`, what the streams' agents say: read, checked, buffered, and written
  per flush in chunks (`_Batch`); `pacing.py`: `HeartbeatIntervals`, the intervals told;
- `session.py`: `AgentSession`, one stream's state, and the messages a stream carries.
"""

from controller.agents.hub import NODE_DELETED, AgentHub
from controller.agents.reports import _Batch
from controller.agents.session import (
    AgentInbound, AgentOutbound, AgentSession, HeartbeatPolicy, HubObserver, ShardStateRequest,
)
from controller.aio import Wakeup  # imported from here by tests (it was a name of the old module)

__all__ = [
    "NODE_DELETED", "AgentHub", "AgentInbound", "AgentOutbound", "AgentSession", "HeartbeatPolicy",
    "HubObserver", "ShardStateRequest", "Wakeup", "_Batch",
]
