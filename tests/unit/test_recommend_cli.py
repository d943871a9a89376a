"""orchestrate recommend and gpus --compare through the real CLI: JSON rows with their basis, --write
output that validates and plans, calibration from a saved bench run, and bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_recommend import _saved_run

# --------------------------------------------------------------------------- the CLI

def test_cli_recommend_json_and_write_plans(orchestrate, tmp_path: Path) -> None:
    out_file = tmp_path / "pick.yaml"
    env = {"ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")}
    code, out, err = orchestrate("recommend", "--gpu", "rtx-4060", "--use", "code", "--json", "--write",
                                 str(out_file), "--pick", "2", env=env)
    assert code == 0, err
    data = json.loads(out)
    assert data["gpu"] == "rtx-4060" and data["context"] == 32768 and data["use"] == "code"
    first = data["rows"][0]
    assert first["speed"]["decode_how"] and first["speed"]["prefill_how"] and first["reason"]
    assert first["speed"]["efficiency"]["basis"].startswith("default for CUDA")
    code, out, err = orchestrate("validate", str(out_file), env=env)
    assert code == 0, err
    code, out, err = orchestrate("plan", str(out_file), env=env)
    assert code == 0, err
    assert data["rows"][1]["model"] in out or data["rows"][1]["quant"] in out


def test_cli_recommend_text_names_its_basis(orchestrate, tmp_path: Path) -> None:
    code, out, err = orchestrate("recommend", "--gpu", "3090", "--top", "5",
                                 env={"ORCHESTRATOR_STATE_DIR": str(tmp_path)})
    assert code == 0, err
    assert "ranking: chat" in out and "#1 because:" in out and "llama.cpp efficiency: default for CUDA" in out
    assert "assumed 60 GB/s" in out


def test_cli_calibration_from_saved_bench(orchestrate, tmp_path: Path) -> None:
    _saved_run(tmp_path, 100.0, 100.0, gpu="rtx-3090")
    code, out, err = orchestrate("recommend", "--gpu", "rtx-3090", "--json",
                                 env={"ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")})
    assert code == 0, err
    eff = json.loads(out)["efficiency"]["llama.cpp"]
    assert eff["calibrated"] and eff["decode"] == 0.5 and "results.jsonl" in eff["basis"]
    code, out, _ = orchestrate("recommend", "--gpu", "rtx-3090", "--json", "--no-calibration",
                               env={"ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")})
    assert not json.loads(out)["efficiency"]["llama.cpp"]["calibrated"]


def test_cli_gpus_compare(orchestrate) -> None:
    code, out, err = orchestrate("gpus", "--compare", "p40", "3090", "5090", "--model", "qwen3.6-27b", "--context",
                                 "16384")
    assert code == 0, err
    assert "tok/J@TDP" in out and "tesla-p40" in out and "what fits entirely" in out
    code, out, err = orchestrate("gpus", "--compare", "p40", "--json")
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    assert row["gpu"] == "tesla-p40" and row["speed"]["decode_tps"] and row["tdp_w"] == 250


def test_cli_gpus_compare_shows_measured_power(orchestrate, tmp_path: Path) -> None:
    _saved_run(tmp_path, 100.0, 100.0, gpu="rtx-3090", watts=280.0)
    code, out, err = orchestrate("gpus", "--compare", "3090", "4090", "--json",
                                 env={"ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")})
    assert code == 0, err
    rows = {r["gpu"]: r for r in json.loads(out)["rows"]}
    assert rows["rtx-3090"]["measured"]["watts"] == 280.0 and rows["rtx-3090"]["measured"]["joules_per_token"] == 2.8
    assert rows["rtx-4090"]["measured"] is None
    assert rows["rtx-3090"]["speed"]["efficiency"]["calibrated"]   # the saved 3090 run calibrates the 3090 row


@pytest.mark.parametrize(("args", "message"), [
    (("recommend", "--gpu", "rtx-3099"), "unknown GPU — did you mean rtx-3090"),
    (("recommend", "--gpu", "3090", "--context", "0"), "--context 0: a context must be at least 128 tokens"),
    (("recommend", "--gpu", "3090", "--count", "0"), "--count 0: at least 1 GPU"),
    (("recommend", "--gpu", "3090", "--write", "x.yaml", "--pick", "999"), "--pick 999: there are"),
    (("gpus", "--compare", "3090", "--model", "nosuch-model-7b"), "no known shape"),
    (("gpus", "--compare", "p40", "rtx-9999"), "unknown GPU"),
    (("gpus", "--compare", "p40", "--context", "0"), "--context 0"),
])
def test_cli_bad_input(orchestrate, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    code, out, err = orchestrate(*args, cwd=None, env={"ORCHESTRATOR_STATE_DIR": str(tmp_path)})
    assert code == 1 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
