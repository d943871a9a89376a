"""Container decisions without a daemon: image choice per GPU architecture, depends_on, the docker
runtime's container spec, compose healthchecks and .env.example, k8s probe timings against the
profile's health settings (schema-validated), llama-swap config; and the daemon-down error."""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import ProfileError
from orchestrator.pipeline import build_plan
from orchestrator.profile import load_text
from orchestrator.render import render
from tests.unit.test_consumers import _k8s_validate

ROOT = Path(__file__).resolve().parents[2]


def plan_of(doc: dict, environ: dict[str, str] | None = None):
    return build_plan(load_text(yaml.safe_dump(doc), "t.yaml"), environ=environ or {"HOME": "/home/u"},
                      state_dir="/var/lib/orchestrator", detect=False, enforce_fit=False)


def valid_k8s(plan, tmp_path: Path) -> str:
    """The k8s target of `plan`, after it passed the schema check."""
    text = render(plan, "k8s")
    path = tmp_path / "k8s.yaml"
    path.write_text(text)
    p = _k8s_validate(path)
    assert p.returncode == 0, p.stdout + p.stderr
    return text


def server(**kw) -> dict:
    return {"name": "s", "model": {"path": "/models/m-Q4_K_M.gguf"}, **kw}


@pytest.mark.parametrize("gpu,engine,expect", [
    ("rtx-3090", "ik_llama", "ghcr.io/ikawrakow/ik-llama-cpp:cu12-server"),
    ("rtx-4090", "ik_llama", "ghcr.io/ikawrakow/ik-llama-cpp:cu12-server"),
    ("tesla-p40", "ik_llama", None),           # Pascal: not in the official sm75-89 builds
    ("h100-sxm", "ik_llama", None),            # Hopper: neither
    ("tesla-p40", "llama.cpp", "ghcr.io/ggml-org/llama.cpp:server-cuda"),
    ("cpu", "ik_llama", "ghcr.io/ikawrakow/ik-llama-cpp:cpu-server"),
    ("a100-80gb", "vllm", "vllm/vllm-openai:v0.32.0"),
])
def test_official_image_by_architecture(gpu: str, engine: str, expect: str | None) -> None:
    sp = plan_of({"name": "p", "hardware": {"gpu": gpu}, "servers": [server(engine=engine)]}).servers[0]
    assert sp.image == expect, sp.image_reason
    if expect is None:
        assert "no official" in sp.image_reason and f"orchestrate engines image {engine}" in sp.image_reason


def test_no_fitting_image_is_a_one_line_render_error() -> None:
    plan = plan_of({"name": "p", "hardware": {"gpu": "tesla-p40"}, "servers": [server(engine="ik_llama")]})
    with pytest.raises(Exception) as exc:
        render(plan, "compose")
    msg = str(exc.value)
    assert "\n" not in msg and "engines image ik_llama" in msg and "set image:" in msg


@pytest.mark.parametrize("image", ["localhost/orchestrator/llama.cpp:b11434-cpu", "homelab/llama.cpp:cpu",
                                   "registry.example:5000/team/llama-server@sha256:" + "0" * 64])
def test_an_image_the_catalog_does_not_list_keeps_its_own_healthcheck(image: str) -> None:
    """Whatever the tag says, compose writes no probe command into an image it does not know: the
    healthcheck is the image's own (images from `orchestrate engines image` carry one)."""
    plan = plan_of({"name": "p", "hardware": {"gpu": "cpu"}, "servers": [server(image=image)]})
    assert plan.servers[0].probe_tool == "image"
    hc = yaml.safe_load(render(plan, "compose"))["services"]["s"]["healthcheck"]
    assert "test" not in hc and hc["start_period"] and hc["interval"]


@pytest.mark.parametrize("engine,image,tool", [
    ("llama.cpp", "ghcr.io/ggml-org/llama.cpp:server", "curl"),
    ("llama.cpp", "ghcr.io/ggml-org/llama.cpp:server-b11434", "curl"),   # another tag of the official repository
    ("vllm", "vllm/vllm-openai:v0.32.0", "python3"),
])
def test_official_repositories_are_probed_with_what_they_ship(engine: str, image: str, tool: str) -> None:
    model = {"path": "/models/Llama-3.1-8B-Instruct"} if engine == "vllm" else server()["model"]
    plan = plan_of({"name": "p", "hardware": {"gpu": "rtx-4090"},
                    "servers": [server(engine=engine, image=image, model=model)]})
    hc = yaml.safe_load(render(plan, "compose"))["services"]["s"]["healthcheck"]
    assert hc["test"][:2] == ["CMD", tool]


