"""vLLM / SGLang planning and lookup without the engines: the CPU path's rules, the context check,
finding the Python that runs the engine, and the version warning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import ProfileError
from orchestrator.pipeline import build_plan
from orchestrator.profile import load_text
from orchestrator.runtime.diagnose import classify
from orchestrator.runtime.health import planned_settings

MIB = 2**20


def hf_model(root: Path, layers: int = 2, heads: int = 4, kv_heads: int = 4, head_dim: int = 64,
             trained: int = 4096) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_size": heads * head_dim,
        "intermediate_size": 512, "max_position_embeddings": trained, "vocab_size": 512}))
    (root / "model.safetensors").write_bytes(b"\0" * 1024)
    return root


def plan_one(tmp: Path, engine: str = "vllm", gpu: str = "cpu", look_up: bool = False, **server: object):
    spec = {"name": "s", "engine": engine, "port": 8000, **server}
    text = yaml.safe_dump({"name": "t", "hardware": {"gpu": gpu}, "servers": [spec]})
    loaded = load_text(text, str(tmp / "t.yaml"))
    return build_plan(loaded, environ={"HOME": str(tmp)}, state_dir=str(tmp / "state"), detect=look_up,
                      run_binary=look_up).servers[0]


def flags(sp) -> dict[str, str | None]:
    return {f.name: f.value for f in sp.flags}


@pytest.mark.parametrize("context,parallel,kv,layers,kv_heads,head_dim,want_mib", [
    # Every size holds context × parallel in 128-token blocks plus the one block vLLM's pool holds back
    # (a size of exactly context × parallel is refused at start: seen with vLLM CPU 0.32.0).
    (2048, 2, "auto", 2, 4, 64, 64),          # 8 MiB of KV: the 64 MiB floor
    (4096, 64, "auto", 2, 4, 64, 576),        # 2 KiB/token × (262144 + 128) tokens: just over 512 MiB
    (4096, 64, "fp8", 2, 4, 64, 320),         # fp8 halves it: just over 256 MiB
    (4000, 1, "auto", 32, 8, 128, 576),       # 128 KiB/token; 4000 → 32 blocks of 128, + 1 = 4224 tokens
    (3000, 3, "auto", 28, 2, 96, 192),        # 21504 B/token × (72 + 1) × 128 tokens = 191.6 MiB → 3 × 64 MiB
])
def test_vllm_cpu_kv_cache_is_sized_for_context_times_parallel(tmp_path: Path, context: int, parallel: int, kv: str,
                                                              layers: int, kv_heads: int, head_dim: int,
                                                              want_mib: int) -> None:
    model = hf_model(tmp_path / "m", layers=layers, kv_heads=kv_heads, head_dim=head_dim, trained=8192)
    sp = plan_one(tmp_path, model={"path": str(model)}, context=context, parallel=parallel, kv_cache=kv)
    f = flags(sp)
    assert f["--kv-cache-memory-bytes"] == str(want_mib * MIB)
    assert "--gpu-memory-utilization" not in f and "--device" not in f
    assert f["--model"] == str(model) and "" not in f        # --model, never the positional MODEL
    assert sp.command == ["python3", "-m", "vllm.entrypoints.openai.api_server"]


def test_vllm_cpu_threads_bind_env_or_auto(tmp_path: Path) -> None:
    model = hf_model(tmp_path / "m")
    bound = plan_one(tmp_path, model={"path": str(model)}, threads=3)
    assert [(e.name, e.value) for e in bound.env] == [("VLLM_CPU_OMP_THREADS_BIND", "0-2")]
    auto = plan_one(tmp_path, model={"path": str(model)})
    assert not any(e.name == "VLLM_CPU_OMP_THREADS_BIND" for e in auto.env)
    assert any("VLLM_CPU_OMP_THREADS_BIND=auto" in n for n in auto.notes)
    gpu = plan_one(tmp_path, gpu="rtx-4090", model={"path": str(model)}, threads=3)
    assert "--kv-cache-memory-bytes" not in flags(gpu) and not gpu.env


@pytest.mark.parametrize("engine,var", [("vllm", "VLLM_ALLOW_LONG_MAX_MODEL_LEN"),
                                        ("sglang", "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN")])
def test_context_beyond_the_trained_context_is_refused(tmp_path: Path, engine: str, var: str) -> None:
    model = hf_model(tmp_path / "m", trained=4096)
    with pytest.raises(ProfileError) as err:
        plan_one(tmp_path, engine=engine, gpu="rtx-4090", model={"path": str(model)}, context=8192)
    text = str(err.value.problems[0])
    assert "servers[0].context" in text and "trained context (4096" in text and var in text
    ok = plan_one(tmp_path, engine=engine, gpu="rtx-4090", model={"path": str(model)}, context=8192,
                  env={var: "1"})
    assert any("beyond the model's trained 4096" in w for w in ok.warnings)
    assert plan_one(tmp_path, engine=engine, gpu="rtx-4090", model={"path": str(model)}, context=4096)


def test_profile_binary_that_cannot_import_vllm(tmp_path: Path) -> None:
    """orchestrate's own venv has no vLLM: plan says `up` cannot start it, and why."""
    model = hf_model(tmp_path / "m")
    sp = plan_one(tmp_path, model={"path": str(model)}, binary=sys.executable, look_up=True)
    assert "cannot import vllm" in sp.executable.describe()
    assert any("`up` cannot start this server" in w for w in sp.warnings)
    gone = plan_one(tmp_path, model={"path": str(model)}, binary=str(tmp_path / "no-python"), look_up=True)
    assert "cannot run" in gone.executable.describe()


