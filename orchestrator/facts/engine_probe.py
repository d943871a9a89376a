"""Which engine version a plan targets, and which options the installed build accepts.

Engines rename flags every few months, so a plan names the version it targets and how that was
found: `engine_version` pinned in the profile, the installed binary's own `--version`, or the
catalog's verified version when neither is known. The installed binary's `--help` is the judge of
which options exist; both are read once per binary (keyed by path, size and mtime) and cached.
Version ranges of individual flags live in the catalog (engines.yaml `flag_history`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROBE_FORMAT = 1
_VERSION_RE = re.compile(r"version:\s*(\d+)\s*\(([0-9a-zA-Z]+)\)")
_BUILD_RE = re.compile(r"\(build\s+(\d+),\s*commit\s+([0-9a-zA-Z]+)\)")
_OPTION_RE = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


@dataclass(frozen=True)
class EngineVersion:
    engine: str
    version: str                          # b9093 | 55d3c05bf | 0.32.0
    source: str                           # how it was determined, for the plan
    flags: frozenset[str] | None = None   # options the binary's --help lists; None when not probed
    help: str = ""                        # the --help text (for value checks)
    binary: str | None = None

    def describe(self) -> str:
        return f"{self.version} ({self.source})"


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


def _cache_dir() -> Path:
    base = os.environ.get("ORCHESTRATOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "orchestrator")
    return Path(base) / "probes"


def probe(engine: str, binary: str) -> EngineVersion | None:
    """Run `binary --version` and `--help` (cached per binary); None if it cannot run."""
    path = Path(binary)
    try:
        st = path.resolve().stat()
    except OSError:
        return None
    stamp = f"{PROBE_FORMAT}|{engine}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache = _cache_dir() / (hashlib.sha256(stamp.encode()).hexdigest()[:32] + ".json")
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
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(cache)
        except OSError:
            pass
    version = data.get("version")
    if not version:
        return None
    return EngineVersion(engine, str(version), f"{binary} --version", help_options(data["help"]), data["help"],
                         str(binary))


_REJECTED = ("invalid argument", "unknown argument", "error while handling argument", "has been removed",
             "error: unknown", "unrecognized", "unknown speculative decoding type")
_PARSED = ("failed to load model", "error loading model", "failed to open", "no such file")


def parser_accepts(binary: str, flag: str, value: str | None) -> bool | None:
    """Ask the build's own argument parser: run it with this one option and a model file that does
    not exist. 'failed to load model' means every argument parsed; an unknown-argument error means
    it did not. Cached per binary. For options its --help does not list (CPU builds of ik_llama.cpp
    hide the GPU offload options their parser still takes)."""
    import socket
    import tempfile

    path = Path(binary)
    try:
        st = path.resolve().stat()
    except OSError:
        return None
    stamp = f"{PROBE_FORMAT}|parse|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{flag}|{value}"
    cache = _cache_dir() / (hashlib.sha256(stamp.encode()).hexdigest()[:32] + ".json")
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
        verdict = False if any(m in out for m in _REJECTED) else (True if any(m in out for m in _PARSED) else None)
        if verdict is not None:
            break
    if verdict is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"accepted": verdict}))
        except OSError:
            pass
    return verdict


def order_key(engine: str, version: str, caps: dict[str, Any]) -> tuple[int, ...] | None:
    """A comparable key: llama.cpp build number; ik_llama.cpp commit date (known commits or a
    YYYY-MM-DD version); vLLM/SGLang release numbers. None when the version cannot be placed."""
    v = version.strip()
    if engine == "llama.cpp":
        n = v.removeprefix("b")
        return (int(n),) if n.isdigit() else None
    if engine == "ik_llama":
        date = (caps.get("commits") or {}).get(v) or (v if re.fullmatch(r"\d{4}-\d{2}(-\d{2})?", v) else None)
        return tuple(int(x) for x in str(date).split("-")) if date else None
    parts = re.findall(r"\d+", v)
    return tuple(int(p) for p in parts[:3]) if parts else None


def at_least(engine: str, version: str, since: str, caps: dict[str, Any]) -> bool | None:
    a, b = order_key(engine, version, caps), order_key(engine, since, caps)
    if a is None or b is None:
        return None
    return a >= b


def history(caps: dict[str, Any], flag: str, value: str | None = None) -> dict[str, Any] | None:
    """The catalog's record of when `flag` (with `value`, for valued entries) appeared or went away."""
    for entry in caps.get("flag_history") or []:
        if entry["flag"] == flag and (entry.get("value") is None or entry.get("value") == value):
            return dict(entry)
    return None


