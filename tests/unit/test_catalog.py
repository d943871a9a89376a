from __future__ import annotations

import pytest

from orchestrator import catalog


@pytest.mark.parametrize("name,expected", [
    ("RTX 3090", "rtx-3090"), ("rtx3090", "rtx-3090"), ("geforce-rtx-3090", "rtx-3090"),
    ("NVIDIA GeForce RTX 3090", "rtx-3090"), ("tesla-p40", "tesla-p40"), ("P40", "tesla-p40"),
    ("v100-32gb", "tesla-v100-pcie-32gb"), ("h100-sxm", "h100-sxm"), ("H100", "h100-sxm"),
    ("Tesla V100-PCIE-16GB", "tesla-v100-pcie-16gb"), ("gtx 1080 ti", "gtx-1080-ti"),
    ("RTX 4060 Ti 16GB", "rtx-4060-ti-16gb"), ("rtx-3060", "rtx-3060-12gb"), ("mi300x", "mi300x"),
    ("Radeon RX 7900 XTX", "rx-7900-xtx"), ("arc-a770", "arc-a770-16gb"), ("b580", "arc-b580"),
    ("apple-m2-max", "apple-m2-max"), ("cpu", "cpu"), ("a100-80g", "a100-80gb"),
])
def test_loose_names(name: str, expected: str) -> None:
    assert catalog.find_gpu(name).id == expected


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(catalog.UnknownGpu) as exc:
        catalog.find_gpu("rtx-3091")
    assert "rtx-3090" in exc.value.suggestions


def test_ambiguous_name_is_not_guessed() -> None:
    with pytest.raises(catalog.UnknownGpu) as exc:
        catalog.find_gpu("rtx-4060-ti")
    assert {"rtx-4060-ti-8gb", "rtx-4060-ti-16gb"} & set(exc.value.suggestions)


def test_required_gpus_present_with_figures_and_sources() -> None:
    required = ["tesla-v100-pcie-16gb", "tesla-v100-pcie-32gb", "tesla-v100-sxm2-16gb", "tesla-v100-sxm2-32gb",
                "tesla-p40", "tesla-p100-16gb", "gtx-1080-ti", "rtx-3090", "rtx-4090", "rtx-5090", "a100-40gb",
                "a100-80gb", "h100-sxm", "h100-pcie", "h200", "l40s", "rtx-6000-ada", "rtx-4060-ti-16gb",
                "rtx-3060-12gb", "mi300x", "rx-7900-xtx", "arc-a770-16gb", "arc-b580", "apple-m2-max", "cpu",
                "rtx-2080-ti", "rtx-3070", "rtx-4060", "rtx-5070"]
    gpus = catalog.gpus()
    for gid in required:
        g = gpus[gid]
        assert g.source, gid
        if g.vendor == "nvidia":
            assert g.cc is not None and g.bandwidth_gbs and g.vram_gb and g.tdp_w, gid
        if g.vendor == "amd":
            assert g.gfx_target, gid


def test_architecture_facts_are_consistent() -> None:
    for g in catalog.gpus().values():
        if g.cc is not None:
            assert g.bf16 == (g.cc >= (8, 0)), g.id
            assert not g.fp8 or g.cc >= (8, 9), g.id


def test_engine_table_names_verified_versions() -> None:
    engines = catalog.engines()
    assert set(engines) == {"llama.cpp", "ik_llama", "vllm", "sglang"}
    for name, caps in engines.items():
        for key in ("verified_version", "health_path", "models_path", "kv_types", "images", "min_compute_capability"):
            assert caps.get(key) is not None, (name, key)
    assert engines["llama.cpp"]["verified_version"] == "b11434"
    assert engines["ik_llama"]["verified_version"] == "55d3c05bf"


def test_a100_sxm_and_pcie_are_named_apart() -> None:
    """NVIDIA's A100 datasheet: the SXM4 module and the PCIe card differ in bandwidth (80 GB) and TDP."""
    sxm, pcie = catalog.find_gpu("NVIDIA A100-SXM4-80GB"), catalog.find_gpu("NVIDIA A100 80GB PCIe")
    assert (sxm.id, sxm.bandwidth_gbs, sxm.tdp_w) == ("a100-80gb", 2039, 400)
    assert (pcie.id, pcie.bandwidth_gbs, pcie.tdp_w) == ("a100-80gb-pcie", 1935, 300)
    assert catalog.find_gpu("NVIDIA A100-PCIE-40GB").tdp_w == 250 and catalog.find_gpu("a100-40gb").tdp_w == 400
