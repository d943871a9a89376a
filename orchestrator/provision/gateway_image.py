"""The gateway's container image (`orchestrate engines image gateway`), built `FROM scratch` like the
engine images: this machine's Python interpreter (the venv's base interpreter) with the shared libraries
`ldd` lists for it and for every C extension copied, its standard library (without tests, IDLE, tkinter,
ensurepip, lib2to3 and bytecode caches), the distributions `orchestrator` requires at run time (the
closure of its Requires-Dist, no extras, each copied from its RECORD) and the orchestrator package from
its source tree. It runs `python -m orchestrator gateway --plan /etc/orchestrator/plan.json` as nobody
(65534); its HEALTHCHECK asks the gateway's /health on the port that plan names.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as md
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from orchestrator import __version__
from orchestrator.errors import OrchestratorError
from orchestrator.provision.images import USER, Context, docker_build, shared_libraries
from orchestrator.render.shell import templates_dir

PY = "/opt/python"                       # PYTHONHOME in the image
SITE = f"{PY}/site-packages"             # PYTHONPATH in the image
PLAN_PATH = "/etc/orchestrator/plan.json"
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "__pycache__", "site-packages",
               "dist-packages"}
CONFIG_DIR = re.compile(r"^config-\d")  # the static libpython and Makefile for building extensions
SKIP_FILE = re.compile(r"(^_tkinter|^_test|^_xxtestfuzz|^xxlimited|^_ctypes_test).*\.so$|\.pyc$")
HEALTHCHECK = ("import json, urllib.request; "
               f"port = json.load(open({PLAN_PATH!r}))['gateway']['port']; "
               "urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4)")


def _name(requirement: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert m, requirement
    return m.group(1)


def runtime_distributions(root: str = "orchestrator") -> list[md.Distribution]:
    """The closure of `root`'s Requires-Dist without extras, with markers evaluated for this interpreter."""
    from packaging.requirements import Requirement

    seen: dict[str, md.Distribution] = {}
    todo = [r for r in (md.distribution(root).requires or [])]
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in seen:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise OrchestratorError(f"{root} requires {req.name}, which is not installed",
                                    "pip install -e . in the environment the image is built from") from None
        seen[key] = dist
        todo += [r for r in (dist.requires or [])]
    return [seen[k] for k in sorted(seen)]


def _tree(src: Path, skip: set[str]) -> Iterator[Path]:
    for p in sorted(src.iterdir()):
        if p.name in skip or p.is_symlink() and p.is_dir() or p.is_dir() and CONFIG_DIR.match(p.name):
            continue
        if p.is_dir():
            yield from _tree(p, skip)
        elif p.is_file() and not SKIP_FILE.search(p.name):
            yield p


def _dist_files(dist: md.Distribution) -> Iterator[tuple[Path, str]]:
    """(source file, path under site-packages) of a distribution's RECORD, bytecode and files installed
    outside site-packages (scripts) left out."""
    for f in dist.files or []:
        rel = str(f)
        if rel.startswith("..") or "__pycache__" in rel or SKIP_FILE.search(Path(rel).name):
            continue
        src = Path(str(dist.locate_file(f)))
        if src.is_file():
            yield src, rel


def _code() -> tuple[list[tuple[Path, str]], str]:
    """The orchestrator package from its source tree (templates at orchestrator/templates, as
    pyproject's package-dir maps them) and the sha256 over every file's path and bytes."""
    pkg = Path(importlib.import_module("orchestrator").__file__ or "").parent
    templates = templates_dir()
    files = [(p, f"orchestrator/{p.relative_to(pkg)}") for p in _tree(pkg, {"__pycache__", "templates"})]
    files += [(p, f"orchestrator/templates/{p.relative_to(templates)}") for p in _tree(templates, {"__pycache__"})]
    h = hashlib.sha256()
    for src, rel in sorted(files, key=lambda x: x[1]):
        h.update(rel.encode() + b"\0" + src.read_bytes() + b"\0")
    return files, h.hexdigest()


