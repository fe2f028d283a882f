"""What the other controllers on the same database tell this one, and what it does on hearing it.

Several controllers may share one PostgreSQL (`controller.api.server`); they tell each other, through
`maia_cluster` notifications (`controller.store.notify`), what this process could not otherwise know
without reading: wake the reconciler (WAKE), push these nodes their sets (NODES), these nodes were
deleted (NODE_REMOVED), these tokens were revoked (TOKENS_REVOKED), the leader lease is free
(LEASE_RELEASED), these deployments changed (DEPLOYMENTS), and messages may have been lost
(RESYNC). `PeerMessages` is the hearing end: it hands each message to the agent hub, the
reconciler, the authenticator, the watchers' event bus or the election, and runs the handlings that
read the database as tasks of their own. It lives apart from `ControllerApp`, the composition root,
which builds it with what it needs and sends the messages (`AppSignals`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Coroutine
from typing import TYPE_CHECKING, Any

from controller.agents import NODE_DELETED
from controller.aio import cancel_and_wait
from controller.domain.values import DeploymentEvent, DeploymentView, split_deployment_key
from controller.store.notify import RESYNC
from controller.usecases import tokens
from controller.usecases.deployments import views_of
from controller.usecases.nodes import registered_sessions
from controller.usecases.watch import deleted_elsewhere

if TYPE_CHECKING:
    from controller.agents import AgentHub
    from controller.authn import Authenticator
    from controller.leadership import LeaderElection
    from controller.reconcile import Reconciler
    from controller.store.db import Database
    from controller.tokenstreams import TokenStreams
    from controller.usecases.watch import DeploymentEventBus

log = logging.getLogger("maia.server")

# What controllers tell each other (`controller.store.notify`).
WAKE, NODES, NODE_REMOVED, DEPLOYMENTS, LEASE_RELEASED = "wake", "nodes", "node_removed", "deployments", "released"
TOKENS_REVOKED = "tokens_revoked"  # token ids: each controller's authenticator forgets them at once


def deployment_item(kind: str, view: DeploymentView) -> str:
    """One DEPLOYMENTS item: `kind:TENANT/NAME` (the deployment's key; neither part holds ':' or
    ','); the others read the deployment back, except a deleted one (its row is gone)."""
    return f"{kind}:{view.spec.key}"


class PeerMessages:
    """The messages of the other controllers on the same database, handled here."""

    def __init__(self, *, db: Database, hub: AgentHub, reconciler: Reconciler, authn: Authenticator,
                 bus: DeploymentEventBus, streams: TokenStreams, election: LeaderElection) -> None:
        self._db = db
        self._hub = hub
        self._reconciler = reconciler
        self._authn = authn
        self._bus = bus
        self._streams = streams
        self._election = election
        self._handling: set[asyncio.Task] = set()
        # DEPLOYMENTS items heard and not read yet, and whether a task reads them (one at a time).
        self._to_republish: list[str] = []
        self._republishing = False

    def notified(self, kind: str, data: str) -> None:
        """A message from another controller on the same database."""
        items = [item for item in data.split(",") if item]
        if kind == WAKE:
            self._reconciler.wake()
        elif kind == NODES:
            self._hub.notify(items)
        elif kind == NODE_REMOVED:
            self._handle(self._removed_elsewhere(items))
        elif kind == TOKENS_REVOKED:
            self.revoked_elsewhere(items)
        elif kind == LEASE_RELEASED:
            self._election.wake()
        elif kind == DEPLOYMENTS:
            self._to_republish.extend(items)
            if not self._republishing:
                self._republishing = True
                self._handle(self._republish_heard())
        elif kind == RESYNC:
            self.resync()

    def forget_tokens(self, token_ids: Collection[str]) -> None:
        """Tokens revoked: their cached verifications are forgotten (else each was let through
        until its entry aged out: `Config.auth_cache_ttl_s`)."""
        for token_id in token_ids:
            self._authn.forget(token_id)

    def revoked_elsewhere(self, token_ids: Collection[str]) -> None:
        """Tokens another controller revoked (TOKENS_REVOKED): forgotten here, and the streams they
        opened here end: deployment watches and console event streams at once (`TokenStreams`),
        agent streams after a read (`_end_streams`). A controller that may have missed some
        resyncs, forgetting every verification and ending every watch (`resync`). The revoking
        controller did all this as it committed (`AppSignals.tokens_revoked`)."""
        self.forget_tokens(token_ids)
        self._streams.revoke(token_ids)
        if self._hub.nodes_connected_with(token_ids):
            self._handle(self._end_streams(token_ids))

    async def _end_streams(self, token_ids: Collection[str]) -> None:
        """The agent streams here opened with these tokens, revoked by another controller, end
        (else one went on with a revoked credential for as long as it lasted: a node's credential
        reset through another controller than the one its stream is on): UNAUTHENTICATED, the
        agent registers again with its bootstrap token; or, their node no longer stored (the
        revocation was its deletion's, whose NODE_REMOVED may come before or after it), as a
        deletion ends them. If the read fails, all end UNAUTHENTICATED. A stream ended meanwhile
        (the deletion's NODE_REMOVED heard) is left as it ended."""
        nodes = self._hub.nodes_connected_with(token_ids)
        stored = nodes
        try:
            async with self._db.unit_of_work() as uow:
                stored = set(await registered_sessions(uow, nodes))
        except Exception:
            log.exception("could not read the nodes whose agent streams opened with revoked tokens")
        self._hub.revoke_credentials(token_ids, deleted=nodes - stored)

    async def close(self) -> None:
        """The handlings under way end (cancelled and waited for): at the stop, once no message
        can arrive and before the engine they read with is disposed (one waiting on a slow read
        would otherwise outlive the controller's stop)."""
        await cancel_and_wait(list(self._handling))

    def _handle(self, reading: Coroutine[Any, Any, None]) -> None:
        """A message's handling that reads the database, run as a task of its own (kept until done)."""
        task = asyncio.get_running_loop().create_task(reading)
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    async def _removed_elsewhere(self, node_ids: list[str]) -> None:
        """Nodes another controller deleted: their streams here end (`NODE_DELETED`).

        A NODE_REMOVED is sent once its row is gone, so a node stored when it is heard registered
        again since: the message is late (held across its sender's reconnection: `store/notify.py`)
        and ends no stream of that registration (its session, read for the whole message at once),
        only one of an older session. If the read fails every named stream ends, as before (an
        agent whose node is stored registers and connects again). The deletion revoked the nodes'
        credentials: their cached verifications here are forgotten (else a deleted node's agent
        kept its credential for up to the cache's TTL here, refused PERMISSION_DENIED, not
        UNAUTHENTICATED, which tells it to register with its bootstrap token). The deleting
        controller's TOKENS_REVOKED named them already; a controller of an earlier version (a
        rolling upgrade) sends only this message."""
        self._authn.forget_nodes(node_ids)
        registered: dict[str, str | None] = {}
        try:
            async with self._db.unit_of_work() as uow:
                registered = await registered_sessions(uow, node_ids)
        except Exception:
            log.exception("could not read the nodes another controller removed")
        for node_id in node_ids:
            self._hub.disconnect(node_id, NODE_DELETED, registered=registered.get(node_id))

    def resync(self) -> None:
        """Messages this controller was owed may be lost (another controller dropped some, or this
        one listens again after its connection dropped: `store/notify.py`): what they would have
        said is taken again from the database. Every watch ends (UNAVAILABLE, as one that fell
        behind: its client watches again, from the current state), every agent connected here is
        sent its set as stored (a node deleted meanwhile has none: its stream ends, as a
        NODE_REMOVED lost would have ended it), the reconciler looks (a lost WAKE), and every
        verified token is forgotten (a lost TOKENS_REVOKED: each token's next use reads its row)
        and the agent streams opened with a token revoked since end (`_recheck_streams`)."""
        log.warning("notifications from the other controllers may have been lost: ending %d watch(es), "
                    "sending %d agent(s) their sets again and verifying every token afresh",
                    self._bus.subscriber_count, len(self._hub.connected()))
        self._authn.forget_all()
        self._handle(self._recheck_streams())
        self._bus.close()
        self._hub.notify(list(self._hub.connected()))
        self._reconciler.wake()

    async def _recheck_streams(self) -> None:
        """After a resync: the agent streams here opened with a token revoked since (by another
        controller, whose TOKENS_REVOKED was lost) end, as one heard would have ended them
        (`revoked`)."""
        held = self._hub.stream_credentials()
        if not held:
            return
        try:
            async with self._db.unit_of_work() as uow:
                revoked = await tokens.revoked_among(uow, held)
        except Exception:
            log.exception("could not read the tokens of the agent streams connected here")
            return
        if revoked:
            await self._end_streams(revoked)

    async def _republish_heard(self) -> None:
        """The DEPLOYMENTS items heard, read and handed on in the order heard: those heard during a
        read are read together after it. A task a message, as before, could hand on a `deleted`
        and then a `modified` read earlier and ended later: the watchers kept a deployment gone."""
        try:
            while self._to_republish:
                items, self._to_republish = self._to_republish, []
                await self._republish(items)
        finally:
            self._republishing = False

    async def _republish(self, items: list[str]) -> None:
        """Deployments another controller changed (`TYPE:TENANT/NAME`), for this controller's watchers.

        A `deleted` is sent once its row is gone, so a deployment of that key stored when it is
        heard was submitted again since (through any controller): the message is late (held
        across its sender's reconnection: `store/notify.py`, or racing the submit's own message)
        and is not handed on; the watchers were or will be told that newer deployment ("added"),
        and a `deleted` after it would tell them a live deployment is gone. If the read fails,
        every watch ends (UNAVAILABLE, as on a resync: its client watches again from the current
        state): the changes could not be told, and a `deleted` could not be told from a late one."""
        by_type: dict[str, set[str]] = {}
        gone: list[str] = []
        stored_again: set[str] = set()
        for item in items:
            kind, _, key = item.partition(":")
            if kind == "deleted":
                gone.append(key)
            else:
                by_type.setdefault(kind, set()).add(key)
        views: dict[str, list[DeploymentView]] = {}
        try:
            if by_type or gone:
                async with self._db.unit_of_work() as uow:
                    views = {kind: await views_of(uow, keys) for kind, keys in by_type.items()}
                    if gone:
                        stored_again = {view.spec.key for view in await views_of(uow, set(gone))}
        except Exception:
            log.exception("could not read deployments another controller changed: ending %d watch(es)",
                          self._bus.subscriber_count)
            self._bus.close()
            return
        for kind, kind_views in views.items():
            for view in kind_views:
                self._bus.publish(DeploymentEvent(kind, view))
        for key in gone:  # after the reads: a DELETING seen in the same message comes first
            if key not in stored_again:
                tenant, name = split_deployment_key(key)
                self._bus.publish(deleted_elsewhere(name, tenant))
