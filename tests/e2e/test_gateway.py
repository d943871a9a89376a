"""The gateway in front of real llama-server (llama.cpp b11434, ik_llama.cpp) processes on the Gemma 3
270M GGUF, driven with the official openai client: two models, chat and completion, streaming and
not; on-demand start and idle stop; swaps under a memory budget that holds one gemma but not two,
with collation; an upstream killed mid-stream; a client that disconnects frees the engine's slot."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.e2e.gateway_util import gateway_profile, metric, record_pid, streams_in_background, up

pytestmark = pytest.mark.engines
ENGINES = ["llama.cpp", "ik_llama"]


@pytest.fixture
def engine_built(request: pytest.FixtureRequest) -> str:
    from orchestrator.provision import builds as provision

    engine = getattr(request, "param", "llama.cpp")
    provision.build(engine, "cpu")   # cached after the first build
    return str(engine)


def gemma_server(gemma: Path, name: str, served: str, **extra: object) -> dict:
    return {"name": name, "model": {"path": str(gemma), "served_name": served}, **extra}


def client(port: int, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)


def states(port: int) -> dict[str, str]:
    return {m.id: (m.model_extra or {})["state"] for m in client(port).models.list().data}


def slug(engine: str) -> str:
    return engine.replace(".", "").replace("_", "")


@pytest.mark.parametrize("engine_built", ENGINES, indirect=True)
def test_openai_client_two_models_chat_and_completion_stream_and_not(engine_built: str, env, gemma: Path) -> None:
    engine = engine_built
    profile, port = gateway_profile(env, f"gw2-{slug(engine)}", [
        gemma_server(gemma, "a", "gemma-a", engine=engine),
        gemma_server(gemma, "b", "gemma-b", engine=engine, start="on_demand")])
    results = up(env, profile)
    assert [(r["server"], r["outcome"]) for r in results] == [("a", "started"), ("gateway", "started")]
    assert states(port) == {"gemma-a": "running", "gemma-b": "stopped"}
    c = client(port)
    for model in ("gemma-a", "gemma-b"):
        chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8,
                                         temperature=0)
        assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens > 0
        text = c.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
        assert text.choices[0].text
        arrivals: list[float] = []
        pieces: list[str] = []
        for chunk in c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to ten"}],
                                               max_tokens=24, temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                arrivals.append(time.perf_counter())
        assert len(pieces) >= 8 and "".join(pieces).strip()
        assert arrivals[-1] - arrivals[0] > 0.02, "chunks arrived together: the stream was buffered"
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if ch.choices)
        assert streamed == text.choices[0].text        # the same answer, streamed
    assert states(port) == {"gemma-a": "running", "gemma-b": "running"}
    down = env.run("down", str(profile))
    assert down.returncode == 0 and env.records(profile.stem) == {}


def test_on_demand_start_with_loading_comments_then_idle_stop(engine_built: str, env, gemma: Path) -> None:
    profile, port = gateway_profile(env, "gwidle", [gemma_server(gemma, "a", "gemma-a", start="on_demand",
                                                                 idle_timeout=3)])
    up(env, profile)
    assert states(port) == {"gemma-a": "stopped"} and record_pid(env, "gwidle", "a") is None
    body = {"model": "gemma-a", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "stream": True}
    lines: list[str] = []
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            lines.append(line)
    assert lines[0].startswith(": waiting for gemma-a"), lines[:3]   # the client hears from the gateway at once
    assert any(line.startswith("data: {") for line in lines) and "data: [DONE]" in lines
    pid = record_pid(env, "gwidle", "a")
    assert pid and psutil.pid_exists(pid)

    def idle_stops() -> float:
        return metric(httpx.get(f"http://127.0.0.1:{port}/metrics").text, "gateway_server_stops_total", server="a",
                      reason="idle")

    # /v1/models shows a server that is stopping as stopped, and its record goes before the stop has
    # finished; the counter is written when it has.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (record_pid(env, "gwidle", "a") is not None or idle_stops() < 1):
        time.sleep(0.25)
    assert record_pid(env, "gwidle", "a") is None and states(port) == {"gemma-a": "stopped"}
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert metric(metrics, "gateway_server_stops_total", server="a", reason="idle") == 1
    assert metric(metrics, "gateway_server_starts_total", server="a", outcome="ok") == 1


def _need(env, gemma: Path) -> int:
    """What one gemma server needs of RAM by the plan's fit estimate."""
    profile, _ = gateway_profile(env, "gwneed", [gemma_server(gemma, "a", "gemma-a", start="on_demand")])
    r = env.run("plan", str(profile), "--json")
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["gateway"]["needs"]["a"]["RAM"])


