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
    from orchestrator import pyenvs

    env = pyenvs.installed(key)
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
    from orchestrator.provision import cache_root

    digest = hashlib.sha256(MAKE_TINY_LLAMA.read_bytes()).hexdigest()[:12]
    out = cache_root() / "test-models" / f"tiny-llama-{digest}"
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
