"""`maiactl summary`: nodes, accelerators, power and deployments of the whole cluster."""
from __future__ import annotations

import argparse

from controller.cli.context import Context
from controller.cli.views import summary_view
from maia.v1 import admin_pb2


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("summary", parents=[common], help="cluster totals and per-tenant usage")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    summary = ctx.controller.admin.GetClusterSummary(admin_pb2.GetClusterSummaryRequest(),
                                                     timeout=ctx.rpc_timeout)
    ctx.emit_json(summary) if ctx.json else ctx.out(summary_view(summary))
    return 0
