"""Fault cases: each asserts the classified cause, that nothing is left running, and the state.

Real engines show the faults they can (rejected argument, missing and truncated model, port in
use). tests/fake_engine.py, a scripted stand-in, shows those they can't be made to show on
demand (never ready, crash during load, ignoring SIGTERM, a slow load to interrupt)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest


def no_process_with(marker: str) -> bool:
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for whoever adopted it counts as gone: it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def failed(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data[0]["outcome"] == "failed"
    return data[0]


@pytest.mark.engines
def test_argument_rejected_by_engine(env, gemma: Path, built_engines: None) -> None:
    # An option the build knows with a value it refuses: the --help check before start lets it
    # through, the engine rejects it at start-up (an unknown option never gets that far).
    profile = env.profile("badarg", model={"path": str(gemma)}, extra_args=["-fa", "sometimes"])
    t0 = time.monotonic()
    r = failed(env.run("up", str(profile), "--json"))
    assert r["cause"] == "bad_flag" and "exited with code" in r["detail"]
    assert time.monotonic() - t0 < 20
    assert any("sometimes" in line for line in r["log_tail"])
    assert env.records("badarg") == {} and no_process_with("sometimes")


@pytest.mark.engines
def test_unknown_option_stops_up_before_anything_starts(env, gemma: Path, built_engines: None) -> None:
    profile = env.profile("unknownopt", model={"path": str(gemma)}, extra_args=["--no-such-flag-xyz"])
    r = env.run("up", str(profile))
    assert r.returncode != 0 and "does not take --no-such-flag-xyz" in r.stderr
    assert env.records("unknownopt") == {} and no_process_with("--no-such-flag-xyz")


def test_missing_model_file(env) -> None:
    profile = env.profile("nomodel", model={"path": str(env.tmp / "missing.gguf")})
    r = failed(env.run("up", str(profile), "--json"))
    assert r["cause"] == "model_missing" and r["stage"] == "preflight"
    assert env.records("nomodel") == {}


@pytest.mark.engines
def test_truncated_gguf(env, gemma: Path, built_engines: None) -> None:
    cut = env.tmp / "truncated.gguf"
    with gemma.open("rb") as src:
        cut.write_bytes(src.read(20_000_000))
    profile = env.profile("trunc", model={"path": str(cut)})
    # The header promises more tensor data than the file holds: refused while planning, before the
    # engine is started (it used to start and fail on its own).
    p = env.run("up", str(profile), "--json")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "servers[0].model.path" in p.stderr and "truncated: the header promises" in p.stderr, p.stderr
    assert env.records("trunc") == {} and no_process_with(str(cut))


def test_not_a_gguf_file(env) -> None:
    bogus = env.tmp / "notes.gguf"
    bogus.write_text("this is not a model\n")
    # Found while planning, before anything starts: the same FILE:LINE error validate gives.
    profile = env.profile("bogus", model={"path": str(bogus)})
    p = env.run("up", str(profile), "--json")
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"{profile}:" in p.stderr and "servers[0].model.path" in p.stderr and "not a GGUF file" in p.stderr
    assert "Traceback" not in p.stderr and env.records("bogus") == {}


@pytest.mark.engines
def test_port_already_taken_names_owner(env, gemma: Path, built_engines: None) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        profile = env.profile("portbusy", model={"path": str(gemma)}, port=port)
        r = failed(env.run("up", str(profile), "--json"))
        assert r["cause"] == "port_in_use"
        assert f"pid {os.getpid()}" in str(r["detail"])
        assert env.records("portbusy") == {}
    finally:
        holder.close()


def test_never_ready_times_out_and_kills_group(env) -> None:
    profile = env.fake("never", env={"FAKE_NEVER_READY": "1", "FAKE_SPAWN_CHILD": "1"}, health={"timeout": 5})
    t0 = time.monotonic()
    r = failed(env.run("up", str(profile), "--json"))
    assert r["cause"] == "timeout" and r["stage"] == "ready"
    assert 5 <= time.monotonic() - t0 < 30
    time.sleep(0.2)
    assert no_process_with(str(env.tmp / "dummy.gguf")), "the engine or its child survived"
    assert env.records("never") == {}


def test_crash_during_load_is_reported_at_once(env) -> None:
    profile = env.fake("crash", env={"FAKE_READY_AFTER": "30", "FAKE_CRASH_AFTER": "1"}, health={"timeout": 120})
    t0 = time.monotonic()
    r = failed(env.run("up", str(profile), "--json"))
    assert time.monotonic() - t0 < 15, "waited for the timeout instead of noticing the exit"
    assert "exited with code 1" in str(r["detail"]) and r["cause"] == "model_corrupt"
    assert env.records("crash") == {}


def test_sigterm_ignored_is_killed_after_grace(env) -> None:
    profile = env.fake("stubborn", env={"FAKE_IGNORE_SIGTERM": "1", "FAKE_SPAWN_CHILD": "1"})
    assert env.run("up", str(profile)).returncode == 0
    rec = env.records("stubborn")["s"]
    members = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == rec.pgid]
    assert len(members) >= 2, "the fake should have a child in its group"
    t0 = time.monotonic()
    down = env.run("down", "stubborn")
    assert down.returncode == 0 and "forced" in down.stdout
    assert time.monotonic() - t0 >= 2  # ORCHESTRATOR_STOP_GRACE=2 in these tests
    assert all(gone(pid) for pid in members)


def test_down_stops_a_child_that_left_the_process_group(env) -> None:
    """Engines spawn helpers (vLLM: engine core, workers); one that calls setsid escapes a group signal."""
    profile = env.fake("detached", env={"FAKE_SPAWN_DETACHED": "1"})
    assert env.run("up", str(profile)).returncode == 0
    rec = env.records("detached")["s"]
    children = psutil.Process(rec.pid).children(recursive=True)
    escaped = [c for c in children if _pgid(c.pid) != rec.pgid]
    assert escaped, "the fake should have a child outside its group"
    down = env.run("down", "detached")
    assert down.returncode == 0 and "stopped" in down.stdout
    assert all(gone(c.pid) for c in children)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_orchestrate_killed_mid_up_then_status_and_down_recover(env) -> None:
    profile = env.fake("killed", env={"FAKE_READY_AFTER": "4"}, health={"timeout": 60})
    proc = env.popen("up", str(profile))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "s" not in env.records("killed"):
        time.sleep(0.1)
    assert "s" in env.records("killed"), "up records the server before waiting for health"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rec = env.records("killed")["s"]
    assert psutil.pid_exists(rec.pid)
    st = json.loads(env.run("status", "killed", "--json").stdout)
    assert st[0]["state"] in ("loading", "healthy", "healthy (up was interrupted)")
    time.sleep(4)
    st = json.loads(env.run("status", "killed", "--json").stdout)
    assert st[0]["state"].startswith("healthy")
    down = env.run("down", "killed")
    assert "stopped" in down.stdout and gone(rec.pid)


def test_stale_pid_is_never_signalled(env) -> None:
    from orchestrator.runtime.state import ServerRecord, StateStore

    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        store = StateStore(env.state)
        store.save("stale", {"s": ServerRecord(
            profile="stale", server="s", engine="llama.cpp", pid=sleeper.pid, pgid=sleeper.pid,
            create_time=psutil.Process(sleeper.pid).create_time() - 3600, plan_hash="x", host="127.0.0.1",
            port=1, log="/dev/null", binary="llama-server", argv=[], served_name="m", health_path="/health",
            profile_file="p.yaml")})
        st = json.loads(env.run("status", "stale", "--json").stdout)
        assert st[0]["state"].startswith("stale")
        down = env.run("down", "stale")
        assert "stale" in down.stdout
        assert sleeper.poll() is None, "a process that merely reused the pid was signalled"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_two_ups_at_once_start_one_server(env) -> None:
    profile = env.fake("twice", env={"FAKE_READY_AFTER": "1"})
    a, b = env.popen("up", str(profile)), env.popen("up", str(profile))
    outs = [p.communicate(timeout=120) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    text = " ".join(o[0] for o in outs)
    assert "started" in text and "already running" in text
    engines = [p for p in psutil.process_iter(["cmdline"]) if "fake_engine.py" in " ".join(p.info["cmdline"] or [])
               and str(env.tmp) in " ".join(p.info["cmdline"] or [])]
    assert len(engines) == 1


def test_state_file_is_private_and_survives_garbage(env) -> None:
    profile = env.fake("private")
    assert env.run("up", str(profile)).returncode == 0
    path = env.state / "deployments" / "private.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert env.run("down", "private").returncode == 0
    path.write_text("{ not json")
    st = env.run("status", "private", "--json")
    assert st.returncode == 0 and json.loads(st.stdout) == []
    assert list((env.state / "deployments").glob("private.corrupt-*")), "a damaged file is kept aside"
    assert sys.platform.startswith("linux")
