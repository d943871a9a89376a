"""The pieces of a relayed call that hooks rely on: who asked, and the last JSON event of a stream."""

from __future__ import annotations

import json

from starlette.requests import Request

from orchestrator.gateway.app import client_of, last_event
from orchestrator.gateway.call import Call


def request(headers: dict[str, str] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": raw,
                    "client": ("10.1.2.3", 5555)})


def test_client_is_user_then_header_then_address() -> None:
    assert client_of(request({"x-client-id": "ide"}), {"user": "alice"}) == "user:alice"
    assert client_of(request({"x-client-id": "ide"}), {}) == "id:ide"
    assert client_of(request(), {"user": 7}) == "addr:10.1.2.3"


def test_last_event_skips_done_and_reads_the_final_chunk() -> None:
    final = {"choices": [], "timings": {"cache_n": 12, "prompt_n": 3}}
    tail = b'data: {"choices": [{"delta": {"content": "a"}}]}\n\ndata: ' + json.dumps(final).encode() + \
        b"\n\ndata: [DONE]\n\n"
    assert last_event(tail) == final
    assert last_event(b"data: {broken\n\n") is None
    assert last_event(b": comment only\n\n") is None


def test_set_body_re_encodes_what_goes_upstream() -> None:
    call = Call("/v1/chat/completions", {"model": "m"}, b'{"model": "m"}', "m", "a", False, 0.0, "addr:x")
    call.set_body({"model": "m", "messages": [{"role": "user", "content": "é"}]})
    assert json.loads(call.raw) == call.body and "é".encode() in call.raw
