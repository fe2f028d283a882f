"""`maia-controller`: parse the settings, start the controller, stop it on SIGINT/SIGTERM.

Prints "maia-controller listening on HOST:PORT" on stdout once serving (the real port when
asked for port 0), so scripts and tests can read where it is, and with --metrics-listen
"maia-controller metrics on http://HOST:PORT/metrics", with --http-listen "maia-controller
console on http://HOST:PORT/". Exit codes: 0 after a clean stop, 3 when a stop did not finish
within SHUTDOWN_DEADLINE_S (or a second SIGINT/SIGTERM asked for it at once: every thread's stack
is written to stderr first, so a stuck shutdown can be diagnosed; a SIGTERM once the stop is over
is ignored), 2 for a bad --listen or --db or two listen flags on one port (checked by
`preflight` before the database is touched), a TLS file that cannot be read, when the database
cannot be reached (a PostgreSQL server is tried for --db-wait first; a stop meanwhile exits 0),
when the schema is behind and --no-migrate forbids upgrading it, when it is ahead of this code,
when a SQLite database is read-only, or when --bootstrap-admin-token-file cannot be written (no
token is then created). Every such error is one line on stderr, with a hint.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from controller.config import Config, parse_args
from controller.logs import configure_logging
from controller.openfiles import raise_open_files_limit
from controller.aio import on_stop_signals, stopped_ignoring_sigterm
from controller.gcpolicy import configure_gc
from controller.threads import name_threads
from controller.preflight import StartupError, check_db_url, check_listen, check_listens_apart
from controller.gateway.linkdir import LinkPathTooLong, check_link_parent

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

EXIT_SCHEMA = 2  # every start-up refusal: bad settings, database unreachable or on the wrong schema
EXIT_STUCK = 3   # the stop did not finish in time (or a second signal): stacks dumped, exited anyway
SHUTDOWN_DEADLINE_S = 30.0

log = logging.getLogger("maia.main")


def exit_if_stuck(deadline_s: float) -> Callable[[], None]:
    """Arm the shutdown deadline: if the process is still here after `deadline_s` (a task that
    ignores cancellation, a thread nobody joins, an executor job that runs on), write every
    thread's stack to stderr and exit with EXIT_STUCK. Returns what fires it at once (a second
    signal: the operator will not wait)."""
    fired = threading.Lock()

    def fire() -> None:
        if not fired.acquire(blocking=False):
            return
        log.error("shutdown did not finish (deadline %.0fs or a second signal); the threads' stacks follow, "
                  "then the process exits", deadline_s)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_STUCK)

    timer = threading.Timer(deadline_s, fire)
    timer.daemon = True
    timer.start()
    return fire


def choose_event_loop(db: URL) -> None:
    """uvloop's event loops (libuv, in C) on PostgreSQL, asyncio's own on SQLite, for the
    controller's loop and those its threads create (`scheduling.own_loop`). On PostgreSQL every
    round trip is a callback of the loop, and gRPC hands calls to their handlers at a rate set by
    how long the loop's turns are; on SQLite the statements are trips to aiosqlite's thread.
    Measured (docs/benchmarks.md, issue 8, 2026-12-01, night, lead: 64 clients at 4,096 nodes,
    two runs each): PostgreSQL 127.5 and 100.2 deployments/s with uvloop against 92.4 and 73.9
    without, controller CPU 19.6 and 24.0 s against 26.0 and 31.3 s; SQLite 179.3 and 192.9/s
    with it against 238.4 and 202.0/s without."""
    if db.get_backend_name() != "postgresql":
        return
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(config: Config) -> int:
    from sqlalchemy.exc import DBAPIError

    from controller.api.server import ControllerApp, ListenError, StartAbandoned
    from controller.store.db import DatabaseReadOnly, unreachable
    from controller.store.migrate import SchemaError

    app = ControllerApp(config)
    # Handlers first: a SIGTERM that arrives as soon as "listening" is printed (or during start)
    # must stop the controller cleanly, not kill it with the default action.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    on_stop_signals(loop, lambda _: stop.set())
    try:
        address = await app.start(stop)
    except StartAbandoned:  # stopped while waiting for the database: nothing else was started
        log.info("stopped before the database was ready (unreachable, or another controller migrating it)")
        await app.db.dispose()
        return 0
    except (SchemaError, ListenError, StartupError, DatabaseReadOnly) as exc:
        # One clear line; nothing was started but the engine.
        print(f"maia-controller: {exc}", file=sys.stderr, flush=True)
        await app.db.dispose()
        return EXIT_SCHEMA
    except (DBAPIError, OSError) as exc:  # the database refused the connection or is not what it seemed
        url = app.db.engine.url.render_as_string(hide_password=True)
        cause = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        waited = f" (tried for {config.db_wait_s:g} s: --db-wait)" if unreachable(exc) and config.db_wait_s and \
            not app.db.is_sqlite else ""
        print(f"maia-controller: cannot use the database at {url}: {cause}{waited}; hint: check that it is "
              f"running and reachable and that the URL's user, host, port and name are right",
              file=sys.stderr, flush=True)
        await app.db.dispose()
        return EXIT_SCHEMA
    log.info("serving on %s's event loop", type(loop).__module__.partition(".")[0])
    print(f"maia-controller listening on {address}", flush=True)
    if app.agent_address:
        print(f"maia-controller agents on {app.agent_address} ({config.agent_gateways} gateways)", flush=True)
    if app.metrics_address:
        print(f"maia-controller metrics on http://{app.metrics_address}/metrics", flush=True)
    if app.console_address:
        print(f"maia-controller console on http://{app.console_address}/", flush=True)

    await stop.wait()
    fire = exit_if_stuck(SHUTDOWN_DEADLINE_S)
    on_stop_signals(loop, lambda _: fire())
    await app.stop()
    # A SIGTERM from now on has nothing left to hurry; one before the loop closed would report the
    # clean stop as stuck (EXIT_STUCK, the stacks).
    stopped_ignoring_sigterm(loop)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    optional = {"--metrics-listen": config.metrics_listen, "--http-listen": config.http_listen,
                "--agent-listen": config.agent_listen}
    listens = {"--listen": config.listen, **{flag: text for flag, text in optional.items() if text}}
    try:
        for flag, text in listens.items():
            check_listen(text, flag=flag)
        check_listens_apart(listens)
        if config.agent_gateways:
            check_link_parent()
        db = check_db_url(config.db_url)
    except (StartupError, LinkPathTooLong) as exc:
        print(f"maia-controller: {exc}", file=sys.stderr, flush=True)
        return EXIT_SCHEMA
    configure_logging(config.log_level)
    configure_gc()
    raise_open_files_limit()  # a connection per agent
    name_threads()
    choose_event_loop(db)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
