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
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.plan.model import (
    L_ENGINE,
    L_HASH,
    L_HEALTH,
    L_HOST,
    L_KEYENV,
    L_MODEL,
    L_PORT,
    L_PROFILE,
    L_PROFILE_FILE,
    L_SERVER,
    Plan,
    ServerPlan,
    container_name,
)
from orchestrator.runtime.base import (
    STOP_GRACE_S,
    Found,
    Host,
    Launched,
    Prepared,
    Reconciled,
    Runtime,
    ServerFailure,
    UpResult,
    api_url,
    health_path,
    new_record,
    plan_hash,
)
from orchestrator.runtime.diagnose import Diagnosis
from orchestrator.runtime.health import quick_probe
from orchestrator.runtime.state import ServerRecord

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
    if "@" in image:   # pinned by digest (a lock): pull exactly that
        repo, _, tag = image.partition("@")
    else:
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
    if not sp.gpu_access().nvidia:
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
            L_HEALTH: health_path(sp), L_MODEL: sp.served_name,
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
    gpu = sp.gpu_access()
    if gpu.nvidia and gpu.device_ids is None:
        kw["device_requests"] = [DeviceRequest(driver="nvidia", count=-1, capabilities=[["gpu"]])]
    elif gpu.nvidia:
        kw["device_requests"] = [DeviceRequest(driver="nvidia", device_ids=[str(i) for i in gpu.device_ids or []],
                                               capabilities=[["gpu"]])]
    if gpu.devices:
        kw["devices"] = [f"{d}:{d}:rwm" for d in gpu.devices]
    if gpu.groups:
        kw["group_add"] = list(gpu.groups)
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


