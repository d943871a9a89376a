"""The docker runtime: one container per server through the Docker Engine API (the `docker` SDK).

Containers carry labels naming their deployment, server and plan, so `status` and `down` find them
even when the state file is gone, and `up` adopts or replaces such an orphan instead of starting a
second copy. Every failure to reach the daemon, find the image or give the container its GPUs is
an OrchestratorError: one line, with the fix.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.plan.model import ServerPlan

LABEL = "orchestrator"
L_PROFILE, L_SERVER, L_HASH = f"{LABEL}.profile", f"{LABEL}.server", f"{LABEL}.plan-hash"
L_ENGINE, L_HOST, L_PORT = f"{LABEL}.engine", f"{LABEL}.host", f"{LABEL}.port"
L_HEALTH, L_MODEL, L_KEYENV = f"{LABEL}.health-path", f"{LABEL}.served-name", f"{LABEL}.api-key-env"
L_PROFILE_FILE = f"{LABEL}.profile-file"

DAEMON_FIX = ("start the Docker daemon (sudo systemctl start docker, or sudo dockerd &), or point DOCKER_HOST at "
              "one; install it with sudo apt-get install docker.io")
NVIDIA_FIX = ("install the NVIDIA Container Toolkit (nvidia-container-toolkit), run sudo nvidia-ctk runtime "
              "configure --runtime=docker and restart the daemon")


def client(timeout: int = 60) -> Any:
    """A connected DockerClient, or a one-line error when no daemon answers."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:  # pragma: no cover - docker is a dependency
        raise OrchestratorError("the docker Python package is missing", "pip install docker") from None
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        c = docker.from_env(timeout=timeout)
        c.ping()
    except (DockerException, OSError) as exc:
        text = str(exc)
        why = ("no daemon socket there" if "FileNotFoundError" in text or "No such file" in text else
               "connection refused" if "Connection refused" in text or "ConnectionRefused" in text else
               "permission denied" if "Permission denied" in text or "PermissionError" in text else
               _first_line(exc)[:160])
        fix = ("add your user to the docker group (sudo usermod -aG docker $USER) and log in again"
               if why == "permission denied" else DAEMON_FIX)
        raise OrchestratorError(f"cannot reach the Docker daemon at {where}: {why}", fix) from None
    return c


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def ensure_image(c: Any, image: str) -> None:
    """The image is on this machine, pulled when a registry is reachable; else a one-line error."""
    from docker.errors import APIError, ImageNotFound

    try:
        c.images.get(image)
        return
    except ImageNotFound:
        pass
    repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
    try:
        c.images.pull(repo, tag=tag)
        return
    except APIError as exc:
        why = _first_line(exc).split("Error response from daemon: ")[-1]
    raise OrchestratorError(
        f"image {image} is not on this machine and could not be pulled ({why[:160]})",
        f"docker pull {image} where a registry is reachable, or build one from an installed engine: "
        "orchestrate engines image llama.cpp|ik_llama, then set image: to the tag it prints")


def require_gpu_runtime(c: Any, sp: ServerPlan) -> None:
    if sp.gpu_count == 0 or sp.accelerator != "cuda":
        return
    info = c.info()
    runtimes = set((info.get("Runtimes") or {}).keys())
    cdi = bool(info.get("CDISpecDirs"))
    if "nvidia" not in runtimes and not cdi:
        raise OrchestratorError("the Docker daemon has no NVIDIA container runtime: the container cannot see "
                                "the GPUs", NVIDIA_FIX)


def labels(profile: str, sp: ServerPlan, plan_hash: str, profile_file: str) -> dict[str, str]:
    return {L_PROFILE: profile, L_SERVER: sp.name, L_HASH: plan_hash,
            L_ENGINE: f"{sp.engine} {sp.engine_version}", L_HOST: sp.host, L_PORT: str(sp.port),
            L_HEALTH: sp.health.ready_path if sp.health else "/health", L_MODEL: sp.served_name,
            L_KEYENV: sp.api_key.env_var if sp.api_key else "", L_PROFILE_FILE: profile_file}


