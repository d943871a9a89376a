"""Real llama.cpp b11434 and ik_llama.cpp 55d3c05bf servers on the Gemma 3 270M GGUF: up → all
health stages → OpenAI chat completion → status → down → nothing left, port free."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
import requests

pytestmark = pytest.mark.engines
ENGINES = ["llama.cpp", "ik_llama"]


def port_free(port: int) -> bool:
    """No socket listens on the port any more (closing client connections may linger; they serve nothing)."""
    return not any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                   for c in psutil.net_connections(kind="inet"))


@pytest.mark.parametrize("kv,parallel", [("f16", 2), ("q8_0", 1)])
@pytest.mark.parametrize("engine", ENGINES)
def test_up_chat_status_down(engine: str, kv: str, parallel: int, env, gemma: Path, built_engines: None) -> None:
    name = f"real-{engine.replace('.', '').replace('_', '')}-{kv.replace('_', '')}"
    profile = env.profile(name, engine=engine, kv_cache=kv, parallel=parallel,
                          model={"path": str(gemma), "served_name": "gemma"})
    up = env.run("up", str(profile), "--json")
    assert up.returncode == 0, up.stdout + up.stderr
    result = json.loads(up.stdout)[0]
    assert result["outcome"] == "started" and result["ttft_s"] > 0
    assert result["stages"] == ["process", "port", "ready", "models", "completion", "settings"]
    rec = env.records(name)["s"]
    port = rec.port
    if kv == "q8_0":
        assert "-ctk" in rec.argv and "-fa" in rec.argv and rec.argv[rec.argv.index("-fa") + 1] == "on"
    r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                      json={"model": "gemma", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None
    st = env.run("status", name, "--json")
    rows = json.loads(st.stdout)
    assert rows and rows[0]["state"] == "healthy"
    down = env.run("down", str(profile))
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not psutil.pid_exists(rec.pid) or psutil.Process(rec.pid).status() == psutil.STATUS_ZOMBIE  # exited
    assert port_free(port)
    assert env.records(name) == {}


@pytest.mark.parametrize("engine", ENGINES)
def test_api_key_by_reference_never_leaks(engine: str, env, gemma: Path, built_engines: None) -> None:
    secret = "sk-e2e-Zq81xVt9"
    profile = env.profile(f"key-{engine.replace('.', '').replace('_', '')}", engine=engine, api_key_env="E2E_KEY",
                          model={"path": str(gemma), "served_name": "gemma"})
    up = env.run("up", str(profile), env={"E2E_KEY": secret})
    assert up.returncode == 0, up.stdout + up.stderr
    rec = env.records(profile.stem)["s"]
    cmdline = Path(f"/proc/{rec.pid}/cmdline").read_bytes().decode()
    assert secret not in cmdline
    for path in env.state.rglob("*"):
        if path.is_file() and path.suffix != ".api-key":
            assert secret not in path.read_text(errors="replace"), path
        if path.suffix == ".api-key":
            assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert secret not in up.stdout + up.stderr
    st = env.run("status", "--json", env={"E2E_KEY": secret})
    assert secret not in st.stdout
    url = f"http://127.0.0.1:{rec.port}/v1/completions"
    body = {"model": "gemma", "prompt": "Hi", "max_tokens": 1}
    assert requests.post(url, json=body, timeout=30).status_code == 401
    ok = requests.post(url, json=body, timeout=30, headers={"Authorization": f"Bearer {secret}"})
    assert ok.status_code == 200
    assert env.run("down", profile.stem).returncode == 0
    assert not list(env.state.rglob("*.api-key")), "down removes ik_llama.cpp's key file"


def test_idempotent_up_and_plan_change_restarts(env, gemma: Path, built_engines: None) -> None:
    profile = env.profile("idem", model={"path": str(gemma), "served_name": "gemma"})
    assert env.run("up", str(profile)).returncode == 0
    first = env.records("idem")["s"].pid
    again = env.run("up", str(profile))
    assert again.returncode == 0 and "already running" in again.stdout
    assert env.records("idem")["s"].pid == first
    text = profile.read_text().replace("context: 2048", "context: 1024")
    profile.write_text(text)
    changed = env.run("up", str(profile))
    assert changed.returncode == 0 and "restarted" in changed.stdout and "plan changed" in changed.stderr
    assert env.records("idem")["s"].pid != first
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
    env.run("down", "idem")
