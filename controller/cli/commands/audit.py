"""`maiactl audit list [--tenant T] [--since WHEN]` and `maiactl audit verify [--expect-head SEQ:HASH]`.

`list -o json|yaml` prints a List of AuditEvent documents, as `get events` prints its events.
`verify` exits 0 when the chain is intact and prints its head (seq and hash): keep that line
somewhere outside the controller's database and pass it back with --expect-head to detect a
tail rewritten together with the head record. When the chain is broken it names the first bad
entry and exits 1. Where the controller deletes entries past `--audit-ttl`, it says from which
entry on the chain was checked.
"""
from __future__ import annotations

import argparse
import re
from datetime import datetime, timezone


from controller.cli.bounds import back_from, count
from controller.cli.client import CliError, Exit
from controller.cli.context import Context
from controller.cli.documents import list_document, message_document
from controller.cli.tables import render_table
from maia.v1 import audit_pb2

_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PAGE_SIZE = 1000


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """'15m', '24h', '7d' ago, or an ISO 8601 time (UTC unless it says otherwise)."""
    match = _RELATIVE.match(text.strip())
    if match:
        return back_from(now or datetime.now(timezone.utc), int(match[1]) * _UNIT_S[match[2]], text)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (90s, 15m, 24h, 7d) nor an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _head(text: str) -> tuple[int, str]:
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or int(seq) < 1 or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise argparse.ArgumentTypeError(f"{text!r} is not SEQ:HASH as printed by `maiactl audit verify`")
    return int(seq), digest


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    audit = sub.add_parser("audit", help="the hash-chained audit log: list entries, verify the chain")
    verbs = audit.add_subparsers(dest="audit_command", metavar="VERB", required=True)
    p = verbs.add_parser("list", parents=[common], help="audit entries in order (a tenant token: its own only)")
    p.add_argument("--tenant", default="", help="only this tenant's entries")
    p.add_argument("--since", type=parse_since, metavar="WHEN", help="only entries since WHEN (24h, 7d, ISO time)")
    p.add_argument("--limit", type=count(), metavar="N", help="at most N entries (default: all)")
    p.set_defaults(handler=run_list)
    v = verbs.add_parser("verify", parents=[common], help="check the chain; exit 0 when intact, 1 naming "
                                                          "the first bad entry otherwise")
    v.add_argument("--expect-head", type=_head, metavar="SEQ:HASH",
                   help="a head printed by an earlier verify: also detects a rewritten tail")
    v.set_defaults(handler=run_verify)


def _events(args: argparse.Namespace, ctx: Context) -> list[audit_pb2.AuditEvent]:
    request = audit_pb2.ListAuditEventsRequest(tenant=args.tenant, page_size=_PAGE_SIZE)
    if args.since is not None:
        request.since.FromDatetime(args.since)  # to the microsecond (whole seconds listed up to 1 s more)
    events: list[audit_pb2.AuditEvent] = []
    while True:
        page = ctx.controller.audit.ListAuditEvents(request, timeout=ctx.rpc_timeout)
        events.extend(page.events)
        if not page.next_page_token or (args.limit and len(events) >= args.limit):
            return events[: args.limit] if args.limit else events
        request.page_token = page.next_page_token


def _table(events: list[audit_pb2.AuditEvent]) -> str:
    rows = [
        (e.seq, e.at.ToDatetime(tzinfo=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), e.actor, e.role, e.tenant,
         e.action.rpartition("/")[2] if e.action.startswith("/") else e.action,
         f"{e.object_kind}/{e.object_id}" if e.object_id else e.object_kind, e.outcome, e.request_id)
        for e in events
    ]
    return render_table(("seq", "time", "actor", "role", "tenant", "action", "object", "outcome", "request"), rows,
                        empty="(no audit entries)")


def run_list(args: argparse.Namespace, ctx: Context) -> int:
    events = _events(args, ctx)
    ctx.emit(lambda: list_document({"kind": "AuditEvent", **message_document(e)} for e in events),
             lambda: _table(events), is_table=True,
             names=lambda: (f"audit/{e.seq}" for e in events))
    return Exit.OK


def run_verify(args: argparse.Namespace, ctx: Context) -> int:
    request = audit_pb2.VerifyAuditLogRequest()
    if args.expect_head is not None:
        request.expected_head_seq, request.expected_head_hash = args.expect_head
    report = ctx.controller.audit.VerifyAuditLog(request, timeout=ctx.rpc_timeout)
    if ctx.json:
        ctx.emit_json(report)
    elif report.intact:
        since = f" from entry {report.first_seq} (those before it deleted past --audit-ttl)" \
            if report.first_seq > 1 else ""
        ctx.out(f"audit log intact: {report.entries} entries{since}; head {report.head_seq}:{report.head_hash}")
    if not report.intact:
        raise CliError(f"audit log broken at entry {report.first_bad_seq}: {report.problem}", Exit.FAILED)
    return Exit.OK