def supports(caps: dict[str, Any], target: EngineVersion, flag: str, value: str | None = None) -> bool | None:
    """Whether the targeted build takes flag (value): its --help decides when it was probed, else the
    catalog's version ranges; None when neither can say."""
    entry = history(caps, flag, value)
    if target.flags is not None:
        if flag not in target.flags:
            return parser_accepts(target.binary, flag, value) if target.binary else False
        if entry is None or not entry.get("value"):
            return True
        if entry.get("help_lists_values"):
            return value is not None and value in target.help
    if entry is None:
        return None
    checks = []
    if entry.get("since"):
        checks.append(at_least(target.engine, target.version, entry["since"], caps))
    if entry.get("until"):
        newer = at_least(target.engine, target.version, entry["until"], caps)
        checks.append(None if newer is None else not newer)
    if False in checks:
        return False
    return None if None in checks else True


def explain_missing(caps: dict[str, Any], target: EngineVersion, flag: str, value: str | None = None) -> str:
    """One line for a flag the targeted build does not take: which version has it, or what replaced it."""
    entry = history(caps, flag, value)
    what = f"{flag} {value}" if value else flag
    base = f"{caps['display']} {target.version} does not take {what}"
    if entry is None:
        return base + f" (not in its --help; the rules were verified against {caps['verified_version']})"
    if entry.get("since"):
        base += f"; it arrived in {entry['since']}"
    if entry.get("until"):
        base += f"; it was removed by {entry['until']}"
    if entry.get("replacement"):
        base += f"; use {entry['replacement']}"
    if entry.get("note"):
        base += f" ({entry['note']})"
    return base


def compare_plans(path: str) -> list[dict[str, Any]]:
    """Per server: the version the plan targets here and the catalog's, the argv each renders, the
    flags that differ, and the problems the targeted build would have (engines check)."""
    from dataclasses import replace

    from orchestrator import catalog
    from orchestrator.errors import ProfileError
    from orchestrator.plan.planner import gather_facts, plan
    from orchestrator.profile import load

    loaded = load(path)
    facts = gather_facts(loaded)
    facts.enforce_fit = False
    rows: list[dict[str, Any]] = []

    def attempt(versions: dict[str, EngineVersion]) -> tuple[dict[str, list[str]], list[str]]:
        try:
            p = plan(loaded, replace(facts, versions=versions))
        except ProfileError as exc:
            return {}, [str(x) for x in exc.problems]
        return {s.name: s.args() for s in p.servers}, []

    here, here_problems = attempt(facts.versions)
    catalog_versions = {name: EngineVersion(v.engine, str(catalog.engine(v.engine)["verified_version"]),
                                            "catalog") for name, v in facts.versions.items()}
    there, _ = attempt(catalog_versions)
    for name, v in facts.versions.items():
        a, b = here.get(name, []), there.get(name, [])
        rows.append({
            "server": name, "engine": v.engine, "installed": v.version if v.flags is not None else None,
            "targeted": v.version, "targeted_from": v.source, "catalog": catalog_versions[name].version,
            "argv_targeted": a, "argv_catalog": b,
            "only_targeted": [x for x in a if x not in b], "only_catalog": [x for x in b if x not in a],
            "problems": [p for p in here_problems if f"servers[{_index(loaded, name)}]" in p or "engine" in p],
        })
    return rows


def _index(loaded: Any, name: str) -> int:
    return next(i for i, s in enumerate(loaded.profile.servers) if s.name == name)
