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

Features plug in without rewriting the relay: each relayed request is one `Call`; `Gateway.hooks` see
it before it is queued (they may pick its server for a virtual model name, change its body, add
response headers, or answer it) and after its answer; the first of `Gateway.handlers` that claims a call
answers it instead of the plain relay, with `Gateway.complete` for its upstream requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from orchestrator.gateway.backend import GatewayBackend
from orchestrator.gateway.call import Call, Handler, Hook
from orchestrator.gateway.dashboard import Dashboard
from orchestrator.gateway.metrics import Metrics
from orchestrator.gateway.routing import Judge, Router, decide
from orchestrator.gateway.scheduler import Rejected, Scheduler, ServerSpec, Waiter
from orchestrator.plan.model import Plan

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
HEARTBEAT_S = 1.0
TICK_S = 1.0
UPSTREAM_KEEPALIVE_S = 2.0   # below llama-server's 5 s keep-alive timeout (see upstream_client)
T = TypeVar("T")


class TooLarge(Exception):
    pass


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


def client_of(request: Request, body: dict[str, Any]) -> str:
    user = body.get("user")
    if isinstance(user, str) and user:
        return "user:" + user[:64]
    given = request.headers.get("x-client-id", "")
    if given:
        return "id:" + given[:64]
    return "addr:" + (request.client.host if request.client else "-")


def last_event(tail: bytes) -> dict[str, Any] | None:
    """The last JSON `data:` event in the end of an SSE stream (llama.cpp puts its timings there)."""
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data == b"[DONE]":
                continue
            try:
                value = json.loads(data)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


STREAM_TAIL = 16384


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return



def upstream_client() -> httpx.AsyncClient:
    """The pool the gateway reaches its servers with. TCP_NODELAY: httpx writes a request's headers and
    body separately, and Nagle's algorithm would hold the body until the server's delayed ACK of the
    headers (~40 ms on Linux loopback) on every request. Keep-alive expiry below the engines' own:
    llama-server (cpp-httplib) closes a connection idle for CPPHTTPLIB_KEEPALIVE_TIMEOUT_SECOND = 5 s,
    httpx's default expiry is also 5 s, and a request sent on a connection the server is closing at that
    moment fails with RemoteProtocolError (seen as a 502 "server a did not answer")."""
    transport = httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=UPSTREAM_KEEPALIVE_S),
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.AsyncClient(timeout=httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=None), trust_env=False,
                             transport=transport)

