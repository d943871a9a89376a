"""Container images from installed engine builds (`orchestrate engines image`).

For machines that cannot pull from a registry, and for accelerators or GPU architectures the official
images do not cover. The image is `FROM scratch`: the statically linked llama-server that
`orchestrate engines install` built, the shared libraries `ldd` lists for it (driver libraries
excepted: the NVIDIA container runtime mounts those), the dynamic loader, a static busybox, and the image's own
HEALTHCHECK (/bin/healthcheck: busybox wget on the port the server was started with), which compose
and docker inherit. It runs as nobody (65534), from /tmp, with the same
entrypoint as the official images (/app/llama-server).
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator import catalog
from orchestrator.errors import OrchestratorError
from orchestrator.facts.installed import InstalledEngine, installed

PREFIX = catalog.LOCAL_IMAGE_PREFIX   # default tags; the healthcheck travels in the image, not in its name
USER = "65534:65534"
# Supplied by the host's driver through the container runtime, never copied into an image.
DRIVER_LIBS = re.compile(r"^(libcuda\.so|libnvidia-|libnvcuvid)")


def default_tag(inst: InstalledEngine) -> str:
    arch = f"-{inst.gpu_arch}" if inst.gpu_arch else ""
    return f"{PREFIX}{inst.engine}:{inst.version}-{inst.backend}{arch}".lower()


def shared_libraries(binary: Path) -> list[Path]:
    """The shared objects the dynamic loader resolves for `binary` (ldd), driver libraries excepted."""
    p = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=60, check=False)
    if p.returncode != 0 and "not a dynamic executable" in (p.stdout + p.stderr):
        return []
    if p.returncode != 0:
        raise OrchestratorError(f"ldd {binary} failed: {(p.stderr or p.stdout).strip()[:200]}",
                                "install libc-bin (ldd), or rebuild the engine")
    libs: list[Path] = []
    for line in p.stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            raise OrchestratorError(f"{binary} needs a library this machine lacks: {line}",
                                    "install it, or rebuild the engine: orchestrate engines install")
        m = re.match(r"(\S+) => (/\S+) \(", line) or re.match(r"(/\S+) \(", line)
        if not m:
            continue
        path = Path(m.group(2) if m.lastindex == 2 else m.group(1))
        if DRIVER_LIBS.match(path.name):
            continue
        libs.append(path)
    return libs


def static_busybox() -> Path:
    found = shutil.which("busybox")
    if found:
        p = subprocess.run(["ldd", found], capture_output=True, text=True, timeout=30, check=False)
        if "not a dynamic executable" in p.stdout + p.stderr or "statically linked" in p.stdout:
            return Path(found)
    raise OrchestratorError("a static busybox is needed for the image's healthcheck (wget) and was not found",
                            "sudo apt-get install busybox-static")


def _add_file(tf: tarfile.TarFile, src: Path, arcname: str, mode: int = 0o755) -> None:
    data = src.read_bytes()            # follows symlinks: the soname path holds the real file
    info = tarfile.TarInfo(arcname)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tf.addfile(info, io.BytesIO(data))


def _add_dir(tf: tarfile.TarFile, arcname: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(arcname)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, int(time.time())
    tf.addfile(info)


# The image's own HEALTHCHECK (busybox sh): GET /health of the llama-server this container runs, on the
# port it was started with (--port in its command line; else LLAMA_ARG_PORT, else 8080). It reads every
# process's command line, as the server is PID 1 or the child of an init (docker run --init).
HEALTHCHECK_SCRIPT = """#!/bin/sh
port="${LLAMA_ARG_PORT:-8080}"
for f in /proc/[0-9]*/cmdline; do
  set -f
  set -- $(tr '\\000' ' ' < "$f" 2>/dev/null)
  while [ "$#" -gt 1 ]; do
    if [ "$1" = "--port" ]; then port="$2"; fi
    shift
  done
