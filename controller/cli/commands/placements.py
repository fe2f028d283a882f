"""`maiactl placements`: every shard in the cluster; the same as `maiactl get placements`."""
from __future__ import annotations

import argparse

from controller.cli.commands import get
from controller.cli.context import Context


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("placements", parents=[common], help="every placed shard in the cluster (= get placements)")
    p.add_argument("--tenant", help="one tenant only")
    p.add_argument("--rack", help="one rack only")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    return get.run(argparse.Namespace(resource="placements", names=[], tenant=args.tenant, rack=args.rack,
                                      selector=None, watch=False, interval=2.0), ctx)