class DockerRuntime(Runtime):
    """A server is a container, labelled with its deployment, server and plan hash; its log is copied
    into the state dir's log file (the container's goes with it)."""

    name = "docker"

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self._client: Any = None
        self._unreachable = False   # an optional look found no daemon: later optional looks do not wait again

    def client(self, required: bool = True) -> Any:
        """A connected Docker client; None when not required and no daemon answers."""
        if self._client is None:
            if not required and self._unreachable:
                return None
            try:
                # Optional looks (status, down of process servers) must not hang on a remote DOCKER_HOST.
                self._client = client(timeout=60 if required else 10)
            except OrchestratorError:
                if required:
                    raise
                self._unreachable = True
                return None
        return self._client

    # ------------------------------------------------------------------ up

    def preflight(self, sp: ServerPlan) -> Prepared:
        if not sp.image:
            raise ServerFailure("preflight", f"no container image: {sp.image_reason}",
                                Diagnosis("image_missing", "set image: in the profile (orchestrate engines image "
                                          f"{sp.engine} builds one from an installed engine)", None))
        self.host.ensure_model(sp)
        self.host.check_model_file(sp)
        key = self.host.api_key(sp)
        try:
            c = self.client()
            require_gpu_runtime(c, sp)
            ensure_image(c, sp.image)
        except OrchestratorError as exc:
            raise ServerFailure("preflight", str(exc).split(" — ")[0], Diagnosis("docker", exc.hint, None)) from None
        image_id = str(c.images.get(sp.image).id)
        return Prepared(plan_hash(sp, f"{sp.image}@{image_id}", container=True), key, sp.image)

    def retire(self, deployment: str, rec: ServerRecord, successor: str) -> bool:
        self.host.progress(rec.server, "restart", f"runtime changed to {successor}: removing the container")
        return self.stop(deployment, rec.server, rec) == "stopped"

    def reconcile(self, plan: Plan, sp: ServerPlan, prep: Prepared, existing: ServerRecord | None,
                  log_path: Path) -> Reconciled:
        """The recorded container and any labelled one left by a lost state file: adopt the one that
        runs as planned, remove the others."""
        restarted = False
        for ct in find(self.client(), plan.name, sp.name):
            status, _ = state(ct)
            if status == "running" and ct.labels.get(L_HASH) == prep.hash:
                rec = self._record(plan, sp, ct, prep, log_path)
                if existing is None or existing.container != ct.id:
                    self.host.progress(sp.name, "adopt", f"container {ct.name} was running without a state record")
                self.host.store.update(plan.name, rec)
                health = quick_probe(sp.host, sp.port, rec.health_path, prep.key)
                return Reconciled(UpResult(sp.name, "already running", f"container {ct.short_id}, {health}",
                                           url=api_url(sp), log=str(log_path)))
            why = "plan changed" if status == "running" else f"left {status}"
            self.host.progress(sp.name, "restart" if status == "running" else "cleanup",
                               f"{why}: removing container {ct.name}")
            restarted = restarted or status == "running"
            remove(ct, STOP_GRACE_S)
        return Reconciled(restarted=restarted)

    def start(self, plan: Plan, sp: ServerPlan, prep: Prepared, log_path: Path) -> Launched:
        from docker.errors import APIError

        name = container_name(plan.name, sp.name)
        lbls = labels(plan.name, sp, prep.hash, os.path.abspath(plan.profile_file))
        kwargs = create_kwargs(name, sp, self.host.plan_env(sp, container=True), lbls, STOP_GRACE_S)
        self.host.progress(sp.name, "start", f"container {name} from {sp.image}")
        c = self.client()
        ct = None
        try:
            ct = c.containers.create(**kwargs)
            if sp.api_key and sp.api_key.container_path and prep.key is not None:
                uid, gid = image_user(c, prep.binary)
                ct.put_archive("/", secret_archive(sp.api_key.container_path, sp.api_key.file_text(prep.key),
                                                   uid, gid))
            ct.start()
        except APIError as exc:
            if ct is not None:
                remove(ct, 0)
            detail, fix = start_error(exc, sp)
            raise ServerFailure("preflight", detail, Diagnosis("docker", fix, None)) from None
        return Launched(self._record(plan, sp, ct, prep, log_path), exit_poller(ct), f"container {ct.short_id}", ct)

    def abort(self, launched: Launched, detail: str) -> str:
        ct = launched.handle
        self._save_log(launched.rec.profile, launched.rec.server, ct)
        outcome = remove(ct, STOP_GRACE_S)
        detail = detail.replace("process exited", "container exited")
        return detail + (" (container stopped and removed)" if outcome == "stopped" else " (container removed)")

    def settle(self, launched: Launched) -> None:
        ct = launched.handle
        self._save_log(launched.rec.profile, launched.rec.server, ct)
        ct.update(restart_policy={"Name": "unless-stopped"})

    def _record(self, plan: Plan, sp: ServerPlan, ct: Any, prep: Prepared, log_path: Path) -> ServerRecord:
        ct.reload()
        pid = int((ct.attrs.get("State") or {}).get("Pid") or 0)
        return new_record(plan, sp, prep, log_path, pid=pid, pgid=0, create_time=0.0, binary=str(sp.image),
                          argv=sp.argv(container=True), runtime="docker", container=str(ct.id))

    def _save_log(self, deployment: str, server: str, ct: Any) -> None:
        """Copy the container's log into the state dir's log file (it goes when the container is removed)."""
        text = logs(ct)
        if not text:
            return
        store = self.host.store
        path = store.log_path(deployment, server)
        store.ensure()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)

    # ------------------------------------------------------------------ down / status

    def _get(self, deployment: str, server: str, rec: ServerRecord, c: Any) -> Any:
        """The recorded container; None when it is gone."""
        from docker.errors import NotFound

        try:
            return c.containers.get(rec.container or container_name(deployment, server))
        except NotFound:
            return None

    def stop(self, deployment: str, server: str, rec: ServerRecord) -> str:
        ct = self._get(deployment, server, rec, self.client())
        if ct is None:
            return "not running"
        self._save_log(deployment, server, ct)
        return remove(ct, STOP_GRACE_S)

    def alive(self, rec: ServerRecord) -> bool:
        c = self.client(required=False)
        if c is None:
            return False
        from docker.errors import NotFound

        try:
            return state(c.containers.get(rec.container))[0] == "running"
        except NotFound:
            return False

    def host_pid(self, rec: ServerRecord) -> int | None:
        """A container's init: its processes are host processes too."""
        try:
            return int(self.client().containers.get(rec.container).attrs["State"]["Pid"]) or None
        except Exception:  # the daemon went away, or the container with it
            return None

    def status_row(self, deployment: str, server: str, rec: ServerRecord) -> dict[str, Any]:
        row = {"deployment": deployment, "server": server, "engine": rec.engine, "pid": None,
               "container": (rec.container or "")[:12], "address": f"{rec.host}:{rec.port}",
               "model": rec.served_name, "uptime_s": None, "log": rec.log}
        c = self.client(required=False)
        if c is None:
            return {**row, "state": "unknown (the Docker daemon does not answer)"}
        ct = self._get(deployment, server, rec, c)
        if ct is None:
            return {**row, "state": "gone (container removed outside orchestrate)"}
        return self._row(deployment, server, ct, rec)

    def _row(self, deployment: str, server: str, ct: Any, rec: ServerRecord | None) -> dict[str, Any]:
        status, code = state(ct)
        lb = ct.labels
        host, port = lb.get(L_HOST, "127.0.0.1"), int(lb.get(L_PORT, "0") or 0)
        if status == "running":
            key = self.host.environ.get(lb.get(L_KEYENV) or "") or None
            health = quick_probe(host, port, lb.get(L_HEALTH, "/health"), key)
            if rec is not None and rec.status == "starting" and health == "healthy":
                health = "healthy (up was interrupted)"
        else:
            health = f"{status} (exit code {code})" if code is not None else status
        if rec is None:
            health += " — no state record (orchestrate up adopts it, down removes it)"
        started = (ct.attrs.get("State") or {}).get("StartedAt", "")
        return {"deployment": deployment, "server": server, "engine": lb.get(L_ENGINE, "?").split(" ")[0],
                "pid": None, "container": ct.short_id, "address": f"{host}:{port}",
                "model": lb.get(L_MODEL, "?"), "state": health,
                "uptime_s": _uptime(started) if status == "running" and started else None,
                "log": str(self.host.store.log_path(deployment, server))}

    def discover(self, deployment: str | None = None) -> list[Found]:
        c = self.client(required=False)
        if c is None:
            return []
        return [_Container(self, ct) for ct in find(c, deployment)]


def _uptime(started: str) -> float | None:
    """Seconds since a container's State.StartedAt (RFC 3339, nanoseconds, UTC)."""
    try:
        return round(time.time() - datetime.fromisoformat(started[:26].rstrip("Z") + "+00:00").timestamp(), 1)
    except ValueError:
        return None


class _Container(Found):
    """A labelled container, found whether or not a state record names it."""

    def __init__(self, rt: DockerRuntime, ct: Any) -> None:
        self.rt, self.ct = rt, ct
        self.deployment = ct.labels.get(L_PROFILE, "?")
        self.server = ct.labels.get(L_SERVER, "?")
        self.instance = str(ct.id)

    def row(self) -> dict[str, Any]:
        return self.rt._row(self.deployment, self.server, self.ct, None)

    def remove(self) -> str:
        self.save_log()
        return remove(self.ct, STOP_GRACE_S) + " (container without a state record)"

    def save_log(self) -> None:
        self.rt._save_log(self.deployment, self.server, self.ct)
