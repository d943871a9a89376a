"""The gateway's Prometheus metrics (one registry per gateway) and its log: what was asked, what was
started and stopped and why. Labels are server and model names, endpoints and status codes; no header,
key or body ever reaches either."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from orchestrator.gateway.scheduler import Events, StartOutcome

STATES = ("stopped", "loading", "running", "stopping", "failed")
MAX_CLIENT_LABELS = 64      # distinct client labels on the prefix-cache counters; later clients count as "other"


class Metrics(Events):
    def __init__(self, log: TextIO | None = None) -> None:
        self.registry = CollectorRegistry()
        self.log_stream = log or sys.stderr
        r = self.registry
        self.requests = Counter("gateway_requests", "Requests answered, by model, endpoint and status code",
                                ["model", "endpoint", "code"], registry=r)
        self.duration = Histogram("gateway_request_duration_seconds", "Time from request to the last byte",
                                  ["model", "endpoint"], registry=r,
                                  buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.wait = Histogram("gateway_queue_wait_seconds", "Time a request waited for a slot (and a start)",
                              ["model"], registry=r, buckets=(0.001, 0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.starts = Counter("gateway_server_starts", "Server starts, by outcome", ["server", "outcome"], registry=r)
        self.start_seconds = Histogram("gateway_server_start_seconds", "Time to start a server and pass its health "
                                       "stages", ["server"], registry=r, buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300))
        self.stops = Counter("gateway_server_stops", "Server stops, by reason (idle, swap, crashed)",
                             ["server", "reason"], registry=r)
        self.rejections = Counter("gateway_rejections", "Requests the gateway answered itself, by reason",
                                  ["server", "reason"], registry=r)
        self.state = Gauge("gateway_server_state", "1 for the server's current state", ["server", "state"],
                           registry=r)
        self.inflight = Gauge("gateway_server_inflight", "Requests being served", ["server"], registry=r)
        self.route_decisions = Counter("gateway_route_decisions", "Routing decisions, by route, tier, server and "
                                       "how (score, sticky, escalated, header)", ["route", "tier", "server", "by"],
                                       registry=r)
        self.route_escalations = Counter("gateway_route_escalations", "Conversations moved up a tier, by cause "
                                         "(error, context, tool_calls)", ["route", "cause"], registry=r)
        self.route_judgements = Counter("gateway_route_judgements", "Judgements near a tier boundary, by verdict "
                                        "(simple, hard, unclear, timeout, failed)", ["route", "verdict"], registry=r)
        self.tool_calls = Counter("gateway_tool_calls", "Answers to requests with tools, by what the gateway did: "
                                  "valid (first time), repaired, rescued, retried, escalated, failed, unvalidated",
                                  ["server", "outcome"], registry=r)
        self.tool_call_failures = Counter("gateway_tool_call_failures", "Invalid answers seen (each attempt), by "
                                          "kind: no_call, unknown_tool, bad_json, schema, unwanted_call, text_call",
                                          ["server", "kind"], registry=r)
        self.waiting = Gauge("gateway_server_waiting", "Requests waiting for a slot", ["server"], registry=r)
        pc = ["model", "client"]
        self.prefix_prompt = Counter("gateway_prefix_prompt_tokens", "Prompt tokens of chat/completion requests (the "
                                     "engine's count)", pc, registry=r)
        self.prefix_reused = Counter("gateway_prefix_reused_tokens", "Prompt tokens the engine reused from its "
                                     "prefix cache (its own report)", pc, registry=r)
        self.prefix_reusable = Counter("gateway_prefix_reusable_tokens", "Prompt tokens shared with the "
                                       "conversation's previous prompt (could have been reused)", pc, registry=r)
        self.prefix_lost = Counter("gateway_prefix_lost_tokens", "Tokens of reuse lost, by cause (see "
                                   "orchestrate cache-report)", [*pc, "cause"], registry=r)
        self._clients: set[str] = set()

    def client_label(self, client: str) -> str:
        """A bounded set of client labels: the first MAX_CLIENT_LABELS seen, then 'other'."""
        client = client[:64]
        if client in self._clients:
            return client
        if len(self._clients) < MAX_CLIENT_LABELS:
            self._clients.add(client)
            return client
        return "other"

    def log(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        print(f"{stamp} {text}", file=self.log_stream, flush=True)

    def started(self, name: str, outcome: StartOutcome) -> None:
        self.starts.labels(name, "ok" if outcome.ok else "failed").inc()
        self.start_seconds.labels(name).observe(outcome.elapsed_s)
        if outcome.ok:
            self.log(f"start {name}: {outcome.detail} in {outcome.elapsed_s:.1f} s")
        else:
            self.log(f"start {name} failed at stage {outcome.stage}: {outcome.detail} ({outcome.cause}: "
                     f"{outcome.hint})")

    def stopped(self, name: str, reason: str) -> None:
        self.stops.labels(name, reason).inc()
        self.log(f"stop {name}: {reason}")

    def rejected(self, name: str, status: int, reason: str) -> None:
        self.rejections.labels(name, reason).inc()

    def changed(self, name: str, state: str, inflight: int, waiting: int) -> None:
        for s in STATES:
            self.state.labels(name, s).set(1 if s == state else 0)
        self.inflight.labels(name).set(inflight)
        self.waiting.labels(name).set(waiting)

    def text(self) -> bytes:
        return generate_latest(self.registry)
