"""The hub's silence check alone (`AgentHub._expire`): how long the event loop waits for it.

In process, no gRPC and no database: a hub holding `--streams` open streams (each heard from just
now, so none is silent), each with `--unacknowledged` shards owed a word (the ack-timeout check
looks at them too), checked `--rounds` times. A ticker task meanwhile takes every turn the loop
gives it; the longest wait between two of its turns is the longest step the check held the loop
for, which every call arriving during the check waits behind. Per round: the check's wall time,
that longest step, and the ticker's turns. Medians over the rounds (after `--warmup`), and the
longest step of all.

    python -m bench.silencecheck --streams 16384 --rounds 30
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from controller.agents.hub import AgentHub
from controller.agents.session import AgentSession

TIMEOUT_S = 98.0  # a stream's silence timeout at 16,384 nodes and 500 heartbeats a second


class _NoDatabase:
    """The hub's constructor asks its database which kind it is; the check itself never uses it."""

    is_sqlite = True


@dataclass(frozen=True)
class Round:
    check_ms: float
    longest_step_ms: float
    ticker_turns: int


def _hub(streams: int, unacknowledged: int) -> AgentHub:
    hub = AgentHub(_NoDatabase(), heartbeat_timeout_s=10, on_liveness_change=lambda: None,  # type: ignore[arg-type]
                   on_deployments_changed=lambda views: asyncio.sleep(0), ack_timeout_s=TIMEOUT_S)
    now = time.monotonic()
    for i in range(streams):
        session = AgentSession(f"n{i}", f"s{i}", interval_ms=32_768, timeout_s=TIMEOUT_S, last_seen=now)
        session.unacknowledged = {("t", f"d{i}", 0, shard): (now, 1, 0) for shard in range(unacknowledged)}
        hub._sessions[session.node_id] = session
    return hub


async def _round(hub: AgentHub) -> Round:
    done = False
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # the ticker's first turn
    started = time.perf_counter()
    await hub._expire()
    check_s = time.perf_counter() - started
    done = True
    await ticking
    return Round(check_s * 1000, max(gaps, default=0.0) * 1000, len(gaps))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    hub = _hub(args.streams, args.unacknowledged)
    gc.collect()
    gc.freeze()  # the streams are long-lived state, as the controller freezes its warm heap
    try:
        rounds = [await _round(hub) for _ in range(args.warmup + args.rounds)][args.warmup:]
    finally:
        gc.unfreeze()
    return {
        "streams": args.streams,
        "unacknowledged": args.unacknowledged,
        "rounds": len(rounds),
        "check_ms_p50": round(statistics.median(r.check_ms for r in rounds), 3),
        "longest_step_ms_p50": round(statistics.median(r.longest_step_ms for r in rounds), 3),
        "longest_step_ms_max": round(max(r.longest_step_ms for r in rounds), 3),
        "ticker_turns_p50": statistics.median(r.ticker_turns for r in rounds),
        "per_round": [asdict(r) for r in rounds] if args.per_round else [],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.silencecheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=16_384, help="open streams the hub holds")
    p.add_argument("--unacknowledged", type=int, default=0,
                   help="shards each stream owes a word of (the ack-timeout check's work)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--per-round", action="store_true", help="also list every round")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(asyncio.run(run(parse_args(argv))), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
