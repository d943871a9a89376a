"""Secrets stay references; shell metacharacters stay data; templates are sandboxed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import OrchestratorError
from orchestrator.pipeline import build_plan
from orchestrator.plan.model import EnvVar, Flag
from orchestrator.profile import load_text
from orchestrator.render import TARGETS, environment, render

SECRET = "s3cr3t-Value-9f8e"
NASTY = ["; rm -rf ~", "$(touch PWNED)", "`touch PWNED`", "a'b\"c", "$HOME ${HOME}"]
# A validated profile holds no control characters (the loader refuses them); the renderers must be
# safe without that, so the YAML tests put this into the Plan itself.
INJECT = "x\n    privileged: true"


def nasty_profile(engine: str, pwned: Path) -> str:
    args = [a.replace("PWNED", str(pwned)) for a in NASTY]
    return yaml.safe_dump({
        "name": "nasty",
        "hardware": {"gpu": "rtx-3090"},
        "servers": [{
            "name": "s", "engine": engine,
            "model": {"path": f"/models/dir with space/$(touch {pwned})/m-Q4_K_M.gguf"},
            "host": "0.0.0.0", "api_key_env": "MY_KEY",
            "env": {"NOTE": f"$(touch {pwned}) `id`"},
            "extra_args": args,
        }],
    })


ENGINES = ["llama.cpp", "ik_llama"]


def plan_for(engine: str, pwned: Path, tmp_path: Path):
    return build_plan(load_text(nasty_profile(engine, pwned), "nasty.yaml"), detect=False,
                      environ={"MY_KEY": SECRET, "HOME": "/home/u"}, state_dir=str(tmp_path / "state"))


@pytest.mark.parametrize("engine", ENGINES)
def test_secret_value_never_rendered(engine: str, tmp_path: Path) -> None:
    plan = plan_for(engine, tmp_path / "pwned", tmp_path)
    # llama-swap expands ${...} in cmd (${env.MY_KEY} would put the key into argv): it refuses this plan.
    with pytest.raises(OrchestratorError, match="llama-swap would expand"):
        render(plan, "llama-swap")
    outputs = [render(plan, t) for t in TARGETS if t != "llama-swap"] + [
        render(plan, "command", as_json=True), json.dumps(plan.to_dict())]
    for text in outputs:
        assert SECRET not in text
    assert any("MY_KEY" in t for t in outputs)
    assert "--api-key" not in " ".join(plan.servers[0].argv()).replace("--api-key-file", "")


def _fake_bin(folder: Path, name: str, record: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(
        "#!/usr/bin/env python3\nimport json, os, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], "
        "'key': os.environ.get('LLAMA_API_KEY')}) + '\\n')\n")
    script.chmod(0o755)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("target", ["command", "docker"])
def test_shell_metacharacters_stay_literal(engine: str, target: str, tmp_path: Path) -> None:
    """Execute the rendered script against recording stand-ins: argv arrives verbatim, nothing runs."""
    pwned = tmp_path / "pwned"
    plan = plan_for(engine, pwned, tmp_path)
    script = tmp_path / f"{target}.sh"
    script.write_text(render(plan, target))
    record = tmp_path / "argv.jsonl"
    bindir = tmp_path / "bin"
    _fake_bin(bindir, "llama-server" if target == "command" else "docker", record)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "MY_KEY": SECRET, "HOME": str(tmp_path)}
    p = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert not pwned.exists(), "a shell metacharacter was executed"
    call = json.loads(record.read_text().splitlines()[0])
    s = plan.servers[0]
    expected = s.args() if target == "command" else None
    if expected is not None:
        assert call["argv"] == expected
        if engine == "llama.cpp":
            assert call["key"] == SECRET  # passed by environment, not argv
    else:
        assert call["argv"][-len(s.args(container=True)):] == s.args(container=True)
    for arg in NASTY[:4]:
        assert arg.replace("PWNED", str(pwned)) in call["argv"]
    if s.api_key and s.api_key.process_path:
        key = Path(s.api_key.process_path)
        assert key.read_text().strip() == SECRET
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert SECRET not in json.dumps(call["argv"])


@pytest.mark.parametrize("engine", ENGINES)
def test_yaml_outputs_round_trip_and_resist_injection(engine: str, tmp_path: Path) -> None:
    plan = plan_for(engine, tmp_path / "pwned", tmp_path)
    s = plan.servers[0]
    s.env = [*s.env, EnvVar("INJECT", INJECT, "test: a value no profile can hold")]
    s.flags = [*s.flags, Flag("", INJECT, "test: a value no profile can hold", "user")]
    compose = yaml.safe_load(render(plan, "compose"))
    svc = compose["services"]["s"]
    assert "privileged" not in svc
    assert svc["environment"]["INJECT"] == "x\n    privileged: true"
    # Compose interpolation: literal $ is escaped as $$ and comes back verbatim.
    unescaped = [a.replace("$$", "$") for a in svc["command"]]
    assert unescaped == plan.servers[0].args(container=True)
    docs = list(yaml.safe_load_all(render(plan, "k8s")))
    container = docs[0]["spec"]["template"]["spec"]["containers"][0]
    assert "privileged" not in container
    assert container["args"] == plan.servers[0].args(container=True)
    assert not any("privileged" in d for d in docs)


def test_templates_strict_and_sandboxed() -> None:
    from jinja2.exceptions import SecurityError, UndefinedError

    env = environment()
    with pytest.raises(UndefinedError, match="undefined_var"):
        env.from_string("{{ undefined_var }}").render()
    with pytest.raises(SecurityError):
        env.from_string("{{ ''.__class__.__mro__[1].__subclasses__() }}").render()


def test_no_shell_true_or_os_system_in_package() -> None:
    root = Path(__file__).resolve().parents[2] / "orchestrator"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "shell=True" not in text, path
        assert "os.system(" not in text, path
    assert os.name == "posix"
