"""up --foreground, --atomic, --server, logs and engines list, against the scripted fake engine."""

from __future__ import annotations

import json
import signal
import time

import psutil
import yaml


def two_server_profile(env, name: str, second_env: dict[str, str]) -> str:
    path = env.fake(name)
    doc = yaml.safe_load(path.read_text())
    first = doc["servers"][0]
    from tests.e2e.conftest import free_port

    second = {**first, "name": "t", "port": free_port(), "env": second_env, "health": {"timeout": 5, "interval": 1}}
    doc["servers"].append(second)
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_foreground_stops_servers_on_ctrl_c(env) -> None:
    profile = env.fake("fg")
    proc = env.popen("up", str(profile), "--foreground")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        recs = env.records("fg")
        if "s" in recs and recs["s"].status == "running":
            break
        time.sleep(0.1)
    pid = env.records("fg")["s"].pid
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert "s: stopped" in out
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert env.records("fg") == {}


def test_atomic_rolls_back_the_servers_that_started(env) -> None:
    profile = two_server_profile(env, "atomic", {"FAKE_NEVER_READY": "1"})
    r = env.run("up", profile, "--atomic", "--json")
    assert r.returncode == 1
    results = {x["server"]: x for x in json.loads(r.stdout)}
    assert results["s"]["outcome"] == "rolled back" and results["t"]["outcome"] == "failed"
    assert env.records("atomic") == {}


def test_without_atomic_other_servers_stay(env) -> None:
    profile = two_server_profile(env, "partial", {"FAKE_NEVER_READY": "1"})
    r = env.run("up", profile, "--json")
    assert r.returncode == 1
    assert set(env.records("partial")) == {"s"}
    assert env.run("down", "partial").returncode == 0


def test_server_selection_and_logs(env) -> None:
    profile = two_server_profile(env, "pick", {})
    r = env.run("up", profile, "--server", "t")
    assert r.returncode == 0, r.stderr
    assert set(env.records("pick")) == {"t"}
    logs = env.run("logs", "pick", "--server", "t", "-n", "5")
    assert logs.returncode == 0 and "request:" in logs.stdout
    missing = env.run("up", profile, "--server", "nope")
    assert missing.returncode == 1 and "no server named nope" in missing.stderr
    env.run("down", "pick")


def test_engines_list_shows_builds(env) -> None:
    r = env.run("engines", "list", "--json")
    assert r.returncode == 0
    for row in json.loads(r.stdout):
        assert row["engine"] in ("llama.cpp", "ik_llama", "vllm", "sglang") and row["version"]
        if row["engine"] in ("vllm", "sglang"):   # Python engine environments
            assert row["python"].endswith("/bin/python") and row["purpose"] in ("serve", "parser")
