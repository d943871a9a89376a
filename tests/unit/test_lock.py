"""The lock file: written from what is installed (a real executable that answers --version, a real
model file), read leniently, refused with FILE:LINE when corrupt, and drift named precisely when the
model, the engine build or the machine changes. No engine build is needed: the executable is a small
script that speaks llama-server's --version."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import yaml

from orchestrator import pipeline
from orchestrator.errors import OrchestratorError, ProfileError
from orchestrator.facts import lock as lockfile
from orchestrator.pipeline import build_plan, gather
from orchestrator.plan.explain import explain
from orchestrator.plan.planner import plan
from orchestrator.profile import load, load_text
from orchestrator.render import render
from tests.unit.test_pure_plan import no_world  # noqa: F401 - the fixture that blocks processes, sockets and files

ENGINE = """#!/bin/sh
case "$1" in
  --version) echo "version: {build} (abc{build})"; echo "built with cc for x86_64" ;;
  --help) echo "-m,    --model FNAME    model path" ;;
  *) echo "failed to load model" ;;
esac
"""


def _gguf(path: Path, payload: int) -> None:
    """A GGUF file with an empty header (version 3, no tensors, no keys) and `payload` random bytes."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + os.urandom(payload))


def _engine(path: Path, build: int) -> None:
    path.write_text(ENGINE.format(build=build))
    path.chmod(0o755)


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A profile on this machine's CPU with its own model file and engine executable, caches in tmp."""
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    _gguf(model, 4096)
    _engine(tmp_path / "llama-server", 11434)
    doc = {"name": "locked", "hardware": {"gpu": "cpu"},
           "servers": [{"name": "s", "engine": "llama.cpp", "model": {"path": str(model)}, "context": 2048,
                        "binary": str(tmp_path / "llama-server"), "port": 18555, "api_key_env": "LOCK_TEST_KEY",
                        "env": {"HF_HOME": "/srv/hf"}}]}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _tuning(flags: tuple[tuple[str, str | None], ...], gain: float = 0.12) -> lockfile.Tuning:
    return lockfile.Tuning(flags, "won by +12% over planned", "2026-12-03T18:00:00Z", "tok/s (workload)",
                           {"prompt_tokens": 128}, {"gain": gain, "noise": 0.04})


def test_lock_pins_build_model_and_machine(here: Path) -> None:
    path, said = pipeline.write_lock(str(here))
    assert path == here.with_name("p.lock.yaml") and said == []
    lk = lockfile.read(path)
    assert lk is not None and lk.profile == "locked" and lk.version == lockfile.LOCK_VERSION
    s = lk.servers["s"]
    assert s.build is not None and s.build.version == "b11434" and s.build.commit == "abc11434"
    assert s.build.sha256 == lockfile.sha256_file(here.with_name("llama-server"))
    assert s.model is not None and s.model.size == 4120
    assert s.model.sha256 == lockfile.sha256_file(here.with_name("m.gguf"))
    assert lk.machine == lockfile.observe_machine()
    assert all(r["ok"] and not r["drift"] for r in pipeline.verify_lock(str(here), str(here.parent / "st")))


