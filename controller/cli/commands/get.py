"""`maiactl get RESOURCE [NAME...]` for deployments, nodes, tenants, topology and placements.

Every filter either works or is refused (exit 2) — none is silently ignored:
`--tenant` (deployments, nodes holding its shards, placements), `--rack` (deployments with a
shard there, nodes, placements), `-l key=value` (node labels; the other kinds carry none).
NAMEs that do not exist are said on stderr, one `error: NOT_FOUND: ...` each, after what the
others print (exit 3), as kubectl does; so is the object of `get events --for KIND/NAME` when it
has no events and does not exist. `--watch` prints the list again whenever it changes (polling
every --interval seconds); `get events --watch` prints the events not shown yet (`cli.follow`). A
watch outlives a controller that goes away for a while (a restart, a failover, a network that
drops packets): a poll it does not serve (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) is said once
on stderr and polled again at the interval, and the watch goes on where it was (the events not
shown yet) once the controller answers (`cli.outage`). Any other failure ends it.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from controller import limits
from controller.cli.bounds import count, int_max, seconds
from controller.cli.client import CliError, Exit, list_all, rpc_error_text, status_code
from controller.cli.context import Context, yaml_text
from controller.cli.follow import PAGE, EventFollower, read_after
from controller.cli.outage import Polls
from controller.cli.refs import deployment_name, deployment_ref, kind_and_names, placement_name
from controller.cli.documents import (
    deployment_document, event_document, list_document, node_document, placement_document, tenant_document, topology_document,
)
from controller.cli.views import (
    cluster_placements_table, deployment_detail, deployments_table, events_table, node_detail, nodes_table,
    shard_rows, tenants_table, topology_view,
)
from maia.v1 import admin_pb2, deployments_pb2

# Accepted spellings of each resource, kubectl-style.
RESOURCES = {
    "deployments": "deployment", "deployment": "deployment", "deploy": "deployment",
    "nodes": "node", "node": "node", "no": "node",
    "tenants": "tenant", "tenant": "tenant",
    "topology": "topology",
    "placements": "placement", "placement": "placement",
    "events": "event", "event": "event",
}
# Which filters each kind understands; any other one given is refused.
FILTERS = {"deployment": {"tenant", "rack"}, "node": {"tenant", "rack", "selector"},
           "placement": {"tenant", "rack"}, "tenant": set(), "topology": set(),
           "event": {"for_object", "limit", "tenant"}}
_FLAG = {"tenant": "-n/--tenant", "rack": "--rack", "selector": "-l/--selector", "for_object": "--for", "limit": "--limit"}
EVENT_KINDS = ("deployment", "node", "tenant", "topology")
# The kinds whose objects are named, each spelling -> kind: `KIND/NAME` words (`-o name`'s lines).
_NAMED = {word: kind for word, kind in RESOURCES.items() if kind in ("deployment", "node", "tenant")}
WATCH_INTERVAL_MIN_S = 0.1
_EVENTS_LIMIT = admin_pb2.ListEventsRequest.DESCRIPTOR.fields_by_name["limit"]
T = TypeVar("T")


def parse_selector(text: str) -> dict[str, str]:
    """'a=b,c=d' -> {'a': 'b', 'c': 'd'}; anything else is a usage error."""
    pairs: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise CliError(f"-l {text!r}: expected key=value[,key=value...]", Exit.USAGE)
        pairs[key.strip()] = value.strip()
    return pairs


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("get", parents=[common], help="list or show deployments, nodes, tenants, topology, placements")
    p.add_argument("resource", metavar="RESOURCE",
                   help="deployments | nodes | tenants | topology | placements | events (singular forms too); "
                        "or a KIND/NAME as -o name prints it (deployment/TENANT/NAME, node/ID, tenant/ID)")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="objects by name (lists all when absent); deployments as NAME or TENANT/NAME")
    p.add_argument("-n", "--tenant", help="deployments/placements of a tenant; nodes holding its shards; with "
                   "deployment NAMEs or --for deployment/NAME: their tenant (names are per tenant)")
    p.add_argument("--rack", help="nodes of a rack; deployments/placements with a shard there")
    p.add_argument("-l", "--selector", metavar="KEY=VALUE[,...]", help="nodes whose labels match all pairs")
    p.add_argument("--for", dest="for_object", metavar="KIND/NAME",
                   help="events of one object: deployment/NAME, node/ID, tenant/ID (a bare NAME: a deployment)")
    p.add_argument("--limit", type=count(int_max(_EVENTS_LIMIT)), metavar="N",
                   help="events: the newest N (default: 50)")
    p.add_argument("-w", "--watch", action="store_true", help="print again on every change (Ctrl-C stops; blocks)")
    # At least WATCH_INTERVAL_MIN_S: a watch polls the controller once an interval, for as long as it runs.
    p.add_argument("--interval", type=seconds(WATCH_INTERVAL_MIN_S), default=2.0, metavar="SECONDS",
                   help=f"--watch polling period (default: 2; at least {WATCH_INTERVAL_MIN_S:g})")
    p.set_defaults(handler=run)


@dataclass(frozen=True)
class Listing:
    """One fetch of a resource, ready for every output format."""

    document: Callable[[], Any]
    text: Callable[[], str]
    names: Callable[[], list[str]]
    is_table: bool = True
    missing: list[grpc.RpcError] = field(default_factory=list)  # NOT_FOUND of NAMEs asked for


def _get_one(ctx: Context, kind: str, name: str, tenant: str = "") -> Any:
    """One deployment (NAME, with `tenant` or the caller's own, or TENANT/NAME), node or tenant,
    read by name (NOT_FOUND raised as it comes)."""
    if kind == "deployment":
        ref = deployment_ref(name, tenant)
        return ctx.controller.deployments.GetDeployment(
            deployments_pb2.GetDeploymentRequest(name=ref.name, tenant=ref.tenant), timeout=ctx.rpc_timeout)
    if kind == "node":
        return ctx.controller.admin.GetNode(admin_pb2.GetNodeRequest(id=name), timeout=ctx.rpc_timeout)
    return ctx.controller.admin.GetTenant(admin_pb2.GetTenantRequest(id=name), timeout=ctx.rpc_timeout)


def _each(names: Sequence[str], get: Callable[[str], T],
          key: Callable[[T], object]) -> tuple[list[T], list[grpc.RpcError]]:
    """`get` of every name: what was found, each object once (by `key`: two names of one object,
    `x` and `TENANT/x`, printed it twice, a List that apply refuses), and the NOT_FOUND of each
    that was not (any other failure ends the command)."""
    found: dict[object, T] = {}
    missing: list[grpc.RpcError] = []
    for name in names:
        try:
            got = get(name)
        except grpc.RpcError as exc:
            if status_code(exc) != grpc.StatusCode.NOT_FOUND:
                raise
            missing.append(exc)
            continue
        found.setdefault(key(got), got)
    return list(found.values()), missing


def _named(resource: str, words: Sequence[str]) -> tuple[str, list[str]]:
    """The kind and the NAMEs of `get RESOURCE [NAME...]`, where RESOURCE may itself be a NAME
    as `-o name` prints it (`get deployment/lab/chat node/n1` is refused: one kind per get),
    and a NAME may say the kind again (`get deployment deployment/lab/chat`)."""
    kind = RESOURCES.get(resource.partition("/")[0])
    if kind is None:
        raise CliError(f"get: unknown resource {resource!r} (one of {', '.join(sorted(RESOURCES))}, or KIND/NAME)",
                       Exit.USAGE)
    if kind not in _NAMED.values():  # topology, placements, events: any NAME is refused below
        return kind, [resource, *words] if "/" in resource else list(words)
    return kind_and_names("get", [resource, *words], _NAMED)


def run(args: argparse.Namespace, ctx: Context) -> int:
    kind, args.names = _named(args.resource, args.names)
    if "/" in args.resource:
        args.resource = kind
    given = {k for k in ("tenant", "rack", "selector", "for_object", "limit") if getattr(args, k, None) is not None}
    refused = sorted(given - FILTERS[kind])
    if refused:
        hint = f" (it takes {', '.join(_FLAG[f] for f in sorted(FILTERS[kind]))})" if FILTERS[kind] else ""
        raise CliError(f"get {args.resource}: {_FLAG[refused[0]]} does not apply to {kind}s{hint}", Exit.USAGE)
    if kind == "event":
        return _events(args, ctx)
    if kind in ("topology", "placement") and args.names:
        raise CliError(f"get {args.resource} takes no NAME", Exit.USAGE)
    if args.names and given - {"for_object", "limit"} - ({"tenant"} if kind == "deployment" else set()):
        raise CliError("give either NAMEs or filters, not both", Exit.USAGE)
    fetch = {"deployment": _deployments, "node": _nodes, "tenant": _tenants, "topology": _topology,
             "placement": _placements}[kind]
    if not args.watch:
        listing = fetch(args, ctx)
        if len(listing.missing) < len(args.names) or not args.names:  # something to show
            _emit(listing, ctx)
        for exc in listing.missing:
            ctx.note(rpc_error_text(exc, ctx.address))
        return Exit.NOT_FOUND if listing.missing else Exit.OK
    return _watch(lambda: _all_found(fetch(args, ctx)), args.interval, ctx)


def _all_found(listing: Listing) -> Listing:
    """A watch of NAMEs follows them all: one missing ends it, NOT_FOUND."""
    if listing.missing:
        raise listing.missing[0]
    return listing


def _emit(listing: Listing, ctx: Context) -> None:
    ctx.emit(listing.document, listing.text, names=listing.names, is_table=listing.is_table)


def _printed(listing: Listing, ctx: Context) -> str:
    """What `_emit` prints of `listing` in the chosen format, to tell a change by: a table of
    nodes stays the same from one heartbeat to the next, their document does not, and a watch of
    the document printed the same table again every few seconds."""
    if ctx.json:
        return repr(listing.document())
    if ctx.output == "name":
        return repr(list(listing.names()))
    return listing.text()


def _watch_polls(ctx: Context, interval: float) -> Polls:
    return Polls(ctx, "watch", f"polling again every {interval:g}s")


def _watch(fetch: Callable[[], Listing], interval: float, ctx: Context) -> int:
    shown: str | None = None
    polls = _watch_polls(ctx, interval)
    listing: Listing | None = fetch()  # the first: a controller not there ends the command
    while True:
        if listing is not None and (snapshot := _printed(listing, ctx)) != shown:
            if shown is not None and not ctx.json:
                ctx.out(f"--- {time.strftime('%H:%M:%S')}")
            _emit(listing, ctx)
            shown = snapshot
        time.sleep(interval)
        listing = polls.poll(fetch)


def _deployments(args: argparse.Namespace, ctx: Context) -> Listing:
    stub = ctx.controller.deployments
    missing: list[grpc.RpcError] = []
    if args.names:
        refs = [deployment_ref(n, args.tenant) for n in args.names]  # every NAME checked before a call
        deps, missing = _each(refs, lambda r: _get_one(ctx, "deployment", r.name, r.tenant),
                              key=lambda d: (d.spec.tenant, d.spec.name))
        if len(deps) == 1 and not missing and not ctx.wide:
            return Listing(lambda: deployment_document(deps[0]), lambda: deployment_detail(deps[0]),
                           lambda: [deployment_name(deps[0].spec.tenant, deps[0].spec.name)], is_table=False,
                           missing=missing)
    else:
        response = list_all(stub.ListDeployments, deployments_pb2.ListDeploymentsRequest(tenant=args.tenant or ""),
                            "deployments", timeout=ctx.rpc_timeout)
        deps = sorted(response.deployments, key=lambda d: (d.spec.name, d.spec.tenant))
        if args.rack:
            deps = [d for d in deps if any(p.rack == args.rack for p in d.placements)]
    return Listing(lambda: list_document(deployment_document(d) for d in deps),
                   lambda: deployments_table(deps, wide=ctx.wide),
                   lambda: [deployment_name(d.spec.tenant, d.spec.name) for d in deps], missing=missing)


def _nodes(args: argparse.Namespace, ctx: Context) -> Listing:
    admin = ctx.controller.admin
    missing: list[grpc.RpcError] = []
    if args.names:
        nodes, missing = _each(args.names, lambda n: _get_one(ctx, "node", n), key=lambda n: n.id)
        if len(nodes) == 1 and not missing and not ctx.wide:
            return Listing(lambda: node_document(nodes[0]), lambda: node_detail(nodes[0]),
                           lambda: [f"node/{nodes[0].id}"], is_table=False, missing=missing)
    else:
        response = list_all(admin.ListNodes, admin_pb2.ListNodesRequest(rack=args.rack or ""), "nodes",
                            timeout=ctx.rpc_timeout)
        nodes = sorted(response.nodes, key=lambda n: n.id)
        if args.tenant:
            nodes = [n for n in nodes if args.tenant in n.tenants]
        if args.selector:
            wanted = parse_selector(args.selector).items()
            nodes = [n for n in nodes if all(n.labels.get(k) == v for k, v in wanted)]
    return Listing(lambda: list_document(node_document(n) for n in nodes),
                   lambda: nodes_table(nodes, wide=ctx.wide), lambda: [f"node/{n.id}" for n in nodes], missing=missing)


def _tenants(args: argparse.Namespace, ctx: Context) -> Listing:
    admin = ctx.controller.admin
    missing: list[grpc.RpcError] = []
    tenants: Sequence[admin_pb2.Tenant]
    if args.names:
        tenants, missing = _each(args.names, lambda n: _get_one(ctx, "tenant", n), key=lambda t: t.id)
        if len(tenants) == 1 and not missing:
            return Listing(lambda: tenant_document(tenants[0]), lambda: tenants_table(tenants),
                           lambda: [f"tenant/{tenants[0].id}"], missing=missing)
    else:
        tenants = list_all(admin.ListTenants, admin_pb2.ListTenantsRequest(), "tenants",
                           timeout=ctx.rpc_timeout).tenants
    ordered = sorted(tenants, key=lambda t: t.id)
    return Listing(lambda: list_document(tenant_document(t) for t in ordered),
                   lambda: tenants_table(tenants), lambda: [f"tenant/{t.id}" for t in ordered], missing=missing)


def _topology(args: argparse.Namespace, ctx: Context) -> Listing:
    topology = ctx.controller.admin.GetTopology(admin_pb2.GetTopologyRequest(), timeout=ctx.rpc_timeout)
    return Listing(lambda: topology_document(topology), lambda: topology_view(topology), lambda: ["topology"],
                   is_table=False)


def _placements(args: argparse.Namespace, ctx: Context) -> Listing:
    response = list_all(ctx.controller.deployments.ListDeployments,
                        deployments_pb2.ListDeploymentsRequest(tenant=args.tenant or ""), "deployments",
                        timeout=ctx.rpc_timeout)
    deps = list(response.deployments)
    rows = shard_rows(deps, args.rack)
    return Listing(
        lambda: list_document({"kind": "Placement", "deployment": d.spec.name, "tenant": d.spec.tenant,
                               **placement_document(p)} for d, p in rows),
        lambda: cluster_placements_table(deps, args.rack),
        lambda: [placement_name(d.spec.tenant, d.spec.name, p.replica, p.shard) for d, p in rows])


def parse_object(text: str) -> tuple[str, str]:
    """'node/rack-00-n01' -> ('node', 'rack-00-n01'); a bare name is a deployment."""
    kind, sep, name = text.partition("/")
    if not sep:
        return "deployment", text
    kind = RESOURCES.get(kind, kind)
    if kind not in EVENT_KINDS or not name:
        raise CliError(f"--for {text!r}: expected KIND/NAME with KIND one of {', '.join(EVENT_KINDS)}", Exit.USAGE)
    return kind, name


def fetch_events(ctx: Context, kind: str = "", name: str = "", after_id: int = 0,
                 limit: int = 50, tenant: str = "", oldest_first: bool = False) -> list[admin_pb2.EventRecord]:
    """Events, of one object when `kind` and `name` are given (a deployment: NAME in `tenant`, or TENANT/NAME)."""
    return list(_list_events(ctx, kind, name, after_id, limit, tenant, oldest_first).events)


def _list_events(ctx: Context, kind: str, name: str, after_id: int, limit: int, tenant: str,
                 oldest_first: bool) -> admin_pb2.ListEventsResponse:
    if kind == "deployment" and name:
        ref = deployment_ref(name, tenant)
        name, tenant = ref.name, ref.tenant
    elif tenant:
        raise CliError("-n/--tenant with events goes with --for deployment/NAME", Exit.USAGE)
    response = ctx.controller.admin.ListEvents(
        admin_pb2.ListEventsRequest(object_kind=kind, object_id=name, tenant=tenant, after_id=after_id, limit=limit,
                                    oldest_first=oldest_first),
        timeout=ctx.rpc_timeout)
    return response


def _deleted_through(exc: grpc.RpcError) -> int | None:
    """The highest id the controller's event retention deleted, if `exc` is its OUT_OF_RANGE."""
    if status_code(exc) != grpc.StatusCode.OUT_OF_RANGE:
        return None
    for key, value in getattr(exc, "trailing_metadata", lambda: None)() or ():
        if key == limits.EVENTS_DELETED_THROUGH_METADATA_KEY and value.isdigit():
            return int(value)
    return None


def _must_exist(ctx: Context, kind: str, name: str, tenant: str) -> None:
    """NOT_FOUND raised when the object of `--for` does not exist: its having no events says
    nothing (a deleted one keeps its history for the controller's --event-ttl, so this is asked
    only when there is none). One read; an answer other than NOT_FOUND (a tenant's token may not
    read nodes) leaves the empty list be."""
    if kind == "topology":  # always exists
        return
    try:
        _get_one(ctx, kind, name, tenant)
    except grpc.RpcError as exc:
        if status_code(exc) == grpc.StatusCode.NOT_FOUND:
            raise


def _events(args: argparse.Namespace, ctx: Context) -> int:
    """`get events [--for KIND/NAME] [--watch]`: the newest --limit, then (watch) new ones as they come."""
    if args.names:
        raise CliError("get events takes no NAME (use --for KIND/NAME)", Exit.USAGE)
    limit = 50 if args.limit is None else args.limit  # at least 1: `count`
    kind, name = parse_object(args.for_object) if args.for_object else ("", "")
    first = _list_events(ctx, kind, name, 0, limit, args.tenant or "", False)
    events = list(first.events)
    if not events and name and not args.watch:  # a watch may wait for the object to come
        _must_exist(ctx, kind, name, args.tenant or "")
    ctx.emit(lambda: list_document(event_document(e) for e in events), lambda: events_table(events),
             names=lambda: [f"event/{e.id}" for e in events], is_table=True)
    follower = EventFollower(events)
    polls = _watch_polls(ctx, args.interval)

    def page_after(after_id: int) -> tuple[list[admin_pb2.EventRecord], int]:
        reply = _list_events(ctx, kind, name, after_id, PAGE, args.tenant or "", True)
        return list(reply.events), reply.read_through

    while args.watch:
        time.sleep(args.interval)
        after = follower.after_id()
        try:
            read = polls.poll(lambda: read_after(page_after, after), back="; showing the events not shown yet")
        except grpc.RpcError as exc:
            if (through := _deleted_through(exc)) is None:
                raise
            if through > first.read_through:  # else all it deleted was older than the first listing's newest
                ctx.note(f"(watch: the events after {max(after, first.read_through)} up to {through} were deleted by the "
                         f"controller's event retention before they were shown; following from {through})")
            follower.skip_to(through)
            continue
        new = follower.fresh(*read) if read else []
        if not new:
            continue
        if ctx.output == "json":
            for e in new:  # one compact document per line while following
                ctx.stdout.write(json.dumps(event_document(e)) + "\n")
            ctx.stdout.flush()
        elif ctx.output == "yaml":  # a YAML stream: each event a document of its own
            ctx.stdout.write("".join("---\n" + yaml_text(event_document(e)) for e in new))
            ctx.stdout.flush()
        elif ctx.output == "name":
            ctx.out("\n".join(f"event/{e.id}" for e in new))
        else:
            ctx.out("\n".join(events_table(new).splitlines()[1:]))
    return Exit.OK
