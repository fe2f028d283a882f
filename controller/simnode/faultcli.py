"""`maia-simnode fault VERB ...`: inject faults into a running fleet through its control socket.

The fleet was started with `--control-socket PATH` (`controller/simnode/faults.py` serves it);
every verb sends one JSON request and prints the answer. Exit status: 0 done, 2 refused (bad
flags, an unknown node or rack, no shard to fail; nothing was changed), 5 no fleet answers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controller.pipes import BROKEN_PIPE_EXIT, quiet_stdout

CONTROL_ENV = "MAIA_SIMNODE_CONTROL"
EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 2, 5

_DURATION_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class FleetUnreachable(Exception):
    """No fleet serves the control socket."""


def parse_duration(text: str) -> float:
    """'500ms', '2s', '1.5m', '1h' or plain seconds -> seconds."""
    match = _DURATION_RE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration such as 500ms, 30s or 2m, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def send(path: Path, request: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
    """One request to the fleet serving `path`, its answer (FleetUnreachable if none serves it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout_s)
        try:
            conn.connect(str(path))
            conn.sendall(json.dumps(request).encode() + b"\n")
            with conn.makefile("rb") as answer:
                line = answer.readline()
        except OSError as exc:
            raise FleetUnreachable(f"no fleet answers on {path}: {exc.strerror or exc}") from None
    if not line:
        raise FleetUnreachable(f"the fleet on {path} closed the connection without an answer")
    return json.loads(line)


def _node_list(text: str) -> list[str]:
    return [part for part in (p.strip() for p in text.split(",")) if part]


def _common_flags(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--control-socket and -o, before the VERB (`defaults`: their defaults) or after it (no
    defaults of their own, so a flag given before the verb is not overwritten)."""
    keep = argparse.SUPPRESS
    parser.add_argument("--control-socket", type=Path, metavar="PATH",
                        default=(os.environ.get(CONTROL_ENV) or None) if defaults else keep,
                        help=f"the fleet's control socket (its --control-socket; default: ${CONTROL_ENV})")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text" if defaults else keep)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _common_flags(common, defaults=False)
    targets = argparse.ArgumentParser(add_help=False)
    group = targets.add_argument_group("which nodes (any mix of --node and --rack, or --all)")
    group.add_argument("--node", dest="nodes", action="extend", type=_node_list, default=[], metavar="ID[,ID...]")
    group.add_argument("--rack", dest="racks", action="extend", type=_node_list, default=[], metavar="RACK[,RACK...]")
    group.add_argument("--all", action="store_true", help="every node of the fleet")
    timed = argparse.ArgumentParser(add_help=False)
    timed.add_argument("--for", dest="for_s", type=parse_duration, metavar="DURATION",
                       help="undo it after DURATION (30s, 2m); default: until `fault revive`")

    p = argparse.ArgumentParser(prog="maia-simnode fault",
                                description="Inject faults into a running maia-simnode fleet (see docs/simnode.md).")
    _common_flags(p, defaults=True)  # before the VERB too: `fault --control-socket S kill ...`
    verbs = p.add_subparsers(dest="op", metavar="VERB", required=True)
    verbs.add_parser("kill", parents=[common, targets, timed],
                     help="the hosts die: streams cut, every shard lost, silent until revived")
    verbs.add_parser("partition", parents=[common, targets, timed],
                     help="the nodes stop talking to the controller (streams open but silent, no reconnects)")
    delay = verbs.add_parser("delay-heartbeats", parents=[common, targets, timed],
                             help="BY more between heartbeats (0 ends it)")
    delay.add_argument("--by", dest="delay_s", type=parse_duration, required=True, metavar="DURATION")
    flap = verbs.add_parser("flap", parents=[common, targets, timed],
                            help="drop the stream every PERIOD, back after DOWN (shards kept)")
    flap.add_argument("--period", dest="period_s", type=parse_duration, default=2.0, metavar="DURATION")
    flap.add_argument("--down", dest="down_s", type=parse_duration, default=None, metavar="DURATION",
                      help="how long each drop lasts (default: half the period, at most 0.5s)")
    flap.add_argument("--count", type=int, default=None, help="how many drops (default 5, or until --for ends)")
    verbs.add_parser("revive", parents=[common, targets],
                     help="undo kill, partition, flap and heartbeat delay: the nodes connect again")
    fail = verbs.add_parser("fail-shard", parents=[common, targets],
                            help="the agent holding a shard reports it FAILED with a message")
    fail.add_argument("--deployment", required=True, help="deployment id, or its name after the last '/'")
    fail.add_argument("--replica", type=int, default=None, help="only this replica (default: every one)")
    fail.add_argument("--shard", type=int, default=None, help="only this shard (default: every one)")
    fail.add_argument("--message", default="injected fault", help="the FAILED report's message")
    fail.add_argument("--keep-failing", action="store_true",
                      help="every later load of a matching shard fails too (on the nodes named, if any), "
                           "until `fault stop-failing`")
    acc = verbs.add_parser("fail-accelerator", parents=[common, targets, timed],
                           help="an accelerator of the nodes fails: their heartbeats list it until repaired")
    acc.add_argument("--index", type=int, required=True, help="which accelerator (0..accelerators-1)")
    acc.add_argument("--reason", default=None, help="what the agent says of it (default: injected accelerator fault)")
    fix = verbs.add_parser("repair-accelerator", parents=[common, targets],
                           help="a failed accelerator of the nodes works again")
    fix.add_argument("--index", type=int, default=None, help="which one (default: every failed one)")
    stop = verbs.add_parser("stop-failing", parents=[common], help="end --keep-failing rules")
    stop.add_argument("--deployment", default=None,
                      help="only the rules of this deployment, TENANT/NAME or NAME as fail-shard named it "
                           "(default: all)")
    verbs.add_parser("status", parents=[common], help="what is injected, how many nodes are connected")
    return p


def request_of(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON request a parsed command line sends."""
    fields = ("nodes", "racks", "all", "for_s", "delay_s", "period_s", "down_s", "count", "deployment",
              "replica", "shard", "message", "keep_failing", "index", "reason")
    request = {"op": args.op}
    for name in fields:
        value = getattr(args, name, None)
        if value is not None and value is not False and value != []:
            request[name] = value
    return request


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.control_socket is None:
        parser.error(f"--control-socket (or ${CONTROL_ENV}) is required: the path the fleet serves")
    try:
        answer = send(args.control_socket, request_of(args))
    except FleetUnreachable as exc:
        print(f"maia-simnode fault: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        _print(args, answer)
    except BrokenPipeError:  # whoever read stdout stopped (`... -o json | head`): controller/pipes.py
        quiet_stdout()
        return BROKEN_PIPE_EXIT
    if not answer.get("ok"):
        print(f"maia-simnode fault: {answer.get('error', 'refused')}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def _print(args: argparse.Namespace, answer: dict[str, Any]) -> None:
    if args.output == "json":
        print(json.dumps(answer, indent=1, sort_keys=True))
    elif answer.get("ok"):
        print(answer.get("message", "done"))
        for node_id, kinds in sorted(answer.get("faults", {}).items()):
            print(f"  {node_id}: {', '.join(kinds)}")
        for pattern in answer.get("failing", []):
            print(f"  shards of {pattern}: every load fails")
    sys.stdout.flush()  # a reader gone fails here, not in the exit's flush