def test_no_secret_in_the_lock(here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCK_TEST_KEY", "sk-very-secret-value")
    path, _ = pipeline.write_lock(str(here), {"s": _tuning((("-t", "2"),))})
    text = path.read_text()
    assert "sk-very-secret-value" not in text and "LOCK_TEST_KEY" not in text and "/srv/hf" not in text
    assert "-t" in text


def test_verify_names_a_running_server_without_the_locked_flags(here: Path) -> None:
    """A running server started before the lock was tuned: verify says to restart it. The record is
    this test's own process (alive); a record whose process is gone is ignored."""
    import psutil

    from orchestrator.runtime.state import ServerRecord, StateStore

    pipeline.write_lock(str(here), {"s": _tuning((("-t", "1"),))})
    store = StateStore(here.parent / "st")
    store.ensure()
    me = psutil.Process()
    argv = ["llama-server", "-m", "m.gguf", "-t", "2"]
    rec = ServerRecord("locked", "s", "llama.cpp", me.pid, os.getpgid(0), me.create_time(), "h", "127.0.0.1", 18555,
                       "log", "llama-server", argv, "m", "/health", str(here))
    store.update("locked", rec)
    [row] = pipeline.verify_lock(str(here), str(here.parent / "st"))
    assert row["drift"] == [f"the running server was started without the locked -t 1: restart it with "
                            f"orchestrate up {here}"]
    store.update("locked", ServerRecord(**{**rec.__dict__, "argv": [*argv, "-t", "1"]}))
    assert pipeline.verify_lock(str(here), str(here.parent / "st"))[0]["ok"]
    store.update("locked", ServerRecord(**{**rec.__dict__, "create_time": 1.0}))   # pid reused: not ours
    assert pipeline.verify_lock(str(here), str(here.parent / "st"))[0]["ok"]


def test_drift_model_replaced(here: Path) -> None:
    pipeline.write_lock(str(here))
    _gguf(here.with_name("m.gguf"), 5000)
    [row] = pipeline.verify_lock(str(here), str(here.parent / "st"))
    assert not row["ok"]
    [d] = row["drift"]
    assert d.startswith(f"model file replaced: {here.with_name('m.gguf')} has sha256 ") and "(5024 bytes)" in d
    assert "(4120 bytes)" in d


def test_drift_engine_rebuilt_at_another_version(here: Path) -> None:
    pipeline.write_lock(str(here))
    _engine(here.with_name("llama-server"), 11500)
    [row] = pipeline.verify_lock(str(here), str(here.parent / "st"))
    assert row["drift"] == [f"engine rebuilt at another version: llama.cpp b11500 is installed "
                            f"({here.with_name('llama-server')}), the lock has b11434"]


def test_drift_engine_rebuilt_at_the_same_version(here: Path) -> None:
    pipeline.write_lock(str(here))
    binary = here.with_name("llama-server")
    binary.write_text(binary.read_text() + "# rebuilt\n")
    [row] = pipeline.verify_lock(str(here), str(here.parent / "st"))
    [d] = row["drift"]
    assert d.startswith(f"engine rebuilt: {binary} (sha256 ") and "at the same version b11434" in d


def test_drift_machine_changed(here: Path) -> None:
    path, _ = pipeline.write_lock(str(here))
    data = yaml.safe_load(path.read_text())
    real = data["machine"]["cpu"]
    data["machine"]["cpu"] = "AMD Ryzen 9 7950X 16-Core Processor"
    data["machine"]["cores"] = 32
    path.write_text(yaml.safe_dump(data))
    [row] = pipeline.verify_lock(str(here), str(here.parent / "st"))
    assert row["drift"] == [
        f"machine changed: CPU is {real!r}, the lock was measured on 'AMD Ryzen 9 7950X 16-Core Processor'",
        f"machine changed: {os.cpu_count()} CPU cores, the lock has 32"]


def test_plan_uses_a_matching_lock_and_falls_back_on_drift(here: Path) -> None:
    pipeline.write_lock(str(here), {"s": _tuning((("-t", "1"), ("-ub", "128"), ("-fa", "off")))})
    sp = build_plan(load(here)).server("s")
    flags = {f.name: f for f in sp.flags}
    assert flags["-t"].value == "1" and flags["-t"].source == "tuned"
    assert flags["-fa"].value == "off" and flags["-fa"].reason.startswith("tuned: +12% tok/s (workload) (noise ±4%)")
    assert "the rules chose on: CPU backend has FlashAttention" in flags["-fa"].reason
    assert "the rules leave it at the engine's default" in flags["-ub"].reason
    assert sp.settings is not None and sp.settings.flash_attention is False
    text = explain(build_plan(load(here)))
    assert "-t 1" in text and "[tuned]" in text
    # the model replaced: the rules' flags, and the plan says why
    _gguf(here.with_name("m.gguf"), 10)
    sp = build_plan(load(here)).server("s")
    assert {f.name: f.value for f in sp.flags}["-fa"] == "on" and not any(f.source == "tuned" for f in sp.flags)
    assert any("no longer matches" in w and "model file replaced" in w for w in sp.warnings)
    with pytest.raises(OrchestratorError, match="--locked: .* no longer matches this machine: s: model file replaced"):
        build_plan(load(here), locked=True)


def test_locked_without_a_lock_is_an_error(here: Path) -> None:
    with pytest.raises(OrchestratorError, match="--locked: there is no lock file"):
        build_plan(load(here), locked=True)
    assert build_plan(load(here)).server("s").warnings == []   # without --locked: the rules, silently


def test_relock_keeps_tuning_until_drift(here: Path) -> None:
    path, _ = pipeline.write_lock(str(here), {"s": _tuning((("-t", "1"),))})
    _, said = pipeline.write_lock(str(here))
    lk = lockfile.read(path)
    assert said == [] and lk is not None and lk.servers["s"].tuning is not None
    _engine(here.with_name("llama-server"), 11500)
    _, said = pipeline.write_lock(str(here))
    lk = lockfile.read(path)
    assert lk is not None and lk.servers["s"].tuning is None
    assert said and "tuned flags were dropped" in said[0] and "b11500" in said[0]


# --------------------------------------------------------------------------- reading the file

GOOD = """\
lock_version: 1
profile: p
machine:
  cpu: Some CPU
  cores: 2
servers:
  s:
    engine: llama.cpp
    build: {version: b11434, sha256: %s}
    tuned:
      flags:
        - {flag: -t, value: '2'}
""" % ("a" * 64)


def test_round_trip() -> None:
    lk = lockfile.parse(GOOD, "x.lock.yaml")
    again = lockfile.parse(lockfile.dump(lk), "y.lock.yaml")
    assert again.servers == lk.servers and again.machine == lk.machine
    assert again.servers["s"].tuning is not None and again.servers["s"].tuning.flags == (("-t", "2"),)


def test_newer_version_and_unknown_keys_are_read_leniently() -> None:
    text = GOOD.replace("lock_version: 1", "lock_version: 7\nsignature: abc") + "    accelerator_hint: x\n"
    lk = lockfile.parse(text, "x.lock.yaml")
    assert lk.servers["s"].build is not None and lk.servers["s"].build.version == "b11434"
    assert any("lock_version 7 is newer" in n for n in lk.notes)
    assert any(n.startswith("x.lock.yaml:2: unknown key 'signature'") for n in lk.notes)
    assert any("unknown key 'servers.s.accelerator_hint'" in n for n in lk.notes)


@pytest.mark.parametrize(("text", "where", "what"), [
    (GOOD.replace("cores: 2", "cores: [2"), "x.lock.yaml:6: lock file", "not valid YAML"),
    (GOOD.replace("a" * 64, "'not-a-hash'"), "x.lock.yaml:9: servers.s.build.sha256", "is not a sha256"),
    (GOOD.replace("flag: -t", "flag: --api-key"), "x.lock.yaml:12: servers.s.tuned.flags[0].flag",
     "'--api-key' is not a tunable knob"),
    (GOOD.replace("lock_version: 1\n", ""), "x.lock.yaml:1: lock_version", "this is not a lock file"),
    (GOOD.replace("servers:\n", "servers: 3\nx:\n"), "x.lock.yaml:6: servers", "expected a mapping"),
    ("- just\n- a list\n", "x.lock.yaml:1: lock file", "expected a mapping"),
])
def test_corrupt_lock_is_a_clear_error(text: str, where: str, what: str) -> None:
    with pytest.raises(ProfileError) as err:
        lockfile.parse(text, "x.lock.yaml")
    first = str(err.value.problems[0])
    assert first.startswith(where) and what in first and "orchestrate lock PROFILE" in first


def test_cli_corrupt_lock_is_one_line(here: Path, orchestrate) -> None:
    here.with_name("p.lock.yaml").write_text(GOOD.replace("flag: -t", "flag: --api-key"))
    code, out, err = orchestrate("plan", str(here), env={"ORCHESTRATOR_CACHE": os.environ["ORCHESTRATOR_CACHE"]})
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"{here.with_name('p.lock.yaml')}:12: servers.s.tuned.flags[0].flag: '--api-key'")


