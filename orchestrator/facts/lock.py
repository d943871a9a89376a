"""The lock file beside a profile (`NAME.lock.yaml`): what ran, pinned, and the flags a tuning run chose.

Per server: the engine build (version, commit, the binary's sha256) or the container image's digest as
the local daemon reports it, the model file's size and sha256, and the tuned flags with their figures;
once per file: the machine they were measured on. `observe_*` read what is here now; `drift` names
each difference between the lock and now. Nothing here decides what a plan does with it: the planner
reads the result as `Facts.locks` (a LockedServer per server).

Read leniently (dstack's rule for files we wrote: unknown keys and a newer `lock_version` are noted,
not fatal), but a lock that cannot be what it claims (not YAML, a field of the wrong type, a tuned
option that is not a tunable knob) is a FILE:LINE error. No secret is ever written: the lock holds
paths, versions, hashes and the whitelisted knob flags, never the environment or an API key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import Problem, ProfileError
from orchestrator.paths import file_cache, lock_path, write_private
from orchestrator.profile import parse_yaml

__all__ = ["LockFile", "ServerLock", "Tuning", "lock_path"]

LOCK_VERSION = 1
# The knobs a tuning run may set (and a lock may carry): each changes speed, never what is served.
# A lock naming any other option is refused, so a lock file cannot slip arbitrary arguments into argv.
TUNABLE = frozenset({"-t", "-tb", "-b", "-ub", "-fa", "-ctk", "-ctv", "--spec-draft-n-max", "--draft-max",
                     "-ncmoe", "-np"})
HEADER = ("# Written by `orchestrate lock` / `orchestrate tune`: what this profile ran, pinned.\n"
          "# Commit it with the profile; `orchestrate lock verify PROFILE` checks this machine against it.\n")


# --------------------------------------------------------------------------- the file's contents

@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mib: int | None = None
    driver: str | None = None


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int | None
    memory_gib: int | None           # rounded: the kernel reports a few MiB more or less across boots
    gpus: tuple[Gpu, ...] = ()

    def describe(self) -> str:
        gpus = ", ".join(g.name for g in self.gpus) or "no GPU"
        return f"{self.cpu} ({self.cores} cores, {self.memory_gib} GiB, {gpus})"


@dataclass(frozen=True)
class Build:
    version: str | None
    commit: str | None = None
    binary: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Image:
    ref: str
    digest: str | None = None        # repo@sha256:… from the daemon's RepoDigests (a registry digest)
    id: str | None = None            # the local image id (sha256:…), what a local-only image has


@dataclass(frozen=True)
class ModelPin:
    location: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Tuning:
    flags: tuple[tuple[str, str | None], ...]     # the winner's flags that differ from the rules
    summary: str                                   # why the winner won, in one line
    measured: str                                  # ISO time
    objective: str = ""
    workload: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    candidates: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class ServerLock:
    engine: str
    runtime: str
    build: Build | None = None
    image: Image | None = None
    model: ModelPin | None = None
    tuning: Tuning | None = None


@dataclass
class LockFile:
    profile: str
    machine: Machine
    servers: dict[str, ServerLock]
    written: str = ""
    orchestrator: str = ""
    version: int = LOCK_VERSION
    file: str = ""
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- writing

def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v not in (None, (), [], {})}
    if isinstance(value, list | tuple):
        return [_drop_none(v) for v in value]
    return value


def _flags_out(flags: tuple[tuple[str, str | None], ...]) -> list[dict[str, Any]]:
    return [{"flag": name, "value": value} for name, value in flags]


def dump(lock: LockFile) -> str:
    servers = {}
    for name, s in lock.servers.items():
        entry: dict[str, Any] = {"engine": s.engine, "runtime": s.runtime}
        if s.build:
            entry["build"] = asdict(s.build)
        if s.image:
            entry["image"] = asdict(s.image)
        if s.model:
            entry["model"] = asdict(s.model)
        if s.tuning:
            t = s.tuning
            entry["tuned"] = {"flags": _flags_out(t.flags), "summary": t.summary, "measured": t.measured,
                              "objective": t.objective, "workload": t.workload, "figures": t.figures,
                              "candidates": list(t.candidates)}
        servers[name] = entry
    m = lock.machine
    data = {"lock_version": lock.version, "orchestrator": lock.orchestrator, "profile": lock.profile,
            "written": lock.written,
            "machine": {"cpu": m.cpu, "cores": m.cores, "memory_gib": m.memory_gib,
                        "gpus": [asdict(g) for g in m.gpus]},
            "servers": servers}
    return HEADER + yaml.safe_dump(_drop_none(data), sort_keys=False, allow_unicode=True, width=110)


def write(path: Path, lock: LockFile) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(dump(lock), encoding="utf-8")
    tmp.replace(path)


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------- reading

FIX = "rewrite it with `orchestrate lock PROFILE` (or restore it from version control)"


class _Reader:
    """Typed access to the parsed YAML with the line of every field: lenient about keys it does not
    know (noted), strict about the types of those it does."""

    def __init__(self, text: str, file: str) -> None:
        try:
            self.src = parse_yaml(text, file)
        except ProfileError as exc:
            raise ProfileError([Problem(p.path or ("lock file",), p.message, FIX, p.file, p.line)
                                for p in exc.problems]) from None
        self.file = file
        self.problems: list[Problem] = []
        self.notes: list[str] = []

    def bad(self, path: tuple[str | int, ...], message: str) -> None:
        self.problems.append(self.src.locate(Problem(path or ("lock file",), message, FIX)))

    def map(self, value: Any, path: tuple[str | int, ...], known: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.bad(path, f"expected a mapping, got {type(value).__name__}")
            return {}
        for key in value:
            if key not in known:
                self.notes.append(f"{self.file}:{self.src.line_of((*path, key))}: unknown key "
                                  f"{'.'.join(map(str, (*path, key)))!r} ignored (written by a newer orchestrate?)")
        return value

    def str_(self, d: dict[str, Any], key: str, path: tuple[str | int, ...], required: bool = False) -> str | None:
        v = d.get(key)
        if v is None:
            if required:
                self.bad(path, f"{key} is missing")
            return None
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            self.bad((*path, key), f"expected text, got {type(v).__name__}")
            return None
        return str(v)

    def int_(self, d: dict[str, Any], key: str, path: tuple[str | int, ...]) -> int | None:
        v = d.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.bad((*path, key), f"expected a whole number, got {v!r}")
            return None
        return v

    def sha(self, d: dict[str, Any], key: str, path: tuple[str | int, ...]) -> str | None:
        v = self.str_(d, key, path)
        if v is not None and not (len(v) == 64 and all(c in "0123456789abcdef" for c in v)):
            self.bad((*path, key), f"{v[:80]!r} is not a sha256 (64 lowercase hex digits)")
            return None
        return v


def _machine(r: _Reader, raw: Any) -> Machine:
    d = r.map(raw, ("machine",), ("cpu", "cores", "memory_gib", "gpus"))
    gpus = []
    raw_gpus = d.get("gpus") or []
    if not isinstance(raw_gpus, list):
        r.bad(("machine", "gpus"), "expected a list")
        raw_gpus = []
    for i, g in enumerate(raw_gpus):
        gd = r.map(g, ("machine", "gpus", i), ("name", "memory_mib", "driver"))
        gpus.append(Gpu(r.str_(gd, "name", ("machine", "gpus", i), True) or "",
                        r.int_(gd, "memory_mib", ("machine", "gpus", i)),
                        r.str_(gd, "driver", ("machine", "gpus", i))))
    return Machine(r.str_(d, "cpu", ("machine",), True) or "", r.int_(d, "cores", ("machine",)),
                   r.int_(d, "memory_gib", ("machine",)), tuple(gpus))


def _tuned_flags(r: _Reader, raw: Any, path: tuple[str | int, ...]) -> tuple[tuple[str, str | None], ...]:
    if not isinstance(raw, list):
        r.bad(path, "expected a list of {flag, value}")
        return ()
    out = []
    for i, item in enumerate(raw):
        d = r.map(item, (*path, i), ("flag", "value"))
        name = r.str_(d, "flag", (*path, i), True)
        if name is None:
            continue
        if name not in TUNABLE:
            r.bad((*path, i, "flag"), f"{name!r} is not a tunable knob (a lock may set {', '.join(sorted(TUNABLE))})")
            continue
        out.append((name, r.str_(d, "value", (*path, i))))
    return tuple(out)


def _tuning(r: _Reader, raw: Any, path: tuple[str | int, ...]) -> Tuning | None:
    if raw is None:
        return None
    d = r.map(raw, path, ("flags", "summary", "measured", "objective", "workload", "figures", "candidates"))
    if not d:
        return None
    cands = d.get("candidates") or []
    workload, figures = d.get("workload") or {}, d.get("figures") or {}
    return Tuning(_tuned_flags(r, d.get("flags") or [], (*path, "flags")), r.str_(d, "summary", path) or "",
                  r.str_(d, "measured", path) or "", r.str_(d, "objective", path) or "",
                  workload if isinstance(workload, dict) else {}, figures if isinstance(figures, dict) else {},
                  tuple(c for c in cands if isinstance(c, dict)) if isinstance(cands, list) else ())


def _server(r: _Reader, name: str, raw: Any) -> ServerLock:
    path: tuple[str | int, ...] = ("servers", name)
    d = r.map(raw, path, ("engine", "runtime", "build", "image", "model", "tuned"))
    build = image = model = None
    if d.get("build") is not None:
        b = r.map(d["build"], (*path, "build"), ("version", "commit", "binary", "sha256"))
        build = Build(r.str_(b, "version", (*path, "build")), r.str_(b, "commit", (*path, "build")),
                      r.str_(b, "binary", (*path, "build")), r.sha(b, "sha256", (*path, "build")))
    if d.get("image") is not None:
        i = r.map(d["image"], (*path, "image"), ("ref", "digest", "id"))
        image = Image(r.str_(i, "ref", (*path, "image"), True) or "", r.str_(i, "digest", (*path, "image")),
                      r.str_(i, "id", (*path, "image")))
    if d.get("model") is not None:
        m = r.map(d["model"], (*path, "model"), ("location", "size", "sha256"))
        model = ModelPin(r.str_(m, "location", (*path, "model"), True) or "", r.int_(m, "size", (*path, "model")),
                         r.sha(m, "sha256", (*path, "model")))
    return ServerLock(r.str_(d, "engine", path, True) or "", r.str_(d, "runtime", path) or "process",
                      build, image, model, _tuning(r, d.get("tuned"), (*path, "tuned")))


def parse(text: str, file: str) -> LockFile:
    r = _Reader(text, file)
    top = r.map(r.src.data, (), ("lock_version", "orchestrator", "profile", "written", "machine", "servers"))
    if not isinstance(r.src.data, dict):
        raise ProfileError(r.problems)
    version = r.int_(top, "lock_version", ())
    if version is None:
        r.bad(("lock_version",), "lock_version is missing or not a number: this is not a lock file")
    elif version > LOCK_VERSION:
        r.notes.append(f"{file}: lock_version {version} is newer than this orchestrate's {LOCK_VERSION}: "
                       "read what this version knows")
    servers_raw = top.get("servers") or {}
    if not isinstance(servers_raw, dict):
        r.bad(("servers",), "expected a mapping of server name to its pins")
        servers_raw = {}
    servers = {str(n): _server(r, str(n), s) for n, s in servers_raw.items()}
    machine = _machine(r, top.get("machine"))
    if r.problems:
        raise ProfileError(r.problems)
    return LockFile(r.str_(top, "profile", ()) or "", machine, servers, r.str_(top, "written", ()) or "",
                    r.str_(top, "orchestrator", ()) or "", version or LOCK_VERSION, file, r.notes)


def read(path: Path) -> LockFile | None:
    """The lock beside a profile, or None when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError([Problem((), f"cannot read the lock file: {exc}", FIX, str(path))]) from None
    return parse(text, str(path))