def test_swap_under_a_budget_for_one_with_collation(engine_built: str, env, gemma: Path) -> None:
    need = _need(env, gemma)
    profile, port = gateway_profile(env, "gwswap", [
        gemma_server(gemma, "a", "gemma-a", start="on_demand"),
        gemma_server(gemma, "b", "gemma-b", start="on_demand")], memory_budget={"ram": int(need * 1.5)})
    up(env, profile)
    both: list[float] = []
    stop = threading.Event()

    def watch() -> None:                    # the budget holds one: two running at once is a failure
        while not stop.is_set():
            records = env.records("gwswap")
            if "a" in records and "b" in records:
                both.append(time.monotonic())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    c = client(port)
    try:
        for model in ("gemma-a", "gemma-b", "gemma-a"):          # one at a time: each one swaps
            assert c.completions.create(model=model, prompt="Hi", max_tokens=2).choices[0].text is not None
        m = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert metric(m, "gateway_server_starts_total", outcome="ok") == 3
        assert metric(m, "gateway_server_stops_total", reason="swap") == 2
        burst = ["gemma-a", "gemma-b"] * 6                         # 12 alternating requests at once
        errors: list[str] = []
        served: list[str] = []

        def one(model: str) -> None:
            try:
                r = c.completions.create(model=model, prompt="Hello", max_tokens=3)
                served.append(r.model if r.model else model)
            except Exception as exc:  # collected: every request must succeed
                errors.append(f"{model}: {exc}")

        threads = [threading.Thread(target=one, args=(mname,)) for mname in burst]
        for t in threads:
            t.start()
            time.sleep(0.01)
        for t in threads:
            t.join(300)
        assert not errors, errors
        assert len(served) == len(burst)
        after = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        burst_starts = metric(after, "gateway_server_starts_total", outcome="ok") - 3
        assert burst_starts <= 3, f"{burst_starts} starts for {len(burst)} alternating requests"
    finally:
        stop.set()
        watcher.join()
    assert not both, "both servers were running at once under a budget for one"
    assert env.run("down", str(profile)).returncode == 0


def test_upstream_killed_mid_stream_then_restarted(engine_built: str, env, gemma: Path) -> None:
    profile, port = gateway_profile(env, "gwkill", [gemma_server(gemma, "a", "gemma-a", start="on_demand")])
    up(env, profile)
    c = client(port)
    c.completions.create(model="gemma-a", prompt="Hi", max_tokens=1)
    pid = record_pid(env, "gwkill", "a")
    assert pid
    got = 0
    t0 = time.monotonic()
    with pytest.raises(openai.APIError, match="ended the stream"):
        for _chunk in c.completions.create(model="gemma-a", prompt="Once upon a time", max_tokens=400, stream=True):
            got += 1
            if got == 3:
                os.kill(pid, signal.SIGKILL)
    assert 3 <= got < 400 and time.monotonic() - t0 < 30
    answer = c.completions.create(model="gemma-a", prompt="Hi", max_tokens=2)     # restarted for this one
    assert answer.choices[0].text is not None
    again = record_pid(env, "gwkill", "a")
    assert again and again != pid
    m = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert metric(m, "gateway_server_stops_total", server="a", reason="crashed") == 1


def test_client_disconnect_frees_the_engine_slot(engine_built: str, env, gemma: Path) -> None:
    profile, port = gateway_profile(env, "gwgone", [gemma_server(gemma, "a", "gemma-a")])
    up(env, profile)
    upstream_port = env.records("gwgone")["a"].port

    def processing() -> float:
        text = httpx.get(f"http://127.0.0.1:{upstream_port}/metrics", timeout=10).text
        return metric(text, "llamacpp:requests_processing")

    body = {"model": "gemma-a", "prompt": "Once upon a time", "max_tokens": 2000, "stream": True,
            "ignore_eos": True}   # a base model may stop early: the engine must still be generating
    # The client reads on in a thread until told to go: leaving httpx's line iterator closes the
    # connection at once (and a client that stops reading makes the engine cancel too, once the
    # buffers between them fill), so the engine is seen generating only while someone reads.
    events: list[str] = []
    go = threading.Event()

    def read() -> None:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                if go.is_set():
                    return   # the connection closes here, mid-stream

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    busy = time.monotonic() + 30
    while time.monotonic() < busy and (len(events) < 3 or processing() != 1):
        time.sleep(0.1)
    if processing() != 1:   # say what the engine did instead (a stream that ended, a slot that was never used)
        slots = httpx.get(f"http://127.0.0.1:{upstream_port}/slots", timeout=10).text[:1500]
        go.set()
        raise AssertionError(f"the engine is not generating: events {events[-3:]}, /slots {slots}")
    go.set()
    reader.join(30)
    assert not reader.is_alive() and not any('"finish_reason":"length"' in e for e in events), "it went mid-stream"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and processing() != 0:
        time.sleep(0.1)
    assert processing() == 0, "the engine still generates for a client that went away"
    t0 = time.monotonic()     # parallel 1: the slot is free for the next request at once
    assert client(port).completions.create(model="gemma-a", prompt="Hi", max_tokens=2).choices[0].text is not None
    assert time.monotonic() - t0 < 15


