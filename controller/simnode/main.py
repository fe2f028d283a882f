"""maia-simnode entry point: parse flags, start the fleet, stop it on SIGINT/SIGTERM (exit 0)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from controller.simnode.fleet import Fleet, FleetShape
from controller.simnode.transport import SimulatedNode

log = logging.getLogger("simnode")


def _interval(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maia-simnode",
                                description="Run a fleet of simulated Maia node agents against a controller.")
    p.add_argument("--controller", default="127.0.0.1:50051", metavar="HOST:PORT")
    p.add_argument("--racks", type=_positive_int, required=True)
    p.add_argument("--nodes-per-rack", type=_positive_int, required=True)
    p.add_argument("--rack-prefix", default="rack-")
    p.add_argument("--load-delay", type=float, default=1.0, metavar="SECONDS",
                   help="time from LOADING to RUNNING for a new shard")
    p.add_argument("--accelerators", type=_positive_int, default=4)
    p.add_argument("--model", default="maia-100")
    p.add_argument("--hbm-gib", type=float, default=64.0)
    p.add_argument("--idle-power-w", type=float, default=600.0)
    p.add_argument("--heartbeat-interval", type=_interval, default=None, metavar="auto|SECONDS",
                   help="default: what the controller asks for at registration")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def build_fleet(args: argparse.Namespace) -> Fleet:
    shape = FleetShape(racks=args.racks, nodes_per_rack=args.nodes_per_rack, rack_prefix=args.rack_prefix,
                       accelerators=args.accelerators, accelerator_model=args.model,
                       hbm_gib=args.hbm_gib, idle_power_w=args.idle_power_w)
    nodes = [SimulatedNode(spec, args.controller, load_delay_s=args.load_delay,
                           heartbeat_interval_s=args.heartbeat_interval)
             for spec in shape.node_specs()]
    return Fleet(nodes)


async def _run(fleet: Fleet) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal, fleet, sig)
    await fleet.run()


def _on_signal(fleet: Fleet, sig: signal.Signals) -> None:
    log.info("%s received: stopping %d nodes", signal.Signals(sig).name, len(fleet.nodes))
    fleet.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("grpc").setLevel(logging.WARNING)
    if args.load_delay < 0:
        log.error("--load-delay must not be negative")
        return 2
    fleet = build_fleet(args)
    log.info("controller %s, %d racks x %d nodes (%s, %d accelerators, %.0f W idle)", args.controller,
             args.racks, args.nodes_per_rack, args.model, args.accelerators, args.idle_power_w)
    asyncio.run(_run(fleet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
