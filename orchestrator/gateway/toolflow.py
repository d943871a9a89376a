"""The gateway's handler for chat requests with `tools` on servers whose profile sets `tool_calls`:
each answer's tool calls are checked (toolcalls.check) and, until one passes, repaired and rescued,
retried with the validation errors, retried with output constrained to a valid call, sent to the
`escalate_to` server; then a clear error (or, with on_failure: raw, the answer marked unvalidated).
An invalid call is never handed on as valid.

Upstream requests are non-streamed (Gateway.complete); a streaming client gets the validated answer as
chat.completion.chunk events. The response says what happened in `x-orchestrator-tool-calls`
(valid, repaired, rescued, retried, escalated, failed, unvalidated) and `x-orchestrator-tool-attempts`;
/metrics counts both outcomes and failure kinds; the log says why, by kind and argument path (never
the content of a request or an answer)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from orchestrator.gateway import toolcalls as tc
from orchestrator.gateway.call import Call, Relay
from orchestrator.gateway.scheduler import Rejected
from orchestrator.plan.model import ToolCallsPlan

HEADER = "x-orchestrator-tool-calls"
ATTEMPTS = "x-orchestrator-tool-attempts"


@dataclass
class Outcome:
    status: int
    answer: Any
    how: str = ""                          # valid | repaired | rescued | retried | escalated | failed | ...
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    server: str = ""


def _where(errors: list[str]) -> str:
    """What was wrong, without the values: the part of each message before its first ': '."""
    return "; ".join(dict.fromkeys(e.split(": ", 1)[0] for e in errors[:6]))


class ToolFlow:
    def __init__(self, gateway: Relay) -> None:
        self.gateway = gateway
        self.settings: dict[str, ToolCallsPlan] = dict(gateway.gw.tool_calls)

    def claims(self, call: Call) -> bool:
        return call.endpoint == tc.CHAT and call.name in self.settings and bool(tc.tools_of(call.body))

    def log(self, call: Call, text: str) -> None:
        self.gateway.metrics.log(f"tool calls {call.name} model={call.model}: {text}")

    def settle(self, call: Call, server: str, body: dict[str, Any], answer: Any, repair: bool,
               attempt: int) -> tuple[dict[str, Any] | None, str, tc.Verdict]:
        """The answer if it passes as it is, or as repaired/rescued: (answer, how, verdict of the original)."""
        verdict = tc.check(body, tc.message_of(answer) or {})
        if verdict.ok:
            return answer, "valid", verdict
        for kind in verdict.kinds:
            self.gateway.metrics.tool_call_failures.labels(server, kind).inc()
        self.log(call, f"attempt {attempt} on {server} invalid ({', '.join(dict.fromkeys(verdict.kinds))}: "
                       f"{_where(verdict.errors)})")
        if repair:
            if (fixed := tc.repair(body, answer)) is not None:
                self.log(call, f"attempt {attempt}: argument JSON repaired, now valid")
                return fixed, "repaired", verdict
            if (fixed := tc.rescue(body, answer)) is not None:
                self.log(call, f"attempt {attempt}: call rescued from the text, now valid")
                return fixed, "rescued", verdict
        return None, "", verdict

    async def run(self, call: Call) -> Outcome:
        settings = self.settings[call.name]
        body = {k: v for k, v in call.body.items() if k not in ("stream", "stream_options")}
        server = call.name
        status, answer = await self.gateway.complete(call, body)
        attempts = 1
        if status != 200 or tc.message_of(answer) is None:
            return Outcome(status, answer, "", attempts, server=server)
        fixed, how, verdict = self.settle(call, server, body, answer, settings.repair, attempts)
        if fixed is not None:
            return Outcome(200, fixed, how, attempts, server=server)
        last, errors = answer, verdict.errors
        for _ in range(settings.retries):
            attempts += 1
            status, reply = await self.gateway.complete(call, tc.retry_body(body, last, errors))
            if status != 200 or tc.message_of(reply) is None:
                self.log(call, f"retry {attempts - 1} answered {status}")
                break
            fixed, _, verdict = self.settle(call, server, body, reply, settings.repair, attempts)
            if fixed is not None:
                self.log(call, f"retry {attempts - 1} valid")
                return Outcome(200, fixed, "retried", attempts, server=server)
            last, errors = reply, verdict.errors
        if settings.constrained and tc.choice_of(body) != "none":
            got, tried = await self.constrained(call, server, body, errors, attempts + 1)
            attempts += tried
            if got is not None:
                return Outcome(200, got, "retried", attempts, server=server)
        if settings.escalate_to:
            target = settings.escalate_to
            attempts += 1
            up = {**body, "model": self.gateway.plan.server(target).served_name}
            status, reply = await self.gateway.complete(call, up, target)
            if status == 200 and tc.message_of(reply) is not None:
                fixed, _, verdict = self.settle(call, target, body, reply, True, attempts)
                if fixed is None and self.settings.get(target, settings).constrained and tc.choice_of(body) != "none":
                    fixed, tried = await self.constrained(call, target, body, verdict.errors, attempts + 1)
                    attempts += tried
                if fixed is not None:
                    self.log(call, f"escalated to {target}: valid")
                    return Outcome(200, fixed, "escalated", attempts, server=target)
                last, errors = reply, verdict.errors
            else:
                self.log(call, f"escalated to {target}: it answered {status}")
        return Outcome(200, last, "failed", attempts, errors, server)

    def engine(self, server: str) -> str:
        return self.gateway.plan.server(server).engine

    async def constrained(self, call: Call, server: str, body: dict[str, Any], errors: list[str],
                          attempt: int) -> tuple[dict[str, Any] | None, int]:
        """A retry whose output the engine constrains to a valid call: (the answer if it passes, 1 if it
        was tried / 0 when the engine cannot constrain)."""
        up = tc.constrained_body(body, self.engine(server), errors)
        if up is None:
            return None, 0
        status, reply = await self.gateway.complete(call, up, server)
        if status != 200:
            self.log(call, f"constrained retry on {server} answered {status}")
            return None, 1
        fixed = tc.from_constrained(body, reply)
        self.log(call, f"attempt {attempt} on {server}: constrained retry " + ("valid" if fixed else "still invalid"))
        if fixed is not None and isinstance(reply, dict):
            # the tools moved into a system message: the usage of this attempt is not the client's prompt
            fixed.pop("usage", None)
        return fixed, 1

    async def handle(self, call: Call, request: Request) -> Response:
        try:
            out = await self.run(call)
        except Rejected as exc:
            return self.gateway.rejected(exc, call)
        except httpx.HTTPError as exc:
            self.gateway.count(call.model, call.endpoint, 502, call.t0)
            return JSONResponse({"error": {"message": f"server {call.name} failed while answering: "
                                           f"{type(exc).__name__}", "type": "upstream_error", "code": 502}}, 502,
                                headers=call.headers)
        settings = self.settings[call.name]
        if not out.how:                       # the upstream's own error, or not a chat answer: as it came
            self.gateway.count(call.model, call.endpoint, out.status, call.t0)
            self.gateway.finish(call, out.status, out.answer if isinstance(out.answer, dict) else None)
            if isinstance(out.answer, bytes | bytearray):
                return Response(bytes(out.answer), out.status, headers=call.headers)
            return JSONResponse(out.answer, out.status, headers=call.headers)
        if out.how == "failed" and settings.on_failure == "raw":
            out.how = "unvalidated"
        self.gateway.metrics.tool_calls.labels(call.name, out.how).inc()
        call.notes["tool_calls"] = out.how
        call.headers[HEADER] = out.how
        call.headers[ATTEMPTS] = str(out.attempts)
        if out.server != call.name:
            call.headers["x-orchestrator-server"] = out.server
        took = time.perf_counter() - call.t0
        self.log(call, f"{out.how} after {out.attempts} attempt{'s' if out.attempts > 1 else ''} in {took:.2f} s")
        if out.how == "failed":
            self.gateway.count(call.model, call.endpoint, 502, call.t0)
            self.gateway.finish(call, 502, None)
            return JSONResponse({"error": {
                "message": f"the model gave no valid tool call in {out.attempts} attempts: "
                           + "; ".join(out.errors[:6]),
                "type": "tool_call_error", "code": 502, "errors": out.errors[:20]}}, 502, headers=call.headers)
        self.gateway.count(call.model, call.endpoint, 200, call.t0)
        self.gateway.finish(call, 200, out.answer)
        if call.stream:
            return StreamingResponse(self._events(out.answer), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **call.headers})
        return JSONResponse(out.answer, 200, headers=call.headers)

    async def _events(self, answer: dict[str, Any]) -> AsyncIterator[bytes]:
        for event in tc.chunks(answer):
            yield event
