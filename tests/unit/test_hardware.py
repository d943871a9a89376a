"""Detection parsers on recorded tool outputs (tests/fixtures/hardware/README.md says where the
formats come from), and doctor on this machine (no GPU)."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.facts import hardware

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hardware"


def test_nvidia_smi_four_a100s() -> None:
    gpus = hardware.parse_nvidia_smi_xml((FIX / "nvidia-smi-a100-sxm4-80gb-x4.xml").read_text())
    assert len(gpus) == 4
    g = gpus[0]
    assert g.catalog_id == "a100-80gb" and g.compute_capability == "8.0" and g.arch == "Ampere"
    assert g.vram_total_bytes == 81920 * 2**20 and g.vram_free_bytes == 81349 * 2**20
    assert g.driver == "535.54.03" and g.runtime_version == "12.2" and g.power_limit_w == 400.0
    assert gpus[1].vram_free_bytes == 40395 * 2**20


def test_nvidia_smi_geforce() -> None:
    (g,) = hardware.parse_nvidia_smi_xml((FIX / "nvidia-smi-rtx3080ti.xml").read_text())
    assert g.catalog_id == "rtx-3080-ti" and g.compute_capability == "8.6" and g.power_limit_w == 350.0


def test_nvidia_smi_gpu_missing_from_catalog_is_reported_not_guessed() -> None:
    (g,) = hardware.parse_nvidia_smi_xml((FIX / "nvidia-smi-rtx4070-laptop.xml").read_text())
    assert g.catalog_id is None and g.arch == "Ada Lovelace" and g.vram_total_bytes == 8188 * 2**20


def test_rocm_smi_json() -> None:
    (g,) = hardware.parse_rocm_smi_json((FIX / "rocm-smi-7900xtx.json").read_text())
    assert g.catalog_id == "rx-7900-xtx" and g.arch == "gfx1100" and g.vendor == "amd"
    assert g.vram_total_bytes == 25753026560 and g.vram_free_bytes == 25753026560 - 1073741824


def test_doctor_on_this_machine(orchestrate) -> None:
    code, out, err = orchestrate("doctor", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert {"cpu", "memory", "gpus", "docker", "engines"} <= set(report)
    assert report["cpu"]["cores_logical"] >= 1 and report["memory"]["total_bytes"] > 0
    if not report["gpus"]:
        assert any("no GPU detected" in p["what"] for p in report["problems"])
    code, out, _ = orchestrate("doctor")
    assert code == 0 and out.startswith("cpu: ")
