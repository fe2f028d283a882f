"""`maiactl usage`: metered accelerator-hours and energy per tenant, deployment, model and zone.

`--since` / `--until` take an ISO-8601 time (`2026-11-30`, `2026-11-30T08:00`, `...Z`; UTC
when no offset is given) or a duration back from now (`90m`, `24h`, `7d`); since must be before
until (now when not given), or the command is refused (exit 2). `-o csv` prints one header line
and one line per record (for spreadsheets and billing scripts), each with the window it covers
(`since`, empty from the start, and `until`, as the controller clamped it to its now); `-o name` is refused (exit 2):
a record is no object with a name.
"""
from __future__ import annotations

import argparse
import csv
import re
from datetime import datetime, timezone

from controller.cli.bounds import back_from
from controller.cli.client import CliError, Exit
from controller.cli.context import Context
from controller.cli.tables import render_table
from maia.v1 import deployments_pb2

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The window on every row (`since` empty: from the start): a billing script reads what a file
# covers, `until` as the controller clamped it to its now.
CSV_FIELDS = ("tenant", "deployment", "accelerator_model", "zone", "accelerator_seconds", "accelerator_hours",
              "energy_kwh", "since", "until")


def _stamp(at: datetime) -> str:
    """RFC 3339 in UTC to the millisecond: 2026-12-06T01:12:37.377Z."""
    return at.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO-8601 time (UTC unless it says otherwise) or a duration ago ('24h')."""
    now = now or datetime.now(timezone.utc)
    ago = _AGO.match(text.strip())
    if ago:
        return back_from(now, float(ago.group(1)) * _UNIT_S[ago.group(2)], text)
    try:
        at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO-8601 time (2026-11-30T08:00Z) nor a duration ago (90m, 24h, 7d)") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("usage", parents=[common], help="metered accelerator-hours and kWh (-o table|json|csv)")
    p.add_argument("--tenant", default="", help="one tenant only (a tenant's token sees only its own)")
    p.add_argument("--since", type=parse_time, help="start of the window: ISO-8601 time or a duration ago (24h)")
    p.add_argument("--until", type=parse_time, help="end of the window (default: now)")
    p.set_defaults(handler=run, csv_output=True)


def run(args: argparse.Namespace, ctx: Context) -> int:
    if ctx.output == "name":
        raise CliError("-o name is not supported by usage: its records are no objects with names "
                       "(use -o table, json, yaml or csv)", Exit.USAGE)
    until = args.until or datetime.now(timezone.utc)
    if args.since is not None and args.since >= until:  # as the controller says it of a --until given
        raise CliError(f"since ({args.since.isoformat()}) must be before until ({until.isoformat()}"
                       f"{'' if args.until else ', now'})", Exit.USAGE)
    request = deployments_pb2.GetUsageRequest(tenant=args.tenant)
    for field, at in (("since", args.since), ("until", args.until)):
        if at is not None:
            getattr(request, field).FromDatetime(at)
    reply = ctx.controller.deployments.GetUsage(request, timeout=ctx.rpc_timeout)
    since = _stamp(reply.since.ToDatetime(tzinfo=timezone.utc)) if reply.HasField("since") else ""
    until = _stamp(reply.until.ToDatetime(tzinfo=timezone.utc))
    if ctx.json:
        ctx.emit_json(reply)
    elif ctx.output == "csv":
        writer = csv.writer(ctx.stdout, lineterminator="\n")
        writer.writerow(CSV_FIELDS)
        for r in reply.records:
            writer.writerow([r.tenant, r.deployment, r.accelerator_model, r.zone, f"{r.accelerator_seconds:.3f}",
                             f"{r.accelerator_hours:.6f}", f"{r.energy_kwh:.6f}", since, until])
        ctx.stdout.flush()
    else:
        ctx.out(render_table(
            ("tenant", "deployment", "model", "zone", "accel-hours", "energy-kwh"),
            # Fixed three places, as the total below: a float cell shows one or two, and 0.0036
            # hours read "0" under a total of 0.022 that the rows did not add up to.
            [(r.tenant, r.deployment, r.accelerator_model, r.zone, f"{r.accelerator_hours:.3f}",
              f"{r.energy_kwh:.3f}") for r in reply.records],
        ))
        hours = sum(r.accelerator_hours for r in reply.records)
        kwh = sum(r.energy_kwh for r in reply.records)
        ctx.out(f"\n{hours:.3f} accelerator-hours, {kwh:.3f} kWh from {since or 'the start'} to {until}")
    return 0
