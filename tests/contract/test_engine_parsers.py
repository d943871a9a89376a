"""Contract: the argv we render is accepted by the real engines' own argument parsers.

llama-server (llama.cpp b11434 and ik_llama.cpp 55d3c05bf, built from their PyPI source
packages by orchestrator.provision) parses every argument before it loads the model. We run
it with the rendered argv, the model path swapped for one that does not exist and a free
port: "failed to load model" proves every flag parsed; "invalid/unknown argument",
"error while handling argument" or "has been removed" means a flag was rejected.

What this proves: flag names, value syntax and accepted values (KV types, -fa values,
--spec-type names, -ngl all/999, MoE offload flags) for every profile in profiles/ and
examples/ rendered with these engines. What it does not prove: behaviour that needs a GPU
(CUDA kernels, offload placement); a CPU build parses GPU flags such as -ngl and -cmoe but
cannot exercise them.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from orchestrator.facts.engine_probe import PARSED, REJECTED
from orchestrator.pipeline import build_plan
from orchestrator.profile import load
from orchestrator.provision import builds as provision

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted([*ROOT.glob("profiles/*.yaml"), *ROOT.glob("examples/*.yaml")])


@pytest.fixture(scope="session")
def engines() -> dict[str, Path]:
    out = {}
    for name in ("llama.cpp", "ik_llama"):
        out[name] = provision.build(name, "cpu").binary()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_check(binary: Path, args: list[str]) -> tuple[str, str]:
    """Run llama-server on args; return ('parsed'|'rejected'|'unclear', output)."""
    import tempfile

    verdict, out = "unclear", ""
    for _ in range(8):  # b9093 now and then exits 1 before its (asynchronous) log is flushed: run it again
        with tempfile.TemporaryDirectory() as cwd:  # ik_llama.cpp writes llama.log into its working directory
            p = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60, cwd=cwd)
        out = (p.stdout + p.stderr).lower()
        if any(m in out for m in REJECTED):
            return "rejected", out
        if any(m in out for m in PARSED):
            return "parsed", out
    return verdict, out


def rendered_args(profile: Path, tmp_path: Path, engine_filter: str) -> list[tuple[str, list[str]]]:
    plan = build_plan(load(profile), state_dir=str(tmp_path / "state"), detect=False)
    out = []
    for s in plan.servers:
        if s.engine != engine_filter:
            continue
        if s.api_key and s.api_key.process_path:  # the key file must exist for --api-key-file to parse
            key = Path(s.api_key.process_path)
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_text("test-key\n")
        args = s.args()
        missing = str(tmp_path / "absent-model.gguf")
        swapped = []
        for i, a in enumerate(args):
            prev = args[i - 1] if i else ""
            if prev in ("-m", "-md"):
                a = missing
            elif prev == "--port":
                a = str(free_port())
            swapped.append(a)
        out.append((s.name, swapped))
    return out


@pytest.mark.engines
@pytest.mark.parametrize("engine", ["llama.cpp", "ik_llama"])
@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_rendered_argv_parses(engine: str, profile: Path, engines: dict[str, Path], tmp_path: Path) -> None:
    cases = rendered_args(profile, tmp_path, engine)
    if not cases:
        pytest.skip(f"{profile.name} has no {engine} server")
    for name, args in cases:
        verdict, out = parse_check(engines[engine], args)
        assert verdict == "parsed", f"{profile.name}:{name}: {engine} did not accept {args}\n{out[-2000:]}"


@pytest.mark.engines
@pytest.mark.parametrize("engine,bad", [("llama.cpp", ["--draft-max", "3"]), ("ik_llama", ["-fmoe"]),
                                        ("llama.cpp", ["-fa"]), ("ik_llama", ["--spec-type", "mtp:n_max=2"])])
def test_parser_check_can_fail(engine: str, bad: list[str], engines: dict[str, Path], tmp_path: Path) -> None:
    """The check is not vacuous: flags these builds reject are reported as rejected."""
    args = ["-m", str(tmp_path / "absent.gguf"), "--port", str(free_port()), *bad]
    verdict, out = parse_check(engines[engine], args)
    assert verdict == "rejected", out[-1500:]


@pytest.mark.engines
def test_every_engine_profile_is_covered(tmp_path: Path) -> None:
    """At least one curated profile exercises each GGUF engine's speculative and MoE syntax."""
    seen: set[str] = set()
    for profile in PROFILES:
        plan = build_plan(load(profile), state_dir=str(tmp_path), detect=False)
        for s in plan.servers:
            for f in s.flags:
                seen.add(f"{s.engine}{f.name}")
    for needed in ("llama.cpp--spec-type", "llama.cpp-ncmoe", "llama.cpp-ctk", "ik_llama-ctk",
                   "ik_llama--api-key-file", "llama.cpp-ngl"):
        assert needed in seen, needed