def test_embeddings_and_a_server_that_fails_to_start(engine_built: str, env, gemma: Path) -> None:
    # A truncated model is refused when planning now; an option the build knows with a value it
    # refuses gets past every check before start and fails in the engine itself.
    profile, port = gateway_profile(env, "gwemb", [
        gemma_server(gemma, "emb", "gemma-embed", start="on_demand", extra_args=["--embeddings", "--pooling", "mean"]),
        gemma_server(gemma, "bad", "gemma-broken", start="on_demand", extra_args=["-fa", "sometimes"])])
    up(env, profile)
    c = client(port)
    vectors = c.embeddings.create(model="gemma-embed", input=["the cat sat", "a dog ran"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) > 100
    with pytest.raises(openai.APIStatusError) as exc:
        c.completions.create(model="gemma-broken", prompt="Hi", max_tokens=2)
    assert exc.value.status_code == 503
    err = exc.value.body if isinstance(exc.value.body, dict) else {}
    err = err.get("error", err)
    assert err.get("cause") == "bad_flag", exc.value.body
    assert "failed to start at stage" in str(err.get("message")) and record_pid(env, "gwemb", "bad") is None


def test_real_engine_keys_401_and_queue_overflow_429(env, gemma: Path) -> None:
    """On real llama-server: a wrong gateway key is 401, the upstream's own key (injected by the gateway)
    is never the gateway's; with parallel 1 and queue 1 a third concurrent request gets 429 with
    Retry-After while the first streams and the second waits, and both of those finish."""
    from orchestrator.provision import builds as provision

    provision.build("llama.cpp", "cpu")
    gw_key, up_key = "sk-gw-R7c2Lq90zz", "sk-up-Hx51Ty63yy"
    profile, port = gateway_profile(env, "gwreal", [gemma_server(gemma, "a", "gemma-a", api_key_env="UP_KEY")],
                                    api_key_env="GW_KEY", queue=1)
    up(env, profile, {"GW_KEY": gw_key, "UP_KEY": up_key})
    with pytest.raises(openai.AuthenticationError):
        client(port, "sk-wrong").completions.create(model="gemma-a", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(port, up_key).completions.create(model="gemma-a", prompt="Hi", max_tokens=2)
    upstream_port = env.records("gwreal")["a"].port
    assert httpx.post(f"http://127.0.0.1:{upstream_port}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                      timeout=30).status_code == 401          # the engine itself wants its key
    c = client(port, gw_key)
    assert c.completions.create(model="gemma-a", prompt="Hi", max_tokens=2).choices[0].text is not None

    base, auth = f"http://127.0.0.1:{port}/v1", {"Authorization": f"Bearer {gw_key}"}
    body = {"model": "gemma-a", "prompt": "Once upon a time", "max_tokens": 120, "stream": True,
            "ignore_eos": True}
    threads, done = streams_in_background(f"{base}/completions", body, 2, auth, stagger_s=0.3)  # one generating, one waiting
    deadline = time.monotonic() + 10
    metrics_text = ""
    while time.monotonic() < deadline:
        metrics_text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=auth).text
        if metric(metrics_text, "gateway_server_waiting", server="a") == 1:
            break
        time.sleep(0.1)
    assert metric(metrics_text, "gateway_server_waiting", server="a") == 1, metrics_text
    r = httpx.post(f"{base}/completions", json=body, headers=auth, timeout=30)
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1 and "queue 1" in r.json()["error"]["message"]
    for t in threads:
        t.join(120)
    assert done == [200, 200]
