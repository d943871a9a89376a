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


# Pages that collect other sites' figures, or repositories unrelated to the card: a `source` must
# name the vendor's datasheet, spec page or announcement instead (issue 15, item 6).
_AGGREGATORS = ("omegaco", "sysrqmts", "tech4gamers", "techpowerup", "microway", "io-tech", "glennklockwood",
                "manuals.plus", "winston-zhang", "saulelectric", "astroc86", "mullet.se", "grafikkarten", "cputronic",
                "technic3d", "calwoo", "holynerdvana", "triteia", "waredb", "thefpsreview", "spheron", "dominikbucko",
                "codesota", "aiwiki", "zexron", "yobitel", "pcspecchart", "phoronix", "gentoo", "svethardware",
                "fpsbench", "hmc-tech", "myapplechat", "macmegasite", "llmfit", "goodnewsapodcast", "public llm-serving",
                "tom's", "linux format")
_VENDOR_NAMES = {"nvidia": "NVIDIA", "amd": "AMD", "intel": "Intel", "apple": "Apple"}
_FORMS = {"datacenter", "workstation", "consumer", "integrated", "cpu"}


@pytest.mark.parametrize("gid", sorted(catalog.gpus()))
def test_every_entry_cites_its_vendor(gid: str) -> None:
    g = catalog.gpus()[gid]
    text = f"{g.source} {g.notes or ''}".lower()
    assert not [a for a in _AGGREGATORS if a in text], f"{gid}: cites an aggregator: {g.source}"
    if g.vendor in _VENDOR_NAMES:
        assert _VENDOR_NAMES[g.vendor] in g.source, f"{gid}: source names no {_VENDOR_NAMES[g.vendor]} document"
    if g.vendor == "nvidia":
        assert "developer.nvidia.com/cuda-gpus" in g.source or "compute capability" in g.source, gid


@pytest.mark.parametrize("gid", sorted(catalog.gpus()))
def test_every_entry_has_the_fields_its_readers_need(gid: str) -> None:
    g = catalog.gpus()[gid]
    assert g.form in _FORMS and g.name and g.arch, gid
    if g.is_cpu:
        return
    assert g.vram_gb > 0 and g.bandwidth_gbs, gid
    if g.vendor == "nvidia":
        assert g.cc is not None and g.gfx_target is None, gid
    if g.vendor == "amd":
        assert g.compute_capability is None and (g.gfx_target or "").startswith("gfx"), gid
    for field in ("fp16_tflops", "tdp_w"):
        if getattr(g, field) is None:       # a missing figure is explained, never left silent
            assert field in (g.notes or "") or "publishes no" in (g.notes or ""), (gid, field)


def test_ids_names_and_aliases_are_unique_after_matching() -> None:
    seen: dict[str, str] = {}
    for g in catalog.gpus().values():
        for key in {catalog.normalize(k) for k in (g.id, g.name, *g.aliases)}:
            assert seen.setdefault(key, g.id) == g.id, f"{key!r} names both {seen[key]} and {g.id}"


@pytest.mark.parametrize("gid,arch,target,vram,bandwidth", [
    ("b200", "blackwell", "10.0", 180, 8000), ("b300", "blackwell", "10.3", 288, 8000),
    ("gb200", "blackwell", "10.0", 186, 8000), ("rtx-pro-6000-blackwell", "blackwell", "12.0", 96, 1792),
    ("gb10", "blackwell", "12.1", 128, 273), ("h20", "hopper", "9.0", 96, 4000), ("l20", "ada", "8.9", 48, 864),
    ("mi210", "cdna2", "gfx90a", 64, 1638.4), ("mi325x", "cdna3", "gfx942", 256, 6000),
    ("mi355x", "cdna4", "gfx950", 288, 8000), ("radeon-pro-w7900", "rdna3", "gfx1100", 48, 864),
    ("ryzen-ai-max-395", "rdna3.5", "gfx1151", 128, 256), ("arc-b570", "xe2-hpg", None, 10, 380),
    ("arc-pro-b50", "xe2-hpg", None, 16, 224), ("arc-pro-b60", "xe2-hpg", None, 24, 456),
    ("apple-m5", "apple-m5", None, 32, 153), ("apple-m1", "apple-m1", None, 16, 68.25),
    ("apple-m2-pro", "apple-m2", None, 32, 200), ("apple-m3-pro", "apple-m3", None, 36, 150),
])
def test_new_cards_carry_their_vendor_figures(gid: str, arch: str, target: str | None, vram: float,
                                              bandwidth: float) -> None:
    g = catalog.gpus()[gid]
    assert (g.arch, g.compute_capability or g.gfx_target, g.vram_gb, g.bandwidth_gbs) == (arch, target, vram, bandwidth)


@pytest.mark.parametrize("name,expected", [
    ("NVIDIA B200", "b200"), ("NVIDIA GB10", "gb10"), ("DGX Spark", "gb10"), ("NVIDIA B300 SXM", "b300"),
    ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "rtx-pro-6000-blackwell"),
    ("NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition", "rtx-pro-6000-blackwell-max-q"),
    ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "rtx-pro-6000-blackwell-server"), ("rtx pro 6000", "rtx-pro-6000-blackwell"),
    ("AMD Instinct MI355X", "mi355x"), ("Radeon PRO W7900", "radeon-pro-w7900"), ("Strix Halo", "ryzen-ai-max-395"),
    ("Radeon 8060S Graphics", "ryzen-ai-max-395"), ("Intel Arc Pro B60", "arc-pro-b60"), ("Arc B570", "arc-b570"),
    ("Apple M5", "apple-m5"), ("Apple M3 Pro", "apple-m3-pro"),
])
def test_new_cards_match_the_names_tools_report(name: str, expected: str) -> None:
    assert catalog.find_gpu(name).id == expected