def test_the_built_image_carries_its_healthcheck() -> None:
    from orchestrator.facts.installed import InstalledEngine
    from orchestrator.provision import images

    inst = InstalledEngine("llama.cpp", "b11434", "cpu", None, "/nonexistent", "sdist", "0", "/nonexistent/log")
    text = images.dockerfile(inst)
    assert 'HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 CMD ["/bin/healthcheck"]' in text
    assert {"sh", "tr", "wget"} <= set(images.BUSYBOX_APPLETS)


def _unshare_works() -> bool:
    if not (shutil.which("unshare") and shutil.which("wget") and shutil.which("tr")):
        return False
    p = subprocess.run(["unshare", "-pf", "--mount-proc", "true"], capture_output=True, timeout=30)
    return p.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs wget, tr and unshare (root) for a PID namespace")
def test_the_image_healthcheck_probes_the_port_the_server_was_started_with(tmp_path: Path) -> None:
    """The script as the image runs it, in a PID namespace of its own as in a container, with this
    machine's sh, tr and wget: it finds --port in the command line of the server process and gets
    /health there (200 from a server that answers; failure once it is gone)."""
    import http.server
    import threading

    from orchestrator.provision.images import HEALTHCHECK_SCRIPT

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    script = tmp_path / "healthcheck"
    script.write_text(HEALTHCHECK_SCRIPT)
    port = srv.server_address[1]
    # PID 1 of the namespace is an init-like sh; the "server" is its child, started with --port
    inner = (f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(30)' -m /models/x.gguf --port {port} & "
             f"sleep 0.5; sh {shlex.quote(str(script))}; rc=$?; kill $!; exit $rc")
    run = ["unshare", "-pf", "--mount-proc", "sh", "-c", inner]
    env = {"PATH": "/usr/bin:/bin"}
    ok = subprocess.run(run, capture_output=True, text=True, timeout=60, env=env)
    srv.shutdown()
    srv.server_close()
    gone = subprocess.run(run, capture_output=True, text=True, timeout=60, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert gone.returncode != 0


@pytest.mark.parametrize("deps,message", [
    ({"a": ["zz"], "b": []}, "not a server of this profile"),
    ({"a": ["a"], "b": []}, "the server itself"),
    ({"a": ["b"], "b": ["a"]}, "cycle"),
])
def test_depends_on_is_checked(deps: dict, message: str) -> None:
    doc = {"name": "p", "hardware": {"gpu": "cpu"}, "servers": [
        server(name=n, port=8080 + i, depends_on=d) for i, (n, d) in enumerate(deps.items())]}
    with pytest.raises(ProfileError) as exc:
        plan_of(doc)
    assert message in str(exc.value)


def test_compose_health_depends_on_and_env_example(orchestrate, tmp_path: Path) -> None:
    doc = {"name": "p", "hardware": {"gpu": "cpu"}, "servers": [
        server(name="a", port=8081, health={"timeout": 321, "interval": 7}, api_key_env="A_KEY"),
        server(name="b", port=8082, depends_on=["a"]),
    ]}
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out" / "compose.yaml"
    out.parent.mkdir()
    code, _, err = orchestrate("render", str(profile), "-t", "compose", "-o", str(out))
    assert code == 0, err
    services = yaml.safe_load(out.read_text())["services"]
    hc = services["a"]["healthcheck"]
    assert (hc["interval"], hc["start_period"]) == ("7s", "321s")
    assert services["b"]["depends_on"] == {"a": {"condition": "service_healthy"}}
    assert services["a"]["init"] is True and services["a"]["ports"] == ["127.0.0.1:8081:8081"]
    example = (out.parent / ".env.example").read_text()
    assert "A_KEY=\n" in example and "A_KEY=" + "x" not in example


@pytest.mark.parametrize("timeout,interval", [(90, 5), (1234, 10), (7, 3)])
def test_k8s_probes_follow_the_profile_health_settings(timeout: int, interval: int, tmp_path: Path) -> None:
    plan = plan_of({"name": "p", "hardware": {"gpu": "rtx-3090"},
                    "servers": [server(health={"timeout": timeout, "interval": interval}, api_key_env="K")]})
    text = valid_k8s(plan, tmp_path)
    [deploy] = [d for d in yaml.safe_load_all(text) if d["kind"] == "Deployment"]
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    startup, ready, live = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
    assert startup["periodSeconds"] == interval == ready["periodSeconds"]
    assert startup["failureThreshold"] == math.ceil(timeout / interval)   # the loading budget, no less
    assert startup["failureThreshold"] * startup["periodSeconds"] >= timeout
    assert startup["httpGet"]["path"] == ready["httpGet"]["path"] == live["httpGet"]["path"] == "/health"
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert c["env"] == [{"name": "LLAMA_API_KEY", "valueFrom": {"secretKeyRef": {"name": "p--s-api-key",
                                                                                 "key": "api-key"}}}]


def test_llama_swap_config(tmp_path: Path) -> None:
    plan = plan_of({"name": "p", "hardware": {"gpu": "rtx-3090"}, "servers": [
        server(name="a", engine="ik_llama", host="0.0.0.0", api_key_env="A_KEY", model={
            "path": "/models/a-Q4_K_M.gguf", "served_name": "alpha"}),
        server(name="b", port=8090, gpus=[0]),
    ]}, environ={"HOME": "/home/u", "A_KEY": "sk-never-rendered"})
    text = render(plan, "llama-swap")
    assert "sk-never-rendered" not in text
    doc = yaml.safe_load(text)
    assert doc["apiKeys"] == ["${env.A_KEY}"]
    alpha, b = doc["models"]["alpha"], doc["models"]["m-Q4_K_M"]
    assert alpha["proxy"] == "http://127.0.0.1:8080" and b["proxy"] == "http://127.0.0.1:8090"
    assert "--host 127.0.0.1" in alpha["cmd"] and "--api-key-file" not in alpha["cmd"]  # behind llama-swap only
    assert alpha["checkEndpoint"] == "/health" and alpha["ttl"] > 0 and alpha["aliases"] == ["a"]
    assert b["env"] == ["CUDA_VISIBLE_DEVICES=0"]
    assert doc["healthCheckTimeout"] >= max(s.health.timeout_s for s in plan.servers)


def test_two_servers_of_one_file_get_distinct_default_names_and_both_reach_llama_swap() -> None:
    plan = plan_of({"name": "p", "hardware": {"gpu": "cpu"}, "servers": [
        server(name="fast", parallel=1), server(name="wide", port=8090, parallel=4)]})
    assert [s.served_name for s in plan.servers] == ["m-Q4_K_M", "m-Q4_K_M-wide"]
    models = yaml.safe_load(render(plan, "llama-swap"))["models"]
    assert sorted(models) == ["m-Q4_K_M", "m-Q4_K_M-wide"]
    assert "-a m-Q4_K_M-wide" in models["m-Q4_K_M-wide"]["cmd"]


@pytest.mark.parametrize("second", [{"served_name": "same"}, {"served_name": "first"}])
def test_one_name_for_two_servers_is_a_llama_swap_error_naming_both(second: dict) -> None:
    plan = plan_of({"name": "p", "hardware": {"gpu": "cpu"}, "servers": [
        server(name="first", model={"path": "/models/a-Q4_K_M.gguf", "served_name": "same"}),
        server(name="second", port=8090, model={"path": "/models/b-Q4_K_M.gguf", **second})]})
    with pytest.raises(Exception) as exc:
        render(plan, "llama-swap")
    msg = str(exc.value)
    assert "servers first and second" in msg and "model.served_name" in msg


def test_container_spec_from_the_plan() -> None:
    from docker.types import DeviceRequest

    from orchestrator.runtime import docker as docker_rt

    plan = plan_of({"name": "p", "hardware": {"gpu": "rtx-3090", "count": 2},
                    "servers": [server(gpus=[1], port=9001)]})
    sp = plan.servers[0]
    kw = docker_rt.create_kwargs("p-s", sp, {"X": "1"}, docker_rt.labels("p", sp, "h", "/p.yaml"), 5)
    assert kw["ports"] == {"9001/tcp": ("127.0.0.1", 9001)} and kw["init"] is True
    assert [(m["Source"], m["Target"], m["ReadOnly"]) for m in kw["mounts"]] == [("/models", "/models", True)]
    assert kw["device_requests"] == [DeviceRequest(driver="nvidia", device_ids=["1"], capabilities=[["gpu"]])]
    assert kw["labels"]["orchestrator.profile"] == "p" and kw["labels"]["orchestrator.server"] == "s"
    assert kw["entrypoint"] == ["/app/llama-server"] and "--host" in kw["command"]
    assert kw["command"][kw["command"].index("--host") + 1] == "0.0.0.0"
    assert "CUDA_VISIBLE_DEVICES" not in kw["environment"]     # containers select devices instead


def test_secret_archive_is_owned_by_the_image_user_and_0400() -> None:
    import io
    import tarfile

    from orchestrator.runtime.docker import secret_archive

    data = secret_archive("/run/secrets/api_key", "k\n", 65534, 65534)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        member = tf.getmember("run/secrets/api_key")
        assert (member.uid, member.gid, member.mode) == (65534, 65534, 0o400)
        assert tf.extractfile(member).read() == b"k\n"


def test_daemon_unreachable_is_one_line_with_the_fix(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\0" * 16)  # a GGUF v3 header, no tensors
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"name": "p", "hardware": {"gpu": "cpu"}, "servers": [
        server(runtime="docker", image="localhost/orchestrator/llama.cpp:b11434-cpu", port=18999,
               model={"path": str(model)})]}))
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock", "ORCHESTRATOR_STATE_DIR": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "orchestrator", "up", str(profile), "--ignore-fit"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "cannot reach the Docker daemon" in lines[0] and "no-daemon.sock" in lines[0] and "fix:" in lines[0]
    assert "Traceback" not in p.stderr


