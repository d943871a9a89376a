"""The gateway's HTTP face: an OpenAI-compatible ASGI app (starlette) that routes each request by its
model name to the server that serves it, through the scheduler, and relays the answer (httpx).

- /v1/models lists every served name with its state; /v1/chat/completions, /v1/completions and
  /v1/embeddings are relayed; /health answers without a key (for supervisors); /metrics is Prometheus.
- Streams are relayed chunk by chunk as they arrive, never buffered. While a stopped server starts, a
  streaming client gets SSE comments (": loading …"), so nothing in between times out.
- A client that goes away cancels its upstream request (the connection is closed, so the engine frees
  the slot); an upstream that dies mid-stream ends the client's stream with an error event, and the
  server is restarted on the next request.
- The gateway's own key is checked (401); each upstream's key is injected here; no key is logged,
  counted or echoed in an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from orchestrator.gateway.backend import DeployerBackend
from orchestrator.gateway.metrics import Metrics
from orchestrator.gateway.scheduler import Rejected, Scheduler, ServerSpec, Waiter
from orchestrator.plan.model import Plan

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
HEARTBEAT_S = 1.0
TICK_S = 1.0
TAIL_BYTES = 16384      # the end of a stream kept for hooks: its last JSON event (llama.cpp's timings)
T = TypeVar("T")


class TooLarge(Exception):
    pass


@dataclass
class Call:
    """One relayed request on its way through the gateway (what hooks see)."""

    endpoint: str
    body: dict[str, Any]
    raw: bytes                   # the bytes sent upstream
    model: str
    name: str                    # the server that answers
    stream: bool
    t0: float
    client: str                  # body "user", else header x-client-id, else the peer address
    headers: dict[str, str] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def set_body(self, body: dict[str, Any]) -> None:
        self.body, self.raw = body, json.dumps(body).encode()


class Hook(Protocol):
    def prepare(self, call: Call) -> Response | None: ...

    def finished(self, call: Call, status: int, answer: dict[str, Any] | None) -> None: ...


def client_of(body: dict[str, Any], request: Request) -> str:
    user = body.get("user")
    if isinstance(user, str) and user:
        return user[:128]
    header = request.headers.get("x-client-id")
    if header:
        return header[:128]
    return request.client.host if request.client else "-"


def last_json_event(tail: bytes) -> dict[str, Any] | None:
    """The last JSON `data:` event in the end of an SSE stream (llama.cpp puts `timings` there)."""
    for event in reversed(tail.split(b"\n\n")):
        line = event.strip()
        if line.startswith(b"data: {"):
            try:
                data = json.loads(line[6:])
            except ValueError:
                continue
            return data if isinstance(data, dict) else None
    return None


def json_body(content: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


class Hold:
    """Whether this request holds one of the server's slots, so that it is given back exactly once."""

    def __init__(self, sched: Scheduler, name: str) -> None:
        self.sched, self.name, self.held = sched, name, True

    def release(self, ok: bool) -> None:
        if self.held:
            self.held = False
            self.sched.release(self.name, ok)


class ClientGone(Exception):
    pass


def error(status: int, message: str, kind: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status, **extra}}, status,
                        headers=headers)


def error_event(message: str, kind: str, code: int) -> bytes:
    """An SSE event the OpenAI clients raise as an error (they look for an `error` object in data)."""
    return b"data: " + json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode() + b"\n\n"


def specs(plan: Plan) -> list[ServerSpec]:
    gw = plan.gateway
    assert gw is not None
    return [ServerSpec(sp.name, sp.start, sp.settings.slots if sp.settings else 1, dict(gw.needs.get(sp.name, {})),
                       sp.idle_timeout_s, gw.start_timeout(sp)) for sp in plan.servers]