# --------------------------------------------------------------------------- observing what is here now

def sha256_file(path: str | Path) -> str | None:
    """The file's sha256, cached by (path, size, mtime, inode): a 20 GB model is hashed once, and a file
    replaced in place (new inode or mtime) is hashed again."""
    p = Path(path)
    cache = file_cache("hashes", p)
    if cache is None:
        return None
    try:
        return str(json.loads(cache.read_text())["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    try:
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    digest = h.hexdigest()
    try:
        write_private(cache, json.dumps({"sha256": digest}))
    except OSError:
        pass
    return digest


def _dir_digest(path: Path) -> tuple[int, str]:
    """An HF model folder: total size and a sha256 over each file's relative path and sha256."""
    lines, total = [], 0
    for f in sorted(x for x in path.rglob("*") if x.is_file()):
        total += f.stat().st_size
        lines.append(f"{f.relative_to(path)}\0{sha256_file(f)}\n")
    return total, hashlib.sha256("".join(lines).encode()).hexdigest()


def observe_model(location: str, is_hf_ref: bool) -> ModelPin:
    if is_hf_ref:
        return ModelPin(location)
    p = Path(location)
    if p.is_dir():
        total, digest = _dir_digest(p)
        return ModelPin(location, total, digest)
    try:
        size = p.stat().st_size
    except OSError:
        return ModelPin(location)
    return ModelPin(location, size, sha256_file(p))


def build_commit(binary: str) -> str | None:
    """The commit a llama-server build names in `--version` (llama.cpp: `version: N (commit)`)."""
    from orchestrator.facts.engine_probe import parse_commit

    try:
        p = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_commit(p.stdout + p.stderr)


def observe_build(version: str | None, binary: str | None, python_engine: bool) -> Build:
    if not binary or not binary.startswith("/"):
        return Build(version, binary=binary)
    if python_engine:   # the interpreter of the engine's env: the package version pins the engine
        return Build(version, binary=binary)
    resolved = str(Path(binary).resolve())
    return Build(version, build_commit(binary), binary, sha256_file(resolved))


def observe_image(ref: str) -> Image:
    """The image as the local daemon has it: its registry digest (RepoDigests) and its local id."""
    if shutil.which("docker") is None:
        return Image(ref)
    try:
        p = subprocess.run(["docker", "image", "inspect", ref], capture_output=True, text=True, timeout=30)
        data = json.loads(p.stdout)[0] if p.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        data = None
    if not isinstance(data, dict):
        return Image(ref)
    repo = ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref
    digests = [d for d in data.get("RepoDigests") or [] if isinstance(d, str)]
    digest = next((d for d in digests if d.split("@")[0] == repo), digests[0] if digests else None)
    return Image(ref, digest, str(data.get("Id")) if data.get("Id") else None)


def observe_machine(gpus_too: bool = True) -> Machine:
    from orchestrator.facts.hardware import detect_cpu, detect_gpus

    cpu = detect_cpu()
    try:
        mem: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    gpus = tuple(Gpu(g.name, g.vram_total_bytes // 2**20 if g.vram_total_bytes else None, g.driver)
                 for g in detect_gpus()) if gpus_too else ()
    return Machine(str(cpu["model"]), cpu.get("cores_logical"), round(mem / 2**30) if mem else None, gpus)


# --------------------------------------------------------------------------- drift

def machine_drift(locked: Machine, now: Machine) -> list[str]:
    out = []
    if locked.cpu != now.cpu:
        out.append(f"machine changed: CPU is {now.cpu!r}, the lock was measured on {locked.cpu!r}")
    if locked.cores != now.cores:
        out.append(f"machine changed: {now.cores} CPU cores, the lock has {locked.cores}")
    if locked.memory_gib is not None and now.memory_gib is not None and abs(locked.memory_gib - now.memory_gib) > 1:
        out.append(f"machine changed: {now.memory_gib} GiB of memory, the lock has {locked.memory_gib} GiB")
    names_now, names_locked = [g.name for g in now.gpus], [g.name for g in locked.gpus]
    if names_now != names_locked:
        out.append(f"machine changed: GPUs are {', '.join(names_now) or 'none'}, the lock has "
                   f"{', '.join(names_locked) or 'none'}")
    else:
        for i, (a, b) in enumerate(zip(locked.gpus, now.gpus, strict=True)):
            if a.driver != b.driver:
                out.append(f"machine changed: GPU {i} ({b.name}) driver {b.driver}, the lock has {a.driver}")
    return out


def _short(digest: str | None) -> str:
    return (digest or "unknown")[:12]


def _build_drift(engine: str, locked: Build, now: Build) -> list[str]:
    if locked.version != now.version:
        return [f"engine rebuilt at another version: {engine} {now.version} is installed "
                f"({now.binary or '-'}), the lock has {locked.version}"]
    if locked.sha256 and now.sha256 and locked.sha256 != now.sha256:
        return [f"engine rebuilt: {now.binary} (sha256 {_short(now.sha256)}…) differs from the locked build "
                f"(sha256 {_short(locked.sha256)}…) at the same version {locked.version}"]
    if locked.sha256 and not now.sha256:
        return [f"engine binary missing: {locked.binary or now.binary} ({engine} {locked.version}) is not here"]
    return []


def _image_drift(locked: Image, now: Image) -> list[str]:
    if locked.ref != now.ref:
        return [f"image changed: the plan runs {now.ref}, the lock has {locked.ref}"]
    if (locked.digest or locked.id) and not (now.digest or now.id):
        return [f"image {now.ref} is not on this machine (or no Docker daemon answered): the lock pins "
                f"{locked.digest or locked.id}"]
    if locked.digest and now.digest and locked.digest != now.digest:
        return [f"image re-pushed: {now.ref} is now {now.digest}, the lock pins {locked.digest}"]
    if locked.id and now.id and locked.id != now.id and not (locked.digest and locked.digest == now.digest):
        return [f"image rebuilt: {now.ref} is now {_short(now.id)}…, the lock pins {_short(locked.id)}…"]
    return []


def _model_drift(locked: ModelPin, now: ModelPin) -> list[str]:
    if locked.location != now.location:
        return [f"model changed: the profile names {now.location}, the lock has {locked.location}"]
    if locked.sha256 and now.sha256 is None:
        return [f"model file missing: {now.location} is not here (the lock has sha256 {_short(locked.sha256)}…)"]
    if locked.sha256 and now.sha256 != locked.sha256:
        return [f"model file replaced: {now.location} has sha256 {_short(now.sha256)}… ({now.size} bytes), the "
                f"lock has {_short(locked.sha256)}… ({locked.size} bytes)"]
    return []


def image_drift(locked: ServerLock, now: ServerLock) -> list[str]:
    return _image_drift(locked.image, now.image) if locked.image and now.image else []


def server_drift(locked: ServerLock, now: ServerLock) -> list[str]:
    """Each difference between a server's pins and what would run now, named precisely (the image
    counts for the docker runtime; a process server runs the build, and its image is pinned for
    rendering only)."""
    if locked.engine != now.engine:
        return [f"engine changed: the plan runs {now.engine}, the lock has {locked.engine}"]
    out = []
    if locked.runtime != now.runtime:
        out.append(f"runtime changed: the plan runs {now.runtime}, the lock has {locked.runtime}")
    if locked.build and now.build:
        out += _build_drift(now.engine, locked.build, now.build)
    if now.runtime == "docker":
        out += image_drift(locked, now)
    if locked.model and now.model:
        out += _model_drift(locked.model, now.model)
    return out


def _signed_pct(x: float) -> str:
    return f"{x:+.0%}"


def tuned_reason(t: Tuning, machine: Machine) -> str:
    """The reason a tuned flag shows in the plan: `tuned: +12% tok/s (workload), measured …`."""
    gain = t.figures.get("gain")
    what = (f"{_signed_pct(float(gain))} {t.objective or 'measured'}" if isinstance(gain, int | float)
            else t.summary or "measured")
    noise = t.figures.get("noise")
    beyond = f" (noise ±{float(noise):.0%})" if isinstance(noise, int | float) else ""
    return f"tuned: {what}{beyond}, measured {t.measured[:10] or '?'} on {machine.cpu}"