def test_cli_lock_and_verify(here: Path, orchestrate) -> None:
    env = {"ORCHESTRATOR_CACHE": os.environ["ORCHESTRATOR_CACHE"], "ORCHESTRATOR_STATE_DIR": str(here.parent / "st")}
    code, out, err = orchestrate("lock", str(here), env=env)
    assert code == 0 and out.strip() == f"wrote {here.with_name('p.lock.yaml')}", err
    code, out, err = orchestrate("lock", "verify", str(here), env=env)
    assert code == 0 and out.strip() == "s: matches the lock (tuned flags: none)", err
    _gguf(here.with_name("m.gguf"), 1)
    code, out, err = orchestrate("lock", "verify", str(here), env=env)
    assert code == 1 and out.startswith(f"s: drift: model file replaced: {here.with_name('m.gguf')}")
    code, out, err = orchestrate("plan", str(here), "--locked", env=env)
    assert code == 1 and "--locked" in err and "model file replaced" in err and "Traceback" not in err


# --------------------------------------------------------------------------- images pinned by digest

def test_render_pins_the_image_by_digest(tmp_path: Path) -> None:
    """The planner applies a matching lock's image digest; compose and k8s render what the plan says."""
    from orchestrator.facts.types import LockedServer

    text = yaml.safe_dump({"name": "img", "hardware": {"gpu": "cpu"}, "servers": [
        {"name": "s", "engine": "llama.cpp", "runtime": "docker", "model": {"path": "/models/m.gguf"}}]})
    loaded = load_text(text, str(tmp_path / "img.yaml"))
    facts = gather(loaded, environ={"HOME": "/home/u"}, detect=False)
    digest = "ghcr.io/ggml-org/llama.cpp@sha256:" + "b" * 64
    facts.locks = {"s": LockedServer("img.lock.yaml", image=digest)}
    p = plan(loaded, facts, enforce_fit=False)
    assert p.server("s").image == digest and "pinned by the digest in img.lock.yaml" in p.server("s").image_reason
    compose = yaml.safe_load(render(p, "compose"))
    assert compose["services"]["s"]["image"] == digest
    docs = list(yaml.safe_load_all(render(p, "k8s")))
    images = [c["image"] for d in docs if d.get("kind") == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]]
    assert images == [digest]
    facts.locks = {"s": LockedServer("img.lock.yaml", image=digest, drift=("machine changed: x",))}
    p = plan(loaded, facts, enforce_fit=False)
    assert p.server("s").image == "ghcr.io/ggml-org/llama.cpp:server"


