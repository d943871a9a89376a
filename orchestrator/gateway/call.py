"""One relayed request as the gateway's features see it (`Call`), the two ways they plug in (`Hook`,
`Handler`), and what a handler may ask of the gateway (`Relay`). A module of its own so that the
features import it, not the app that registers them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orchestrator.gateway.metrics import Metrics
from orchestrator.gateway.scheduler import Rejected
from orchestrator.plan.model import GatewayPlan, Plan


@dataclass
class Call:
    """One relayed request on its way through the gateway."""

    endpoint: str                  # /v1/chat/completions, /v1/completions, /v1/embeddings
    body: dict[str, Any]           # the parsed request body
    raw: bytes                     # the bytes sent upstream (set_body re-encodes after a change)
    model: str                     # the name the client asked for
    name: str                      # the server that answers ("" until a server serves that name)
    stream: bool
    t0: float                      # time.perf_counter() at arrival
    client: str                    # who asked: body "user", else header x-client-id, else the peer address
    headers: dict[str, str] = field(default_factory=dict)   # added to the response
    notes: dict[str, Any] = field(default_factory=dict)     # what hooks learned, for later hooks and metrics
    request_headers: dict[str, str] = field(default_factory=dict)   # the request's x-* headers (lowercase)

    def set_body(self, body: dict[str, Any]) -> None:
        self.body = body
        self.raw = json.dumps(body, ensure_ascii=False).encode()


class Hook(Protocol):
    """Sees every relayed call, in `Gateway.hooks` order."""

    def prepare(self, call: Call) -> Response | None:
        """Before the call is queued: may set call.name, change the body, add headers; a Response
        answers the request instead."""

    def finished(self, call: Call, status: int, answer: dict[str, Any] | None) -> None:
        """After the answer: its JSON body (unary) or the last JSON data event of a stream; None when
        it was not JSON."""


class Handler(Protocol):
    """Answers the calls it claims instead of the plain relay (e.g. with several upstream requests)."""

    def claims(self, call: Call) -> bool: ...

    async def handle(self, call: Call, request: Request) -> Response: ...


class Relay(Protocol):
    """What a handler uses of the gateway (orchestrator.gateway.app.Gateway)."""

    plan: Plan
    gw: GatewayPlan
    metrics: Metrics

    async def complete(self, call: Call, body: dict[str, Any], name: str | None = None) -> tuple[int, Any]: ...
    def rejected(self, exc: Rejected, call: Call) -> JSONResponse: ...
    def count(self, model: str, endpoint: str, status: int, t0: float) -> None: ...
    def finish(self, call: Call, status: int, answer: dict[str, Any] | None) -> None: ...