def test_k8s_model_from_a_persistent_volume_claim(tmp_path: Path) -> None:
    """model.k8s_claim: the model folder comes from a PVC (read-only) instead of a hostPath; the draft
    of another folder keeps its hostPath; the manifest still passes the schema."""
    plan = plan_of({"name": "p", "hardware": {"gpu": "rtx-3090"},
                    "servers": [server(model={"path": "/models/m-Q4_K_M.gguf", "k8s_claim": "llm-models"})]})
    text = valid_k8s(plan, tmp_path)
    [deploy] = [d for d in yaml.safe_load_all(text) if d["kind"] == "Deployment"]
    spec = deploy["spec"]["template"]["spec"]
    [vol] = [v for v in spec["volumes"] if v["name"] == "model-0"]
    assert vol == {"name": "model-0", "persistentVolumeClaim": {"claimName": "llm-models", "readOnly": True}}
    [mount] = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model-0"]
    assert mount["mountPath"] == "/models" and mount["readOnly"] is True
    assert "hostPath" not in text


# ------------------------------------------------------------------ vLLM / SGLang across nodes

def _multi_node(engine: str, **kw) -> dict:
    return {"name": "big", "hardware": {"gpu": "h100-sxm", "count": 8},
            "servers": [{"name": "m", "engine": engine, "nodes": 2, "port": 8000,
                         "model": {"path": "/models/Llama-3.1-405B-Instruct-FP8", "k8s_claim": "llm-models"},
                         **kw}]}


