"""maia-simnode entry point: parse flags, start the fleet (its nodes holding the shards a previous
run left them, `shardstate.py`, and its fault-injection control socket with --control-socket),
stop it on SIGINT/SIGTERM (exit 0). `maia-simnode fault ...`
is the client of that socket (`controller/simnode/faultcli.py`)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import grpc

from controller import limits
from controller.aio import on_stop_signals, stopped_ignoring_sigterm
from controller.cli.bounds import count
from controller.gcpolicy import configure_gc
from controller.openfiles import raise_open_files_limit
from controller.bearer import CONTROLLER_ENV, TOKEN_ENV
from controller.flagtypes import finite_number
from controller.simnode import faultcli
from controller.simnode.credentials import CredentialFile, default_state_dir, unwritable
from controller.simnode.faults import ControlServer, FaultError, FaultInjector
from controller.simnode.fleet import Fleet, FleetShape
from controller.simnode.shardstate import ShardStateFile
from controller.simnode.transport import REGISTER_TIMEOUT_S, SimulatedNode

log = logging.getLogger("simnode")


# The longest heartbeat interval: a day (Hello carries it in int32 milliseconds, ~24.8 days at most).
HEARTBEAT_INTERVAL_MAX_S = 86_400.0
# The longest of the other durations: a day too (a stagger or a load delay of more is a typo).
SECONDS_MAX = 86_400.0


def _number(text: str, *, least: float, inclusive: bool, most: float = math.inf) -> float:
    """A finite number (`finite_number`) from `least` (excluded unless `inclusive`) to `most`."""
    value = finite_number(text)
    if value < least or (value == least and not inclusive):
        raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'more than'} {least:g}, got {text}")
    if value > most:
        raise argparse.ArgumentTypeError(f"must be at most {most:.15g}, got {text}")
    return value


def _seconds(*, zero: bool) -> Callable[[str], float]:
    """A duration flag: more than 0 (or 0 too, `zero`), at most `SECONDS_MAX`."""
    return lambda text: _number(text, least=0.0, inclusive=zero, most=SECONDS_MAX)


def _quantity(most: float) -> Callable[[str], float]:
    """An amount (GiB, watts): at least 0, at most what the controller takes in a Register
    (`controller.limits`; beyond it every node was refused INVALID_ARGUMENT)."""
    return lambda text: _number(text, least=0.0, inclusive=True, most=most)


def _interval(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return _number(text, least=0.0, inclusive=False, most=HEARTBEAT_INTERVAL_MAX_S)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"expected 'auto' or seconds: {exc}") from None


def _model(text: str) -> str:
    """An accelerator model as a Register carries it (`limits.MODEL_MAX`, no control character)."""
    if len(text) > limits.MODEL_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {limits.MODEL_MAX} characters, got {len(text)}")
    if re.search(limits.CONTROL_CHARACTERS, text):
        raise argparse.ArgumentTypeError(f"must hold no control character, got {text!r}")
    return text


def _check_fleet(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """At most `limits.SIMNODE_FLEET_NODES_MAX` nodes, and rack and node ids (`--rack-prefix` and
    the indexes) the controller takes (`limits.ID_PATTERN`, at most `limits.ID_MAX` characters;
    else every node's Register is refused INVALID_ARGUMENT). The last node's id is judged: every
    id holds the prefix, the others' digits are as many, and a node's id is its rack's and "-nNN"."""
    nodes = args.racks * args.nodes_per_rack
    if nodes > limits.SIMNODE_FLEET_NODES_MAX:
        parser.error(f"--racks {args.racks} x --nodes-per-rack {args.nodes_per_rack} is {nodes:,} nodes; one fleet "
                     f"runs at most {limits.SIMNODE_FLEET_NODES_MAX:,} (start several)")
    shape = FleetShape(racks=args.racks, nodes_per_rack=args.nodes_per_rack, rack_prefix=args.rack_prefix)
    last = shape.node_id(shape.rack_id(args.racks - 1), args.nodes_per_rack - 1)
    quoted = limits.QUOTED_VALUE_MAX
    if not re.fullmatch(limits.ID_PATTERN, last):
        parser.error(f"--rack-prefix {args.rack_prefix[:quoted]!r} makes ids the controller refuses (such as "
                     f"{last[-quoted:]!r}): use letters, digits, '-', '_' and '.', starting with a letter or digit")
    if len(last) > limits.ID_MAX:
        parser.error(f"--rack-prefix of {len(args.rack_prefix)} characters makes node ids of {len(last)} "
                     f"(the last: ...{last[-quoted:]}); the controller takes at most {limits.ID_MAX}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """maia-simnode's flags; a value, or a fleet, the controller would not take exits 2 with
    argparse's usage and one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_fleet(parser, args)
    return args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maia-simnode",
                                description="Run a fleet of simulated Maia node agents against a controller. "
                                            "`maia-simnode fault --help`: inject faults into a running fleet.")
    p.add_argument("--controller", default=os.environ.get(CONTROLLER_ENV) or "127.0.0.1:50051",
                   metavar="HOST:PORT[,HOST:PORT...]",
                   help="the controller, or several (comma-separated): nodes follow the leader among them "
                        f"(default: ${CONTROLLER_ENV}, as maiactl reads it, else 127.0.0.1:50051)")
    p.add_argument("--token", default=None, metavar="TOKEN",
                   help=f"node-bootstrap (or admin) token to register with (default: ${TOKEN_ENV})")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help="where each node's credential (issued by Register) and the shards it holds are kept, "
                        "0600 files per cluster (its set of controllers) and rack prefix: a restarted fleet's "
                        f"nodes report their shards still running (default: {default_state_dir()})")
    p.add_argument("--forget-shards", action="store_true",
                   help="start every node with no shards, as hosts that rebooted, instead of with those the "
                        "fleet's last run left them (the controller places the shards it gave them again)")
    p.add_argument("--racks", type=count(limits.TOPOLOGY_ITEMS_MAX), required=True,
                   help=f"how many racks (at most {limits.TOPOLOGY_ITEMS_MAX}, the racks a topology holds)")
    p.add_argument("--nodes-per-rack", type=count(), required=True,
                   help=f"nodes in each rack (the fleet: at most {limits.SIMNODE_FLEET_NODES_MAX:,} nodes)")
    p.add_argument("--rack-prefix", default="rack-", metavar="PREFIX",
                   help="racks are PREFIX00, PREFIX01, ..., nodes PREFIX00-n00, ...: ids the controller takes "
                        f"(letters, digits, '-', '_' and '.', at most {limits.ID_MAX} characters; default: rack-)")
    p.add_argument("--load-delay", type=_seconds(zero=True), default=1.0, metavar="SECONDS",
                   help="time from LOADING to RUNNING for a new shard")
    p.add_argument("--accelerators", type=count(limits.NODE_ACCELERATORS_MAX), default=4,
                   help=f"accelerators per node (1..{limits.NODE_ACCELERATORS_MAX})")
    p.add_argument("--model", type=_model, default="maia-100", help="accelerator model (default: maia-100)")
    p.add_argument("--hbm-gib", type=_quantity(limits.HBM_GIB_MAX), default=64.0,
                   help=f"HBM per accelerator, GiB (at most {limits.HBM_GIB_MAX:.15g}; 0: not said)")
    p.add_argument("--idle-power-w", type=_quantity(limits.POWER_W_MAX), default=600.0,
                   help=f"each node's idle power draw, watts (at most {limits.POWER_W_MAX:.15g})")
    p.add_argument("--heartbeat-interval", type=_interval, default=None, metavar="auto|SECONDS",
                   help="default: what the controller asks for at registration, and later on the stream "
                        "(HeartbeatPolicy: the cluster grew); a number here ignores both")
    p.add_argument("--register-timeout", type=_seconds(zero=False), default=REGISTER_TIMEOUT_S, metavar="SECONDS",
                   help="each Register's deadline (a controller busy with a join storm refuses at once, with a "
                        "retry time, a Register that would not be served within it)")
    p.add_argument("--stagger", type=_seconds(zero=True), default=0.01, metavar="SECONDS",
                   help="pause between starting one node and the next (0: the whole fleet at once, a join storm)")
    p.add_argument("--shared-channel", action="store_true",
                   help="one gRPC channel (connection) per controller for the whole fleet, every node's calls "
                        "multiplexed on it, instead of one per node: a cheap fleet for tens of thousands of nodes "
                        "on one machine (the controller then holds few connections; not with --cert-dir)")
    p.add_argument("--control-socket", type=Path, default=None, metavar="PATH",
                   help="serve fault injection on this Unix socket (mode 0600) for `maia-simnode fault ...`")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    tls = p.add_argument_group("TLS", "connect with TLS when --ca is given; mutual TLS with client certificates")
    tls.add_argument("--ca", type=Path, metavar="PEM", help="CA bundle that signed the controller's certificate")
    tls.add_argument("--cert-dir", type=Path, metavar="DIR",
                     help="per-node client certificates DIR/node-<id>.pem and DIR/node-<id>-key.pem "
                          "(as `maiactl dev-ca --node <id>` writes them)")
    tls.add_argument("--cert", type=Path, metavar="PEM", help="one client certificate for every node (a fleet of one)")
    tls.add_argument("--key", type=Path, metavar="PEM", help="the private key of --cert")
    return p


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SystemExit(f"maia-simnode: cannot read {path}: {exc.strerror}") from None


