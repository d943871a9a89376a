"""Which CPU features an engine build compiles in: what GGML_NATIVE would take, except llama.cpp's
AMX kernels on a host that has AMX (they crash there: ggml-org/llama.cpp#20824)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.facts import installed as facts_installed
from orchestrator.facts.cpu import host_cpu_flags
from orchestrator.provision import builds

SPR = {"sse4_2", "f16c", "fma", "bmi2", "avx", "avx2", "avx_vnni", "avx512f", "avx512vbmi", "avx512_vnni",
       "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"}
ZEN3 = {"sse4_2", "f16c", "fma", "bmi2", "avx", "avx2"}


def test_native_everywhere_but_llama_cpp_on_an_amx_host() -> None:
    assert builds.native_options("llama.cpp", False, ZEN3) == ["-DGGML_NATIVE=ON"]
    assert builds.native_options("ik_llama", False, SPR) == ["-DGGML_NATIVE=ON"]
    assert builds.native_options("llama.cpp", True, SPR) == ["-DGGML_NATIVE=OFF"]
    opts = builds.native_options("llama.cpp", False, SPR)
    assert opts[0] == "-DGGML_NATIVE=OFF"
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AVX_VNNI=ON",
            "-DGGML_AVX2=ON", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_BF16=OFF"} <= set(opts)


def test_cpu_flags_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_int8\nbugs\t\t: none\n")
    assert host_cpu_flags(str(info)) == {"fpu", "avx2", "amx_int8"}
    assert host_cpu_flags(str(tmp_path / "missing")) == set()


def _manifest(tmp_path: Path, **extra: object) -> facts_installed.InstalledEngine:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "llama-server").write_text("")
    data = {"engine": "llama.cpp", "version": "b11434", "backend": "cpu", "gpu_arch": None, "bin_dir": str(bin_dir),
            "source": "s.tar.gz", "source_sha256": "", "build_log": "", **extra}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    inst = facts_installed._read_manifest(tmp_path / "manifest.json")
    assert inst is not None
    return inst


@pytest.mark.parametrize("extra,kept", [({}, False), ({"amx": True}, False), ({"amx": False}, True),
                                        ({"portable": True}, True)])
def test_an_amx_build_on_an_amx_host_is_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    extra: dict[str, object], kept: bool) -> None:
    inst = _manifest(tmp_path, **extra)
    monkeypatch.setattr(builds, "host_cpu_flags", lambda cpuinfo="/proc/cpuinfo": SPR)
    said: list[str] = []
    assert (builds._usable(inst, said.append) is inst) == kept
    assert bool(said) != kept and (kept or "ggml-org/llama.cpp#20824" in said[0])
    monkeypatch.setattr(builds, "host_cpu_flags", lambda cpuinfo="/proc/cpuinfo": ZEN3)
    assert builds._usable(inst, said.append) is inst
