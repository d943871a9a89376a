"""The docker runtime and the rendered compose file against a real Docker daemon, with images built
here by `orchestrate engines image` from the real llama.cpp b11434 and ik_llama.cpp builds, serving the
Gemma 3 270M GGUF. Every request goes to a port published on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from tests.unit.test_consumers import compose_binary

pytestmark = [pytest.mark.docker, pytest.mark.engines]
ENGINES = ["llama.cpp", "ik_llama"]
PREFIX = "dk-"          # every deployment here is named dk-*; the fixture removes what a test leaves


class Images(dict):
    """engine -> image tag, built on first use by the real CLI from the engine's real build (made first
    when missing); the tag is the CLI's last line of output."""

    def __init__(self, client) -> None:
        super().__init__()
        self.client = client

    def __missing__(self, engine: str) -> str:
        from orchestrator.provision import builds as provision

        provision.build(engine, "cpu")
        p = subprocess.run([sys.executable, "-m", "orchestrator", "engines", "image", engine], capture_output=True,
                           text=True, timeout=900)
        assert p.returncode == 0, p.stdout + p.stderr
        tag = p.stdout.strip().splitlines()[-1]
        assert tag.startswith(f"localhost/orchestrator/{engine}:") and tag.endswith("-cpu"), tag
        self.client.images.get(tag)
        self[engine] = tag
        return tag


@pytest.fixture(scope="session")
def images(docker_client) -> Images:
    return Images(docker_client)


def ours(client, profile: str | None = None) -> list:
    flt = f"orchestrator.profile={profile}" if profile else "orchestrator.profile"
    return client.containers.list(all=True, filters={"label": flt})


@pytest.fixture(autouse=True)
def no_leftovers(docker_client):
    yield
    for ct in ours(docker_client):
        if ct.labels.get("orchestrator.profile", "").startswith(PREFIX):
            ct.remove(force=True)


def docker_profile(env, name: str, engine: str, images: dict[str, str], gemma: Path, **extra):
    return env.profile(name, engine=engine, runtime="docker", image=images[engine],
                       model={"path": str(gemma), "served_name": "gemma"}, **extra)


