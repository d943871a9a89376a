"""What the deployer asks of a runtime, for one server at a time: the `Runtime` interface that the
process runtime (runtime/process.py) and the docker runtime (runtime/docker.py) implement, and the
results both hand back.

`Deployer.up` walks the same steps for every runtime (preflight, replace a server of another runtime,
reconcile with what already runs, the port check, start, the staged health wait, settle or abort);
each step that depends on how the server runs is one method here.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator.plan.model import Plan, ServerPlan
from orchestrator.runtime.diagnose import Diagnosis
from orchestrator.runtime.state import ServerRecord, StateStore

Progress = Callable[[str, str, str], None]   # (server, event, detail)
# (server, what, done, total or None, unit: steps | bytes | s, note): a long step's progress; for a
# wait (unit s) done is the time waited and total the timeout, note the stage.
Meter = Callable[[str, str, float, "float | None", str, str], None]
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


def api_url(sp: ServerPlan) -> str:
    return f"http://{sp.host}:{sp.port}/v1"


def health_path(sp: ServerPlan) -> str:
    return sp.health.ready_path if sp.health else "/health"


def new_record(plan: Plan, sp: ServerPlan, prep: Prepared, log_path: Path, *, pid: int, pgid: int,
               create_time: float, binary: str, argv: list[str], runtime: str = "process",
               container: str | None = None) -> ServerRecord:
    """The state record of a server just started (status 'starting' until it passes its health stages)."""
    return ServerRecord(profile=plan.name, server=sp.name, engine=sp.engine, pid=pid, pgid=pgid,
                        create_time=create_time, plan_hash=prep.hash, host=sp.host, port=sp.port, log=str(log_path),
                        binary=binary, argv=argv, served_name=sp.served_name, health_path=health_path(sp),
                        profile_file=os.path.abspath(plan.profile_file),
                        api_key_env=sp.api_key.env_var if sp.api_key else None, runtime=runtime, container=container)


@dataclass
class Prepared:
    """What preflight found: the plan hash (what `up` compares with a running server's), the API key,
    and what will run (the engine binary, or the image)."""

    hash: str
    key: str | None
    binary: str


@dataclass
class Launched:
    """A server just started: its state record, poll() (its exit code once it has exited, else None)
    for the health wait, the words that name it in up's result, and the runtime's own handle."""

    rec: ServerRecord
    poll: Callable[[], int | None]
    detail: str
    handle: Any = None


@dataclass
class Reconciled:
    """What up found of this server already: `running` when it runs as planned (nothing to start);
    `restarted` when a running copy was stopped to make way."""

    running: UpResult | None = None
    restarted: bool = False


class Found(ABC):
    """A server the runtime finds by its own marks (container labels), whether or not a state record
    names it: how `status` and `down` see what a lost state file no longer lists."""

    deployment: str
    server: str
    instance: str          # what a state record of this runtime names it by (ServerRecord.container)

    @abstractmethod
    def row(self) -> dict[str, Any]:
        """Its `status` row, as a server without a state record."""

    @abstractmethod
    def remove(self) -> str:
        """Stop and remove it (its log kept): down's outcome."""

    @abstractmethod
    def save_log(self) -> None:
        """Bring its log file in the state dir up to date."""


class Host(Protocol):
    """What a runtime uses of the deployer: its state, the user's environment, progress, and the
    checks shared by every runtime."""

    store: StateStore
    environ: dict[str, str]
    progress: Progress
    meter: Meter

    def ensure_model(self, sp: ServerPlan) -> None: ...
    def check_model_file(self, sp: ServerPlan) -> None: ...
    def resolve_binary(self, sp: ServerPlan) -> str: ...
    def api_key(self, sp: ServerPlan) -> str | None: ...
    def plan_env(self, sp: ServerPlan, container: bool = False) -> dict[str, str]: ...
    def process_env(self, sp: ServerPlan) -> dict[str, str]: ...


class Runtime(ABC):
    """How servers run: one implementation per `runtime:` value of the profile."""

    name: str

    def __init__(self, host: Host) -> None:
        self.host = host

    @abstractmethod
    def preflight(self, sp: ServerPlan) -> Prepared:
        """Every check before anything is stopped or started; raises ServerFailure (stage preflight)."""

    @abstractmethod
    def retire(self, deployment: str, rec: ServerRecord, successor: str) -> bool:
        """Stop a server of this runtime that now runs under the `successor` runtime; True when it ran."""

    @abstractmethod
    def reconcile(self, plan: Plan, sp: ServerPlan, prep: Prepared, existing: ServerRecord | None,
                  log_path: Path) -> Reconciled:
        """Keep (or adopt) a copy that runs as planned, or stop what runs otherwise. The caller drops
        the state record afterwards unless it runs."""

    @abstractmethod
    def start(self, plan: Plan, sp: ServerPlan, prep: Prepared, log_path: Path) -> Launched:
        """Start the server (the port is free); raises ServerFailure when it cannot be started at all."""

    @abstractmethod
    def abort(self, launched: Launched, detail: str) -> str:
        """Stop a server that failed its health stages; the failure's detail, with what was done."""

    @abstractmethod
    def settle(self, launched: Launched) -> None:
        """A server that passed its health stages stays: whatever the runtime does then."""

    @abstractmethod
    def stop(self, deployment: str, server: str, rec: ServerRecord) -> str:
        """Stop a recorded server: down's outcome ('stopped', 'forced', 'not running', ...)."""

    @abstractmethod
    def alive(self, rec: ServerRecord) -> bool: ...

    @abstractmethod
    def host_pid(self, rec: ServerRecord) -> int | None:
        """The server's main process as a host pid; None when the runtime cannot say."""

    @abstractmethod
    def status_row(self, deployment: str, server: str, rec: ServerRecord) -> dict[str, Any]: ...

    def discover(self, deployment: str | None = None) -> list[Found]:
        """The servers of this runtime it finds without the state file (of one deployment, or all)."""
        return []
