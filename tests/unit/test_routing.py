"""Routing (orchestrator/gateway/routing.py): the scorer on the labeled set's training split, what must
not make a request hard (a harness's long system prompt, its tool list), the hook's decisions,
stickiness and escalation, and the profile's routes: checks → FILE:LINE errors, the plan's form."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from orchestrator.gateway import route_set
from orchestrator.gateway.call import Call
from orchestrator.gateway.routing import Router, conversation_key, decide, score
from orchestrator.pipeline import build_plan
from orchestrator.plan.model import RoutePlan, RouteTier, plan_from_dict
from orchestrator.profile import load_text
from tests.unit.test_gateway_profile import ENV, two_servers

TH = {"simple": 0.17, "medium": 0.35, "complex": 0.6}


def route(sticky: int = 100) -> RoutePlan:
    return RoutePlan("auto", [RouteTier("fast", "small", "simple"), RouteTier("smart", "big", None)], TH, sticky, 2)


def chat(*users: str, system: str = "", **extra: object) -> dict:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    for i, u in enumerate(users):
        if i:
            messages.append({"role": "assistant", "content": "ok"})
        messages.append({"role": "user", "content": u})
    return {"model": "auto", "messages": messages, **extra}


def call(body: dict, client: str = "addr:1", **headers: str) -> Call:
    return Call("/v1/chat/completions", body, json.dumps(body).encode(), body["model"], "", False, time.perf_counter(),
                client, request_headers=headers)


def test_scorer_on_the_training_split() -> None:
    items = route_set.load(split="train")
    assert len(items) >= 100 and {i.level for i in items} == {"simple", "complex"}
    r = route()
    rep = route_set.report(r, items, [decide(r, i.body) for i in items])
    assert rep["accuracy"] >= 0.9, rep["wrong"]


def test_the_set_is_big_and_mixed_and_its_splits_are_fixed() -> None:
    every = route_set.load()
    assert len(every) >= 150
    assert {i.split for i in every} == {"train", "heldout"}
    assert len({i.lang for i in every}) >= 4 and {"agent", "long-context", "math", "code", "chit-chat"} <= \
        {i.kind for i in every}
    assert [i.id for i in every if i.split == "heldout"] == [i.id for n, i in enumerate(every) if n % 3 == 2]


def test_harness_boilerplate_does_not_make_a_request_hard() -> None:
    harness = json.loads((Path(route_set.__file__).parents[1] / "data" / "route_harness.json").read_text())
    body = chat("What's the current branch?", system=harness["systems"]["agent"] * 4,
                tools=harness["tools"]["agent"])
    d = score(body, TH)
    assert d.level == "simple", d
    assert d.signals["length"] == 0          # the system prompt is not the user's text
    reminder = "<system-reminder>" + "Think step by step and analyze the code carefully. " * 50 + "</system-reminder>"
    assert score(chat(reminder + "thanks!"), TH).level == "simple"


def test_signals_move_the_score() -> None:
    assert score(chat("hi there"), TH).level == "simple"
    hard = score(chat("Think step by step: prove that there are infinitely many primes."), TH)
    assert hard.level in ("complex", "reasoning") and hard.signals["step_by_step"] > 0 and hard.signals["math"] > 0
    code = score(chat("```python\nx = [1, 2]\nd = {x: 1}\n```\nWhy does this fail?"), TH)
    assert code.signals["code"] > 0 and code.level != "simple"
    assert score(chat("What is the capital of France?", max_tokens=4096), TH).signals["max_tokens"] > 0
    long_doc = chat("Analyze this report and compare its findings: " + "The results vary by region. " * 200)
    assert score(long_doc, TH).signals["length"] > 0 and score(long_doc, TH).level != "simple"


def test_hook_picks_a_tier_and_says_why() -> None:
    router = Router([route()])
    easy = call(chat("Hello!"))
    router.prepare(easy)
    assert easy.name == "fast"
    assert easy.headers["x-orchestrator-route"].startswith("auto tier=0 server=fast level=simple")
    hard = call(chat("Write a Rust function that parses JSON with unit tests and explain the design trade-offs."))
    router.prepare(hard)
    assert hard.name == "smart" and "signals=code:" in hard.headers["x-orchestrator-route"]
    other = call({"model": "gemma", "messages": []})
    router.prepare(other)
    assert other.name == "" and not other.headers      # not a route: left to the plain lookup


def test_a_conversation_stays_on_its_tier_and_never_moves_down() -> None:
    router = Router([route()])
    first = call(chat("Prove that the square root of 2 is irrational, step by step."))
    router.prepare(first)
    assert first.name == "smart"
    follow = call(chat("Prove that the square root of 2 is irrational, step by step.", "thanks!"))
    router.prepare(follow)
    assert follow.name == "smart" and "by=sticky" in follow.headers["x-orchestrator-route"]
    stranger = call(chat("Prove that the square root of 2 is irrational, step by step.", "thanks!"), client="addr:2")
    router.prepare(stranger)
    assert stranger.name == "fast" and "by=score" in stranger.headers["x-orchestrator-route"]   # another client's
    up = call(chat("hi", "Now write a Python parser for ISO dates with unit tests and explain the design."))
    router.prepare(up)
    assert up.name == "smart"               # a harder ask moves a conversation up


@pytest.mark.parametrize("status,answer,notes,moves", [
    (500, {"error": {"message": "boom"}}, {}, True),
    (400, {"error": {"message": "the request exceeds the available context size", "type": "exceed_context_size_error"}},
     {}, True),
    (400, {"error": {"message": "bad temperature"}}, {}, False),
    (200, {}, {"tool_calls": "failed"}, False),      # one failure: not yet (escalate_after 2)
])
def test_escalation_moves_the_conversation_up(status, answer, notes, moves) -> None:
    router = Router([route()])
    c = call(chat("hi"))
    router.prepare(c)
    assert c.name == "fast"
    c.notes.update(notes)
    router.finished(c, status, answer)
    nxt = call(chat("hi", "and again"))
    router.prepare(nxt)
    assert (nxt.name == "smart") is moves
    if moves:
        assert "by=escalated" in nxt.headers["x-orchestrator-route"]


def test_repeated_tool_call_failures_escalate() -> None:
    router = Router([route()])
    for n in range(2):
        c = call(chat("hi", *(["list files"] * n)))
        router.prepare(c)
        assert c.name == "fast"
        c.notes["tool_calls"] = "failed"
        router.finished(c, 200, {})
    c = call(chat("hi", "list files", "list files"))
    router.prepare(c)
    assert c.name == "smart"


def test_header_asks_for_a_tier() -> None:
    router = Router([route()])
    for value in ("1", "smart", "big", "complex", "up"):
        c = call(chat("hi", f"turn {value}"), **{"x-route-tier": value})
        router.prepare(c)
        assert c.name == "smart" and "by=header" in c.headers["x-orchestrator-route"], value
    c = call(chat("Prove Fermat's little theorem step by step."), **{"x-route-tier": "0"})
    router.prepare(c)
    assert c.name == "fast"


def test_pins_are_a_bounded_lru() -> None:
    router = Router([route(sticky=3)])
    for n in range(10):
        router.prepare(call(chat(f"hello {n}")))
    assert len(router.routes["auto"].pins) == 3
    assert conversation_key("a", chat("x", "y")) == conversation_key("a", chat("x", "z"))
    assert conversation_key("a", chat("x")) != conversation_key("b", chat("x"))


ROUTES = "gateway:\n  port: 9100\n  routes:\n    auto:\n      tiers:\n"


@pytest.mark.parametrize("name,tiers,where,message", [
    ("unknown-server", "        - {server: a, up_to: simple}\n        - {server: nope}\n",
     "10: gateway.routes.auto.tiers[1].server", "no server is named 'nope'"),
    ("unordered", "        - {server: a, up_to: complex}\n        - {server: b, up_to: simple}\n        - {server: b}\n",
     "10: gateway.routes.auto.tiers[1].up_to", "not above the tier before"),
    ("last-with-up-to", "        - {server: a, up_to: simple}\n        - {server: b, up_to: medium}\n",
     "10: gateway.routes.auto.tiers[1].up_to", "last tier must take"),
    ("middle-without-up-to", "        - {server: a}\n        - {server: b}\n",
     "9: gateway.routes.auto.tiers[0].up_to", "only the last tier"),
    ("bad-level", "        - {server: a, up_to: easy}\n        - {server: b}\n",
     "9: gateway.routes.auto.tiers[0].up_to", "easy"),
])
def test_invalid_routes(name, tiers, where, message, tmp_path: Path, orchestrate) -> None:
    f = tmp_path / f"{name}.yaml"
    f.write_text(two_servers(ROUTES + tiers))
    code, out, err = orchestrate("validate", str(f))
    assert code == 1, (out, err)
    match = [line for line in err.splitlines() if line.startswith(f"{f}:{where}")]
    assert match and message in match[0] and " — " in match[0], err


def test_route_name_that_is_a_served_name_is_an_error(tmp_path: Path, orchestrate) -> None:
    f = tmp_path / "clash.yaml"
    f.write_text(two_servers(ROUTES.replace("auto:", "gemma-a:") + "        - {server: a, up_to: simple}\n"
                             "        - {server: b}\n"))
    code, out, err = orchestrate("validate", str(f))
    assert code == 1 and "gateway.routes.gemma-a" in err and "server a serves" in err, err


def test_plan_carries_and_shows_routes(tmp_path: Path, orchestrate) -> None:
    text = two_servers(ROUTES + "        - {server: a, up_to: simple}\n        - {server: b}\n"
                       "      thresholds: {simple: 0.2}\n      sticky: 10\n")
    plan = build_plan(load_text(text, "gw.yaml"), detect=False, environ=ENV)
    assert plan.gateway is not None
    (r,) = plan.gateway.routes
    assert (r.name, [t.served_name for t in r.tiers], r.thresholds["simple"], r.sticky) == \
        ("auto", ["gemma-a", "gemma-b"], 0.2, 10)
    assert plan_from_dict(json.loads(json.dumps(plan.to_dict()))).gateway == plan.gateway
    f = tmp_path / "gw.yaml"
    f.write_text(text)
    code, out, err = orchestrate("plan", str(f), env={"ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")})
    assert code == 0, err
    assert "route auto: a (gemma-a) up to simple, b (gemma-b) above; scores simple < 0.2" in out


def test_eval_route_in_process_reports_accuracy_and_confusion(tmp_path: Path, orchestrate) -> None:
    f = tmp_path / "gw.yaml"
    f.write_text(two_servers(ROUTES.replace("9100", "9") + "        - {server: a, up_to: simple}\n"
                             "        - {server: b}\n"))
    env = {"ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")}
    code, out, err = orchestrate("eval", "route", str(f), "--split", "train", "--json", env=env)
    assert code == 0, err
    result = json.loads(out)
    assert result["decided_by"].startswith("the scorer in-process") and result["items"] >= 100
    assert result["accuracy"] >= 0.9 and set(result["confusion"]) == {"a", "b"}
    code, out, err = orchestrate("eval", "route", str(f), env=env)
    assert code == 0 and "heldout prompts" in out and "accuracy:" in out, err
    code, out, err = orchestrate("eval", "route", str(f), "--run", env=env)
    assert code == 1 and "--run needs the running gateway" in err


def test_judge_is_asked_only_near_a_boundary_of_a_new_conversation() -> None:
    from orchestrator.gateway.routing import near

    r = route()
    r.judge_server, r.judge_margin = "fast", 0.05
    assert near(r, 0.15) == 0 and near(r, 0.21) == 0 and near(r, 0.3) is None and near(r, 0.0) is None
    router = Router([r])
    edge = call(chat("What is 15 + 27? Then explain."))
    router.prepare(edge)
    if near(r, edge.notes["route"]["score"]) is not None:
        assert edge.notes["route"]["judge"] and "x-orchestrator-route" not in edge.headers   # the Judge decides
    far = call(chat("hello"))
    router.prepare(far)
    assert "judge" not in far.notes["route"] and far.headers["x-orchestrator-route"]


def test_judge_server_must_exist_and_the_plan_shows_it(tmp_path: Path, orchestrate) -> None:
    tiers = "        - {server: a, up_to: simple}\n        - {server: b}\n"
    f = tmp_path / "judge.yaml"
    f.write_text(two_servers(ROUTES + tiers + "      judge: {enabled: true, server: nope}\n"))
    code, out, err = orchestrate("validate", str(f))
    assert code == 1 and f"{f}:11: gateway.routes.auto.judge.server" in err and "no server is named 'nope'" in err, err
    f.write_text(two_servers(ROUTES + tiers + "      judge: {enabled: true, timeout_ms: 800}\n"))
    code, out, err = orchestrate("plan", str(f), env={"ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")})
    assert code == 0 and "judged by a (one token, 800 ms at most) within 0.05 of a threshold" in out, err


def test_route_endpoint_and_models_through_the_app(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from orchestrator.gateway.app import Gateway, create_app
    from orchestrator.gateway.backend import DeployerBackend
    from orchestrator.runtime.deployer import Deployer
    from orchestrator.runtime.state import StateStore

    text = two_servers(ROUTES.replace("9100", "9100\n  api_key_env: GW_KEY") + "        - {server: a, up_to: simple}\n"
                       "        - {server: b}\n")
    plan = build_plan(load_text(text, "gw.yaml"), detect=False, environ=ENV)
    backend = DeployerBackend(plan, Deployer(StateStore(tmp_path), environ=ENV))   # nothing is started here
    gateway = Gateway(plan, backend=backend, api_key="k")
    app = TestClient(create_app(gateway))            # no lifespan: no server is adopted or started
    body = {"model": "auto", "messages": [{"role": "user", "content": "Write a Rust parser with unit tests."}]}
    assert app.post("/v1/route", json=body).status_code == 401
    auth = {"Authorization": "Bearer k"}
    d = app.post("/v1/route", json=body, headers=auth).json()
    assert (d["server"], d["model"], d["tier"]) == ("b", "gemma-b", 1) and d["signals"]["code"] > 0
    missing = app.post("/v1/route", json={**body, "model": "gemma-a"}, headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["available"] == ["auto"]
    models = {m["id"]: m for m in app.get("/v1/models", headers=auth).json()["data"]}
    assert models["auto"]["route"] is True and models["auto"]["tiers"][0] == {"server": "a", "model": "gemma-a",
                                                                              "up_to": "simple"}
    assert {"gemma-a", "gemma-b"} <= set(models)


def test_eval_tools_is_also_an_eval_subcommand(tmp_path: Path, orchestrate) -> None:
    f = tmp_path / "gw.yaml"
    f.write_text(two_servers(ROUTES.replace("9100", "9") + "        - {server: a, up_to: simple}\n"
                             "        - {server: b}\n"))
    env = {"ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")}
    for words in (("eval", "tools"), ("eval-tools",)):
        code, out, err = orchestrate(*words, "--help", env=env)
        assert code == 0 and "tool-use suite" in out, err