def credentials_for(args: argparse.Namespace, node_id: str) -> grpc.ChannelCredentials | None:
    """TLS credentials of one node (its own client certificate with --cert-dir), or None: plaintext."""
    if args.ca is None and args.cert is None and args.cert_dir is None:
        return None
    cert, key = args.cert, args.key
    if args.cert_dir is not None:
        # Here, not at the top: devca imports `cryptography` (~0.1 s of every maia-simnode's start),
        # which only --cert-dir needs; after the first node, a lookup in Python's module cache.
        from controller.devca import node_stem

        cert, key = args.cert_dir / f"{node_stem(node_id)}.pem", args.cert_dir / f"{node_stem(node_id)}-key.pem"
    return grpc.ssl_channel_credentials(
        root_certificates=_read(args.ca) if args.ca else None,
        private_key=_read(key) if key else None, certificate_chain=_read(cert) if cert else None)


def build_fleet(args: argparse.Namespace) -> Fleet:
    shape = FleetShape(racks=args.racks, nodes_per_rack=args.nodes_per_rack, rack_prefix=args.rack_prefix,
                       accelerators=args.accelerators, accelerator_model=args.model,
                       hbm_gib=args.hbm_gib, idle_power_w=args.idle_power_w)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    kept = CredentialFile.for_fleet(args.state_dir or default_state_dir(), args.controller, args.rack_prefix)
    shared: dict[str, grpc.aio.Channel] | None = {} if args.shared_channel else None
    nodes = [SimulatedNode(spec, args.controller, token=token, load_delay_s=args.load_delay,
                           heartbeat_interval_s=args.heartbeat_interval,
                           credentials=credentials_for(args, spec.node_id), node_credentials=kept,
                           register_timeout_s=args.register_timeout, shared_channels=shared)
             for spec in shape.node_specs()]
    shards = ShardStateFile.beside(kept)
    if args.forget_shards:
        shards.forget()
    restored = sum(shards.restore(node.spec.node_id, node.agent) for node in nodes)
    if restored:
        log.info("%d shards restored from %s (the workloads the last run left running)", restored, shards.path)
    return Fleet(nodes, stagger_s=args.stagger, shard_state=shards)