def create_kwargs(name: str, sp: ServerPlan, env: dict[str, str], lbls: dict[str, str],
                  stop_grace: float) -> dict[str, Any]:
    """containers.create() arguments for one server: everything comes from the plan."""
    from docker.types import DeviceRequest, Mount

    assert sp.image
    cmd = list(sp.container_command)
    kw: dict[str, Any] = {
        "image": sp.image, "name": name, "labels": lbls, "detach": True, "init": True,
        "command": [*cmd[1:], *sp.args(container=True)],
        "ports": {f"{sp.port}/tcp": (sp.host, sp.port)},
        "mounts": [Mount(m.container_path, m.host_path, type="bind", read_only=m.read_only) for m in sp.mounts],
        "environment": env, "stop_signal": "SIGTERM",
        "restart_policy": {"Name": "no"},   # while starting; set to unless-stopped once healthy
        "log_config": {"Type": "json-file", "Config": {"max-size": "50m", "max-file": "2"}},
    }
    if cmd:
        kw["entrypoint"] = [cmd[0]]
    if sp.shm_size:
        kw["shm_size"] = sp.shm_size
    if sp.gpu_count and sp.accelerator == "cuda":
        if sp.gpu_ids is None:
            kw["device_requests"] = [DeviceRequest(driver="nvidia", count=-1, capabilities=[["gpu"]])]
        else:
            kw["device_requests"] = [DeviceRequest(driver="nvidia", device_ids=[str(i) for i in sp.gpu_ids],
                                                   capabilities=[["gpu"]])]
    elif sp.gpu_count and sp.accelerator == "rocm":
        kw["devices"] = ["/dev/kfd:/dev/kfd:rwm", "/dev/dri:/dev/dri:rwm"]
        kw["group_add"] = ["video"]
    elif sp.gpu_count and sp.accelerator == "intel":
        kw["devices"] = ["/dev/dri:/dev/dri:rwm"]
    return kw


def secret_archive(path: str, content: str, uid: int, gid: int) -> bytes:
    """A tar holding one 0400 file at `path` (absolute), owned by the container's user: copied into the
    created container before it starts, so the key is never on a bind mount or in the image."""
    buf = io.BytesIO()
    data = content.encode()
    parts = path.strip("/").split("/")
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(1, len(parts)):
            d = tarfile.TarInfo("/".join(parts[:i]))
            d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tf.addfile(d)
        info = tarfile.TarInfo("/".join(parts))
        info.size, info.mode, info.uid, info.gid, info.mtime = len(data), 0o400, uid, gid, int(time.time())
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def image_user(c: Any, image: str) -> tuple[int, int]:
    """The numeric uid/gid the image runs as (0 when it names a user by name or none)."""
    user = (c.images.get(image).attrs.get("Config") or {}).get("User") or "0"
    uid, _, gid = user.partition(":")
    return (int(uid) if uid.isdigit() else 0, int(gid) if gid.isdigit() else (int(uid) if uid.isdigit() else 0))


def find(c: Any, profile: str | None = None, server: str | None = None) -> list[Any]:
    """Containers (running or not) that carry our labels, optionally of one deployment / server."""
    flt = [f"{L_PROFILE}={profile}" if profile else L_PROFILE]
    if server:
        flt.append(f"{L_SERVER}={server}")
    return list(c.containers.list(all=True, filters={"label": flt}))


def state(container: Any) -> tuple[str, int | None]:
    """(status, exit code when it has exited) after a fresh look."""
    from docker.errors import NotFound

    try:
        container.reload()
    except NotFound:
        return "removed", None
    st = container.attrs.get("State") or {}
    status = str(st.get("Status", "unknown"))
    if status in ("exited", "dead"):
        return status, int(st.get("ExitCode", -1))
    return status, None


def exit_poller(container: Any, every: float = 0.5) -> Any:
    """poll() for wait_healthy: the exit code once the container has stopped, at most one API call per `every` s."""
    last = [0.0, None]

    def poll() -> int | None:
        now = time.monotonic()
        if now - float(last[0] or 0.0) >= every:
            last[0] = now
            status, code = state(container)
            last[1] = code if code is not None else (-1 if status == "removed" else None)
        return last[1]  # type: ignore[return-value]

    return poll


def logs(container: Any, tail: int | str = "all") -> str:
    from docker.errors import APIError, NotFound

    try:
        return bytes(container.logs(stdout=True, stderr=True, tail=tail)).decode("utf-8", "replace")
    except (NotFound, APIError):
        return ""


def remove(container: Any, grace: float) -> str:
    """Stop (SIGTERM, grace, SIGKILL) and remove: 'stopped' | 'not running' (it had exited) | 'gone'."""
    from docker.errors import APIError, NotFound

    status, _ = state(container)
    if status == "removed":
        return "gone"
    outcome = "stopped" if status in ("running", "restarting", "paused") else "not running"
    try:
        if outcome == "stopped":
            container.stop(timeout=int(grace))
        container.remove(force=True)
    except NotFound:
        return "gone"
    except APIError as exc:
        raise OrchestratorError(f"cannot remove container {container.name}: {_first_line(exc)}",
                                f"docker rm -f {container.name}") from None
    return outcome


def start_error(exc: BaseException, sp: ServerPlan) -> tuple[str, str]:
    """(detail, fix) for a container the daemon refused to start."""
    msg = _first_line(exc).split("Error response from daemon: ")[-1]
    low = msg.lower()
    if "port is already allocated" in low or "address already in use" in low:
        return (f"port {sp.port} on {sp.host} is taken ({msg[:160]})",
                "stop what uses it or change port: in the profile")
    if "could not select device driver" in low or "nvidia" in low:
        return f"the container cannot get its GPUs ({msg[:160]})", NVIDIA_FIX
    return msg[:300], "see the message; docker logs may say more"
