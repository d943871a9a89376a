"""The process runtime: start an engine in its own process group, find it again, stop it for sure."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.paths import private_dir
from orchestrator.plan.model import Plan, ServerPlan
from orchestrator.runtime.base import (
    STOP_GRACE_S,
    Launched,
    Prepared,
    Reconciled,
    Runtime,
    UpResult,
    api_url,
    new_record,
    plan_hash,
)
from orchestrator.runtime.health import quick_probe
from orchestrator.runtime.state import ServerRecord

if TYPE_CHECKING:
    import psutil  # imported where used: `up` spawns the engine before it needs psutil


def spawn(argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    private_dir(log_path.parent)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        # cwd: ik_llama.cpp writes llama.log into its working directory; keep it beside our log.
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, close_fds=True, cwd=log_path.parent)
    finally:
        os.close(fd)


def create_time(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def identity(rec: ServerRecord) -> str:
    """'alive' | 'dead' | 'stale' (the pid now belongs to another process: never signal it)."""
    import psutil

    try:
        proc = psutil.Process(rec.pid)
        if abs(proc.create_time() - rec.create_time) > 0.05:
            return "stale"
        if proc.status() == psutil.STATUS_ZOMBIE:
            return "dead"
        return "alive"
    except psutil.NoSuchProcess:
        return "dead"


def group_members(pgid: int, not_before: float) -> list[psutil.Process]:
    """Processes of the group that started no earlier than the leader (pid-reuse safe)."""
    import psutil

    out = []
    for proc in psutil.process_iter(["pid", "create_time", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["create_time"] >= not_before - 0.05 \
                    and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return out


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def escaped_descendants(rec: ServerRecord) -> list[psutil.Process]:
    """Descendants of the leader that left its process group (setsid/setpgid): a group signal misses them.
    Only findable while the leader lives, so stop() collects them before signalling."""
    import psutil

    if identity(rec) != "alive":
        return []
    try:
        children = psutil.Process(rec.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            if os.getpgid(child.pid) != rec.pgid and child.create_time() >= rec.create_time - 0.05:
                out.append(child)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return out


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    import psutil

    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            continue
    return out


def _signal(rec: ServerRecord, extra: list[psutil.Process], sig: signal.Signals) -> bool:
    """Signal the group and the escaped descendants; False when nothing was there to signal."""
    import psutil

    sent = False
    try:
        os.killpg(rec.pgid, sig)
        sent = True
    except ProcessLookupError:
        pass
    for proc in _alive(extra):
        try:
            proc.send_signal(sig)   # psutil checks the pid still belongs to the process it saw
            sent = True
        except psutil.NoSuchProcess:
            continue
    return sent


def stop(rec: ServerRecord, grace: float = 10.0) -> str:
    """SIGTERM the group (and descendants that left it), wait, SIGKILL; 'stopped' | 'forced' | 'not running' |
    'stale'."""
    state = identity(rec)
    if state == "stale":
        members = group_members(rec.pgid, rec.create_time) if rec.pgid != rec.pid else []
        if not members:
            return "stale"
    extra = escaped_descendants(rec)
    members = group_members(rec.pgid, rec.create_time)
    if not members and not _alive(extra):
        _reap(rec.pid)
        return "not running"

    def done() -> bool:
        _reap(rec.pid)
        return not group_members(rec.pgid, rec.create_time) and not _alive(extra)

    if not _signal(rec, extra, signal.SIGTERM):
        return "not running"
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if done():
            return "stopped"
        time.sleep(0.05)
    if not _signal(rec, extra, signal.SIGKILL):
        return "stopped"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if done():
            return "forced"
        time.sleep(0.05)
    raise RuntimeError(f"process group {rec.pgid} survived SIGKILL")


# llama-server (llama.cpp and ik_llama.cpp) listens with cpp-httplib's default_socket_options:
# SO_REUSEPORT where the platform has it (vendor/cpp-httplib, b11434 and ik 55d3c05bf), so it binds
# beside the TIME_WAIT connections a stopped llama-server leaves, which an SO_REUSEADDR bind cannot.
REUSEPORT_ENGINES = ("llama.cpp", "ik_llama")


def _bindable(host: str, port: int, reuseport: bool = False) -> bool:
    import socket

    bind_host = "0.0.0.0" if host in ("0.0.0.0", "::") else host  # noqa: S104 - probing only
    with socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport and hasattr(socket, "SO_REUSEPORT"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((bind_host, port))
            return True
        except OSError:
            return False


def _only_time_wait(port: int) -> bool:
    import psutil

    try:
        states = {c.status for c in psutil.net_connections(kind="inet") if c.laddr and c.laddr.port == port}
    except psutil.AccessDenied:
        return False
    return states == {psutil.CONN_TIME_WAIT}


def port_owner(host: str, port: int, drain_s: float = 65.0, reuseport: bool = False) -> str | None:
    """Who listens on the port: 'pid 123 (name)' or 'another process'; None when the port is free.
    Connections of a server that just stopped linger in TIME_WAIT for up to a minute, and a server
    whose listener lacks SO_REUSEADDR cannot bind until they are gone: wait for that drain. A server
    that binds with SO_REUSEPORT (`reuseport`: llama-server) need not wait when nothing but TIME_WAIT
    connections hold the port (checked first: a live listener with SO_REUSEPORT would let the probe
    bind too)."""
    if _bindable(host, port):
        return None
    import psutil

    if reuseport and _only_time_wait(port) and _bindable(host, port, reuseport=True):
        return None

    deadline = time.monotonic() + drain_s
    while _only_time_wait(port) and time.monotonic() < deadline:
        time.sleep(0.5)
        if _bindable(host, port):
            return None
    if _only_time_wait(port):
        return f"connections of a stopped server still in TIME_WAIT after {drain_s:.0f} s"
    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                try:
                    name = psutil.Process(conn.pid).name()
                except psutil.NoSuchProcess:
                    name = "?"
                return f"pid {conn.pid} ({name})"
    except psutil.AccessDenied:
        pass
    return "another process"


def which(name: str) -> str | None:
    return shutil.which(name)


def write_key_file(sp: ServerPlan, key: str | None) -> None:
    """The API key file (or SGLang's config file) a process reads its key from: 0600, in the state dir."""
    if sp.api_key is None or sp.api_key.process_path is None or key is None:
        return
    path = Path(sp.api_key.process_path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(sp.api_key.file_text(key))
    os.chmod(path, 0o600)


class ProcessRuntime(Runtime):
    """A server is an engine process in its own process group, its output in the state dir's log file."""

    name = "process"

    def preflight(self, sp: ServerPlan) -> Prepared:
        self.host.ensure_model(sp)
        self.host.check_model_file(sp)
        binary = self.host.resolve_binary(sp)
        key = self.host.api_key(sp)
        return Prepared(plan_hash(sp, binary), key, binary)

    def retire(self, deployment: str, rec: ServerRecord, successor: str) -> bool:
        if identity(rec) != "alive":
            return False
        self.host.progress(rec.server, "restart", f"runtime changed to {successor}: stopping the process")
        stop(rec, STOP_GRACE_S)
        return True

    def reconcile(self, plan: Plan, sp: ServerPlan, prep: Prepared, existing: ServerRecord | None,
                  log_path: Path) -> Reconciled:
        if existing is None:
            return Reconciled()
        state = identity(existing)
        if state == "alive" and existing.plan_hash == prep.hash:
            health = quick_probe(existing.host, existing.port, existing.health_path, prep.key)
            return Reconciled(UpResult(sp.name, "already running", f"pid {existing.pid}, {health}", url=api_url(sp),
                                       log=existing.log))
        if state == "alive":
            self.host.progress(sp.name, "restart", "plan changed: stopping the running server")
            stop(existing, STOP_GRACE_S)
            return Reconciled(restarted=True)
        return Reconciled()

    def start(self, plan: Plan, sp: ServerPlan, prep: Prepared, log_path: Path) -> Launched:
        write_key_file(sp, prep.key)
        argv = [prep.binary, *sp.command[1:], *sp.args()]   # command[0] is what resolve_binary located
        self.host.progress(sp.name, "start", " ".join(argv[:1]))
        proc = spawn(argv, log_path, self.host.process_env(sp))
        ctime = create_time(proc.pid) or time.time()
        rec = new_record(plan, sp, prep, log_path, pid=proc.pid, pgid=proc.pid, create_time=ctime,
                         binary=prep.binary, argv=argv)
        return Launched(rec, proc.poll, f"pid {proc.pid}", proc)

    def abort(self, launched: Launched, detail: str) -> str:
        outcome = stop(launched.rec, STOP_GRACE_S)
        return detail + (" (stopped)" if outcome in ("stopped", "forced") else "")

    def settle(self, launched: Launched) -> None:
        return None   # a process needs nothing more once healthy

    def stop(self, deployment: str, server: str, rec: ServerRecord) -> str:
        return stop(rec, STOP_GRACE_S)

    def alive(self, rec: ServerRecord) -> bool:
        return identity(rec) == "alive"

    def host_pid(self, rec: ServerRecord) -> int | None:
        return rec.pid

    def status_row(self, deployment: str, server: str, rec: ServerRecord) -> dict[str, Any]:
        state = identity(rec)
        if state == "alive":
            key = self.host.environ.get(rec.api_key_env or "") or None
            health = quick_probe(rec.host, rec.port, rec.health_path, key)
            if rec.status == "starting" and health == "healthy":
                health = "healthy (up was interrupted)"
        else:
            health = {"dead": "dead", "stale": "stale (pid reused by another process; not signalled)"}[state]
        return {"deployment": deployment, "server": server, "engine": rec.engine, "pid": rec.pid,
                "address": f"{rec.host}:{rec.port}", "model": rec.served_name, "state": health,
                "uptime_s": round(time.time() - rec.started_at, 1) if state == "alive" else None,
                "log": rec.log}