def chat(port: int, model: str = "gemma", headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, headers=headers or {},
                         json={"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8})


@pytest.mark.parametrize("engine", ENGINES)
def test_up_health_chat_down(engine: str, env, gemma: Path, images, docker_client) -> None:
    name = f"{PREFIX}{engine.replace('.', '').replace('_', '')}"
    profile = docker_profile(env, name, engine, images, gemma)
    up = env.run("up", str(profile), "--json")
    assert up.returncode == 0, up.stdout + up.stderr
    result = json.loads(up.stdout)[0]
    assert result["outcome"] == "started" and result["ttft_s"] > 0
    assert result["stages"] == ["process", "port", "ready", "models", "completion", "settings"]
    [ct] = ours(docker_client, name)
    attrs = ct.attrs
    port = env.records(name)["s"].port
    assert attrs["HostConfig"]["Init"] is True
    assert attrs["HostConfig"]["PortBindings"] == {f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
    assert attrs["Config"]["User"] == "65534:65534"                       # non-root
    assert [m["RW"] for m in attrs["Mounts"]] == [False]                 # the model, read-only
    assert attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"  # set once healthy
    r = chat(port)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None
    st = json.loads(env.run("status", name, "--json").stdout)
    assert st and st[0]["state"] == "healthy" and st[0]["container"] == ct.short_id
    logs = env.run("logs", name, "-n", "200")
    assert logs.returncode == 0 and "listening" in logs.stdout      # the container log, via the state dir
    down = env.run("down", str(profile))
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert ours(docker_client, name) == []
    assert env.records(name) == {}


def test_ik_api_key_file_never_in_container_config(env, gemma: Path, images, docker_client) -> None:
    secret = "sk-dk-7Hq2pLw0"
    name = f"{PREFIX}ikkey"
    profile = docker_profile(env, name, "ik_llama", images, gemma, api_key_env="DK_KEY")
    up = env.run("up", str(profile), env={"DK_KEY": secret})
    assert up.returncode == 0, up.stdout + up.stderr
    [ct] = ours(docker_client, name)
    assert secret not in json.dumps(ct.attrs)                 # not in argv, env, labels or mounts
    assert secret not in up.stdout + up.stderr
    port = env.records(name)["s"].port
    assert chat(port).status_code == 401
    assert chat(port, headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert env.run("down", name).returncode == 0


def test_rendered_compose_up_wait_two_servers(env, gemma: Path, images, docker_client, tmp_path: Path) -> None:
    """`docker compose up --wait` on the rendered file as is: healthchecks, depends_on, both answer."""
    name = f"{PREFIX}compose"
    ports = [_free_port(), _free_port()]
    doc = {"name": name, "hardware": {"gpu": "cpu"}, "servers": [
        {"name": "main", "engine": "llama.cpp", "runtime": "docker", "image": images["llama.cpp"], "port": ports[0],
         "context": 2048, "model": {"path": str(gemma), "served_name": "gemma-main"},
         "health": {"timeout": 60, "interval": 1}},
        {"name": "side", "engine": "ik_llama", "runtime": "docker", "image": images["ik_llama"], "port": ports[1],
         "context": 2048, "model": {"path": str(gemma), "served_name": "gemma-side"}, "depends_on": ["main"],
         "health": {"timeout": 60, "interval": 1}},
    ]}
    out = _render_compose(env, tmp_path, doc, "two")
    rendered = yaml.safe_load(out.read_text())
    assert rendered["services"]["side"]["depends_on"] == {"main": {"condition": "service_healthy"}}
    compose = [compose_binary(), "-f", str(out)]
    try:
        p = subprocess.run([*compose, "up", "-d", "--wait", "--wait-timeout", "180"], capture_output=True, text=True,
                           timeout=300, cwd=out.parent)
        assert p.returncode == 0, p.stdout + p.stderr
        cts = {ct.labels["orchestrator.server"]: ct for ct in ours(docker_client, name)}
        assert sorted(cts) == ["main", "side"]
        for ct in cts.values():
            assert ct.attrs["State"]["Health"]["Status"] == "healthy"
        for port, model in zip(ports, ["gemma-main", "gemma-side"], strict=True):
            resp = chat(port, model)
            assert resp.status_code == 200, resp.text
    finally:
        down = subprocess.run([*compose, "down"], capture_output=True, text=True, timeout=180, cwd=out.parent)
    assert down.returncode == 0, down.stderr
    assert ours(docker_client, name) == []


def test_container_exiting_at_once_shows_exit_code_and_log(env, gemma: Path, images, docker_client) -> None:
    name = f"{PREFIX}badflag"
    profile = docker_profile(env, name, "llama.cpp", images, gemma, extra_args=["--no-such-flag"])
    up = env.run("up", str(profile), "--ignore-fit")
    assert up.returncode == 1
    assert "container exited with code 1" in up.stderr, up.stderr
    assert "invalid argument: --no-such-flag" in up.stderr      # the log tail
    assert ours(docker_client, name) == [] and env.records(name) == {}


def test_orphan_from_lost_state_is_adopted_or_replaced_never_duplicated(env, gemma: Path, images,
                                                                      docker_client) -> None:
    import shutil

    name = f"{PREFIX}orphan"
    profile = docker_profile(env, name, "llama.cpp", images, gemma)
    assert env.run("up", str(profile)).returncode == 0
    [first] = ours(docker_client, name)
    shutil.rmtree(env.state / "deployments")                   # the state is lost; the container runs on
    st = json.loads(env.run("status", "--json").stdout)
    assert [r["server"] for r in st if r["deployment"] == name] == ["s"]
    assert "no state record" in st[0]["state"]
    again = env.run("up", str(profile))
    assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
    assert [c.id for c in ours(docker_client, name)] == [first.id]
    assert env.records(name)["s"].container == first.id       # adopted into the state again
    shutil.rmtree(env.state / "deployments")
    profile.write_text(profile.read_text().replace("context: 2048", "context: 1024"))
    changed = env.run("up", str(profile))
    assert changed.returncode == 0, changed.stdout + changed.stderr
    now = ours(docker_client, name)
    assert len(now) == 1 and now[0].id != first.id             # replaced, not a second copy
    shutil.rmtree(env.state / "deployments")
    down = env.run("down", name)
    assert down.returncode == 0 and "without a state record" in down.stdout
    assert ours(docker_client, name) == []


def test_port_taken(env, gemma: Path, images, docker_client) -> None:
    name = f"{PREFIX}port"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        profile = docker_profile(env, name, "llama.cpp", images, gemma, port=port)
        up = env.run("up", str(profile))
    assert up.returncode == 1
    lines = up.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} on 127.0.0.1 is taken" in lines[0] and "fix:" in lines[0], up.stderr
    assert ours(docker_client, name) == []



def _render_compose(env, tmp_path: Path, doc: dict, stem: str) -> Path:
    """Write the profile `doc` and render it to a compose file, as a user would; the compose file."""
    profile = tmp_path / f"{stem}.yaml"
    profile.write_text(yaml.safe_dump(doc))
    out = tmp_path / "deploy" / "compose.yaml"
    out.parent.mkdir()
    r = env.run("render", str(profile), "-t", "compose", "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out

def _free_port() -> int:
    from tests.e2e.conftest import free_port

    return free_port()


def test_missing_image_is_one_line_with_the_fix(env, gemma: Path, docker_client) -> None:
    name = f"{PREFIX}noimage"
    profile = env.profile(name, engine="llama.cpp", runtime="docker", image="localhost/orchestrator/nothing:here",
                          model={"path": str(gemma)})
    up = env.run("up", str(profile))
    assert up.returncode == 1
    lines = up.stderr.strip().splitlines()
    assert len(lines) == 1, up.stderr
    assert "image localhost/orchestrator/nothing:here is not on this machine" in lines[0]
    assert "orchestrate engines image" in lines[0]
    assert ours(docker_client, name) == []


def test_orchestrate_compose_up_down(env, gemma: Path, images, docker_client, tmp_path: Path) -> None:
    name = f"{PREFIX}cmdcompose"
    profile = docker_profile(env, name, "llama.cpp", images, gemma)
    up = env.run("compose", "up", str(profile), "--dir", str(tmp_path / "c"))
    assert up.returncode == 0, up.stdout + up.stderr
    [ct] = ours(docker_client, name)
    assert ct.attrs["State"]["Health"]["Status"] == "healthy"
    port = yaml.safe_load(profile.read_text())["servers"][0]["port"]
    assert chat(port).status_code == 200
    st = [r for r in json.loads(env.run("status", "--json").stdout) if r["deployment"] == name]
    assert [r["server"] for r in st] == ["s"] and st[0]["state"].startswith("healthy")   # found by its labels
    down = env.run("compose", "down", str(profile), "--dir", str(tmp_path / "c"))
    assert down.returncode == 0, down.stderr
    assert ours(docker_client, name) == []


def test_gpu_server_without_nvidia_runtime_is_one_line(env, gemma: Path, images, docker_client) -> None:
    """This daemon has no NVIDIA runtime: a CUDA server must stop before anything is created."""
    if "nvidia" in (docker_client.info().get("Runtimes") or {}):
        pytest.skip("this daemon has the NVIDIA runtime")
    name = f"{PREFIX}nogpu"
    profile = docker_profile(env, name, "llama.cpp", images, gemma)
    profile.write_text(profile.read_text().replace("gpu: cpu", "gpu: rtx-3090"))
    up = env.run("up", str(profile), "--ignore-fit")
    assert up.returncode == 1
    lines = up.stderr.strip().splitlines()
    assert len(lines) == 1 and "no NVIDIA container runtime" in lines[0] and "nvidia-ctk" in lines[0], up.stderr
    assert ours(docker_client, name) == []


def test_compose_up_wait_with_an_image_under_a_custom_tag(env, gemma: Path, docker_client, tmp_path: Path) -> None:
    """`orchestrate engines image llama.cpp --tag NAME` (a documented option) gives an image whose name
    says nothing of what is inside: the rendered compose file keeps the image's own HEALTHCHECK, and
    `docker compose up --wait` turns healthy (with a curl probe inferred from the tag it never did)."""
    from orchestrator.provision import builds as provision

    provision.build("llama.cpp", "cpu")
    tag = "dk-homelab/llama.cpp:cpu"
    p = subprocess.run([sys.executable, "-m", "orchestrator", "engines", "image", "llama.cpp", "--tag", tag],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == tag, p.stdout + p.stderr
    assert docker_client.images.get(tag).attrs["Config"]["Healthcheck"]["Test"] == ["CMD", "/bin/healthcheck"]
    name = f"{PREFIX}customtag"
    port = _free_port()
    doc = {"name": name, "hardware": {"gpu": "cpu"}, "servers": [
        {"name": "main", "engine": "llama.cpp", "runtime": "docker", "image": tag, "port": port, "context": 2048,
         "model": {"path": str(gemma), "served_name": "gemma"}, "health": {"timeout": 120, "interval": 1}}]}
    out = _render_compose(env, tmp_path, doc, "custom")
    assert "test" not in yaml.safe_load(out.read_text())["services"]["main"]["healthcheck"]
    compose = [compose_binary(), "-f", str(out)]
    try:
        up = subprocess.run([*compose, "up", "-d", "--wait", "--wait-timeout", "180"], capture_output=True,
                            text=True, timeout=300, cwd=out.parent)
        assert up.returncode == 0, up.stdout + up.stderr
        (ct,) = ours(docker_client, name)
        assert ct.attrs["State"]["Health"]["Status"] == "healthy"
        assert chat(port).status_code == 200
    finally:
        down = subprocess.run([*compose, "down"], capture_output=True, text=True, timeout=180, cwd=out.parent)
        docker_client.images.remove(tag, force=True)
    assert down.returncode == 0, down.stderr


def test_rendered_compose_with_its_gateway_serves_the_openai_client(env, gemma: Path, images, docker_client,
                                                                   tmp_path: Path) -> None:
    """The gateway image built here (`orchestrate engines image gateway`), the rendered compose file with a
    llama.cpp server and the gateway, `docker compose up --wait`, then the official client through the
    gateway's published port: models, a chat completion, a streamed one; the gateway's key is enforced and
    the server's own key is one only the gateway sends."""
    import time

    import openai

    name = f"{PREFIX}gateway"
    tag = "localhost/orchestrator/gateway:e2e"
    t0 = time.perf_counter()
    built = env.run("engines", "image", "gateway", "--tag", tag, timeout=600)
    build_s = time.perf_counter() - t0
    assert built.returncode == 0, built.stdout + built.stderr
    assert built.stdout.strip().splitlines()[-1] == tag
    image = docker_client.images.get(tag)
    assert image.labels["org.opencontainers.image.version"] and len(image.labels["orchestrator.code-sha256"]) == 64
    print(f"gateway image: {image.attrs['Size'] / 2**20:.0f} MiB, built in {build_s:.1f} s")
    gw_port, port = _free_port(), _free_port()
    doc = {"name": name, "hardware": {"gpu": "cpu"},
           "gateway": {"host": "127.0.0.1", "port": gw_port, "api_key_env": "DK_GATEWAY_KEY", "image": tag},
           "servers": [{"name": "gemma", "engine": "llama.cpp", "runtime": "docker", "image": images["llama.cpp"],
                        "port": port, "context": 2048, "api_key_env": "DK_GEMMA_KEY",
                        "model": {"path": str(gemma), "served_name": "gemma"},
                        "health": {"timeout": 60, "interval": 1}}]}
    out = _render_compose(env, tmp_path, doc, "gw")
    keys = {"DK_GATEWAY_KEY": "gw-key-for-e2e", "DK_GEMMA_KEY": "server-key-for-e2e"}
    compose = [compose_binary(), "-f", str(out)]
    run_env = {**env.env, **keys}
    try:
        p = subprocess.run([*compose, "up", "-d", "--wait", "--wait-timeout", "240"], capture_output=True, text=True,
                           timeout=360, cwd=out.parent, env=run_env)
        logs = subprocess.run([*compose, "logs", "gateway"], capture_output=True, text=True, timeout=60,
                              cwd=out.parent, env=run_env)
        assert p.returncode == 0, p.stdout + p.stderr + logs.stdout + logs.stderr
        gw_ct = docker_client.containers.get(f"{name}--gateway")
        assert gw_ct.attrs["State"]["Health"]["Status"] == "healthy"      # the image's own HEALTHCHECK
        assert gw_ct.attrs["Config"]["User"] == "65534:65534"
        base = f"http://127.0.0.1:{gw_port}/v1"
        client = openai.OpenAI(base_url=base, api_key=keys["DK_GATEWAY_KEY"], max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["gemma"]
        reply = client.chat.completions.create(model="gemma", max_tokens=8,
                                               messages=[{"role": "user", "content": "Say hi"}])
        assert reply.choices[0].message.content
        chunks = list(client.chat.completions.create(model="gemma", max_tokens=8, stream=True,
                                                     messages=[{"role": "user", "content": "Count to three"}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        assert requests.get(f"{base}/models", timeout=10).status_code == 401
        # the server itself wants its own key: the gateway sent it
        assert chat(port).status_code == 401
        assert chat(port, headers={"Authorization": f"Bearer {keys['DK_GEMMA_KEY']}"}).status_code == 200
    finally:
        down = subprocess.run([*compose, "down"], capture_output=True, text=True, timeout=180, cwd=out.parent,
                              env=run_env)
        docker_client.images.remove(tag, force=True)
    assert down.returncode == 0, down.stderr
    assert ours(docker_client, name) == []
