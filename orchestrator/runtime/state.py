"""Deployment state: one JSON file per deployment, written atomically under a lock, mode 0600.

Read leniently (unknown keys from other versions are ignored) so an upgrade never strands
running servers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from orchestrator.errors import NAME_RE, OrchestratorError, shown
from orchestrator.paths import private_dir
from orchestrator.plan.model import container_name

STATE_VERSION = 1


@dataclass
class ServerRecord:
    profile: str
    server: str
    engine: str
    pid: int
    pgid: int
    create_time: float          # psutil create_time of pid: guards against pid reuse
    plan_hash: str
    host: str
    port: int
    log: str
    binary: str
    argv: list[str]
    served_name: str
    health_path: str
    profile_file: str
    api_key_env: str | None = None
    status: str = "starting"    # starting | running | failed
    started_at: float = field(default_factory=time.time)
    ttft_s: float | None = None
    detail: str = ""
    runtime: str = "process"    # process | docker
    container: str | None = None  # docker: the container id

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServerRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# The gateway's record among a deployment's servers: server names are DNS-safe (no "_"), so it never
# meets a server's.
GATEWAY_RECORD = "_gateway"


def valid_name(name: str, what: str = "deployment") -> str:
    """A deployment or server name as the profile allows it (or the gateway's record): nothing else
    becomes a path in the state folder (no '/', '..', newline or glob)."""
    if what == "server" and name == GATEWAY_RECORD:
        return name
    if not re.fullmatch(NAME_RE, name) or len(name) > 63:
        raise OrchestratorError(f"{shown(name)} is not a {what} name",
                                "give a profile file or a deployment name (lowercase letters, digits and '-')")
    return name


class StateStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.dir = self.root / "deployments"
        self.logs = self.root / "logs"

    def ensure(self) -> None:
        for d in (self.root, self.dir, self.logs):
            try:
                private_dir(d)
            except OSError as exc:
                raise OrchestratorError(f"cannot create the state folder {shown(str(d))}: {exc.strerror}",
                                        "set ORCHESTRATOR_STATE_DIR (or XDG_STATE_HOME) to a folder you can "
                                        "write") from None

    def path(self, deployment: str) -> Path:
        return self.dir / f"{valid_name(deployment)}.json"

    def log_path(self, deployment: str, server: str) -> Path:
        return self.logs / f"{container_name(valid_name(deployment), valid_name(server, 'server'))}.log"

    def key_files(self, deployment: str, server: str) -> list[Path]:
        """The key file (ik_llama) and key config (SGLang) a process server was started with."""
        base = self.root / valid_name(deployment)
        return [base / f"{valid_name(server, 'server')}.api-key", base / f"{server}.sglang-auth.yaml"]

    @contextlib.contextmanager
    def lock(self, deployment: str, wait: bool = True) -> Iterator[None]:
        """Exclusive lock for one deployment: two `up` of one profile never start it twice."""
        self.ensure()
        fd = os.open(self.dir / f"{valid_name(deployment)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def load(self, deployment: str) -> dict[str, ServerRecord]:
        path = self.path(deployment)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            # A damaged file is kept aside, never silently dropped: its pids may still run.
            backup = path.with_suffix(f".corrupt-{int(time.time())}")
            path.replace(backup)
            return {}
        servers = data.get("servers", {}) if isinstance(data, dict) else {}
        return {name: ServerRecord.from_dict(rec) for name, rec in servers.items() if isinstance(rec, dict)}

    def save(self, deployment: str, records: dict[str, ServerRecord]) -> None:
        self.ensure()
        path = self.path(deployment)
        if not records:
            path.unlink(missing_ok=True)
            return
        payload = {"version": STATE_VERSION, "deployment": deployment,
                   "servers": {n: asdict(r) for n, r in sorted(records.items())}}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def update(self, deployment: str, record: ServerRecord | None, server: str | None = None) -> None:
        """Read-modify-write one server's record (callers hold the lock)."""
        records = self.load(deployment)
        if record is None:
            records.pop(server or "", None)
        else:
            records[record.server] = record
        self.save(deployment, records)

    def deployments(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.json"))