def _pods(text: str) -> tuple[dict, dict, dict]:
    docs = list(yaml.safe_load_all(text))
    [lws] = [d for d in docs if d["kind"] == "LeaderWorkerSet"]
    [svc] = [d for d in docs if d["kind"] == "Service"]
    assert not [d for d in docs if d["kind"] == "Deployment"]
    return lws, svc, lws["spec"]["leaderWorkerTemplate"]


def _args_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("timeout,interval", [(600, 5), (1800, 20)])
def test_vllm_multi_node_is_a_leader_worker_set(timeout: int, interval: int, tmp_path: Path) -> None:
    """vLLM's multiprocessing backend across nodes: tensor parallel inside a node, one pipeline stage
    per node; the leader serves and is probed like a single-node server, the worker runs headless."""
    plan = plan_of(_multi_node("vllm", health={"timeout": timeout, "interval": interval}))
    text = valid_k8s(plan, tmp_path)
    lws, svc, lwt = _pods(text)
    assert lws["spec"]["replicas"] == 1
    assert lwt["size"] == 2 and lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert svc["spec"]["selector"] == {"leaderworkerset.sigs.k8s.io/name": "big--m", "role": "leader"}
    assert lwt["leaderTemplate"]["metadata"]["labels"]["role"] == "leader"
    leader = lwt["leaderTemplate"]["spec"]["containers"][0]
    worker = lwt["workerTemplate"]["spec"]["containers"][0]
    for c in (leader, worker):
        args = c["args"]
        assert _args_after(args, "--tensor-parallel-size") == "8" and _args_after(args, "--pipeline-parallel-size") == "2"
        assert _args_after(args, "--nnodes") == "2"
        assert _args_after(args, "--node-rank") == "$(LWS_WORKER_INDEX)"
        assert _args_after(args, "--master-addr") == "$(LWS_LEADER_ADDRESS)"
        assert c["resources"] == {"limits": {"nvidia.com/gpu": 8}}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert "--headless" in worker["args"] and "--headless" not in leader["args"]
    assert leader["startupProbe"]["periodSeconds"] == interval
    assert leader["startupProbe"]["failureThreshold"] == math.ceil(timeout / interval)
    assert leader["ports"][0]["containerPort"] == 8000
    assert not {"startupProbe", "readinessProbe", "livenessProbe", "ports"} & set(worker), \
        "a headless worker serves no HTTP"
    vols = lwt["workerTemplate"]["spec"]["volumes"]
    assert {"name": "model-0", "persistentVolumeClaim": {"claimName": "llm-models", "readOnly": True}} in vols


