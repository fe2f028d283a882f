"""What authentication costs per call: the same cheap RPC with tokens and with authentication off.

An in-process controller on a fresh SQLite database, one tenant, a channel on 127.0.0.1; for
each mode (`--insecure-no-auth`, then bearer tokens with the verified-token cache, then with the
cache disabled so every call reads its token row) `--calls` sequential `GetTenant` calls after a
warm-up, timed at the client. Also the verification alone (`Authenticator.authenticate` on a
cached token: parse, digest, constant-time compare), without gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fgd import percentile


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calls", type=int, default=2000, help="timed calls per mode (default 2000)")
    p.add_argument("--warmup", type=int, default=200)


async def _timed_calls(address: str, token: str | None, calls: int, warmup: int) -> list[float]:
    from controller.bearer import aio_channel
    from maia.v1 import admin_pb2, admin_pb2_grpc

    channel = aio_channel(address, token)
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    request = admin_pb2.GetTenantRequest(id="lab")
    try:
        for _ in range(warmup):
            await stub.GetTenant(request)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            await stub.GetTenant(request)
            times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        await channel.close()


async def _mode(root: Path, name: str, calls: int, warmup: int, **config: Any) -> dict[str, float]:
    from controller.api.server import ControllerApp
    from controller.config import Config
    from maia.v1 import admin_pb2

    token_file = root / f"{name}.token"
    if not config.get("insecure_no_auth"):
        config["bootstrap_admin_token_file"] = str(token_file)
    app = ControllerApp(Config(listen="127.0.0.1:0", db_url=f"sqlite+aiosqlite:///{root / name}.db",
                               reconcile_interval_s=60.0, **config))
    await app.start()
    try:
        token = token_file.read_text().strip() if token_file.exists() else None
        from controller.bearer import aio_channel
        from maia.v1 import admin_pb2_grpc
        channel = aio_channel(app.address, token)
        await admin_pb2_grpc.AdminServiceStub(channel).CreateTenant(admin_pb2.Tenant(id="lab"))
        await channel.close()
        times = await _timed_calls(app.address, token, calls, warmup)
    finally:
        await app.stop(grace_s=0.5)
    return {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99), "mean_ms": statistics.fmean(times)}


async def _verify_only(root: Path, calls: int) -> float:
    """Microseconds per `authenticate` of a cached admin token."""
    from controller.authn import Authenticator
    from controller.identity import CONTROLLER
    from controller.store.db import Database
    from controller.store.migrate import ensure_schema
    from controller.usecases import tokens

    db = Database(f"sqlite+aiosqlite:///{root / 'verify.db'}")
    try:
        await ensure_schema(db, migrate=True)
        await tokens.bootstrap_admin_token(db, root / "verify.token", CONTROLLER)
        metadata = (("authorization", f"Bearer {(root / 'verify.token').read_text().strip()}"),)
        authn = Authenticator(db)
        await authn.authenticate(metadata)  # load it into the cache
        started = time.perf_counter()
        for _ in range(calls):
            await authn.authenticate(metadata)
        return (time.perf_counter() - started) / calls * 1e6
    finally:
        await db.dispose()


async def _run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="maia-bench-auth-") as tmp:
        root = Path(tmp)
        modes = {
            "no auth (--insecure-no-auth)": await _mode(root, "off", args.calls, args.warmup, insecure_no_auth=True),
            "bearer token, cached": await _mode(root, "cached", args.calls, args.warmup),
            "bearer token, no cache": await _mode(root, "uncached", args.calls, args.warmup, auth_cache_ttl_s=0.0),
        }
        verify_us = await _verify_only(root, args.calls * 10)
    print(f"GetTenant, {args.calls} sequential calls per mode after {args.warmup} warm-up calls")
    print(f"{'mode':32} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, r in modes.items():
        print(f"{name:32} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['mean_ms']:8.3f}")
    base = modes["no auth (--insecure-no-auth)"]["mean_ms"]
    for name in ("bearer token, cached", "bearer token, no cache"):
        print(f"overhead of {name}: {modes[name]['mean_ms'] - base:+.3f} ms mean per call")
    print(f"Authenticator.authenticate on a cached token alone: {verify_us:.1f} us per call")
    return 0


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
