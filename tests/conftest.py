from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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