@pytest.mark.docker
def test_image_digest_from_the_local_daemon(docker_client) -> None:
    """observe_image asks the daemon: its local id always, the registry digest where it has one."""
    images = [i for i in docker_client.images.list() if i.tags]
    if not images:
        pytest.skip("no tagged image on this daemon")
    for img in images[:3]:
        got = lockfile.observe_image(img.tags[0])
        assert got.id == img.id
        digests = img.attrs.get("RepoDigests") or []
        assert got.digest in digests if digests else got.digest is None
    assert lockfile.observe_image("orchestrator-test/absent:none") == lockfile.Image("orchestrator-test/absent:none")


def test_the_plan_cache_replans_when_the_lock_changes(here: Path) -> None:
    from orchestrator import plancache

    environ = dict(os.environ)
    plancache.store(str(here), environ, build_plan(load(here)), auto_detected=False)
    assert plancache.load(str(here), environ) is not None
    pipeline.write_lock(str(here))
    assert plancache.load(str(here), environ) is None, "a new lock must not be served a plan made without it"


def test_planning_with_a_lock_does_no_io(here: Path, no_world) -> None:  # noqa: F811 - the fixture
    """The lock is read and checked before planning; the planner applies it with the world blocked."""
    pipeline.write_lock(str(here), {"s": _tuning((("-t", "1"), ("-fa", "off")))})
    expected = build_plan(load(here)).to_dict()
    loaded = load(here)
    facts = gather(loaded)
    facts.locks = pipeline.read_lock(loaded, plan(loaded, facts))
    no_world()
    got = plan(loaded, facts)
    assert got.to_dict() == expected
    assert {f.name for f in got.server("s").flags if f.source == "tuned"} == {"-fa", "-t"}


def test_lock_says_what_it_could_not_pin(here: Path) -> None:
    """A model that is not here, or a process server without an installed build: nothing to hash, and
    the lock write says so instead of pinning nothing silently."""
    here.with_name("m.gguf").unlink()
    _, said = pipeline.write_lock(str(here))
    assert said == [f"s: model {here.with_name('m.gguf')} is not on this machine: its size and sha256 are not pinned"]
    text = here.read_text().replace(str(here.with_name("llama-server")), str(here.with_name("absent-server")))
    here.write_text(text)
    _gguf(here.with_name("m.gguf"), 8)
    _, said = pipeline.write_lock(str(here))
    assert said == [f"s: {here.with_name('absent-server')} is not here: only the version b11434 is pinned"]
