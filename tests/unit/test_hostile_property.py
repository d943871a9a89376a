"""Property: whatever hostile value goes into whatever string field of a profile, either the profile
is refused with FILE:LINE errors, or every target renders output that parses as its format, the
shell scripts run exactly the planned argv (recorded by fake engines on PATH), nothing the value
says is executed, and the API key's value appears nowhere."""

from __future__ import annotations

import copy
import json
import random
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.errors import OrchestratorError, ProfileError
from orchestrator.pipeline import build_plan
from orchestrator.profile import load_text
from orchestrator.render import TARGETS, render

SECRET = "s3cret-Key-7f6e5d4c3b2a1908"
PWNED = "PWNED_MARKER"

FRAGMENTS = [
    "\x1b[2K", "\n", "\r", "\x00", "\t", "\u2028", "\u202e", "\x85", "'", '"', "\\", "$(touch PWNED)",
    "`touch PWNED`", "${MY_KEY}", "${env.MY_KEY}", "$MY_KEY", "{{ 7*7 }}", "{% if 1 %}", "---", "\n---\n",
    "a: b", "# c", "&a", "*a", "!!python/object", "ｓ", "раss", "9" * 5000, "-rf", "--host=0.0.0.0",
    "--port", "--api-key", " ", "", "x" * 3000, "*", "../../etc/passwd", "%s%n", "~root", ";", "|", "&&",
    "\u00e9", "0x1F", "010", "yes", "on", "null", "[1, 2]", "{a: 1}",
]


def hostile_values(n: int = 12) -> list[str]:
    """Every fragment alone, then seeded combinations of two or three."""
    rng = random.Random(16)
    values = list(FRAGMENTS)
    while len(values) < len(FRAGMENTS) + n:
        values.append("".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(2, 3))))
    return [v.replace("PWNED", PWNED) for v in values]


BASE: dict[str, Any] = {
    "name": "t",
    "hardware": {"gpu": "rtx-4090"},
    "servers": [{
        "name": "s", "engine": "llama.cpp", "model": {"path": "/models/m-Q4_K_M.gguf"},
        "host": "0.0.0.0", "api_key_env": "MY_KEY",
        "env": {"NOTE": "plain"}, "extra_args": ["--jinja"],
    }],
}

# Every string field of the profile, as (path into BASE, how to set it).
FIELDS: list[tuple[str | int, ...]] = [
    ("name",), ("hardware", "gpu"), ("servers", "name"), ("servers", "engine_version"),
    ("servers", "model", "path"), ("servers", "model", "quant"), ("servers", "model", "served_name"),
    ("servers", "model", "pypi"), ("servers", "model", "k8s_claim"), ("servers", "speculative", "draft_model"),
    ("servers", "image"), ("servers", "host"), ("servers", "api_key_env"), ("servers", "binary"),
    ("servers", "env", "NOTE"), ("servers", "env", "<key>"), ("servers", "extra_args", 0),
    ("servers", "depends_on", 0),
]


# A catalog GPU and another server's name: no hostile value is one.
NEVER_RENDERED: set[tuple[str | int, ...]] = {("hardware", "gpu"), ("servers", "depends_on", 0)}
# Paths get the value inside a path, where it is most likely to be pasted.
IN_A_PATH = {("servers", "model", "path"), ("servers", "speculative", "draft_model")}


def with_value(field: tuple[str | int, ...], value: str, engine: str = "llama.cpp") -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    if engine != "llama.cpp":
        doc["servers"][0].update(engine=engine, model={"path": "/models/Qwen2.5-7B-Instruct"}, extra_args=[])
    node: Any = doc
    parts = list(field)
    if parts[0] == "servers":
        node = doc["servers"][0]
        parts = parts[1:]
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    last = parts[-1]
    if last == "<key>":
        node[value] = "x"
    elif field in IN_A_PATH:
        node[last] = f"/models/{value}-Q4_K_M.gguf"
    elif last == 0:
        doc["servers"][0][field[-2]] = [value]
    else:
        node[last] = value
    if field[-2:] == ("speculative", "draft_model"):
        doc["servers"][0]["speculative"]["method"] = "draft"
    return doc


def _recorder(folder: Path, name: str, record: Path) -> None:
    """A fake engine in sh (fast to start): each call appends CALL and its argv, NUL-separated (argv
    cannot hold NUL, so this is exact), and writes LLAMA_API_KEY as it sees it."""
    script = folder / name
    script.write_text(f"#!/bin/sh\nprintf 'CALL\\0' >> '{record}'\nprintf '%s\\0' \"$@\" >> '{record}'\n"
                      f"printf '%s' \"${{LLAMA_API_KEY-}}${{VLLM_API_KEY-}}\" > '{record}.key'\n")
    script.chmod(0o755)


