from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_plan_json_has_reasons(orchestrate) -> None:
    code, out, err = orchestrate("plan", "profiles/qwen3.6-35b-a3b-mtp-8gb.yaml", "--json")
    assert code == 0, err
    data = json.loads(out)
    server = data["servers"][0]
    assert server["engine"] == "llama.cpp" and server["engine_version"] == "b11434"
    flags = {f["name"]: f for f in server["flags"]}
    moe = flags.get("-ncmoe") or flags["-cmoe"]
    assert moe["reason"] and flags["-fa"]["value"] == "on"
    assert any("speculative decoding while weights sit on the CPU" in w for w in server["warnings"])
    assert server["argv"][0] == "llama-server"


def test_render_to_file_and_json(orchestrate, tmp_path: Path) -> None:
    out_file = tmp_path / "compose.yaml"
    code, _, err = orchestrate("render", "profiles/homelab-3090-coder.yaml", "-t", "compose", "-o", str(out_file))
    assert code == 0, err
    assert "services:" in out_file.read_text()
    code, out, _ = orchestrate("render", "examples/quickstart-cpu.yaml", "--json")
    assert json.loads(out)[0]["argv"][:2] == ["llama-server", "-m"]


def test_validate_many_reports_all(orchestrate, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nservers:\n  - name: a\n    model: {path: /m/a.gguf}\n    context: -1\n    parallel: 0\n")
    code, _, err = orchestrate("validate", "examples/quickstart-cpu.yaml", str(bad))
    assert code == 1
    assert f"{bad}:5: servers[0].context" in err and f"{bad}:6: servers[0].parallel" in err


def test_missing_file_is_one_line(orchestrate) -> None:
    code, _, err = orchestrate("plan", "nope.yaml")
    assert code == 1 and "nope.yaml" in err and "Traceback" not in err


def test_schema_is_generated_from_the_model(orchestrate) -> None:
    code, out, _ = orchestrate("schema")
    schema = json.loads(out)
    assert code == 0 and "servers" in schema["properties"]


def test_core_never_imports_cli() -> None:
    for path in (ROOT / "orchestrator").rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").endswith("cli"), f"{path} imports the CLI"


def test_plan_start_does_not_import_heavy_modules() -> None:
    import subprocess
    import sys

    code = ("import sys; from orchestrator.cli import main; sys.argv=['orchestrate','plan',"
            "'examples/quickstart-cpu.yaml'];\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy=[m for m in ('docker','gguf','rich','requests','psutil','jinja2') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "HEAVY []" in p.stdout, p.stdout + p.stderr