def dockerfile(code_sha256: str) -> str:
    lines = [
        "FROM scratch",
        "COPY rootfs/ /",
        'LABEL org.opencontainers.image.title="orchestrator gateway" '
        f'org.opencontainers.image.version="{__version__}" orchestrator.code-sha256="{code_sha256}" '
        f'orchestrator.python="{sys.version.split()[0]}"',
        f"ENV PYTHONHOME={PY} PYTHONPATH={SITE} PATH={PY}/bin PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 "
        "PYTHONUTF8=1 HOME=/tmp",
        f"USER {USER}",
        "WORKDIR /tmp",
        "EXPOSE 8000",
        f"HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 CMD "
        f'["{PY}/bin/python3", "-c", "{HEALTHCHECK}"]',
        f'ENTRYPOINT ["{PY}/bin/python3", "-m", "orchestrator", "gateway"]',
        f'CMD ["--plan", "{PLAN_PATH}"]',
    ]
    return "\n".join(lines) + "\n"


def build_context() -> tuple[bytes, dict[str, Any]]:
    """The build context and what went into it (distributions, files, code sha256)."""
    exe = Path(getattr(sys, "_base_executable", sys.executable)).resolve()  # the venv's base interpreter
    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
                                      "installed_base": sys.base_prefix, "installed_platbase": sys.base_exec_prefix})
    stdlib, platstdlib = Path(paths["stdlib"]), Path(paths["platstdlib"])
    dists = runtime_distributions()
    code, sha = _code()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    files: list[tuple[Path, str]] = [(exe, f"{PY}/bin/python3")]
    for root in dict.fromkeys([stdlib, platstdlib]):
        files += [(p, f"{PY}/lib/{version}/{p.relative_to(root)}") for p in _tree(root, STDLIB_SKIP)]
    site_roots: list[Path] = []
    for dist in dists:
        site_roots.append(Path(str(dist.locate_file(""))).resolve())
        files += [(src, f"{SITE}/{rel}") for src, rel in _dist_files(dist)]
    files += [(src, f"{SITE}/{rel}") for src, rel in code]
    meta = f"Metadata-Version: 2.1\nName: orchestrator\nVersion: {__version__}\n".encode()
    libs: dict[str, Path] = {}
    for src, _ in files:
        if src == exe or src.suffix == ".so" or ".so." in src.name:
            for lib in shared_libraries(src):
                if not any(lib.resolve().is_relative_to(r) for r in site_roots):  # copied with its distribution
                    libs.setdefault(str(lib), lib)
    ctx = Context(dockerfile(sha))
    ctx.users()
    ctx.mkdir("rootfs/etc/orchestrator")
    for src, dest in files:
        ctx.file(src, "rootfs" + dest, 0o755 if src == exe or ".so" in src.name else 0o644)
    ctx.data(f"rootfs{SITE}/orchestrator-{__version__}.dist-info/METADATA", meta)
    for path, lib in sorted(libs.items()):
        ctx.file(lib, "rootfs" + path, 0o755)
    ctx.symlink(f"rootfs{PY}/bin/python", "python3")
    data = ctx.close()
    return data, {"distributions": [f"{d.metadata['Name']} {d.version}" for d in dists], "files": len(files),
                  "libraries": sorted(libs), "code_sha256": sha}


def build_image(connect: Callable[[], Any], tag: str | None = None, log: Callable[[str], None] = print) -> str:
    """Build the gateway image and return its tag."""
    from orchestrator.plan.gateway import default_gateway_image

    tag = tag or default_gateway_image()
    context, what = build_context()
    log(f"building {tag}: Python {sys.version.split()[0]}, {len(what['distributions'])} distributions "
        f"({', '.join(what['distributions'])}), {what['files']} files, {len(context) / 2**20:.0f} MiB context")
    docker_build(connect, context, tag)
    return tag