done
exec wget -q -O /dev/null "http://127.0.0.1:${port}/health"
"""
BUSYBOX_APPLETS = ("wget", "sh", "tr")


def dockerfile(inst: InstalledEngine) -> str:
    lines = [
        "FROM scratch",
        "COPY rootfs/ /",
        f'LABEL org.opencontainers.image.title="{inst.engine} llama-server" '
        f'org.opencontainers.image.version="{inst.version}" orchestrator.backend="{inst.backend}" '
        f'orchestrator.source-sha256="{inst.source_sha256}"',
        "ENV PATH=/bin:/app",
        f"USER {USER}",
        "WORKDIR /tmp",
        "EXPOSE 8080",
        # no -T for wget: Debian's static busybox 1.35 segfaults with it; the healthcheck timeout bounds it
        'HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 CMD ["/bin/healthcheck"]',
        'ENTRYPOINT ["/app/llama-server"]',
    ]
    return "\n".join(lines) + "\n"


class Context:
    """A docker build context written as a tar: the Dockerfile and rootfs/, each folder made once, with
    its parents."""

    def __init__(self, dockerfile_text: str) -> None:
        self.buf = io.BytesIO()
        self.tf = tarfile.open(fileobj=self.buf, mode="w")
        self.dirs: set[str] = set()
        self.data("Dockerfile", dockerfile_text.encode(), 0o644)

    def mkdir(self, arcname: str, mode: int = 0o755) -> None:
        path = Path(arcname)
        for p in [*reversed(path.parents), path]:
            if str(p) not in (".", "") and str(p) not in self.dirs:
                self.dirs.add(str(p))
                _add_dir(self.tf, str(p), mode if p == path else 0o755)

    def file(self, src: Path, arcname: str, mode: int = 0o755) -> None:
        self.mkdir(str(Path(arcname).parent))
        _add_file(self.tf, src, arcname, mode)

    def data(self, arcname: str, data: bytes, mode: int = 0o644) -> None:
        if "/" in arcname:
            self.mkdir(str(Path(arcname).parent))
        info = tarfile.TarInfo(arcname)
        info.size, info.mode, info.mtime = len(data), mode, int(time.time())
        self.tf.addfile(info, io.BytesIO(data))

    def symlink(self, arcname: str, target: str) -> None:
        link = tarfile.TarInfo(arcname)
        link.type, link.linkname, link.mtime = tarfile.SYMTYPE, target, int(time.time())
        self.tf.addfile(link)

    def users(self) -> None:
        """/etc/passwd and /etc/group naming root and nobody (65534), and a /tmp anyone may write."""
        self.data("rootfs/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:"
                  b"/bin/sh\n")
        self.data("rootfs/etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        self.mkdir("rootfs/tmp", 0o1777)

    def close(self) -> bytes:
        self.tf.close()
        return self.buf.getvalue()


def build_context(inst: InstalledEngine) -> bytes:
    """The docker build context as a tar: Dockerfile + rootfs/."""
    binary = inst.binary()
    libs = shared_libraries(binary)
    busybox = static_busybox()
    ctx = Context(dockerfile(inst))
    for d in ("rootfs/app", "rootfs/bin", "rootfs/models", "rootfs/run"):
        ctx.mkdir(d)
    ctx.users()
    ctx.file(binary, "rootfs/app/llama-server")
    for lib in libs:
        ctx.file(lib, "rootfs" + str(lib), 0o755)
    ctx.file(busybox, "rootfs/bin/busybox")
    ctx.data("rootfs/bin/healthcheck", HEALTHCHECK_SCRIPT.encode(), 0o755)
    for applet in BUSYBOX_APPLETS:
        ctx.symlink(f"rootfs/bin/{applet}", "busybox")
    return ctx.close()


def docker_build(connect: Callable[[], Any], context: bytes, tag: str) -> None:
    """`docker build` of a context made by Context, tagged `tag`."""
    from docker.errors import APIError, BuildError

    c = connect()
    try:
        c.images.build(fileobj=io.BytesIO(context), custom_context=True, tag=tag, rm=True, forcerm=True)
    except (BuildError, APIError) as exc:
        raise OrchestratorError(f"docker build of {tag} failed: {str(exc).splitlines()[0][:200]}",
                                "check the daemon's disk space and the message") from None


def build_image(connect: Callable[[], Any], engine: str, backend: str = "cpu", gpu_arch: str | None = None,
                tag: str | None = None, log: Callable[[str], None] = print) -> str:
    """Build the image and return its tag. connect() gives the Docker client (runtime.docker.client),
    called only once there is something to build."""
    inst = installed(engine, backend, gpu_arch)
    if inst is None:
        arch = f" --gpu-arch {gpu_arch}" if gpu_arch else ""
        raise OrchestratorError(f"{engine} is not installed for {backend}{arch}",
                                f"orchestrate engines install {engine} --backend {backend}{arch} (add --portable "
                                "for an image that runs on any x86-64 CPU)")
    tag = tag or default_tag(inst)
    if not inst.portable:
        log("note: this build targets this machine's CPU: the image runs on CPUs with the same "
            "instruction set; for any x86-64 CPU reinstall with orchestrate engines install --portable")
    context = build_context(inst)
    log(f"building {tag} from {inst.binary()} ({len(context) / 2**20:.0f} MiB context)")
    docker_build(connect, context, tag)
    return tag
