from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKE_TINY_LLAMA = ROOT / "tests" / "e2e" / "make_tiny_llama.py"
# Plans name state-dir paths (API key files); pin them so rendered output is the same everywhere.
os.environ["ORCHESTRATOR_STATE_DIR"] = "/var/lib/orchestrator"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/ from the current output")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture
def orchestrate():
    """Run the real CLI in a subprocess: (exit code, stdout, stderr)."""
    import subprocess

    def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
        full_env = {**os.environ, **(env or {})}
        p = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                           env=full_env, cwd=cwd or ROOT, timeout=120)
        return p.returncode, p.stdout, p.stderr

    return run


def require_pyenv(key: str):
    """An installed engine environment (orchestrator.pyenvs), or skip — except under CI, where a missing
    environment fails the test: scripts/test.sh installs them, so CI never skips these silently."""
    from orchestrator.facts.installed import installed_env

    env = installed_env(key)
    if env is None:
        msg = (f"the {key} environment is not installed: python -m orchestrator engines install {key} "
               "(scripts/test.sh does)")
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(msg + "; under CI=true engine_env tests must run, not skip")
        pytest.skip(msg)
    return env


@pytest.fixture(scope="session")
def vllm_env():
    return require_pyenv("vllm")


@pytest.fixture(scope="session")
def sglang_parser_env():
    return require_pyenv("sglang-parser")


@pytest.fixture(scope="session")
def tiny_llama(vllm_env) -> Path:
    """A random-weight Llama-style HF model (2.7 MB) made by tests/e2e/make_tiny_llama.py with the vLLM env's
    Python. Kept at a path named after the generator's hash, so vLLM's compile cache for it stays valid."""
    from orchestrator.paths import cache_dir

    digest = hashlib.sha256(MAKE_TINY_LLAMA.read_bytes()).hexdigest()[:12]
    out = cache_dir() / "test-models" / f"tiny-llama-{digest}"
    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    p = subprocess.run([vllm_env.python, str(MAKE_TINY_LLAMA), str(tmp)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _docker_client():
    try:
        import docker

        c = docker.from_env(timeout=30)
        c.ping()
        return c
    except Exception:
        return None


def _start_dockerd() -> str:
    """Install Debian's docker.io (and busybox-static, for image healthchecks) when missing and start
    dockerd when no daemon answers. Returns what went wrong, or '' when a daemon should now answer."""
    import time

    root = os.geteuid() == 0
    missing = [pkg for tool, pkg in (("dockerd", "docker.io"), ("busybox", "busybox-static")) if not shutil.which(tool)]
    if missing:
        if not root:
            return f"{' and '.join(missing)} not installed (sudo apt-get install {' '.join(missing)})"
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        p = subprocess.run(["apt-get", "install", "-y", "-qq", *missing], capture_output=True, text=True, timeout=1200,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if p.returncode != 0:
            return f"apt-get install {' '.join(missing)} failed: {p.stderr[-300:]}"
    if _docker_client() is not None:
        return ""
    if not root:
        return "no Docker daemon answers and starting one needs root (sudo dockerd &)"
    log = open(os.environ.get("TMPDIR", "/tmp") + "/orchestrator-tests-dockerd.log", "ab")  # noqa: SIM115
    subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                     start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if _docker_client() is not None:
            return ""
        time.sleep(1)
    return f"dockerd did not answer within 90 s (log: {log.name})"


@pytest.fixture(scope="session")
def docker_client():
    """A Docker client on a live daemon: installed and started here when needed (as root). Tests that need
    it skip only when the daemon truly cannot run, and never under CI=true."""
    c = _docker_client()
    problem = "" if c is not None else _start_dockerd()
    c = c or _docker_client()
    if c is None:
        msg = f"no Docker daemon: {problem or 'it did not answer'}"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(msg + "; under CI=true the docker tests must run")
        pytest.skip(msg)
    if not shutil.which("busybox"):
        _start_dockerd()   # installs busybox-static when root
    return c
