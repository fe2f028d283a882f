"""The read-only web console: `maia-controller --http-listen HOST:PORT` serves it at `/`.

An aiohttp application run in the controller's own event loop (`AppRunner` + `TCPSite`, no
thread, no signal handlers of its own):
- `/` and `/static/*`: the page and its assets, shipped in the package (no build step);
- `/api/state`: the console document (`console.state`): read on the loop, made and encoded on
  the console's own build thread, one build at a time per viewer shared by the requests waiting
  for it (`console.builds`). One thread for every viewer's builds, not the loop's default pool:
  builds hold the interpreter anyway (two at once are no faster), and the pool is where the
  reconciler's decisions and the submit path's capacity rebuilds wait for a thread, so many
  viewers' builds (most of a build's CPU is on that thread) never queue those behind them;
- `/api/events`: server-sent events from the deployment watch bus, one `change` event per
  deployment event the viewer may see (the page then re-reads `/api/state`). The token is checked
  as the stream opens, and the stream is held by it (`controller.tokenstreams`): revoked or
  expired, the stream sends an `ended` event saying why and closes (the page's next read is 401).
A bearer token (`Authorization` header, sent by the page's scripts: from the sign-in form or a
`#token=` URL fragment, which browsers never send to a server) is resolved to a principal by
the `TokenResolver` given (it raises `Unauthenticated` for a credential it refuses, saying why
for the operator); a principal bound to a tenant sees that tenant's view only. Without a resolver
(authentication off) every request sees the whole cluster. A refused credential is logged with
that reason, at a bounded rate (`console.signins`).

Every response, refusals and the event stream included, carries the browser's security headers
(`SECURITY_HEADERS`: a Content-Security-Policy that lets the page load its own script, style and
reads and nothing else, no framing, no type sniffing, no referrer) and no server banner: also the
400 aiohttp answers itself to a request it cannot parse (`_ConsoleConnection`).

Connections are served `_ConsoleConnection`s, at most `max_connections` at once and
`max_connections_per_peer` from one address (`_Gate`: one client cannot hold every place; by default
MAX_CONNECTIONS and MAX_CONNECTIONS_PER_PEER, `--console-max-connections[-per-peer]`); one more
is answered 503 and closed (`_Refused`). Without authentication, a request is answered only when its
Host is localhost, an IP address or the listen host (`_this_host_only`): a page elsewhere, its
name re-pointed at 127.0.0.1 (DNS rebinding), would otherwise read the console from a browser on it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib import resources
from typing import Any, cast

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from controller import limits
from controller.aio import within
from controller.console.builds import SharedBuilds
from controller.console.signins import MALFORMED, RefusedSignIns
from controller.console.state import ConsoleRows, console_document, read_console_rows
from controller.identity import Principal, Role
from controller.store.db import Database
from controller.tokens import bearer_credential
from controller.tokenstreams import TokenStreams
from controller.domain.values import DeploymentEvent
from controller.errors import ResourceExhausted, Unauthenticated
from controller.ratelimit import Sampler
from controller.usecases.watch import DeploymentEventBus

log = logging.getLogger("maia.console")


class _NotHttp(logging.Filter):
    """aiohttp logs a request it cannot parse with its traceback at error level: what a gRPC
    client (`maiactl --controller` given the console's port) or a TLS one sends. Such a record
    is told once a line, at warning level, without the traceback; any other passes as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import BadHttpMessage

        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, BadHttpMessage):
            return True
        log.warning("the console port was sent something that is not HTTP/1.x (%s; a gRPC or TLS client given "
                    "--http-listen's address?): %s", record.getMessage(), str(error).splitlines()[0])
        return False


_NOT_HTTP = _NotHttp()