def test_unified_memory_parts_are_integrated_and_apple_keeps_its_working_set() -> None:
    for gid in ("gb10", "ryzen-ai-max-395", "apple-m1", "apple-m5"):
        assert catalog.gpus()[gid].form == "integrated", gid
    assert catalog.gpus()["apple-m5"].working_set_gb == round(32 * 2 / 3, 2)
    assert catalog.gpus()["gb10"].working_set_gb == 128    # CUDA sees the pool; no macOS-style limit


# --------------------------------------------------------------------------- models.yaml

_NEW_MODELS = ["Llama-3.3-70B-Instruct", "Llama-3.2-3B-Instruct", "Llama-3.2-1B-Instruct", "Mistral-Nemo-Instruct-2407",
               "Mistral-Small-3.1-24B", "Phi-4", "gemma-3-27b-it", "Qwen2.5-32B-Instruct", "Qwen3-14B",
               "Qwen3-30B-A3B", "gpt-oss-120b"]


@pytest.mark.parametrize("file_name,expected", [
    ("Llama-3.3-70B-Instruct-Q4_K_M.gguf", "Llama-3.3-70B-Instruct"),
    ("Meta-Llama-3.3-70B-Instruct-Q4_K_M.gguf", "Llama-3.3-70B-Instruct"),
    ("Llama-3.2-3B-Instruct-Q4_K_M.gguf", "Llama-3.2-3B-Instruct"),
    ("Llama-3.2-1B-Instruct-Q8_0.gguf", "Llama-3.2-1B-Instruct"),
    ("Mistral-Nemo-Instruct-2407-Q4_K_M.gguf", "Mistral-Nemo-Instruct-2407"),
    ("Mistral-Small-3.1-24B-Instruct-2503-Q4_K_M.gguf", "Mistral-Small-3.1-24B"),
    ("phi-4-Q4_K_M.gguf", "Phi-4"),
    ("gemma-3-27b-it-Q4_K_M.gguf", "gemma-3-27b-it"),
    ("Qwen2.5-32B-Instruct-Q4_K_M.gguf", "Qwen2.5-32B-Instruct"),
    ("Qwen3-14B-Q4_K_M.gguf", "Qwen3-14B"),
    ("Qwen3-30B-A3B-Q4_K_M.gguf", "Qwen3-30B-A3B"),
    ("gpt-oss-120b-MXFP4.gguf", "gpt-oss-120b"),
    # the longest fragment still wins for the neighbours of the new entries
    ("Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf", "Qwen3-Coder-30B-A3B"),
    ("gpt-oss-20b-MXFP4.gguf", "gpt-oss-20b"),
    ("gemma-3-4b-it-Q4_K_M.gguf", "gemma-3-4b-it"),
    ("Qwen2.5-7B-Instruct-Q4_K_M.gguf", "Qwen2.5-7B-Instruct"),
    ("Llama-3.1-8B-Instruct-Q4_K_M.gguf", "Llama-3.1-8B-Instruct"),
])
def test_model_files_resolve_to_their_entry(file_name: str, expected: str) -> None:
    found = catalog.find_model(f"/models/{file_name}")
    assert found is not None and found.name == expected


@pytest.mark.parametrize("file_name", ["Phi-4-mini-instruct-Q4_K_M.gguf", "Qwen2.5-Coder-32B-Instruct-Q4_K_M.gguf",
                                       "Llama-3.2-11B-Vision-Instruct-Q4_K_M.gguf"])
def test_other_sizes_of_a_family_are_not_taken_for_a_new_entry(file_name: str) -> None:
    assert catalog.find_model(file_name) is None


def test_the_sliding_window_layers_of_the_new_entries() -> None:
    from orchestrator.facts.catalog_facts import entry_facts
    from orchestrator.plan import fit

    by_name = {m.name: m for m in catalog.models()}
    assert fit.swa_layers(entry_facts(by_name["gpt-oss-120b"], "MXFP4")) == 18     # 36 layers, alternating
    assert fit.swa_layers(entry_facts(by_name["gemma-3-27b-it"], "Q4_K_M")) == 52   # 62 layers, every 6th global
    assert fit.swa_layers(entry_facts(by_name["Llama-3.3-70B-Instruct"], "Q4_K_M")) == 0


@pytest.mark.parametrize("name", _NEW_MODELS)
def test_new_models_plan_through_recommend(name: str) -> None:
    from orchestrator.plan.model import GIB
    from orchestrator.plan.speed import Host
    from orchestrator.recommend.rank import evaluate, quants_for

    entry = next(m for m in catalog.models() if m.name == name)
    quant = "Q4_K_M" if "Q4_K_M" in quants_for(entry) else quants_for(entry)[0]
    row = evaluate(entry, quant, catalog.find_gpu("h100-sxm"), 1, 8192, Host(), 256 * GIB)
    assert row.engine is not None and not row.problems, row.memory
    assert row.verdict in ("fits", "fits with offload"), row.memory
    assert row.speed is not None and row.speed.decode_tps and row.trained_context


@pytest.mark.parametrize("entry", catalog.models(), ids=lambda m: m.name)
def test_every_model_entry_names_its_source(entry: catalog.ModelEntry) -> None:
    assert entry.source and not [a for a in _AGGREGATORS if a in entry.source.lower()], entry.source
    assert entry.match and all(m == m.lower() for m in entry.match), entry.name
    assert (entry.active_params_b is not None) == bool(entry.metadata.get("expert_count")), entry.name
