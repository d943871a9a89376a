"""The memory estimate against what the real engines allocate, read from their own logs.

llama.cpp b11434 (with -lv 4) and ik_llama.cpp 55d3c05bf print their model, KV-cache, output
and compute buffer sizes at load. For the Gemma 3 270M GGUF (sliding-window attention, GQA with
one KV head, 262k vocabulary) at two context sizes and two KV dtypes, each estimated part must
be within 10% of the engine's own figure."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.pipeline import build_plan
from orchestrator.profile import load
from orchestrator.provision import builds as provision
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.engines
MIB = 2**20
SIZE = r"=\s*([0-9.]+) MiB"


def engine_buffers(binary: Path, args: list[str], log: Path) -> dict[str, float]:
    with log.open("w") as fh:
        proc = subprocess.Popen([str(binary), *args], stdout=fh, stderr=subprocess.STDOUT, cwd=log.parent)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "compute buffer size" in text and ("listening" in text or "HTTP server listening" in text):
                break
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text(errors="replace")
    model = re.findall(r"(?:CPU_Mapped model|CPU) buffer size\s*" + SIZE, text)
    kv = re.findall(r"KV buffer size\s*" + SIZE, text)
    compute = re.findall(r"compute buffer size\s*" + SIZE, text)
    output = re.findall(r"output buffer size\s*" + SIZE, text)
    assert model and kv and compute, text[-3000:]
    return {"weights": float(model[0]) * MIB, "kv": sum(map(float, kv)) * MIB,
            "compute": (float(compute[-1]) + (float(output[0]) if output else 0.0)) * MIB}


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
@pytest.mark.parametrize("context", [4096, 16384])
@pytest.mark.parametrize("engine", ["llama.cpp", "ik_llama"])
def test_estimate_within_ten_percent(engine: str, context: int, kv: str, gemma: Path, built_engines: None,
                                     tmp_path: Path) -> None:
    profile = tmp_path / "fit.yaml"
    profile.write_text(yaml.safe_dump({"name": "fit", "hardware": {"gpu": "cpu"}, "servers": [{
        "name": "s", "engine": engine, "model": {"path": str(gemma)}, "context": context, "kv_cache": kv,
        "parallel": 1, "port": free_port()}]}))
    sp = build_plan(load(profile), state_dir=str(tmp_path)).servers[0]
    est = sp.estimate
    assert est is not None
    args = sp.args() + (["-lv", "4"] if engine == "llama.cpp" else [])
    real = engine_buffers(provision.build(engine, "cpu").binary(), args, tmp_path / "engine.log")
    for part, key in (("weights", "weights_bytes"), ("kv", "kv_cache_bytes"), ("compute", "compute_bytes")):
        ratio = getattr(est, key) / real[part]
        assert 0.9 <= ratio <= 1.1, f"{engine} ctx {context} {kv}: {part} estimated {getattr(est, key) / MIB:.2f} MiB, " \
                                    f"engine {real[part] / MIB:.2f} MiB"
