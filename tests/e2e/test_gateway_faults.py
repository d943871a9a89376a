"""The gateway's faults, supervised by `orchestrate up`, in front of tests/fake_engine.py (a scripted
llama-server stand-in for the shapes a real engine cannot be made to show on demand: a crash while
loading, dying mid-stream, a slow stream to overflow a queue). The same gateway in front of real
llama-server processes: tests/e2e/test_gateway.py."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import openai
import psutil
import pytest

from tests.e2e.gateway_util import fake_binary, gateway_profile, metric, record_pid, streams_in_background, up


def fake_server(e, name: str, served: str, **extra) -> dict:
    model, binary = fake_binary(e)
    return {"name": name, "model": {"path": model, "served_name": served}, "binary": binary, **extra}


def client(port: int, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)


def test_up_status_models_on_demand_start_and_down(env) -> None:
    profile, port = gateway_profile(env, "gwfake", [
        fake_server(env, "a", "fa", start="on_demand", idle_timeout=2),
        fake_server(env, "b", "fb"),
    ])
    results = up(env, profile)
    assert [(r["server"], r["outcome"]) for r in results] == [("b", "started"), ("gateway", "started")]
    st = json.loads(env.run("status", "gwfake", "--json").stdout)
    assert {(r["server"], r["state"]) for r in st} == {("_gateway", "healthy"), ("b", "healthy")}
    c = client(port)
    states = {m.id: (m.model_extra or {})["state"] for m in c.models.list().data}
    assert states == {"fa": "stopped", "fb": "running"}
    raw = c.chat.completions.with_raw_response.create(model="fa", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-orchestrator-server"] == "a"
    answer = raw.parse()
    assert answer.choices[0].message.content == "fake answer from fa"
    assert record_pid(env, "gwfake", "a") is not None
    deadline = time.monotonic() + 10                # idle_timeout 2 s: stopped, its record gone
    while time.monotonic() < deadline and record_pid(env, "gwfake", "a") is not None:
        time.sleep(0.2)
    assert record_pid(env, "gwfake", "a") is None
    assert {m.id: (m.model_extra or {})["state"] for m in c.models.list().data}["fa"] == "stopped"
    again = up(env, profile)
    assert [r["outcome"] for r in again] == ["already running", "already running"]
    down = env.run("down", str(profile))
    assert down.returncode == 0 and "_gateway: stopped" in down.stdout
    assert env.records("gwfake") == {}


def test_http_errors_404_400_413_and_models(env) -> None:
    profile, port = gateway_profile(env, "gwerr", [fake_server(env, "a", "fa")], max_body="4 KiB")
    up(env, profile)
    base = f"http://127.0.0.1:{port}/v1"
    r = httpx.post(f"{base}/chat/completions", json={"model": "nope", "messages": []})
    assert r.status_code == 404 and r.json()["error"]["available"] == ["fa"] and "fa" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/chat/completions", content=b'{"model": "fa", "messages": [', headers={
        "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/completions", json={"prompt": "x"})
    assert r.status_code == 400 and "names no model" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/completions", json={"model": "fa", "prompt": "x" * 5000})
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert metric(metrics, "gateway_requests_total", code="404") == 1
    assert metric(metrics, "gateway_requests_total", code="413") == 1


def test_wrong_key_is_401_upstream_key_injected_and_never_leaked(env) -> None:
    gw_key, up_key = "sk-gw-Qe81xVt9aa", "sk-up-Lm27pWz4bb"
    profile, port = gateway_profile(env, "gwkey", [
        fake_server(env, "a", "fa", start="on_demand", api_key_env="UP_KEY")], api_key_env="GW_KEY")
    keys = {"GW_KEY": gw_key, "UP_KEY": up_key}
    up(env, profile, keys)
    with pytest.raises(openai.AuthenticationError):
        client(port, "sk-wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(port, up_key).chat.completions.create(model="fa", messages=[])   # the upstream's key is not the gateway's
    assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 401
    c = client(port, gw_key)
    assert c.completions.create(model="fa", prompt="x").choices[0].text == "!"
    stream = c.chat.completions.create(model="fa", messages=[], stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == "t0 t1 t2 t3 t4 "
    # The fake server only answers with its key (-a, --api-key-file, LLAMA_API_KEY: the gateway passed it on).
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {gw_key}"}).text
    for path in env.state.rglob("*"):
        if path.is_file() and not path.name.endswith(".api-key"):
            text = path.read_text(errors="replace")
            assert gw_key not in text and up_key not in text, path
    assert gw_key not in metrics and up_key not in metrics
    for proc in psutil.process_iter(["cmdline"]):
        assert gw_key not in " ".join(proc.info["cmdline"] or [])


def test_queue_overflow_is_429_with_retry_after(env) -> None:
    profile, port = gateway_profile(env, "gwq", [fake_server(env, "a", "fa", env={"FAKE_TOKENS": "40",
                                                                                  "FAKE_TOKEN_DELAY": "0.05"})],
                                    queue=1)
    up(env, profile)
    base = f"http://127.0.0.1:{port}/v1"
    body = {"model": "fa", "prompt": "x", "stream": True}
    threads, done = streams_in_background(f"{base}/completions", body, 2, timeout=30)   # one running, one waiting
    time.sleep(0.5)
    r = httpx.post(f"{base}/completions", json=body)
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1 and "queue 1" in r.json()["error"]["message"]
    for t in threads:
        t.join(30)
    assert done == [200, 200]


def test_fails_to_start_is_503_with_stage_and_cause(env) -> None:
    profile, port = gateway_profile(env, "gwfail", [fake_server(env, "a", "fa", start="on_demand",
                                                                env={"FAKE_CRASH_AFTER": "0.3",
                                                                     "FAKE_NEVER_READY": "1"})])
    up(env, profile)
    t0 = time.monotonic()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "fa", "prompt": "x"}, timeout=60)
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["cause"] == "model_corrupt" and err["stage"] in ("ready", "port")
    assert "failed to start at stage" in err["message"] and "download it again" in err["message"]
    assert time.monotonic() - t0 < 20                       # a dead process ends the wait at once
    assert "Retry-After" in r.headers
    # A streaming client gets the same cause as an error event (the stream had begun with comments).
    time.sleep(float(r.headers["Retry-After"]) + 0.2)
    with pytest.raises(openai.APIError, match="model_corrupt"):
        for _ in client(port).completions.create(model="fa", prompt="x", stream=True):
            pass
    assert record_pid(env, "gwfail", "a") is None          # nothing left behind


def test_upstream_dies_mid_stream_error_event_then_restart(env) -> None:
    profile, port = gateway_profile(env, "gwdie", [fake_server(env, "a", "fa", env={"FAKE_DIE_MID_STREAM": "1"})])
    up(env, profile)
    c = client(port)
    first = record_pid(env, "gwdie", "a")
    got: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(openai.APIError, match="ended the stream"):
        for chunk in c.chat.completions.create(model="fa", messages=[], stream=True):
            got.append(chunk.choices[0].delta.content or "")
    assert got == ["t0 ", "t1 "] and time.monotonic() - t0 < 10      # ended, not hung
    answer = c.chat.completions.create(model="fa", messages=[])       # the next request restarts it
    assert answer.choices[0].message.content == "fake answer from fa"
    second = record_pid(env, "gwdie", "a")
    assert second is not None and second != first
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert metric(metrics, "gateway_server_stops_total", server="a", reason="crashed") == 1


def test_gateway_restart_adopts_running_servers_nothing_orphaned(env) -> None:
    profile, port = gateway_profile(env, "gwre", [fake_server(env, "a", "fa", start="on_demand"),
                                                  fake_server(env, "b", "fb")])
    up(env, profile)
    c = client(port)
    c.completions.create(model="fa", prompt="x")
    a_pid, gw_pid = record_pid(env, "gwre", "a"), record_pid(env, "gwre", "_gateway")
    assert a_pid and gw_pid
    os.kill(gw_pid, signal.SIGKILL)                               # the gateway dies; its servers run on
    time.sleep(0.5)
    assert psutil.pid_exists(a_pid)
    results = up(env, profile)
    assert [(r["server"], r["outcome"]) for r in results] == [("b", "already running"), ("gateway", "started")]
    states = {m.id: (m.model_extra or {})["state"] for m in client(port).models.list().data}
    assert states == {"fa": "running", "fb": "running"}                # adopted, not restarted
    assert c.completions.create(model="fa", prompt="x").choices[0].text == "!"
    assert record_pid(env, "gwre", "a") == a_pid
    assert env.run("down", str(profile)).returncode == 0
    assert not psutil.pid_exists(a_pid) or psutil.Process(a_pid).status() == psutil.STATUS_ZOMBIE
    assert env.records("gwre") == {}


def test_client_leaving_while_its_server_loads_leaves_no_slot_taken(env) -> None:
    profile, port = gateway_profile(env, "gwleave", [fake_server(env, "a", "fa", start="on_demand",
                                                                 env={"FAKE_READY_AFTER": "1.5"})])
    up(env, profile)
    body = {"model": "fa", "prompt": "x", "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
        first = next(r.iter_lines())
        assert first.startswith(": waiting for fa")                # then the client goes away
    deadline = time.monotonic() + 15
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        if metric(text, "gateway_server_state", server="a", state="running") == 1:
            break
        time.sleep(0.2)
    time.sleep(0.3)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert metric(text, "gateway_server_inflight", server="a") == 0
    assert metric(text, "gateway_server_waiting", server="a") == 0
    # parallel 1, queue 0 would refuse a second request if the first had kept its slot
    assert client(port).completions.create(model="fa", prompt="x").choices[0].text == "!"