def test_sglang_multi_node_uses_its_own_launcher_flags() -> None:
    plan = plan_of(_multi_node("sglang", api_key_env="K", host="0.0.0.0"))
    _, _, lwt = _pods(render(plan, "k8s"))
    for tmpl in (lwt["leaderTemplate"], lwt["workerTemplate"]):
        [c] = tmpl["spec"]["containers"]
        args = c["args"]
        assert _args_after(args, "--tp-size") == "16", "SGLang shards over every GPU of the group"
        assert _args_after(args, "--nnodes") == "2" and _args_after(args, "--node-rank") == "$(LWS_WORKER_INDEX)"
        assert _args_after(args, "--dist-init-addr") == "$(LWS_LEADER_ADDRESS):20000"
        # every rank reads the same key config, from the same Secret
        assert any(v["name"] == "api-key" for v in tmpl["spec"]["volumes"])


@pytest.mark.parametrize("target", ["command", "docker", "compose", "llama-swap"])
def test_multi_node_renders_for_k8s_only(target: str) -> None:
    plan = plan_of(_multi_node("vllm"))
    with pytest.raises(Exception) as exc:
        render(plan, target)
    msg = str(exc.value)
    assert "spans 2 nodes" in msg and "--target k8s" in msg and "\n" not in msg


def test_up_refuses_a_multi_node_server_before_starting_anything(tmp_path: Path) -> None:
    from orchestrator.runtime.deployer import Deployer
    from orchestrator.runtime.state import StateStore

    plan = plan_of(_multi_node("vllm"))
    store = StateStore(tmp_path / "state")
    with pytest.raises(Exception, match="spans 2 nodes"):
        Deployer(store).up(plan)
    assert not (tmp_path / "state").exists(), "nothing half-started, nothing written"


@pytest.mark.parametrize("doc,message", [
    ({"name": "p", "hardware": {"gpu": "h100-sxm"}, "servers": [server(engine="llama.cpp", nodes=2)]},
     "llama.cpp serves from one machine"),
    ({"name": "p", "hardware": {"gpu": "cpu"},
      "servers": [{"name": "s", "engine": "vllm", "nodes": 2, "model": {"path": "/models/Qwen3-32B"}}]},
     "spans GPU machines"),
])
def test_multi_node_needs_vllm_or_sglang_on_gpus(doc: dict, message: str) -> None:
    with pytest.raises(ProfileError) as exc:
        plan_of(doc)
    assert message in str(exc.value) and "nodes" in str(exc.value)
