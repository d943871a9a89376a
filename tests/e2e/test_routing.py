"""Routing in front of real llama-server (llama.cpp b11434) processes: SmolLM2-135M-Instruct as the fast
tier and Gemma 3 270M as the smart one, behind one virtual name `auto`, driven with the official openai
client: the decision per request and its headers, a conversation that stays on its tier, escalation by
the x-route-tier header and by an upstream error (a prompt over the fast server's context), POST
/v1/route, /v1/models and the decision counters in /metrics."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from orchestrator.gateway import route_set
from tests.e2e.gateway_util import gateway_profile, metric, up

pytestmark = pytest.mark.engines

HARD = "Write a Python function that parses ISO 8601 durations, with unit tests, and explain the design trade-offs."


@pytest.fixture
def routed(env, gemma: Path, smollm: Path):
    from orchestrator.provision import builds as provision

    provision.build("llama.cpp", "cpu")   # cached after the first build
    profile, port = gateway_profile(env, "gwroute", [
        {"name": "fast", "model": {"path": str(smollm), "served_name": "smol"}, "context": 512},
        {"name": "smart", "model": {"path": str(gemma), "served_name": "gemma"}, "context": 4096}],
        routes={"auto": {"tiers": [{"server": "fast", "up_to": "simple"}, {"server": "smart"}]},
                "judged": {"tiers": [{"server": "fast", "up_to": "simple"}, {"server": "smart"}],
                           "judge": {"enabled": True, "margin": 1.0, "timeout_ms": 30000}},
                "hasty": {"tiers": [{"server": "fast", "up_to": "simple"}, {"server": "smart"}],
                          "judge": {"enabled": True, "margin": 1.0, "timeout_ms": 1}}})
    up(env, profile)
    yield port
    down = env.run("down", str(profile))
    assert down.returncode == 0, down.stderr


def ask(c: openai.OpenAI, messages: list[dict[str, str]], **extra: object) -> tuple[str, str, str]:
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=messages,  # type: ignore[arg-type]
                                                      max_tokens=8, temperature=0, **extra)  # type: ignore[call-overload]
    answer = raw.parse()
    assert answer.choices[0].message.content is not None
    return raw.headers["x-orchestrator-server"], raw.headers["x-orchestrator-route"], answer.model


def test_auto_routes_sticks_escalates_and_counts(routed: int) -> None:
    port = routed
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    models = {m.id: m.model_extra or {} for m in c.models.list().data}
    assert models["auto"]["route"] is True and [t["server"] for t in models["auto"]["tiers"]] == ["fast", "smart"]
    assert {"smol", "gemma"} <= set(models)

    server, why, _ = ask(c, [{"role": "user", "content": "Hi! How are you?"}])
    assert server == "fast" and why.startswith("auto tier=0 server=fast level=simple") and "by=score" in why
    server, why, _ = ask(c, [{"role": "user", "content": HARD}])
    assert server == "smart" and "signals=code:" in why

    # The hard conversation stays on the smart server, though its next ask is chit-chat.
    convo = [{"role": "user", "content": HARD}, {"role": "assistant", "content": "def parse(s): ..."},
             {"role": "user", "content": "thanks!"}]
    server, why, _ = ask(c, convo)
    assert server == "smart" and "by=sticky" in why
    # Streamed answers carry the same headers.
    with c.chat.completions.with_streaming_response.create(model="auto", messages=[{"role": "user", "content": "hey"}],
                                                           max_tokens=4, stream=True) as s:
        assert s.headers["x-orchestrator-server"] == "fast" and "".join(s.iter_lines())

    # Asked for explicitly.
    server, why, _ = ask(c, [{"role": "user", "content": "hello again"}], extra_headers={"x-route-tier": "smart"})
    assert server == "smart" and "by=header" in why

    # An agent harness's long system prompt does not make a simple ask hard, but it overflows the fast
    # server's 512-token context: that answer fails, and the conversation moves up a tier.
    harness = json.loads((Path(route_set.__file__).parents[1] / "data" / "route_harness.json").read_text())
    agent = [{"role": "system", "content": harness["systems"]["agent"]}, {"role": "user", "content": "What's the branch?"}]
    with pytest.raises(openai.BadRequestError) as failed:
        ask(c, agent)
    assert failed.value.response.headers["x-orchestrator-server"] == "fast"
    server, why, _ = ask(c, [*agent, {"role": "assistant", "content": "?"}, {"role": "user", "content": "the branch?"}])
    assert server == "smart" and "by=escalated" in why

    # The decision alone, without a model.
    d = httpx.post(f"http://127.0.0.1:{port}/v1/route", json={"model": "auto", "messages": [
        {"role": "user", "content": "Think step by step: prove there are infinitely many primes."}]}).json()
    assert d["server"] == "smart" and d["tier"] == 1 and d["score"] > 0.17 and "step_by_step" in d["signals"]
    assert httpx.post(f"http://127.0.0.1:{port}/v1/route", json={"model": "gemma", "messages": []}).status_code == 404

    m = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert metric(m, "gateway_route_decisions_total", route="auto", server="fast") == 3
    assert metric(m, "gateway_route_decisions_total", route="auto", server="smart") == 4
    assert metric(m, "gateway_route_decisions_total", route="auto", by="sticky") == 1
    assert metric(m, "gateway_route_escalations_total", route="auto", cause="context") == 1
    assert metric(m, "gateway_requests_total", model="auto", code="400") == 1


def test_judgement_near_a_boundary_and_its_time_limit(routed: int) -> None:
    port = routed
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    verdicts = []
    for text in ("Hi there!", HARD):
        raw = c.chat.completions.with_raw_response.create(model="judged", messages=[{"role": "user", "content": text}],
                                                          max_tokens=4, temperature=0)
        assert raw.parse().choices[0].message.content is not None
        why = raw.headers["x-orchestrator-route"]
        assert "by=judge judge=" in why or "by=score judge=unclear" in why, why   # the small model's verdict, whatever it is
        assert raw.headers["x-orchestrator-server"] in ("fast", "smart")
        verdicts.append(why)
    raw = c.chat.completions.with_raw_response.create(model="hasty", messages=[{"role": "user", "content": HARD}],
                                                      max_tokens=4, temperature=0)
    assert raw.parse().choices and "by=score judge=timeout" in raw.headers["x-orchestrator-route"]
    assert raw.headers["x-orchestrator-server"] == "smart"        # the score decided
    m = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert metric(m, "gateway_route_judgements_total", route="judged") == 2
    assert metric(m, "gateway_route_judgements_total", route="hasty", verdict="timeout") == 1
    assert metric(m, "gateway_route_decisions_total", route="judged") == 2
