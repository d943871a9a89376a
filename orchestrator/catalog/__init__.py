"""Knowledge as data: the GPU catalog and the engine capability table."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

GGUF_ENGINES = ("llama.cpp", "ik_llama")   # the engines that read GGUF files (formats: [gguf] in engines.yaml)
LOCAL_IMAGE_PREFIX = "localhost/orchestrator/"   # images built here by `orchestrate engines image` (busybox wget inside)

_VENDOR_WORDS = ("nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "intel", "arc", "apple")


@dataclass(frozen=True)
class Gpu:
    id: str
    name: str
    aliases: tuple[str, ...]
    vendor: str
    arch: str
    compute_capability: str | None
    gfx_target: str | None
    vram_gb: float
    bandwidth_gbs: float | None
    fp16_tflops: float | None
    tensor_cores: bool
    fp8: bool
    bf16: bool
    tdp_w: float | None
    form: str
    source: str
    notes: str | None = None

    @property
    def is_cpu(self) -> bool:
        return self.vendor == "cpu"

    @property
    def cc(self) -> tuple[int, int] | None:
        """Compute capability as a comparable tuple (NVIDIA only)."""
        if not self.compute_capability:
            return None
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

    @property
    def sm(self) -> str:
        cc = self.cc
        return f"sm_{cc[0]}{cc[1]}" if cc else (self.gfx_target or self.arch)

    @property
    def accelerator(self) -> str:
        """Backend family: cuda | rocm | sycl (Intel GPUs: llama.cpp's SYCL backend, vLLM's XPU platform) |
        metal | cpu."""
        return {"nvidia": "cuda", "amd": "rocm", "intel": "sycl", "apple": "metal"}.get(self.vendor, "cpu")

    @property
    def working_set_gb(self) -> float:
        """Memory one GPU can hold for a server. Apple: macOS's default Metal working set, which llama.cpp
        reports as the device's total (ggml-metal-device.m: recommendedMaxWorkingSetSize) and only warns
        past: about 2/3 of unified memory up to 36 GB, 3/4 above (raised with sysctl iogpu.wired_limit_mb)."""
        if self.vendor == "apple":
            return round(self.vram_gb * (0.75 if self.vram_gb > 36 else 2 / 3), 2)
        return self.vram_gb

    def describe(self) -> str:
        if self.is_cpu:
            return "CPU"
        return f"{self.name} is {self.arch.capitalize()} ({self.sm})"


def normalize(name: str) -> str:
    s = name.lower().strip()
    s = re.sub(r"[\s_\-]+", "", s)
    changed = True
    while changed:
        changed = False
        for word in _VENDOR_WORDS:
            if s.startswith(word) and len(s) > len(word):
                s = s[len(word):]
                changed = True
    return s


def parse_cc(value: str) -> tuple[int, int]:
    major, minor = value.split(".")
    return int(major), int(minor)


def _load_yaml(name: str) -> Any:
    text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster on the catalog
    return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader


@lru_cache(maxsize=1)
def gpus() -> dict[str, Gpu]:
    data = _load_yaml("gpus.yaml")
    out: dict[str, Gpu] = {}
    for entry in data["gpus"]:
        fields = {k: entry.get(k) for k in Gpu.__dataclass_fields__}
        fields["aliases"] = tuple(entry.get("aliases") or ())
        out[entry["id"]] = Gpu(**fields)
    return out


@lru_cache(maxsize=1)
def _gpu_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for gpu in gpus().values():
        for key in (gpu.id, gpu.name, *gpu.aliases):
            index.setdefault(normalize(key), gpu.id)
    return index


class UnknownGpu(LookupError):
    def __init__(self, name: str, suggestions: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.suggestions = suggestions


def find_gpu(name: str) -> Gpu:
    """Look up a GPU by id, name or alias, loosely; raise UnknownGpu with close matches."""
    key = normalize(name)
    index = _gpu_index()
    if key in index:
        return gpus()[index[key]]
    close = difflib.get_close_matches(key, list(index), n=6, cutoff=0.6)
    ids: list[str] = []
    for c in close:
        if index[c] not in ids:
            ids.append(index[c])
    if not ids:
        ids = [g for g in gpus() if key and key in normalize(g)][:5]
    raise UnknownGpu(name, ids[:4])


@lru_cache(maxsize=1)
def engines() -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = _load_yaml("engines.yaml")["engines"]
    return data


def engine(name: str) -> dict[str, Any]:
    return engines()[name]


def source_packages() -> dict[str, dict[str, str]]:
    """The engines built from source (llama.cpp, ik_llama), each with the PyPI source package that
    holds its verified version: package, filename, tree, version, build_number, commit, sha256."""
    out: dict[str, dict[str, str]] = {}
    for name, caps in engines().items():
        src = caps.get("source")
        if src:
            version = str(caps["verified_version"])
            out[name] = {"sha256": "", **{k: str(v) for k, v in src.items()}, "version": version, "commit": version}
    return out


@dataclass(frozen=True)
class ModelEntry:
    """A model the catalog knows (models.yaml): used when the model file is not on this machine."""

    name: str
    match: tuple[str, ...]
    arch: str
    params_b: float
    active_params_b: float | None
    metadata: dict[str, Any]
    files: dict[str, int]
    assumed: tuple[str, ...]
    source: str
    quants: tuple[str, ...] = ()      # the only quants published for it, where the catalog says so


@lru_cache(maxsize=1)
def models() -> list[ModelEntry]:
    out = []
    for e in _load_yaml("models.yaml")["models"]:
        out.append(ModelEntry(
            name=e["name"], match=tuple(m.lower() for m in e["match"]), arch=e["arch"], params_b=float(e["params_b"]),
            active_params_b=float(e["active_params_b"]) if e.get("active_params_b") else None,
            metadata=dict(e.get("metadata") or {}), files={str(k).upper().removeprefix("UD-"): int(v) for k, v in (e.get("files") or {}).items()},
            assumed=tuple(e.get("assumed") or ()), source=e["source"],
            quants=tuple(str(q).upper() for q in e.get("quants") or ())))
    return out


def find_model(name: str) -> ModelEntry | None:
    """The catalog entry whose longest match fragment occurs in name (case-insensitive), or None."""
    key = name.lower().replace("_", "-")
    best: tuple[int, ModelEntry] | None = None
    for entry in models():
        for frag in entry.match:
            if frag in key and (best is None or len(frag) > best[0]):
                best = (len(frag), entry)
    return best[1] if best else None


@lru_cache(maxsize=1)
def parsers() -> dict[str, Any]:
    """parsers.yaml: tool-call and reasoning parser names by model family, per engine."""
    data: dict[str, Any] = _load_yaml("parsers.yaml")
    return data


def _alnum(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def parser_family(*names: str | None) -> dict[str, Any] | None:
    """The first family of parsers.yaml whose match fragment is in one of the model's names."""
    keys = [_alnum(n) for n in names if n]
    for family in parsers()["families"]:
        if any(fragment in key for fragment in family["match"] for key in keys):
            return dict(family)
    return None


@dataclass(frozen=True)
class QuantQuality:
    """What a quant costs in quality, as llama.cpp's quantize tool states it (quants.yaml)."""

    label: str
    ppl_delta: float
    reference: str
    source: str

    def describe(self) -> str:
        return f"{self.ppl_delta:+.4f} perplexity on {self.reference} ({self.source})"


@lru_cache(maxsize=1)
def quants() -> dict[str, QuantQuality]:
    data = _load_yaml("quants.yaml")
    return {str(k).upper(): QuantQuality(str(k).upper(), float(v["ppl_delta"]), str(v["reference"]), data["source"])
            for k, v in data["quants"].items()}


def quant_quality(label: str | None) -> QuantQuality | None:
    return quants().get((label or "").upper()) if label else None
