"""What the gateway's end-to-end tests share: a profile with a gateway and several servers, and `up` /
`down` of it through the real CLI."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.e2e.conftest import Env, free_port


def fake_binary(env: Env) -> tuple[str, str]:
    """(a GGUF-looking dummy model, a launcher that runs tests/fake_engine.py)."""
    dummy, launcher = env.fake_files()
    return str(dummy), str(launcher)


def gateway_profile(env: Env, name: str, servers: list[dict[str, Any]], **gateway: Any) -> tuple[Path, int]:
    port = free_port()
    specs = []
    for s in servers:
        spec = {"engine": "llama.cpp", "context": 2048, "parallel": 1, "port": free_port(),
                "health": {"timeout": 60, "interval": 1}, **s}
        specs.append(spec)
    doc = {"name": name, "hardware": {"gpu": "cpu"}, "gateway": {"port": port, **gateway}, "servers": specs}
    path = env.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, port


def up(env: Env, profile: Path, extra_env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    r = env.run("up", str(profile), "--json", env=extra_env)
    assert r.returncode == 0, r.stdout + r.stderr
    return list(json.loads(r.stdout))


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def record_pid(env: Env, deployment: str, server: str) -> int | None:
    rec = env.records(deployment).get(server)
    return getattr(rec, "pid", None) if rec is not None else None


def streams_in_background(url: str, body: dict[str, Any], count: int, headers: dict[str, str] | None = None,
                          timeout: float = 120, stagger_s: float = 0.0) -> tuple[list[threading.Thread], list[int]]:
    """`count` streamed requests on threads of their own, read to the end: (the threads, the status
    codes of those that finished, in finishing order)."""
    done: list[int] = []

    def stream_one() -> None:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout) as r:
            for _ in r.iter_bytes():
                pass
            done.append(r.status_code)

    threads = [threading.Thread(target=stream_one) for _ in range(count)]
    for t in threads:
        t.start()
        time.sleep(stagger_s)
    return threads, done
