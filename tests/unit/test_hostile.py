"""Hostile and careless input beyond the bad-profile table: what validate/plan/render do with a
profile nobody has read, and what the rendered files do when they run."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.pipeline import build_plan
from orchestrator.profile import load_text
from orchestrator.render import TARGETS, render

KEY = "k3y-Value-0a9b8c7d6e5f"


def _profile(engine: str = "llama.cpp", **server: object) -> str:
    path = "/m/Qwen2.5-7B" if engine in ("vllm", "sglang") else "/m/model-Q4_K_M.gguf"
    spec = {"name": "s", "engine": engine, "model": {"path": path}, **server}
    return yaml.safe_dump({"name": "t", "hardware": {"gpu": "rtx-4090"}, "servers": [spec]})


def _plan(text: str, tmp_path: Path, file: str = "t.yaml"):
    return build_plan(load_text(text, file), detect=False, environ={"HOME": str(tmp_path)},
                      state_dir=str(tmp_path / "state"))


def _recorder(folder: Path, name: str, record: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      f"open({str(record)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], "
                      "'env': {k: v for k, v in os.environ.items() if k.endswith('API_KEY')}}) + '\\n')\n")
    script.chmod(0o755)


# ---------------------------------------------------------------- 1, 2: every templated line is safe

@pytest.mark.parametrize("target", ["command", "docker"])
def test_injected_version_and_file_name_stay_comments(target: str, tmp_path: Path) -> None:
    """A newline in engine_version (a cached plan, a future field) or in the profile's file name
    cannot start a line of the script: every templated value is written with its controls escaped."""
    pwned = tmp_path / "pwned"
    plan = _plan(_profile(), tmp_path, file=f"evil\ntouch {pwned}\n.yaml")
    plan.servers[0].engine_version = f"b1\ntouch {pwned}"
    plan.servers[0].name = f"s\ntouch {pwned}"
    script = tmp_path / "run.sh"
    script.write_text(render(plan, target))
    record = tmp_path / "argv.jsonl"
    bindir = tmp_path / "bin"
    _recorder(bindir, "llama-server" if target == "command" else "docker", record)
    p = subprocess.run(["sh", str(script)], env={"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)},
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert not pwned.exists()
    assert "\\ntouch" in script.read_text()


@pytest.mark.parametrize("target", ["compose", "k8s", "llama-swap"])
def test_file_name_cannot_break_yaml_targets(target: str, tmp_path: Path) -> None:
    plan = _plan(_profile(), tmp_path, file="x\nname: evil\nservices: {}\n\u2028x: 1.yaml")
    text = render(plan, target)
    docs = list(yaml.safe_load_all(text))
    if target == "compose":
        assert docs[0]["name"] == "t" and "s" in docs[0]["services"]
    assert text.splitlines()[0].startswith("# generated") and "\\n" in text.splitlines()[0]


# ---------------------------------------------------------------- 4: no key, no start

@pytest.mark.parametrize("engine", ["llama.cpp", "ik_llama", "vllm", "sglang"])
@pytest.mark.parametrize("target", ["command", "docker"])
@pytest.mark.parametrize("key", [None, ""])
def test_unset_or_empty_key_starts_nothing(engine: str, target: str, key: str | None, tmp_path: Path) -> None:
    plan = _plan(_profile(engine, host="0.0.0.0", api_key_env="MY_KEY"), tmp_path)
    script = tmp_path / "run.sh"
    script.write_text(render(plan, target))
    record = tmp_path / "argv.jsonl"
    bindir = tmp_path / "bin"
    for name in ("llama-server", "python3", "docker"):
        _recorder(bindir, name, record)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    if key is not None:
        env["MY_KEY"] = key
    p = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    assert "set MY_KEY to the API key" in p.stderr
    assert not record.exists(), "the server was started without its key"
    env["MY_KEY"] = KEY
    p = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert record.exists() and KEY not in json.dumps([json.loads(x)["argv"] for x in record.read_text().splitlines()])


# ---------------------------------------------------------------- 5: render -o writes safely

QUICK = Path(__file__).resolve().parents[2] / "examples" / "quickstart-cpu.yaml"


def _render_to(orchestrate, out: Path | str, profile: Path = QUICK, target: str = "command"):
    return orchestrate("render", str(profile), "-t", target, "-o", str(out))


def test_render_output_keeps_mode_and_leaves_no_temp_file(orchestrate, tmp_path: Path) -> None:
    out = tmp_path / "run.sh"
    out.write_text("old")
    out.chmod(0o600)
    code, _, err = _render_to(orchestrate, out)
    assert code == 0, err
    assert out.read_text().startswith("#!/bin/sh")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["run.sh"]


def test_render_output_refuses_symlinks_and_the_profile(orchestrate, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "out.sh"
    link.symlink_to(victim)
    code, _, err = _render_to(orchestrate, link)
    assert code == 1 and "is a symbolic link" in err and "Traceback" not in err
    assert victim.read_text() == "precious" and link.is_symlink()
    profile = tmp_path / "p.yaml"
    profile.write_text(QUICK.read_text())
    code, _, err = _render_to(orchestrate, profile, profile)
    assert code == 1 and "is the profile being rendered" in err
    assert profile.read_text() == QUICK.read_text()
    # a predictable temp name planted as a link changes nothing either
    (tmp_path / "c.yaml.tmp").symlink_to(victim)
    (tmp_path / ".env.example").symlink_to(victim)
    code, _, err = _render_to(orchestrate, tmp_path / "c.yaml", target="compose")
    assert victim.read_text() == "precious"


def test_render_output_to_a_device_writes_in_place(orchestrate, tmp_path: Path) -> None:
    code, _, err = _render_to(orchestrate, "/dev/null")
    assert code == 0, err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = _render_to(orchestrate, fifo)   # no reader: refused at once, never blocks
    assert code == 1 and "needs a reader" in err
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    code, _, err = _render_to(orchestrate, tmp_path / "missing" / "x.sh")
    assert code == 1 and "cannot write in" in err and "Traceback" not in err


# ---------------------------------------------------------------- 6: checking never runs the profile's program

@pytest.mark.parametrize("engine", ["llama.cpp", "vllm"])
def test_validate_plan_render_never_run_the_binary(engine: str, orchestrate, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    binary = tmp_path / "evil"
    binary.write_text(f"#!/bin/sh\necho ran >> {marker}\necho 'version: 1 (b11434)'\n")
    binary.chmod(0o755)
    model = tmp_path / "m.gguf" if engine == "llama.cpp" else tmp_path / "m"
    spec = {"name": "s", "engine": engine, "binary": str(binary), "model": {"path": str(model)}}
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"name": "t", "hardware": {"gpu": "cpu"}, "servers": [spec]}))
    for args in (["validate"], ["plan"], ["render", "-t", "k8s"], ["render"], ["fit"]):
        code, out, err = orchestrate(*args, str(profile))
        assert "Traceback" not in err, err
        assert not marker.exists(), f"{args[0]} ran the profile's binary"
    code, out, _ = orchestrate("plan", str(profile))
    assert "was not run" in out


def test_relative_binary_is_that_file(tmp_path: Path) -> None:
    from orchestrator.facts.installed import profile_binary

    assert profile_binary("./llama-server") == os.path.join(os.getcwd(), "llama-server")
    assert profile_binary("llama-server") == "llama-server"


# ---------------------------------------------------------------- 9 (and issue 15 item 8): keys are not echoed

@pytest.mark.parametrize("value", ["sk-live-4f9a8b7c6d5e4f3a2b1c", "a3f9c2d4e5f60718293a4b5c6d7e8f90",
                                   "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"])
def test_key_pasted_into_api_key_env_is_never_echoed(value: str, orchestrate, tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(_profile(host="0.0.0.0", api_key_env=value))
    for args in (["validate"], ["validate", "--json"], ["plan"], ["render", "-t", "compose"]):
        code, out, err = orchestrate(*args, str(profile))
        assert code == 1
        assert value not in out + err and value[:12] not in out + err
        assert "never the key itself" in out + err and "characters" in out + err
    for target in TARGETS:
        assert target  # nothing rendered: the profile is refused before any target


def test_plain_variable_names_are_accepted(tmp_path: Path) -> None:
    for name in ("CODER_API_KEY", "OPENROUTER_API_KEY", "MY_SERVICE_PRODUCTION_API_KEY_2", "K8S_TOKEN_2024"):
        plan = _plan(_profile(host="0.0.0.0", api_key_env=name), tmp_path)
        assert plan.servers[0].api_key is not None


# ---------------------------------------------------------------- 8, 11: model files are bounded and whole

def _kv_u64(key: str, value: int) -> bytes:
    import struct

    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 10, value)


def _kv_str(key: str, value: str) -> bytes:
    import struct

    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, len(v)) + v


def _gguf(kvs: list[bytes], tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs) + tensors


def _real_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_tensor("token_embd.weight", np.zeros((256, 64), dtype=np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _model_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    import struct

    cases: dict[str, tuple[Path, str]] = {}
    bomb = tmp_path / "layers-Q4_K_M.gguf"
    bomb.write_bytes(_gguf([_kv_str("general.architecture", "llama"), _kv_u64("llama.block_count", 2**62)]))
    cases["block-count"] = (bomb, "llama.block_count is 4611686018427387904")
    dims = tmp_path / "dims-Q4_K_M.gguf"
    name = b"token_embd.weight"
    info = struct.pack("<Q", len(name)) + name + struct.pack("<I", 2**32 - 1) + b"\0" * 300
    dims.write_bytes(_gguf([_kv_str("general.architecture", "llama")], info, n_tensors=1))
    cases["n-dims"] = (dims, "has 4294967295 dimensions")
    text = tmp_path / "text-Q4_K_M.gguf"
    text.write_text("<html>404 not found</html>")
    cases["not-gguf"] = (text, "not a GGUF file")
    cut = _real_gguf(tmp_path / "cut-Q4_K_M.gguf")
    with cut.open("r+b") as fh:
        fh.truncate(cut.stat().st_size - 4096)
    cases["truncated"] = (cut, "truncated: the header promises")
    fifo = tmp_path / "fifo-Q4_K_M.gguf"
    os.mkfifo(fifo)
    cases["fifo"] = (fifo, "is a FIFO, not a model file")
    cases["device"] = (Path("/dev/zero"), "is a device or socket")
    for label, cfg in {"hf-layers": '{"num_hidden_layers": 4611686018427387904, "num_attention_heads": 8}',
                       "hf-types": '{"num_attention_heads": "eight", "hidden_size": 64}',
                       "hf-json": '{"num_hidden_layers": 4,'}.items():
        folder = tmp_path / label
        folder.mkdir()
        (folder / "config.json").write_text(cfg)
        cases[label] = (folder, {"hf-layers": "num_hidden_layers is", "hf-types": "num_attention_heads is",
                                 "hf-json": "config.json: not valid JSON"}[label])
    return cases


@pytest.mark.parametrize("case", ["block-count", "n-dims", "not-gguf", "truncated", "fifo", "device", "hf-layers",
                                  "hf-types", "hf-json"])
def test_broken_or_crafted_model_file_is_an_error(case: str, orchestrate, tmp_path: Path) -> None:
    import time

    path, want = _model_cases(tmp_path)[case]
    engine = "vllm" if case.startswith("hf") else "llama.cpp"
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"name": "t", "hardware": {"gpu": "cpu"}, "servers": [
        {"name": "s", "engine": engine, "model": {"path": str(path)}}]}))
    for command in ("validate", "fit"):
        start = time.monotonic()
        code, out, err = orchestrate(command, str(profile), env={"ORCHESTRATOR_CACHE": str(tmp_path / "cache")})
        assert time.monotonic() - start < 30
        assert code == 1, (out, err)
        assert f"{profile}:7: servers[0].model.path:" in err, err
        assert want in err and "Traceback" not in err


def test_whole_gguf_still_reads(tmp_path: Path) -> None:
    from orchestrator.facts.model import gather

    facts = gather(str(_real_gguf(tmp_path / "ok.gguf")))
    assert facts.defect is None and facts.n_layers == 1 and facts.size_bytes == (256 + 64) * 64 * 2


def test_up_preflight_never_blocks_on_a_fifo(tmp_path: Path) -> None:
    from orchestrator.runtime.deployer import Deployer, ServerFailure
    from orchestrator.runtime.state import StateStore

    model = _real_gguf(tmp_path / "m.gguf")
    plan = _plan(_profile(), tmp_path)
    sp = plan.servers[0]
    model.unlink()
    os.mkfifo(model)
    sp.model_location = str(model)
    with pytest.raises(ServerFailure, match="not a regular file"):
        Deployer(StateStore(tmp_path / "state")).check_model_file(sp)


# ---------------------------------------------------------------- 10: what a target makes reachable

def test_k8s_target_refuses_a_keyless_server(orchestrate, tmp_path: Path) -> None:
    code, out, err = orchestrate("render", str(QUICK), "-t", "k8s")
    assert code == 1 and out == ""
    assert f"{QUICK.relative_to(QUICK.parents[1])}:" in err or f"{QUICK}:" in err
    assert "servers[0].api_key_env: --target k8s makes this server reachable from every pod" in err
    code, _, err = orchestrate("render", str(QUICK), "-t", "compose")   # publishes on 127.0.0.1 only
    assert code == 0, err


# ---------------------------------------------------------------- 13: names cannot collide

def test_joined_names_are_unambiguous(tmp_path: Path) -> None:
    from orchestrator.plan.model import container_name
    from orchestrator.runtime.state import StateStore

    store = StateStore(tmp_path)
    assert container_name("lc", "a-b") != container_name("lc-a", "b")
    assert store.log_path("lc", "a-b") != store.log_path("lc-a", "b")
    plan_a = _plan(yaml.safe_dump({"name": "lc", "hardware": {"gpu": "cpu"}, "servers": [
        {"name": "a-b", "api_key_env": "K", "model": {"path": "/m/x-Q4_K_M.gguf"}}]}), tmp_path)
    plan_b = _plan(yaml.safe_dump({"name": "lc-a", "hardware": {"gpu": "cpu"}, "servers": [
        {"name": "b", "api_key_env": "K", "model": {"path": "/m/x-Q4_K_M.gguf"}}]}), tmp_path)
    for target in ("docker", "compose", "k8s"):
        a, b = render(plan_a, target), render(plan_b, target)
        assert "lc--a-b" in a and "lc-a--b" in b and "lc--a-b" not in b


# ---------------------------------------------------------------- 14: terminal escapes

def test_plan_text_cannot_steer_the_terminal(tmp_path: Path) -> None:
    from orchestrator.errors import Problem, printable
    from orchestrator.plan.explain import explain

    plan = _plan(_profile(), tmp_path)
    plan.servers[0].warnings.append("fine\x1b[1A\x1b[2K\rall good\u202e")
    text = printable(explain(plan))
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    assert "\\x1b[1A" in text and text.count("\n") == explain(plan).count("\n")
    assert "\n" not in str(Problem(("a",), "x\ny", "z\x1b", "f\n.yaml", 3))


# ---------------------------------------------------------------- 17: ${VAR} only where it is safe to show

@pytest.mark.parametrize("path,env,want", [
    ("${MY_KEY}/m.gguf", {"MY_KEY": KEY}, "names a secret"),
    ("${HF_TOKEN}/m.gguf", {"HF_TOKEN": "tok-value-not-shown"}, "names a secret"),
    ("/m/${WHERE}.gguf", {"WHERE": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"}, "looks like a secret"),
    ("${MODELS}/m.gguf", {"MODELS": "/m\x1b[2K"}, "control"),
])
def test_model_path_does_not_expand_secrets(path: str, env: dict[str, str], want: str, orchestrate,
                                            tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(_profile(host="0.0.0.0", api_key_env="MY_KEY", model={"path": path}))
    code, out, err = orchestrate("plan", str(profile), env=env)
    assert code == 1 and want in err and "servers[0].model.path" in err
    for value in env.values():
        assert value not in out + err


def test_model_path_expands_a_folder_variable(orchestrate, tmp_path: Path) -> None:
    snapshot = "/hf/models--org--m/snapshots/0123456789abcdef0123456789abcdef01234567"
    profile = tmp_path / "p.yaml"
    profile.write_text(_profile(model={"path": "${MODELS_DIR}/m-Q4_K_M.gguf"}))
    code, out, err = orchestrate("plan", str(profile), env={"MODELS_DIR": snapshot})
    assert code == 0, err
    assert f"{snapshot}/m-Q4_K_M.gguf" in out


# ---------------------------------------------------------------- 19: the state folder holds only names

@pytest.mark.parametrize("name", ["*", "a\nb", "a..b", "A"])
def test_commands_refuse_names_that_are_not_deployments(name: str, orchestrate, tmp_path: Path) -> None:
    state = tmp_path / "state"
    for args in (["down", name], ["logs", name], ["status", name]):
        code, out, err = orchestrate(*args, env={"ORCHESTRATOR_STATE_DIR": str(state)})
        assert code == 1 and "is not a deployment name" in err and "Traceback" not in err, (args, err)
    assert not state.exists() or not any(state.rglob("*.lock"))


def test_down_of_an_unknown_deployment_leaves_no_lock(orchestrate, tmp_path: Path) -> None:
    state = tmp_path / "state"
    code, out, _ = orchestrate("down", "nothing-here", env={"ORCHESTRATOR_STATE_DIR": str(state)})
    assert code == 0 and "nothing running" in out
    assert not list(state.rglob("*.lock"))


def test_state_dir_without_home_is_never_a_literal_tilde() -> None:
    from orchestrator.paths import cache_dir, state_dir

    assert os.path.isabs(state_dir({})) and "~" not in state_dir({})
    assert cache_dir("", {}).is_absolute()


# ---------------------------------------------------------------- 12: env secrets by reference, private files

def test_env_reference_stays_a_reference_in_every_target(tmp_path: Path) -> None:
    token = "tok-Secret-4a5b6c7d8e9f0a1b"
    plan = _plan(_profile(host="0.0.0.0", api_key_env="MY_KEY", env={"HF_TOKEN": "${HF_TOKEN}"}), tmp_path)
    texts = {t: render(plan, t) for t in TARGETS}
    assert all(token not in t for t in texts.values())
    compose = yaml.safe_load(texts["compose"])["services"]["s"]
    assert compose["environment"]["HF_TOKEN"] == "${HF_TOKEN:?set HF_TOKEN to the value of HF_TOKEN}"
    [deploy] = [d for d in yaml.safe_load_all(texts["k8s"]) if d["kind"] == "Deployment"]
    env = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "t--s-env", "key": "HF_TOKEN"}}} in env
    script = tmp_path / "run.sh"
    script.write_text(texts["command"])
    record = tmp_path / "argv.jsonl"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "llama-server").write_text(f"#!{sys.executable}\nimport json, os\n"
                                         f"open({str(record)!r}, 'w').write(os.environ.get('HF_TOKEN', ''))\n")
    (bindir / "llama-server").chmod(0o755)
    env_run = {"PATH": f"{bindir}:/usr/bin:/bin", "MY_KEY": KEY}
    p = subprocess.run(["sh", str(script)], env=env_run, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "set HF_TOKEN" in p.stderr and not record.exists()
    p = subprocess.run(["sh", str(script)], env={**env_run, "HF_TOKEN": token}, capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    assert record.read_text() == token


def test_secret_looking_env_literal_is_a_warning_without_the_value(tmp_path: Path) -> None:
    value = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"
    plan = _plan(_profile(env={"HF_TOKEN": value}), tmp_path)
    [warning] = [w for w in plan.servers[0].warnings if "HF_TOKEN" in w]
    assert "looks like a secret" in warning and value not in warning and "'${HF_TOKEN}'" in warning


def test_cache_and_state_files_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import plancache
    from orchestrator.facts.model import gather
    from orchestrator.runtime.state import StateStore

    cache = tmp_path / "cache"
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(cache))
    model = _real_gguf(tmp_path / "m.gguf")
    gather(str(model))
    profile = tmp_path / "p.yaml"
    profile.write_text(_profile(model={"path": str(model)}))
    plancache.store(str(profile), {"ORCHESTRATOR_CACHE": str(cache)}, _plan(profile.read_text(), tmp_path), False)
    store = StateStore(tmp_path / "state")
    store.ensure()
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert {p.parent.name for p in files} >= {"modelfacts", "plans"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700, p.parent
    for d in (store.root, store.dir, store.logs):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_state_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    from orchestrator.errors import OrchestratorError
    from orchestrator.runtime.state import StateStore

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OrchestratorError, match="cannot create the state folder .* set ORCHESTRATOR_STATE_DIR"):
        StateStore(blocker / "state").ensure()


# ---------------------------------------------------------------- 16: a LAN host behind llama-swap

def test_llama_swap_proxies_where_the_upstream_binds(tmp_path: Path) -> None:
    plan = _plan(_profile(host="192.168.1.5", api_key_env="MY_KEY"), tmp_path)
    [model] = yaml.safe_load(render(plan, "llama-swap"))["models"].values()
    argv = model["cmd"].split()
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert model["proxy"].startswith("http://127.0.0.1:")