def fake_version_env(root: Path, version: str) -> Path:
    """A real venv whose installed `vllm` distribution is `version` (metadata and an empty package: what the
    version lookup reads; nothing here runs vLLM)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next((root / "lib").glob("python3*/site-packages"))
    (site / "vllm").mkdir()
    (site / "vllm" / "__init__.py").write_text("")
    info = site / f"vllm-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    (info / "top_level.txt").write_text("vllm\n")
    return root / "bin" / "python"


def test_plan_warns_when_the_installed_version_is_not_the_verified_one(tmp_path: Path) -> None:
    model = hf_model(tmp_path / "m")
    old = fake_version_env(tmp_path / "env-old", "0.31.0")
    sp = plan_one(tmp_path, model={"path": str(model)}, binary=str(old), look_up=True)
    assert "vllm 0.31.0" in sp.executable.describe()
    assert any("installed vLLM is 0.31.0" in w and "verified against 0.32.0" in w for w in sp.warnings)
    same = fake_version_env(tmp_path / "env-same", "0.32.0")
    sp = plan_one(tmp_path, model={"path": str(model)}, binary=str(same), look_up=True)
    assert not any("installed vLLM" in w for w in sp.warnings)


def test_up_without_vllm_fails_in_one_line_with_the_fix(orchestrate, tmp_path: Path) -> None:
    model = hf_model(tmp_path / "m")
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"name": "novllm", "hardware": {"gpu": "cpu"}, "servers": [
        {"name": "s", "engine": "vllm", "model": {"path": str(model)}, "port": 18999}]}))
    env = {"ORCHESTRATOR_CACHE": str(tmp_path / "empty-cache"), "ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")}
    code, out, err = orchestrate("up", str(profile), env=env)
    assert code == 1
    lines = [line for line in err.splitlines() if "FAILED" in line]
    assert lines == [lines[0]] and "vLLM 0.32.0 is not installed — fix: orchestrate engines install vllm" in lines[0]
    assert "Traceback" not in err
    assert not list((tmp_path / "state").rglob("*.log"))   # nothing was started


def test_engines_install_vllm_is_cpu_only(orchestrate) -> None:
    code, _, err = orchestrate("engines", "install", "vllm", "--backend", "cuda")
    assert code == 1 and "for cpu only" in err and "binary:" in err


def test_settings_stage_knows_vllm_and_sglang_context(tmp_path: Path) -> None:
    model = hf_model(tmp_path / "m")
    assert planned_settings(plan_one(tmp_path, model={"path": str(model)}, context=2048)) == {"max_model_len": 2048}
    sg = plan_one(tmp_path, engine="sglang", gpu="rtx-4090", model={"path": str(model)}, context=1024)
    assert planned_settings(sg) == {"max_model_len": 1024}


@pytest.mark.parametrize("line,cause", [
    ("api_server.py: error: unrecognized arguments: --devices cpu", "bad_flag"),
    # vLLM 0.32.0 on --device (removed): argparse prefix matching finds two longer flags
    ("api_server.py: error: ambiguous option: --device could match --device-ids, --device-memory-utilization",
     "bad_flag"),
    ("api_server.py: error: argument --kv-cache-dtype: invalid choice: 'q8_0'", "bad_flag"),
    ("ModuleNotFoundError: No module named 'vllm'", "engine_missing"),
    ("ValueError: Available memory on node 0 (1.2/23 GiB) on kv cache allocation is less than requested memory "
     "for kv (64 GiB).", "kv_cache_oom"),
    ("ValueError: To serve at least one request with the model's max seq len (8192), (1 GiB KV cache is needed, "
     "which is larger than the available KV cache memory (0.1 GiB).", "kv_cache_oom"),
])
def test_vllm_failures_are_classified(line: str, cause: str) -> None:
    assert classify(f"INFO starting\n{line}\n").cause == cause


def test_an_env_without_its_manifest_is_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyenvs writes the manifest last: a folder from an interrupted install is never taken for an engine."""
    from orchestrator.catalog.recipes import RECIPES
    from orchestrator.facts import installed

    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    root = installed.env_dir(RECIPES["vllm"])
    assert root == tmp_path / "cache" / "pyenvs" / "vllm-0.32.0-cpu"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").symlink_to(sys.executable)
    assert installed.installed_env("vllm") is None
    found = installed.locate("vllm", "cpu", "python3")
    assert found.path is None and "orchestrate engines install vllm" in found.how
    manifest = {"recipe": "vllm", "engine": "vllm", "version": "0.32.0", "purpose": "serve", "accelerator": "cpu",
                "python": str(root / "bin" / "python"), "distribution": "vllm-cpu", "packages": {},
                "install_seconds": 1.0, "log": ""}
    (root / installed.MANIFEST).write_text(json.dumps(manifest))
    found = installed.locate("vllm", "cpu", "python3")
    assert found.path == str(root / "bin" / "python") and found.version == "0.32.0"
    # The CPU env never serves a CUDA plan.
    assert installed.locate("vllm", "cuda", "python3").path != found.path
    (root / "bin" / "python").unlink()
    assert installed.installed_env("vllm") is None      # manifest left, interpreter gone


def test_unknown_python_engine_recipe(orchestrate) -> None:
    from orchestrator.errors import ProvisionError
    from orchestrator.provision import pyenvs

    with pytest.raises(ProvisionError, match="unknown Python engine"):
        pyenvs.install("vllm-rocm")
    code, _, err = orchestrate("engines", "install", "sglang")
    assert code != 0 and "sglang-parser" in err
