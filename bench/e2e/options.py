"""`bench e2e`'s command line: every flag, its default and its help, apart from the run that
reads them (`runner.py`), so that the options can be read in one place."""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, nargs="+", default=[256],
                   help="simulated nodes (multiples of 16: racks of 16 nodes x 4 accelerators)")
    p.add_argument("--db", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"])
    p.add_argument("--clients", type=int, default=16,
                   help="concurrent gRPC clients, each submitting its next deployment when the last was answered "
                        "(closed loop: at saturation a submit's latency is clients / rate, the clients' queue)")
    p.add_argument("--rate", type=float, default=0.0, metavar="PER_S",
                   help="open loop instead: deployments offered at this rate, each submitted at its arrival time "
                        "whatever the answers to the earlier ones (submit latency at a load below saturation); "
                        "0: closed loop (--clients)")
    p.add_argument("--arrivals", choices=["poisson", "even"], default="poisson",
                   help="open loop: exponential gaps between arrivals (poisson) or evenly spaced ones")
    p.add_argument("--submit-batch", type=int, default=1, metavar="K",
                   help="closed loop: each client sends up to K (at most 1000) single-shard deployments per "
                        "SubmitDeployments call (gangs one per call); 1 (the default): one SubmitDeployment each")
    p.add_argument("--fill", type=float, default=0.5,
                   help="share of the cluster's accelerators the submitted deployments ask for")
    p.add_argument("--gang-share", type=float, default=0.25,
                   help="share of the requested accelerators that comes in gangs of 8..64 shards")
    p.add_argument("--delete-every", type=int, default=10,
                   help="delete every this many-th deployment to start running, during the run (0: none)")
    p.add_argument("--deleters", type=int, default=1, metavar="N",
                   help="concurrent deleting clients, each sending its next delete once the last was answered "
                        "(1: one delete after another, never two at the controller at once; more: deletes "
                        "that arrive together, which the controller marks in one batch)")
    p.add_argument("--preload", type=int, default=0, metavar="PLACEMENTS",
                   help="start from a cluster already running this many single-shard deployments "
                        "(written into the database before the controller starts)")
    p.add_argument("--fleets", type=int, default=0,
                   help="maia-simnode processes, started one after the other (0: one per 256 nodes)")
    p.add_argument("--load-delay", type=float, default=0.2, help="simnode LOADING -> RUNNING seconds")
    p.add_argument("--shared-channel", action="store_true",
                   help="each fleet's nodes share one connection to the controller (maia-simnode --shared-channel): "
                        "less of the machine goes to the fleets at 4,096 nodes and more")
    p.add_argument("--fleets-at-once", action="store_true",
                   help="start every fleet at once and wait for all of them (as `bench join` does), not one "
                        "after the other: with --stagger 1, 16,384 nodes join in about ten minutes, not hours")
    p.add_argument("--join-timeout", type=float, default=120.0,
                   help="seconds each fleet has to join (with --fleets-at-once: all of them together)")
    p.add_argument("--stagger", type=float, default=None,
                   help="seconds between one node's start and the next in a fleet (maia-simnode --stagger; "
                        "default: its own)")
    p.add_argument("--fleet-nice", type=int, default=0,
                   help="run the fleets this much nicer than the controller (as `bench join --fleet-nice`)")
    p.add_argument("--others-cpus", type=cpu_list, default=None, metavar="CPUS",
                   help="keep the database server, the simnode fleets and this bench's clients on these CPUs "
                        "(a list such as 1 or 2-3,6), the controller and its decide process free to run on any: "
                        "what the controller would share with them if they ran on other machines, which "
                        "--fleet-nice only approximates (on 2 cores: 1)")
    p.add_argument("--heartbeat-timeout", type=float, default=None,
                   help="the controller's --heartbeat-timeout (agents heartbeat every third of it; default: its own)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up waiting for Running after this")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--controller-log-level", default="WARNING", help="the controller's --log-level")
    p.add_argument("--decide-process", action=argparse.BooleanOptionalAction, default=None,
                   help="the controller's --decide-process / --no-decide-process (default: its default); "
                        "controller CPU counts the decide process's too")
    p.add_argument("--agent-gateways", type=int, default=0, metavar="N",
                   help="the controller serves the agents from N gateway processes (maia-controller "
                        "--agent-gateways); the fleets connect to them; their CPU is counted in the controller's "
                        "and reported apart")
    p.add_argument("--agent-gateway-linger-ms", type=float, default=None, metavar="MS",
                   help="maia-controller --agent-gateway-linger-ms (with --agent-gateways; default: its default)")
    p.add_argument("--pg-statements", type=int, default=0, metavar="N",
                   help="PostgreSQL: load pg_stat_statements, reset it as the submits start and report the N "
                        "statements that took the server's time (and the totals) up to the last Running")
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs, SQLite file)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                   help="a progress line on stderr this often (phase, deployments submitted, committed, "
                        "running, the rate); 0: none")
    p.add_argument("--py-spy", metavar="PATH",
                   help="profile the controller during the run with this py-spy binary: collapsed stacks "
                        "in <run dir>/controller.pyspy.txt (implies --keep; py-spy --nonblocking: sampling never "
                        "pauses the controller, whose stalls would otherwise be the profile)")


def cpu_list(text: str) -> frozenset[int]:
    """`--others-cpus`: CPUs as `1` or `0,2-3`; some of this machine's, never all of them (the
    controller needs one the others do not run on)."""
    usable = os.sched_getaffinity(0)
    try:
        cpus = frozenset(c for part in text.split(",") for c in _cpu_range(part.strip(), max(usable)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of CPUs: {text!r} (e.g. 1 or 2-3,6)") from None
    if not cpus or not cpus < usable:
        raise argparse.ArgumentTypeError(
            f"{text!r} must name some of this process's CPUs ({','.join(map(str, sorted(usable)))}), not all of them")
    return cpus


def _cpu_range(part: str, highest: int) -> range:
    """`3` or `2-5`, within 0..`highest` (past it: not this machine's; a ValueError either way)."""
    first, dash, last = part.partition("-")
    low, high = int(first), int(last if dash else first)
    if not 0 <= low <= high <= highest:
        raise ValueError(part)
    return range(low, high + 1)
