"""The process runtime: start an engine in its own process group, find it again, stop it for sure."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

from orchestrator.runtime.state import ServerRecord


def spawn(argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # cwd: ik_llama.cpp writes llama.log into its working directory; keep it beside our log.
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, close_fds=True, cwd=log_path.parent)
    finally:
        os.close(fd)


def create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def identity(rec: ServerRecord) -> str:
    """'alive' | 'dead' | 'stale' (the pid now belongs to another process: never signal it)."""
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


def _bindable(host: str, port: int) -> bool:
    import socket

    bind_host = "0.0.0.0" if host in ("0.0.0.0", "::") else host  # noqa: S104 - probing only
    with socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind_host, port))
            return True
        except OSError:
            return False


def _only_time_wait(port: int) -> bool:
    try:
        states = {c.status for c in psutil.net_connections(kind="inet") if c.laddr and c.laddr.port == port}
    except psutil.AccessDenied:
        return False
    return states == {psutil.CONN_TIME_WAIT}


def port_owner(host: str, port: int, drain_s: float = 65.0) -> str | None:
    """Who listens on the port: 'pid 123 (name)' or 'another process'; None when the port is free.
    Connections of a server that just stopped linger in TIME_WAIT for up to a minute, and a server
    whose listener lacks SO_REUSEADDR cannot bind until they are gone: wait for that drain."""
    if _bindable(host, port):
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