# A credential's viewer; raises `Unauthenticated` (`why`: for the log) for one that may not view.
TokenResolver = Callable[[str], Awaitable[Principal]]
KEEPALIVE_S = 15.0
# How long a connection is kept with no request under way: one that sent nothing, or part of its
# headers, was kept aiohttp's hour, any number of them, in the file descriptors the API and the
# database share (290 idle sockets under a limit of 300 made every RPC UNAVAILABLE). An event
# stream is a response under way: not cut.
IDLE_CONNECTION_S = 20.0
# Connections open at once, for the same file descriptors: one more is answered 503 (Retry-After)
# and closed, the ones open are served as before. A browser holds a few (the page, its event stream).
# The defaults of `ConsoleServer`'s caps (`--console-max-connections[-per-peer]`).
MAX_CONNECTIONS = limits.CONSOLE_MAX_CONNECTIONS
MAX_CONNECTIONS_PER_PEER = limits.CONSOLE_MAX_CONNECTIONS_PER_PEER  # one address's share (behind a proxy: raise it)
RETRY_AFTER_S = 5
# How long a refused connection is kept for its client to read the 503 and close first (closed
# with the request unread, the client's system may get a reset instead of the answer).
REFUSED_LINGER_S = 1.0
STATIC = resources.files("controller.console").joinpath("static")
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# The page has no inline script or style (console.js sets styles through the CSSOM, `node.style`,
# which style-src does not govern) and sends no form: its own files and reads, nothing else.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",  # frame-ancestors, for browsers that predate it
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Server": "maia",  # not aiohttp's "Python/3.11 aiohttp/x.y.z" (set only where none is)
}


def _refusal(why: str) -> bytes:
    """The whole 503 a connection beyond a cap gets, as bytes."""
    body = f"{why}; retry in {RETRY_AFTER_S}s\n"
    headers = {**SECURITY_HEADERS, "Content-Type": "text/plain; charset=utf-8", "Content-Length": str(len(body)),
               "Retry-After": str(RETRY_AFTER_S), "Connection": "close"}
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"HTTP/1.1 503 Service Unavailable\r\n{head}\r\n{body}".encode()


class _Refused(asyncio.Protocol):
    """A connection beyond a cap: answered 503 at once (`why`), its request read and dropped, and
    closed when its client closes its end or after REFUSED_LINGER_S."""

    def __init__(self, why: str) -> None:
        self._why = why
        self._closing: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is one without subclassing it
        transport.write(_refusal(self._why))
        transport.write_eof()
        self._closing = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._closing is not None:
            self._closing.cancel()


class _Gate(asyncio.Protocol):
    """A connection accepted, until its peer is known: `admit` (given the peer's address) says who
    serves it, a `_ConsoleConnection` or a `_Refused`, which takes the transport from then on."""

    def __init__(self, admit: Callable[[str], asyncio.Protocol]) -> None:
        self._admit = admit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        protocol = self._admit(str(peer[0]) if peer else "")
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


class _ConsoleConnection(web.RequestHandler):
    """aiohttp's HTTP/1 connection, but for two things. The answer aiohttp makes itself to a
    request it cannot parse (a malformed request line or header: a 400 before any handler, of no
    application, so without `on_response_prepare`, aiohttp #6463) carries SECURITY_HEADERS too,
    its `Server` header included. And `closed` is called when the connection ends (the console
    counts them)."""

    __slots__ = ("_closed",)

    def __init__(self, manager: web.Server, *, closed: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._closed: Callable[[], None] | None = closed

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)
        response.headers.update(SECURITY_HEADERS)
        return response

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._closed is not None:
            self._closed, closed = None, self._closed
            closed()
        super().connection_lost(exc)


def _host_name(header: str) -> str:
    """The name a Host header gives, without its port or an IPv6 address's brackets, lower case."""
    name = header.strip().lower()
    if name.startswith("["):
        return name[1:].partition("]")[0]
    return name.rpartition(":")[0] if ":" in name else name


def _names_this_host(name: str, listen_host: str) -> bool:
    """Whether a Host may be answered: localhost, the host the console listens on, or an address
    (DNS rebinding needs a name: a page's own, re-pointed; an address is where the browser went)."""
    name = name.rstrip(".")
    if name in ("localhost", listen_host.strip("[]").lower()):
        return bool(name)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _this_host_only(listen_host: str) -> Middleware:
    """Without authentication, requests whose Host names this machine only (403 otherwise): a page
    whose name was re-pointed at 127.0.0.1 (DNS rebinding) sends its own name as Host."""

    @web.middleware
    async def this_host_only(request: web.Request, handler: Handler) -> web.StreamResponse:
        name = _host_name(request.headers.get("Host", ""))
        if not _names_this_host(name, listen_host):
            raise web.HTTPForbidden(text=f"Host {name or '(none)'!r} refused: this console runs without "
                                         "authentication (--insecure-no-auth) and answers only requests "
                                         f"to localhost, an address or {listen_host or 'its listen host'}\n")
        return await handler(request)

    return this_host_only


