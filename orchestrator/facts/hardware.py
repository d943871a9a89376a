"""Hardware detection: CPU, memory, GPUs (NVML, nvidia-smi, rocm-smi, Apple sysctl), Docker, engines.

Detection gathers facts once, before planning; the planner stays pure. Every probe is optional:
a missing tool is reported with what it blocks and how to fix it, never as a crash.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import xml.etree.ElementTree as ET  # noqa: S405 - parses nvidia-smi's own output
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator import catalog
from orchestrator.catalog import Gpu

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


@dataclass
class GpuInfo:
    index: int
    name: str
    vendor: str
    catalog_id: str | None
    arch: str | None
    compute_capability: str | None
    vram_total_bytes: int | None
    vram_free_bytes: int | None
    driver: str | None
    runtime_version: str | None      # CUDA or ROCm version
    power_limit_w: float | None
    source: str


@dataclass
class Report:
    cpu: dict[str, Any]
    memory: dict[str, Any]
    gpus: list[dict[str, Any]]
    docker: dict[str, Any]
    engines: list[dict[str, Any]]
    problems: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(argv: list[str], timeout: float = 10) -> str | None:
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        p = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def _mib(text: str | None) -> int | None:
    if not text:
        return None
    parts = text.split()
    try:
        value = float(parts[0])
    except (ValueError, IndexError):
        return None
    unit = parts[1].lower() if len(parts) > 1 else "mib"
    scale = {"mib": 2**20, "gib": 2**30, "kib": 2**10, "b": 1}.get(unit, 2**20)
    return int(value * scale)


def _catalog(name: str) -> Gpu | None:
    try:
        return catalog.find_gpu(name)
    except catalog.UnknownGpu:
        return None


def parse_nvidia_smi_xml(text: str) -> list[GpuInfo]:
    """GPUs from `nvidia-smi -q -x`."""
    root = ET.fromstring(text.strip())  # noqa: S314 - local tool output, not untrusted input
    driver = root.findtext("driver_version")
    cuda = root.findtext("cuda_version")
    out = []
    for i, gpu in enumerate(root.findall("gpu")):
        name = (gpu.findtext("product_name") or "").strip()
        cat = _catalog(name)
        power = gpu.find("gpu_power_readings") or gpu.find("power_readings")
        limit = None
        if power is not None:
            raw = power.findtext("default_power_limit") or power.findtext("power_limit")
            try:
                limit = float((raw or "").split()[0])
            except (ValueError, IndexError):
                limit = None
        arch = gpu.findtext("product_architecture") or (cat.arch if cat else None)
        out.append(GpuInfo(i, name, "nvidia", cat.id if cat else None, arch,
                           cat.compute_capability if cat else None,
                           _mib(gpu.findtext("fb_memory_usage/total")), _mib(gpu.findtext("fb_memory_usage/free")),
                           driver, cuda, limit, "nvidia-smi"))
    return out


def parse_rocm_smi_json(text: str) -> list[GpuInfo]:
    """GPUs from `rocm-smi --showproductname --showmeminfo vram --showdriverversion --json`."""
    data = json.loads(text)
    driver = None
    out = []
    for key, card in sorted(data.items()):
        if not key.startswith("card") or not isinstance(card, dict):
            if isinstance(card, dict):
                driver = card.get("Driver version") or driver
            continue
        fields = {k.lower(): v for k, v in card.items()}
        name = fields.get("card series") or fields.get("card model") or fields.get("card sku") or key
        gfx = fields.get("gfx version")
        cat = _catalog(str(name))
        total = fields.get("vram total memory (b)")
        used = fields.get("vram total used memory (b)")
        free = int(total) - int(used) if total and used else None
        arch = str(gfx) if gfx else (cat.arch if cat else None)
        out.append(GpuInfo(int(key[4:] or 0), str(name), "amd", cat.id if cat else None, arch, None,
                           int(total) if total else None, free, driver, None, None, "rocm-smi"))
    return out


def _nvml() -> list[GpuInfo] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            try:
                limit = pynvml.nvmlDeviceGetPowerManagementDefaultLimit(h) / 1000
            except pynvml.NVMLError:
                limit = None
            cat = _catalog(name)
            out.append(GpuInfo(i, name, "nvidia", cat.id if cat else None, cat.arch if cat else None,
                               f"{major}.{minor}", int(mem.total), int(mem.free), str(driver),
                               f"{cuda // 1000}.{cuda % 1000 // 10}", limit, "nvml"))
        return out
    finally:
        pynvml.nvmlShutdown()


def detect_gpus() -> list[GpuInfo]:
    found = _nvml()
    if found:
        return found
    xml = _run(["nvidia-smi", "-q", "-x"])
    if xml:
        try:
            return parse_nvidia_smi_xml(xml)
        except ET.ParseError:
            pass
    rocm = _run(["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--showdriverversion", "--json"])
    if rocm:
        try:
            return parse_rocm_smi_json(rocm)
        except (ValueError, TypeError):
            pass
    if platform.system() == "Darwin":
        brand = _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or ""
        mem = _run(["sysctl", "-n", "hw.memsize"])
        cat = _catalog(brand.strip())
        return [GpuInfo(0, brand.strip(), "apple", cat.id if cat else None, cat.arch if cat else None, None,
                        int(mem) if mem and mem.strip().isdigit() else None, None, None, None, None, "sysctl")]
    return []


def detect_gpu() -> tuple[Gpu, int] | None:
    """For `hardware: gpu: auto`: the first GPU's catalog entry and how many GPUs there are."""
    gpus = detect_gpus()
    if not gpus or not gpus[0].catalog_id:
        return None
    return catalog.gpus()[gpus[0].catalog_id], len(gpus)