def _variant(engine: str, gpu: str, model: str, **server: object) -> str:
    import yaml

    spec = {"name": "v", "engine": engine, "model": {"path": model}, **server}
    return yaml.safe_dump({"name": "matrix", "hardware": {"gpu": gpu}, "servers": [spec]})


MOE = "/m/Qwen3.6-35B-A3B-UD-Q4_K_XL.gguf"
DENSE = "/m/Qwen3-8B-Q4_K_M.gguf"
MATRIX = {
    "llama.cpp": [
        ("cpu-f16", "cpu", DENSE, {"kv_cache": "f16", "threads": 2}),
        ("cuda-q8", "rtx-3090", DENSE, {"kv_cache": "q8_0", "parallel": 4}),
        ("cuda-q4", "rtx-3090", DENSE, {"kv_cache": "q4_0"}),
        ("cuda-bf16", "rtx-4090", DENSE, {"kv_cache": "bf16"}),
        ("pascal", "tesla-p40", DENSE, {"kv_cache": "q8_0"}),
        ("moe-cpu-experts-mtp", "rtx-4060", MOE, {"speculative": {"method": "mtp", "tokens": 2}}),
        ("moe-all-experts-cpu", "rtx-4060", "/m/Acme-Moe-35B-A3B-Q4_K_M.gguf", {"context": 8192}),
        ("draft", "rtx-3090", DENSE, {"speculative": {"method": "draft", "draft_model": "/m/Qwen3-0.6B-Q8_0.gguf"}}),
        ("eagle3", "rtx-3090", DENSE, {"speculative": {"method": "eagle3", "draft_model": "/m/eagle3.gguf"}}),
        ("ngram", "rtx-3090", DENSE, {"speculative": {"method": "ngram"}}),
        ("no-prefix-cache-key", "rtx-3090", DENSE, {"prefix_cache": False, "api_key_env": "K"}),
        ("vulkan-q8", "rx-7900-xtx", DENSE, {"kv_cache": "q8_0"}),
    ],
    "ik_llama": [
        ("cpu-q8", "cpu", DENSE, {"kv_cache": "q8_0", "threads": 2}),
        ("cuda-q4", "rtx-3090", DENSE, {"kv_cache": "q4_0", "parallel": 2}),
        ("moe-cpu-experts-mtp", "rtx-4060", MOE, {"speculative": {"method": "mtp", "tokens": 2}}),
        ("draft", "rtx-3090", DENSE, {"speculative": {"method": "draft", "draft_model": "/m/Qwen3-0.6B-Q8_0.gguf"}}),
        ("ngram", "rtx-3090", DENSE, {"speculative": {"method": "ngram", "tokens": 4}}),
        ("no-prefix-cache-key", "rtx-3090", DENSE, {"prefix_cache": False, "api_key_env": "K"}),
        ("mla", "rtx-3090", "/m/DeepSeek-V2-Lite-Q4_K_M.gguf", {"kv_cache": "q8_0"}),
    ],
}
MATRIX_CASES = [(e, *c) for e, cases in MATRIX.items() for c in cases]


@pytest.mark.engines
@pytest.mark.parametrize("engine,case,gpu,model,server", MATRIX_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in MATRIX_CASES])
def test_rule_matrix_parses(engine: str, case: str, gpu: str, model: str, server: dict[str, object],
                            engines: dict[str, Path], tmp_path: Path) -> None:
    """Every rule path (KV types, speculative methods, MoE offload, key file) in each engine's syntax."""
    from orchestrator.facts.types import ModelFacts
    from orchestrator.pipeline import gather
    from orchestrator.plan.planner import plan
    from orchestrator.profile import load_text

    loaded = load_text(_variant(engine, gpu, model, **server), f"{case}.yaml")
    facts = gather(loaded, environ={"HOME": "/h"}, state_dir=str(tmp_path / "state"), detect=False)
    if case == "mla":  # the planner reads the architecture from the GGUF header; give it the fact
        m = facts.models["v"]
        facts.models["v"] = ModelFacts(**{**m.__dict__, "arch": "deepseek2"})
    p = plan(loaded, facts)
    s = p.servers[0]
    if s.api_key and s.api_key.process_path:
        Path(s.api_key.process_path).parent.mkdir(parents=True, exist_ok=True)
        Path(s.api_key.process_path).write_text("k\n")
    args = []
    flags = s.args()
    for i, a in enumerate(flags):
        prev = flags[i - 1] if i else ""
        args.append(str(tmp_path / "absent.gguf") if prev in ("-m", "-md") else
                    str(free_port()) if prev == "--port" else a)
    verdict, out = parse_check(engines[engine], args)
    assert verdict == "parsed", f"{engine} {case}: {args}\n{out[-2000:]}"