async def _secured(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: every response, errors and streams included, before its headers go."""
    response.headers.update(SECURITY_HEADERS)


def _peer(request: web.Request) -> str:
    """HOST:PORT of the connection ([HOST]:PORT for IPv6), as the log lines name it."""
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    if not isinstance(peer, tuple) or len(peer) < 2:
        return request.remote or "-"
    host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
    return f"{host}:{peer[1]}"


def _sign_in() -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(text=json.dumps({"error": "sign in with a token"}), content_type="application/json",
                                headers={"WWW-Authenticate": 'Bearer realm="maia"'})


def _viewer_tenant(principal: Principal | None) -> str:
    return principal.tenant if principal is not None and principal.role is Role.TENANT else ""


class ConsoleServer:
    def __init__(self, db: Database, bus: DeploymentEventBus, *, resolve_token: TokenResolver | None = None,
                 streams: TokenStreams | None = None, sign_ins: RefusedSignIns | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER) -> None:
        if not 1 <= max_connections_per_peer <= max_connections:
            raise ValueError(f"max_connections_per_peer must be from 1 to max_connections ({max_connections}), "
                             f"got {max_connections_per_peer}")
        self._db = db
        self._bus = bus
        self._resolve = resolve_token
        # The event streams open, by token (the controller's, shared with the watches, which its
        # revocations end; its own otherwise: an expiry still ends a stream).
        self._streams = TokenStreams() if streams is None else streams
        self._sign_ins = RefusedSignIns() if sign_ins is None else sign_ins
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._max_connections, self._max_per_peer = max_connections, max_connections_per_peer
        self._connections = 0  # served now (`_ConsoleConnection`s), or accepted and not yet admitted
        self._by_peer: defaultdict[str, int] = defaultdict(int)  # of those served, from each address
        self._refusals = Sampler(per_minute=1.0, burst=1.0)  # log lines for connections refused
        self.documents = SharedBuilds(self._document)
        # Every viewer's builds, one at a time (module docstring); its thread starts at the first build.
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="console-build")
        self.address = ""

    def application(self, listen_host: str = "") -> web.Application:
        """The console's routes; without authentication, for requests to this host only."""
        app = web.Application(middlewares=[] if self._resolve is not None else [_this_host_only(listen_host)])
        app.on_response_prepare.append(_secured)
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/events", self._events)
        return app

    async def start(self, listen: str) -> str:
        """Serve on HOST:PORT (port 0: any free port); returns the bound HOST:PORT."""
        logging.getLogger("aiohttp.server").addFilter(_NOT_HTTP)  # once: a filter is added at most once
        host, _, port = listen.rpartition(":")
        runner = web.AppRunner(self.application(host), handle_signals=False)
        await runner.setup()
        assert runner.server is not None
        try:  # not a `TCPSite`: its connections would be aiohttp's own, uncounted
            listener = await asyncio.get_running_loop().create_server(
                partial(self._connection, runner.server), host.strip("[]") or "0.0.0.0", int(port))
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"cannot serve the console on {listen}: {exc}") from exc
        self._runner, self._listener = runner, listener
        bound = listener.sockets[0].getsockname()[1]
        self.address = f"{host}:{bound}"
        return self.address

    def _connection(self, http: web.Server) -> asyncio.Protocol:
        """A connection accepted: served, or refused beyond `max_connections` (then, its peer known,
        beyond `max_connections_per_peer`: `_admit`). Counted here, as it is accepted (a burst is
        accepted before any of it is set up), and uncounted as it ends."""
        if self._connections >= self._max_connections:
            self._refused(f"{self._connections} open, the most it serves (--console-max-connections)")
            return _Refused(f"the console serves {self._max_connections} connections at most")
        self._connections += 1
        return _Gate(partial(self._admit, http))

    def _admit(self, http: web.Server, peer: str) -> asyncio.Protocol:
        if self._by_peer[peer] >= self._max_per_peer:
            self._connections -= 1
            self._refused(f"{self._by_peer[peer]} open from {peer}, the most one address holds "
                          "(--console-max-connections-per-peer)")
            return _Refused(f"the console serves {self._max_per_peer} connections from one address at most")
        self._by_peer[peer] += 1
        return _ConsoleConnection(http, loop=asyncio.get_running_loop(), keepalive_timeout=IDLE_CONNECTION_S,
                                  access_log=None, closed=partial(self._connection_ended, peer))

    def _refused(self, why: str) -> None:
        left_out = self._refusals.sample()
        if left_out is not None:
            log.warning("console connection refused (503): %s%s", why, f" suppressed={left_out}" if left_out else "")

    def _connection_ended(self, peer: str) -> None:
        self._connections -= 1
        self._by_peer[peer] -= 1
        if not self._by_peer[peer]:
            del self._by_peer[peer]

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None
        await self.documents.close()
        self._builder.shutdown(wait=False, cancel_futures=True)

    # --- requests ------------------------------------------------------------------------------
    async def _viewer(self, request: web.Request) -> Principal | None:
        """The caller's principal; raises 401 when a token is required and missing or wrong."""
        if self._resolve is None:
            return None
        authorization = request.headers.get("Authorization")
        if authorization is None:  # no credential at all (the page's first read): refused, not logged
            raise _sign_in()
        token = bearer_credential(authorization)
        try:
            if not token:
                raise Unauthenticated(MALFORMED)
            return await self._resolve(token)
        except Unauthenticated as refused:
            self._sign_ins.refused(token, refused.why, path=request.path, peer=_peer(request))
            raise _sign_in() from None

    async def _index(self, request: web.Request) -> web.Response:
        return self._asset("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        return self._asset(request.match_info["name"])

    @staticmethod
    def _asset(name: str) -> web.Response:
        suffix = name[name.rfind("."):] if "." in name else ""
        path = STATIC.joinpath(name)
        if "/" in name or suffix not in CONTENT_TYPES or not path.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=path.read_bytes(), content_type=CONTENT_TYPES[suffix],
                            headers={"Cache-Control": "no-cache"})

    async def _state(self, request: web.Request) -> web.Response:
        principal = await self._viewer(request)
        body = await self.documents.get(_viewer_tenant(principal))
        # The token checked again: the wait for the next build (up to STATE_SPACING_S, behind
        # other viewers' builds) may outlast it, and a token revoked or expired meanwhile got a
        # document built after that (its tenant's, perhaps of a customer given the id since).
        await self._viewer(request)
        return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-store"})

    async def _document(self, viewer_tenant: str) -> bytes:
        """One viewer's document, encoded (`SharedBuilds` calls it)."""
        async with self._db.unit_of_work() as uow:
            read = await read_console_rows(uow.session, viewer_tenant=viewer_tenant)
        return await asyncio.get_running_loop().run_in_executor(self._builder, self._encoded, read)

    def _encoded(self, read: ConsoleRows) -> bytes:
        doc = console_document(read)
        doc["auth"] = self._resolve is not None
        return json.dumps(doc).encode()

    async def _events(self, request: web.Request) -> web.StreamResponse:
        principal = await self._viewer(request)
        tenant = _viewer_tenant(principal)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        queue = self._bus.subscribe()
        try:
            try:  # a token holding the most streams it may: 429 before the stream begins
                self._streams.admit(principal)
            except ResourceExhausted as exc:
                raise web.HTTPTooManyRequests(text=json.dumps({"error": exc.message}),
                                              content_type="application/json") from None
            with self._streams.hold(principal, partial(self._bus.end, queue)) as held:  # no await since admit
                await response.prepare(request)
                await response.write(b": connected\n\n")
                # A keep-alive KEEPALIVE_S after the last write, not after the last event: events a
                # tenant may not see must not delay it (their rhythm would tell it others are busy).
                quiet_until = time.monotonic() + KEEPALIVE_S
                while True:
                    try:
                        item: Any = await within(queue.get(), max(0.0, quiet_until - time.monotonic()))
                    except TimeoutError:
                        await response.write(b": keep-alive\n\n")
                        quiet_until = time.monotonic() + KEEPALIVE_S
                        continue
                    if held.error is not None:  # its token was revoked or expired (`bus.end` woke it)
                        data = json.dumps({"reason": held.error.message})
                        await response.write(f"event: ended\ndata: {data}\n\n".encode())
                        break
                    if not isinstance(item, DeploymentEvent):
                        break  # the bus closed: the controller is stopping
                    spec = item.deployment.spec
                    if tenant and spec.tenant != tenant:
                        continue
                    data = json.dumps({"type": item.type, "deployment": spec.name, "phase": item.deployment.phase})
                    await response.write(f"event: change\ndata: {data}\n\n".encode())
                    quiet_until = time.monotonic() + KEEPALIVE_S
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            self._bus.unsubscribe(queue)
        return response