async def _run(fleet: Fleet, control_socket: Path | None) -> int:
    loop = asyncio.get_running_loop()
    on_stop_signals(loop, partial(_on_signal, fleet))
    control = ControlServer(FaultInjector(fleet.nodes), control_socket) if control_socket else None
    if control is not None:
        await control.start()
    try:
        failed = await fleet.run()
    finally:
        if control is not None:
            await control.close()
    stopped_ignoring_sigterm(loop)  # every node stopped (a fleet told twice must not die of the second)
    return failed


def _on_signal(fleet: Fleet, sig: signal.Signals) -> None:
    log.info("%s received: stopping %d nodes", signal.Signals(sig).name, len(fleet.nodes))
    fleet.stop()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fault"]:
        return faultcli.main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("grpc").setLevel(logging.WARNING)
    if (args.cert is None) != (args.key is None) or (args.cert is not None and args.cert_dir is not None):
        log.error("--cert and --key go together, and exclude --cert-dir")
        return 2
    if args.shared_channel and args.cert_dir is not None:
        log.error("--shared-channel excludes --cert-dir (each node's certificate needs its own connection)")
        return 2
    state_dir = args.state_dir or default_state_dir()
    if (problem := unwritable(state_dir)) is not None:
        log.error("--state-dir %s: %s (the nodes' credentials are kept there; give a writable --state-dir)",
                  state_dir, problem)
        return 2
    configure_gc()
    raise_open_files_limit()  # a connection per node
    fleet = build_fleet(args)
    log.info("controller %s, %d racks x %d nodes (%s, %d accelerators, %.0f W idle)", args.controller,
             args.racks, args.nodes_per_rack, args.model, args.accelerators, args.idle_power_w)
    try:
        failed = asyncio.run(_run(fleet, args.control_socket))
    except FaultError as exc:  # the control socket is taken
        log.error("%s", exc)
        return 2
    return 1 if failed else 0  # a node that ended with an error: a supervisor should know


if __name__ == "__main__":
    sys.exit(main())
