"""Which engine version a plan targets, and which options the installed build accepts.

Engines rename flags every few months, so a plan names the version it targets and how that was
found: `engine_version` pinned in the profile, the installed binary's own `--version`, or the
catalog's verified version when neither is known. The installed binary's `--help` is the judge of
which options exist; both are read once per binary (keyed by path, size and mtime) and cached.
Version ranges of individual flags live in the catalog (engines.yaml `flag_history`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator.facts.types import EngineVersion
from orchestrator.paths import file_cache, write_private

PROBE_FORMAT = 1
_VERSION_RE = re.compile(r"version:\s*(\d+)\s*\(([0-9a-zA-Z]+)\)")
_BUILD_RE = re.compile(r"\(build\s+(\d+),\s*commit\s+([0-9a-zA-Z]+)\)")
_OPTION_RE = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")




def parse_version(engine: str, text: str) -> str | None:
    """llama.cpp and ik_llama.cpp print `version: N (commit)`: llama.cpp builds are named bN,
    ik_llama.cpp builds by their commit."""
    m = _BUILD_RE.search(text) or _VERSION_RE.search(text)
    if not m:
        return None
    number, commit = m.group(1), m.group(2)
    if engine == "llama.cpp":
        return f"b{number}" if number != "0" else commit
    return commit.removeprefix("b") if engine == "ik_llama" else commit


def parse_commit(text: str) -> str | None:
    """The commit a `--version` text names (`version: N (commit)`)."""
    m = _BUILD_RE.search(text) or _VERSION_RE.search(text)
    return m.group(2) if m else None


def help_options(text: str) -> frozenset[str]:
    """Option names from a llama-server --help text: the tokens before each option's description."""
    out: set[str] = set()
    for line in text.splitlines():
        stripped = line.lstrip()
        if not stripped.startswith("-") or len(line) - len(stripped) >= 20:
            continue  # descriptions continue on deeply indented lines
        stripped = re.sub(r",\s+", ", ", stripped)  # "-fa,   --flash-attn": one option list
        head, _, desc = (re.split(r"(\s{2,})", stripped, maxsplit=1) + ["", ""])[:3]
        if "has been removed" in desc:
            continue  # listed only to say so: llama.cpp rejects these
        out.update(_OPTION_RE.findall(head))
    return frozenset(out)


def probe(engine: str, binary: str) -> EngineVersion | None:
    """Run `binary --version` and `--help` (cached per binary); None if it cannot run."""
    path = Path(binary)
    cache = file_cache("probes", path, PROBE_FORMAT, engine)
    if cache is None:
        return None
    data: dict[str, Any] | None = None
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    if data is None:
        try:  # a llama-server answers both at once; anything slower is not one to trust
            ver = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10)
            hlp = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=10)
            data = {"version": parse_version(engine, ver.stdout + ver.stderr), "help": hlp.stdout + hlp.stderr}
        except subprocess.TimeoutExpired:
            data = {"version": None, "help": ""}  # remembered: do not wait again for this binary
        except (OSError, subprocess.SubprocessError):
            return None
        try:
            write_private(cache, json.dumps(data))
        except OSError:
            pass
    version = data.get("version")
    if not version:
        return None
    return EngineVersion(engine, str(version), f"{binary} --version", help_options(data["help"]), data["help"],
                         str(binary))


# What a llama-server prints when its parser refuses an argument, and when every argument parsed.
REJECTED = ("invalid argument", "unknown argument", "error while handling argument", "has been removed",
             "error: unknown", "unrecognized", "unknown speculative decoding type")
PARSED = ("failed to load model", "error loading model", "failed to open", "no such file")


def parser_accepts(binary: str, flag: str, value: str | None) -> bool | None:
    """Ask the build's own argument parser: run it with this one option and a model file that does
    not exist. 'failed to load model' means every argument parsed; an unknown-argument error means
    it did not. Cached per binary. For options its --help does not list (CPU builds of ik_llama.cpp
    hide the GPU offload options their parser still takes)."""
    import socket
    import tempfile

    path = Path(binary)
    cache = file_cache("probes", path, PROBE_FORMAT, "parse", flag, value)
    if cache is None:
        return None
    try:
        return bool(json.loads(cache.read_text())["accepted"])
    except (OSError, ValueError, KeyError):
        pass
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    verdict: bool | None = None
    for _ in range(8):  # some builds now and then exit before their asynchronous log is flushed: ask again
        with tempfile.TemporaryDirectory() as tmp:
            argv = [str(path), "-m", os.path.join(tmp, "absent.gguf"), "--port", port, flag, *([value] if value else [])]
            try:
                p = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=tmp)
            except (OSError, subprocess.SubprocessError):
                return None
        out = (p.stdout + p.stderr).lower()
        verdict = False if any(m in out for m in REJECTED) else (True if any(m in out for m in PARSED) else None)
        if verdict is not None:
            break
    if verdict is not None:
        try:
            write_private(cache, json.dumps({"accepted": verdict}))
        except OSError:
            pass
    return verdict


def probe_history(target: EngineVersion, history: list[dict[str, Any]]) -> EngineVersion:
    """Ask the build's own parser about every catalog flag_history option its --help does not list,
    so the rules that depend on one (speculative syntax, --fit) decide from facts, without running
    anything while planning."""
    if target.flags is None or not target.binary:
        return target
    answers = []
    for entry in history:
        flag, value = entry["flag"], entry.get("value")
        if flag in target.flags:
            continue
        ok = parser_accepts(target.binary, flag, value)
        if ok is not None:
            answers.append((flag, value, ok))
    return replace(target, parser_answers=tuple(answers))