class Gateway:
    def __init__(self, plan: Plan, backend: GatewayBackend, api_key: str | None, metrics: Metrics | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        assert plan.gateway is not None
        self.plan = plan
        self.gw = plan.gateway
        self.backend = backend
        self.api_key = api_key
        self.metrics = metrics or Metrics()
        self.sched = Scheduler(specs(plan), budgets(plan), backend, self.gw.queue, self.metrics)
        self.by_model = {sp.served_name: sp.name for sp in plan.servers}
        self.hooks: list[Hook] = []
        self.handlers: list[Handler] = []
        self.routes = {r.name: r for r in self.gw.routes}
        if self.routes:
            router = Router(self.gw.routes, self.metrics.route_decisions, self.metrics.route_escalations)
            self.hooks.append(router)
            if any(r.judge_server for r in self.gw.routes):
                self.handlers.append(Judge(router, self, self.metrics.route_judgements))
        if self.gw.tool_calls:
            from orchestrator.gateway.toolflow import ToolFlow
            self.handlers.append(ToolFlow(self))
        self.client = client or upstream_client()
        self.created = int(time.time())
        self._ticker: asyncio.Task[None] | None = None
        self._upstreams: dict[str, tuple[str, dict[str, str]]] = {}
        self.prefix: Any = None
        if self.gw.prefix_report:
            from orchestrator.gateway.prefixcache import PrefixCacheHook

            root = backend.deployer.store.root if backend.deployer else None
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
        data += [{"id": r.name, "object": "model", "created": self.created, "owned_by": "orchestrator", "route": True,
                  "tiers": [{"server": t.server, "model": t.served_name, "up_to": t.up_to} for t in r.tiers]}
                 for r in self.routes.values()]
        return JSONResponse({"object": "list", "data": data})

    async def route(self, request: Request) -> Response:
        """POST /v1/route: the routing decision for a chat body, without running a model."""
        if (denied := self.unauthorized(request)) is not None:
            return denied
        try:
            raw = await self.read_body(request)
        except TooLarge:
            return error(413, f"the request body is larger than {self.gw.max_body_bytes} bytes (gateway.max_body)",
                         "invalid_request_error")
        call = self.parse(request, raw, time.perf_counter())
        if isinstance(call, JSONResponse):
            return call
        if call.model not in self.routes:
            names = sorted(self.routes)
            return error(404, f"{call.model!r} is not a route; routes: {', '.join(names) or 'none (gateway.routes)'}",
                         "invalid_request_error", param="model", available=names)
        return JSONResponse(decide(self.routes[call.model], call.body))

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

    def parse(self, request: Request, raw: bytes, t0: float) -> Call | JSONResponse:
        """The call a request body asks for, or the 400 that answers it; its server is the one serving
        the model's name ("" when none does: a hook may know the name, else it is a 404)."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return error(400, f"the request body is not valid JSON: {exc}", "invalid_request_error")
        if not isinstance(body, dict):
            return error(400, f"the request body must be a JSON object, not {type(body).__name__}",
                         "invalid_request_error")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return error(400, f"the request names no model: add \"model\": one of {', '.join(self.names())}",
                         "invalid_request_error", param="model")
        return Call(request.url.path, body, raw, model, self.by_model.get(model, ""), body.get("stream") is True, t0,
                    client_of(request, body),
                    request_headers={k: v for k, v in request.headers.items() if k.startswith("x-")})

    def names(self) -> list[str]:
        """Every model name a client may ask for."""
        return sorted([*self.by_model, *self.routes])

    def unknown(self, call: Call) -> JSONResponse:
        names = self.names()
        return error(404, f"model {call.model!r} is not served here; available: {', '.join(names)}",
                     "invalid_request_error", param="model", available=names)

    def answered(self, call: Call, status: int, content: bytes) -> None:
        """Count a whole upstream answer and tell the hooks, with its JSON body where it has one."""
        self.count(call.model, call.endpoint, status, call.t0)
        if self.hooks:
            try:
                answer = json.loads(content)
            except ValueError:
                answer = None
            self.finish(call, status, answer if isinstance(answer, dict) else None)

    def finish(self, call: Call, status: int, answer: dict[str, Any] | None) -> None:
        for hook in self.hooks:
            try:
                hook.finished(call, status, answer)
            except Exception as exc:  # a hook's bookkeeping never breaks an answer already given
                self.metrics.log(f"hook {type(hook).__name__} failed after {call.endpoint}: {type(exc).__name__}: "
                                 f"{exc}")

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
        call = self.parse(request, raw, t0)
        if isinstance(call, JSONResponse):
            self.count("-", endpoint, call.status_code, t0)
            return call
        for hook in self.hooks:
            if (answer := hook.prepare(call)) is not None:
                self.count(call.model, endpoint, answer.status_code, t0)
                return answer
        if not call.name:
            answer = self.unknown(call)
            self.count("-", endpoint, 404, t0)
            return answer
        call.headers["x-orchestrator-server"] = call.name
        for handler in self.handlers:
            if handler.claims(call):
                return await handler.handle(call, request)
        try:
            waiter = self.sched.enqueue(call.name)
        except Rejected as exc:
            return self.rejected(exc, call)
        if call.stream:
            return await self.stream(request, call, waiter)
        return await self.unary(request, call, waiter)

    async def complete(self, call: Call, body: dict[str, Any], name: str | None = None) -> tuple[int, Any]:
        """One non-streamed upstream request for a handler, through the scheduler like any request (it
        waits for a slot or a start): (status, its JSON, or its bytes when not JSON). Rejected (429/503)
        and httpx errors are the handler's to answer."""
        name = name or call.name
        waiter = self.sched.enqueue(name)
        await self.sched.wait(name, waiter)
        ok, hold = False, Hold(self.sched, name)
        raw = json.dumps({**body, "stream": False}, ensure_ascii=False).encode()
        try:
            upstream = await self.send(name, call.endpoint, raw, hold)
            try:
                content = await upstream.aread()
            finally:
                await upstream.aclose()
            ok = upstream.status_code < 500
        except httpx.HTTPError as exc:
            self.sched.upstream_died(name, type(exc).__name__)
            raise
        finally:
            hold.release(ok)
        try:
            return upstream.status_code, json.loads(content)
        except ValueError:
            return upstream.status_code, content

    def rejected(self, exc: Rejected, call: Call) -> JSONResponse:
        self.count(call.model, call.endpoint, exc.status, call.t0)
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

    async def unary(self, request: Request, call: Call, waiter: Waiter) -> Response:
        name = call.name
        try:
            await self.race(request, self.sched.wait(name, waiter))
        except Rejected as exc:
            return self.rejected(exc, call)
        except ClientGone:
            self.count(call.model, call.endpoint, 499, call.t0)
            return Response(status_code=499)
        ok, hold = False, Hold(self.sched, name)
        try:
            upstream = await self.race(request, self.send(name, call.endpoint, call.raw, hold))
            try:
                content = await self.race(request, upstream.aread())
            finally:
                await upstream.aclose()
            ok = upstream.status_code < 500
        except ClientGone:
            self.count(call.model, call.endpoint, 499, call.t0)
            return Response(status_code=499)
        except Rejected as exc:
            return self.rejected(exc, call)
        except httpx.HTTPError as exc:
            self.sched.upstream_died(name, type(exc).__name__)
            self.count(call.model, call.endpoint, 502, call.t0)
            self.finish(call, 502, None)
            return error(502, f"server {name} failed while answering: {type(exc).__name__}", "upstream_error",
                         headers=call.headers)
        finally:
            hold.release(ok)
        self.answered(call, upstream.status_code, content)
        return Response(content, upstream.status_code, media_type=upstream.headers.get("content-type"),
                        headers=call.headers)

    async def stream(self, request: Request, call: Call, waiter: Waiter) -> Response:
        name = call.name
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **call.headers}
        if not waiter.future.done():
            return StreamingResponse(self.wait_then_relay(call, waiter), media_type="text/event-stream",
                                     headers=headers)
        hold = Hold(self.sched, name)
        try:
            upstream = await self.race(request, self.send(name, call.endpoint, call.raw, hold))
        except BaseException as exc:
            hold.release(ok=False)
            if not isinstance(exc, ClientGone | Rejected | httpx.HTTPError):
                raise
            if isinstance(exc, Rejected):
                return self.rejected(exc, call)
            if isinstance(exc, httpx.HTTPError):
                self.sched.upstream_died(name, type(exc).__name__)
                self.count(call.model, call.endpoint, 502, call.t0)
                self.finish(call, 502, None)
                return error(502, f"server {name} did not answer: {type(exc).__name__}", "upstream_error",
                             headers=call.headers)
            self.count(call.model, call.endpoint, 499, call.t0)
            return Response(status_code=499)
        if upstream.status_code != 200:
            content = await self.failed_answer(upstream, hold, call)
            return Response(content, upstream.status_code, media_type=upstream.headers.get("content-type"),
                            headers=call.headers)
        return StreamingResponse(self.relay(call, upstream, hold), upstream.status_code,
                                 headers=headers, media_type=upstream.headers.get("content-type"))

    async def failed_answer(self, upstream: httpx.Response, hold: Hold, call: Call) -> bytes:
        """The body of an upstream answer that is not 200, read whole; the slot goes back (the server
        counts as healthy unless it answered 5xx) and the request is counted."""
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
            hold.release(upstream.status_code < 500)
        self.answered(call, upstream.status_code, content)
        return content

    async def relay(self, call: Call, upstream: httpx.Response, hold: Hold) -> AsyncIterator[bytes]:
        """The upstream's bytes as they arrive; an upstream failure becomes an error event."""
        name = call.name
        ok, status, tail = False, 200, b""
        keep = bool(self.hooks)
        try:
            async for chunk in upstream.aiter_raw():
                tail = (tail + chunk)[-STREAM_TAIL:] if keep else chunk
                yield chunk
            if b"[DONE]" not in tail[-64:] and not self.backend.alive(name):
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
            code = status if ok or status != 200 else 499
            self.count(call.model, call.endpoint, code, call.t0)
            if keep:
                self.finish(call, code, last_event(tail) if ok else None)

    async def wait_then_relay(self, call: Call, waiter: Waiter) -> AsyncIterator[bytes]:
        """A streaming request that has to wait (a start, a swap, a free slot): SSE comments until it is
        admitted, then the upstream's stream; a failure becomes an error event."""
        name, model = call.name, call.model
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
            self.count(model, call.endpoint, exc.status, call.t0)
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
            upstream = await self.send(name, call.endpoint, call.raw, hold)
        except (Rejected, httpx.HTTPError) as exc:
            hold.release(ok=False)
            code = exc.status if isinstance(exc, Rejected) else 502
            self.count(model, call.endpoint, code, call.t0)
            yield error_event(exc.message if isinstance(exc, Rejected) else f"server {name} did not answer: "
                              f"{type(exc).__name__}", "upstream_error", code)
            return
        except BaseException:      # cancelled (the client went away) before the upstream answered
            hold.release(ok=False)
            raise
        if upstream.status_code != 200:
            content = await self.failed_answer(upstream, hold, call)
            yield error_event(content.decode("utf-8", "replace")[:2000], "upstream_error", upstream.status_code)
            return
        async for chunk in self.relay(call, upstream, hold):
            yield chunk


def create_app(gateway: Gateway) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.startup()
        try:
            yield
        finally:
            await gateway.shutdown()

    dashboard = Dashboard(gateway)            # the page at / and its data under /ui/ (dashboard.py)
    gateway.hooks.append(dashboard)
    routes = [*dashboard.routes(), Route("/health", gateway.health, methods=["GET"]),
              Route("/metrics", gateway.prometheus, methods=["GET"]),
              Route("/v1/models", gateway.models, methods=["GET"]),
              Route("/v1/route", gateway.route, methods=["POST"]),
              *(Route(path, gateway.relay_endpoint, methods=["POST"]) for path in ENDPOINTS)]
    return Starlette(routes=routes, lifespan=lifespan)