def budgets(plan: Plan) -> dict[str, int | None]:
    assert plan.gateway is not None
    return {b.resource: b.bytes for b in plan.gateway.budgets}


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Gateway:
    def __init__(self, plan: Plan, backend: DeployerBackend, api_key: str | None, metrics: Metrics | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        assert plan.gateway is not None
        self.plan = plan
        self.gw = plan.gateway
        self.backend = backend
        self.api_key = api_key
        self.metrics = metrics or Metrics()
        self.sched = Scheduler(specs(plan), budgets(plan), backend, self.gw.queue, self.metrics)
        self.by_model = {sp.served_name: sp.name for sp in plan.servers}
        # TCP_NODELAY: httpx writes a request's headers and body separately, and Nagle's algorithm would hold
        # the body until the server's delayed ACK of the headers (~40 ms on Linux loopback) on every request.
        transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=None), trust_env=False,
            transport=transport)
        self.created = int(time.time())
        self._ticker: asyncio.Task[None] | None = None
        self._upstreams: dict[str, tuple[str, dict[str, str]]] = {}
        self.hooks: list[Hook] = []
        self.prefix: Any = None
        if self.gw.prefix_report:
            from orchestrator.gateway.prefixcache import PrefixCacheHook

            root = getattr(getattr(getattr(backend, "deployer", None), "store", None), "root", None)
            self.prefix = PrefixCacheHook(plan, self.upstream, self.client, self.metrics, root,
                                          normalize=self.gw.normalize_tools)
            self.hooks.append(self.prefix)

    # ------------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        running, stale = self.backend.running()
        for name in sorted(stale):
            self.metrics.log(f"stop {name}: it runs with another plan or its start never finished")
            await self.backend.stop(name, "stale")
        self.sched.adopt(running)
        if running:
            self.metrics.log(f"adopted running servers: {', '.join(sorted(running))}")
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.sched.tick()

    async def shutdown(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        if self.prefix is not None:
            await self.prefix.close()
        await self.client.aclose()

    # ------------------------------------------------------------------ plain endpoints

    def unauthorized(self, request: Request) -> JSONResponse | None:
        if not self.api_key:
            return None
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        if token and hmac.compare_digest(token.encode(), self.api_key.encode()):
            return None
        return error(401, "missing or wrong API key: send Authorization: Bearer <key>", "authentication_error",
                     headers={"WWW-Authenticate": "Bearer"})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "deployment": self.plan.name})

    async def models(self, request: Request) -> Response:
        if (denied := self.unauthorized(request)) is not None:
            return denied
        data = [{"id": sp.served_name, "object": "model", "created": self.created, "owned_by": "orchestrator",
                 "server": sp.name, "start": sp.start, "state": self.sched.state(sp.name)} for sp in self.plan.servers]
        return JSONResponse({"object": "list", "data": data})

    async def prometheus(self, request: Request) -> Response:
        if (denied := self.unauthorized(request)) is not None:
            return denied
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ relayed endpoints

    async def read_body(self, request: Request) -> bytes:
        limit = self.gw.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise TooLarge
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(self, raw: bytes) -> tuple[str, str, bool, dict[str, Any]] | JSONResponse:
        """(server, model, stream, body) of a request body, or the 400/404 that answers it."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return error(400, f"the request body is not valid JSON: {exc}", "invalid_request_error")
        if not isinstance(body, dict):
            return error(400, f"the request body must be a JSON object, not {type(body).__name__}",
                         "invalid_request_error")
        model = body.get("model")
        names = sorted(self.by_model)
        if not isinstance(model, str) or not model:
            return error(400, f"the request names no model: add \"model\": one of {', '.join(names)}",
                         "invalid_request_error", param="model")
        name = self.by_model.get(model)
        if name is None:
            return error(404, f"model {model!r} is not served here; available: {', '.join(names)}",
                         "invalid_request_error", param="model", available=names)
        return name, model, body.get("stream") is True, body

    async def relay_endpoint(self, request: Request) -> Response:
        t0 = time.perf_counter()
        endpoint = request.url.path
        if (denied := self.unauthorized(request)) is not None:
            self.count("-", endpoint, 401, t0)
            return denied
        try:
            raw = await self.read_body(request)
        except TooLarge:
            self.count("-", endpoint, 413, t0)
            return error(413, f"the request body is larger than the gateway's limit of {self.gw.max_body_bytes} "
                         "bytes (gateway.max_body)", "invalid_request_error")
        parsed = self.parse(raw)
        if isinstance(parsed, JSONResponse):
            self.count("-", endpoint, parsed.status_code, t0)
            return parsed
        name, model, stream, body = parsed
        call = Call(endpoint, body, raw, model, name, stream, t0, client_of(body, request))
        for hook in self.hooks:
            answer = hook.prepare(call)
            if answer is not None:
                return answer
        raw = call.raw
        try:
            waiter = self.sched.enqueue(name)
        except Rejected as exc:
            return self.rejected(exc, model, endpoint, t0)
        if stream:
            return await self.stream(request, name, model, endpoint, raw, waiter, t0, call)
        return await self.unary(request, name, model, endpoint, raw, waiter, t0, call)

    def finished(self, call: Call | None, status: int, answer: dict[str, Any] | None) -> None:
        if call is None:
            return
        for hook in self.hooks:
            try:
                hook.finished(call, status, answer)
            except Exception as exc:     # a hook never breaks an answer already given
                self.metrics.log(f"hook {type(hook).__name__} failed: {type(exc).__name__}: {exc}")

    def rejected(self, exc: Rejected, model: str, endpoint: str, t0: float) -> JSONResponse:
        self.count(model, endpoint, exc.status, t0)
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else None
        return error(exc.status, exc.message, exc.kind, headers, **exc.extra)

    def count(self, model: str, endpoint: str, status: int, t0: float) -> None:
        took = time.perf_counter() - t0
        self.metrics.requests.labels(model, endpoint, str(status)).inc()
        self.metrics.duration.labels(model, endpoint).observe(took)
        self.metrics.log(f"POST {endpoint} model={model} -> {status} in {took:.3f} s")

    def upstream(self, name: str) -> tuple[str, dict[str, str]]:
        """The server's base URL and the headers every request to it carries (its key, where it has one)."""
        if name not in self._upstreams:
            sp = self.plan.server(name)
            headers = {"Content-Type": "application/json"}
            key = self.backend.upstream_key(name)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            self._upstreams[name] = (f"http://{sp.client_host}:{sp.port}", headers)
        return self._upstreams[name]

    def request_for(self, name: str, endpoint: str, raw: bytes) -> httpx.Request:
        base, headers = self.upstream(name)
        return self.client.build_request("POST", base + endpoint, content=raw, headers=headers)

    async def race(self, request: Request, work: Awaitable[T]) -> T:
        """The work's result, unless the client disconnects first: then the work is cancelled."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise ClientGone
        finally:
            gone.cancel()

    async def send(self, name: str, endpoint: str, raw: bytes, hold: Hold) -> httpx.Response:
        """Open the upstream request; a refused connection means the server died while idle: it is
        cleaned up and started again, once, before this request goes on."""
        try:
            return await self.client.send(self.request_for(name, endpoint, raw), stream=True)
        except httpx.ConnectError as exc:
            self.sched.upstream_died(name, f"connection refused ({exc})")
            if self.sched.entries[name].state == "running":
                raise
        hold.release(ok=False)
        waiter = self.sched.enqueue(name)
        await self.sched.wait(name, waiter)
        hold.held = True
        return await self.client.send(self.request_for(name, endpoint, raw), stream=True)

    async def unary(self, request: Request, name: str, model: str, endpoint: str, raw: bytes, waiter: Waiter,
                    t0: float, call: Call | None = None) -> Response:
        try:
            await self.race(request, self.sched.wait(name, waiter))
        except Rejected as exc:
            return self.rejected(exc, model, endpoint, t0)
        except ClientGone:
            self.count(model, endpoint, 499, t0)
            return Response(status_code=499)
        ok, hold = False, Hold(self.sched, name)
        try:
            upstream = await self.race(request, self.send(name, endpoint, raw, hold))
            try:
                content = await self.race(request, upstream.aread())
            finally:
                await upstream.aclose()
            ok = upstream.status_code < 500
        except ClientGone:
            self.count(model, endpoint, 499, t0)
            return Response(status_code=499)
        except Rejected as exc:
            return self.rejected(exc, model, endpoint, t0)
        except httpx.HTTPError as exc:
            self.sched.upstream_died(name, type(exc).__name__)
            self.count(model, endpoint, 502, t0)
            return error(502, f"server {name} failed while answering: {type(exc).__name__}", "upstream_error")
        finally:
            hold.release(ok)
        self.count(model, endpoint, upstream.status_code, t0)
        if self.hooks and call is not None:
            self.finished(call, upstream.status_code, json_body(content) if upstream.status_code == 200 else None)
        return Response(content, upstream.status_code, media_type=upstream.headers.get("content-type"))

    async def stream(self, request: Request, name: str, model: str, endpoint: str, raw: bytes, waiter: Waiter,
                     t0: float, call: Call | None = None) -> Response:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if not waiter.future.done():
            return StreamingResponse(self.wait_then_relay(name, model, endpoint, raw, waiter, t0, call),
                                     media_type="text/event-stream", headers=headers)
        hold = Hold(self.sched, name)
        try:
            upstream = await self.race(request, self.send(name, endpoint, raw, hold))
        except BaseException as exc:
            hold.release(ok=False)
            if not isinstance(exc, ClientGone | Rejected | httpx.HTTPError):
                raise
            if isinstance(exc, Rejected):
                return self.rejected(exc, model, endpoint, t0)
            if isinstance(exc, httpx.HTTPError):
                self.sched.upstream_died(name, type(exc).__name__)
                self.count(model, endpoint, 502, t0)
                return error(502, f"server {name} did not answer: {type(exc).__name__}", "upstream_error")
            self.count(model, endpoint, 499, t0)
            return Response(status_code=499)
        if upstream.status_code != 200:
            content = await self.failed_answer(upstream, hold, model, endpoint, t0)
            return Response(content, upstream.status_code, media_type=upstream.headers.get("content-type"))
        return StreamingResponse(self.relay(name, model, endpoint, upstream, hold, t0, call), upstream.status_code,
                                 headers=headers, media_type=upstream.headers.get("content-type"))

    async def failed_answer(self, upstream: httpx.Response, hold: Hold, model: str, endpoint: str,
                            t0: float) -> bytes:
        """The body of an upstream answer that is not 200, read whole; the slot goes back (the server
        counts as healthy unless it answered 5xx) and the request is counted."""
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
            hold.release(upstream.status_code < 500)
        self.count(model, endpoint, upstream.status_code, t0)
        return content

    async def relay(self, name: str, model: str, endpoint: str, upstream: httpx.Response, hold: Hold,
                    t0: float, call: Call | None = None) -> AsyncIterator[bytes]:
        """The upstream's bytes as they arrive; an upstream failure becomes an error event."""
        ok, status, last, tail = False, 200, b"", b""
        keep = bool(self.hooks and call is not None)
        try:
            async for chunk in upstream.aiter_raw():
                last = chunk
                if keep:
                    tail = (tail + chunk)[-TAIL_BYTES:]
                yield chunk
            if b"[DONE]" not in last[-64:] and not self.backend.alive(name):
                raise httpx.RemoteProtocolError("the server exited before the end of the stream")
            ok = True
        except httpx.HTTPError as exc:
            status = 502
            yield error_event(f"server {name} ended the stream: {type(exc).__name__}; it will be restarted on the "
                              "next request", "upstream_error", 502)
            self.sched.upstream_died(name, type(exc).__name__)
        finally:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()
            hold.release(ok)
            self.count(model, endpoint, status if ok or status != 200 else 499, t0)
            if keep and ok:
                self.finished(call, 200, last_json_event(tail))

    async def wait_then_relay(self, name: str, model: str, endpoint: str, raw: bytes, waiter: Waiter,
                              t0: float, call: Call | None = None) -> AsyncIterator[bytes]:
        """A streaming request that has to wait (a start, a swap, a free slot): SSE comments until it is
        admitted, then the upstream's stream; a failure becomes an error event."""
        waiting = asyncio.ensure_future(self.sched.wait(name, waiter))
        admitted = False
        try:
            yield f": waiting for {model}: {self.sched.describe(name)}\n\n".encode()
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=HEARTBEAT_S)
                if not waiting.done():
                    yield f": {'loading' if self.sched.state(name) == 'loading' else 'waiting for'} {model}: " \
                          f"{self.sched.describe(name)}\n\n".encode()
            waiting.result()
            admitted = True
        except Rejected as exc:
            self.count(model, endpoint, exc.status, t0)
            yield error_event(exc.message, exc.kind, exc.status)
            return
        finally:
            if not admitted:       # the client went away: give up the place, or the slot just granted
                if not waiting.done():
                    waiting.cancel()
                elif not waiting.cancelled() and waiting.exception() is None:
                    self.sched.release(name, ok=False)
        hold = Hold(self.sched, name)
        try:
            upstream = await self.send(name, endpoint, raw, hold)
        except (Rejected, httpx.HTTPError) as exc:
            hold.release(ok=False)
            code = exc.status if isinstance(exc, Rejected) else 502
            self.count(model, endpoint, code, t0)
            yield error_event(exc.message if isinstance(exc, Rejected) else f"server {name} did not answer: "
                              f"{type(exc).__name__}", "upstream_error", code)
            return
        except BaseException:      # cancelled (the client went away) before the upstream answered
            hold.release(ok=False)
            raise
        if upstream.status_code != 200:
            content = await self.failed_answer(upstream, hold, model, endpoint, t0)
            yield error_event(content.decode("utf-8", "replace")[:2000], "upstream_error", upstream.status_code)
            return
        async for chunk in self.relay(name, model, endpoint, upstream, hold, t0, call):
            yield chunk


def create_app(gateway: Gateway) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.startup()
        try:
            yield
        finally:
            await gateway.shutdown()

    routes = [Route("/health", gateway.health, methods=["GET"]),
              Route("/metrics", gateway.prometheus, methods=["GET"]),
              Route("/v1/models", gateway.models, methods=["GET"]),
              *(Route(path, gateway.relay_endpoint, methods=["POST"]) for path in ENDPOINTS)]
    return Starlette(routes=routes, lifespan=lifespan)