def detect_cpu() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    physical = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    return {"model": model, "arch": platform.machine(), "cores_logical": os.cpu_count(),
            "cores_physical": physical, "isa": [f for f in ISA_FLAGS if f in flags]}


def detect_memory() -> dict[str, Any]:
    import psutil

    vm = psutil.virtual_memory()
    return {"total_bytes": int(vm.total), "available_bytes": int(vm.available)}


def detect_docker() -> dict[str, Any]:
    if shutil.which("docker") is None:
        return {"cli": False, "daemon": False, "nvidia_runtime": False, "version": None}
    info = _run(["docker", "info", "--format", "{{json .}}"], timeout=15)
    if not info:
        return {"cli": True, "daemon": False, "nvidia_runtime": False, "version": None}
    try:
        data = json.loads(info)
    except ValueError:
        data = {}
    runtimes = data.get("Runtimes") or {}
    cdi = data.get("CDISpecDirs") or []
    return {"cli": True, "daemon": True, "version": data.get("ServerVersion"),
            "nvidia_runtime": "nvidia" in runtimes or bool(cdi and shutil.which("nvidia-ctk")),
            "runtimes": sorted(runtimes)}


def detect_engines() -> list[dict[str, Any]]:
    from orchestrator.facts import installed

    out: list[dict[str, Any]] = [
        {"engine": e.engine, "version": e.version, "backend": e.backend, "path": str(e.binary()), "source": "installed"}
        for e in installed.list_installed()]
    out += [{"engine": e.engine, "version": e.version, "backend": e.accelerator or e.purpose, "path": e.python,
             "source": "installed env" if e.purpose == "serve" else "installed env (argument parser only)"}
            for e in installed.list_envs()]
    for engine, command in (("llama-server", "llama-server"), ("vllm", "vllm"), ("sglang", "sglang")):
        path = shutil.which(command)
        if path:
            out.append({"engine": engine, "version": None, "backend": None, "path": path, "source": "PATH"})
    return out


def doctor() -> Report:
    cpu, memory, docker = detect_cpu(), detect_memory(), detect_docker()
    gpus, engines = detect_gpus(), detect_engines()
    problems: list[dict[str, str]] = []
    if not gpus:
        problems.append({"what": "no GPU detected (NVML, nvidia-smi, rocm-smi)",
                         "blocks": "GPU offload; plans for this machine use the CPU backend",
                         "fix": "install the NVIDIA driver (nvidia-smi) or ROCm (rocm-smi), or set hardware.gpu "
                                "in profiles planned for another machine"})
    for g in gpus:
        if g.catalog_id is None:
            problems.append({"what": f"GPU {g.name!r} is not in the catalog",
                             "blocks": "hardware: auto for this GPU (architecture-specific flags)",
                             "fix": "set hardware.gpu to the closest catalog entry (orchestrate gpus)"})
    if "avx2" not in cpu["isa"] and cpu["arch"] in ("x86_64", "AMD64"):
        problems.append({"what": "CPU without AVX2", "blocks": "fast CPU inference",
                         "fix": "expect low tokens/s on CPU; offload to a GPU"})
    if not docker["cli"]:
        problems.append({"what": "docker CLI not found", "blocks": "runtime: docker and `docker compose`",
                         "fix": "install Docker (Debian: apt-get install docker.io)"})
    elif not docker["daemon"]:
        problems.append({"what": "Docker daemon not reachable", "blocks": "runtime: docker",
                         "fix": "start it (systemctl start docker, or dockerd) and check access to its socket"})
    elif gpus and gpus[0].vendor == "nvidia" and not docker["nvidia_runtime"]:
        problems.append({"what": "NVIDIA container runtime missing", "blocks": "GPU containers (--gpus)",
                         "fix": "install nvidia-container-toolkit and run nvidia-ctk runtime configure"})
    if not engines:
        problems.append({"what": "no engine installed", "blocks": "runtime: process",
                         "fix": "orchestrate engines install llama.cpp (up does it for CPU profiles)"})
    return Report(cpu, memory, [asdict(g) for g in gpus], docker, engines, problems)