def _run_script(text: str, tmp: Path, target: str, key_var: str) -> list[dict[str, Any]]:
    script = tmp / f"{target}.sh"
    script.write_text(text)
    record = tmp / f"{target}.rec"
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    for name in ("llama-server", "python3", "docker"):
        _recorder(bindir, name, record)
    p = subprocess.run(["sh", str(script)], cwd=tmp, env={"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp),
                                                          key_var: SECRET},
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, (target, p.stderr, text)
    tokens = record.read_bytes().decode("utf-8", "surrogateescape").split("\0")[:-1]
    calls: list[dict[str, Any]] = []
    for token in tokens:
        if token == "CALL":
            calls.append({"argv": [], "key": Path(f"{record}.key").read_text()})
        else:
            calls[-1]["argv"].append(token)
    return calls


_COMPOSE_DOLLAR = re.compile(r"\$(?!\{[A-Za-z_][A-Za-z0-9_]*:\?)")


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _check_targets(plan: Any, tmp: Path) -> None:
    sp = plan.servers[0]
    key_var = sp.api_key.env_var if sp.api_key else "MY_KEY"
    texts: dict[str, str] = {}
    for target in TARGETS:
        try:
            texts[target] = render(plan, target)
        except OrchestratorError as exc:   # a target that cannot express the value refuses it, in one line
            assert "\n" not in str(exc) and " — " in str(exc), exc
    texts["command.json"] = render(plan, "command", as_json=True)
    texts["plan.json"] = json.dumps(plan.to_dict())
    for name, text in texts.items():
        assert SECRET not in text, name
    assert json.loads(texts["command.json"])[0]["argv"] == sp.argv()
    if "command" in texts:
        calls = _run_script(texts["command"], tmp, "command", key_var)
        assert calls == [{"argv": sp.argv()[1:], "key": SECRET}]
    if "docker" in texts:
        calls = _run_script(texts["docker"], tmp, "docker", key_var)
        assert len(calls) == 1 and calls[0]["argv"][-len(sp.args(container=True)):] == sp.args(container=True)
        assert sp.image in calls[0]["argv"] and SECRET not in json.dumps(calls[0]["argv"])
    if "compose" in texts:
        doc = yaml.safe_load(texts["compose"])
        svc = doc["services"][sp.name]
        assert [a.replace("$$", "$") for a in svc["command"]] == sp.args(container=True)
        assert svc["image"].replace("$$", "$") == sp.image
        for s in _strings(doc):
            assert not _COMPOSE_DOLLAR.search(s.replace("$$", "")), s   # every $ escaped but ${VAR:?} references
    if "k8s" in texts:
        docs = list(yaml.safe_load_all(texts["k8s"]))
        assert [d["kind"] for d in docs] == ["Deployment", "Service"]
        assert docs[0]["spec"]["template"]["spec"]["containers"][0]["args"] == sp.args(container=True)
    if "llama-swap" in texts:
        doc = yaml.safe_load(texts["llama-swap"])
        [model] = doc["models"].values()
        assert shlex.split(model["cmd"])[0] == sp.command[0]


@pytest.mark.parametrize("engine", ["llama.cpp", "vllm"])
@pytest.mark.parametrize("field", FIELDS, ids=[".".join(map(str, f)) for f in FIELDS])
def test_hostile_value_in_every_string_field(field: tuple[str | int, ...], engine: str, tmp_path: Path) -> None:
    refused = rendered = 0
    for i, value in enumerate(hostile_values(12 if engine == "llama.cpp" else 0)):
        text = yaml.safe_dump(with_value(field, value, engine), allow_unicode=True)
        file = str(tmp_path / "p.yaml")
        try:
            plan = build_plan(load_text(text, file), detect=False, environ={"HOME": str(tmp_path), "MY_KEY": SECRET,
                                                                             value: SECRET},
                              state_dir=str(tmp_path / "state"))
        except ProfileError as exc:
            refused += 1
            for problem in exc.problems:
                line = str(problem)
                assert line.startswith(f"{file}:") and " — " in line and "\n" not in line, line
                assert SECRET not in line
                assert len(line) < 2000, line[:200]
            continue
        case = tmp_path / f"case{i}"
        case.mkdir()
        _check_targets(plan, case)
        rendered += 1
        assert not list(tmp_path.rglob(f"{PWNED}*")), f"{value!r} in {field} ran a command"
    print(f"{field}: {rendered} rendered, {refused} refused")
    assert refused, "every field refuses some of these values"
    assert rendered or field in NEVER_RENDERED, "and renders others"
