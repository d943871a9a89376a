"""Facts: everything the pure planner needs from the outside world, gathered once, before planning.

Hardware (the catalog GPU or a detected one, this machine's RAM), model facts (GGUF header or HF
config, else the catalog or the name) and, per server, the installed engine it would run: its
executable and the version and options that build reports. Nothing here decides anything: which
engine a server gets is the planner's choice (plan.decisions.choose_engine), and the pipeline
asks for that engine's facts once it is chosen.
"""

from __future__ import annotations

import os
from dataclasses import replace

from orchestrator import catalog
from orchestrator.catalog import GGUF_ENGINES, Gpu, UnknownGpu
from orchestrator.errors import Problem, ProfileError, shown
from orchestrator.facts import engine_probe
from orchestrator.facts.installed import locate
from orchestrator.facts.model import gather
from orchestrator.facts.types import EngineVersion, Facts, Located, ModelFacts
from orchestrator.paths import state_dir as default_state_dir
from orchestrator.profile import LoadedProfile, Profile, Server, UnsafeReference, expand_path

# --------------------------------------------------------------------------- hardware

def resolve_gpu(profile: Profile, detect: bool = True) -> tuple[Gpu, str, int, list[Problem]]:
    name = profile.hardware.gpu
    if name == "auto":
        from orchestrator.facts.hardware import detect_gpu

        found = detect_gpu() if detect else None
        if found is None:
            return catalog.find_gpu("cpu"), "hardware.gpu auto: no GPU detected, planning for CPU", 0, []
        gpu, count = found
        return gpu, f"hardware.gpu auto: detected {count}× {gpu.name}", count, []
    try:
        gpu = catalog.find_gpu(name)
    except UnknownGpu as exc:
        hint = (f"did you mean {', '.join(exc.suggestions)}?" if exc.suggestions
                else "run `orchestrate gpus` for the catalog")
        return catalog.find_gpu("cpu"), "", 0, [Problem(("hardware", "gpu"), f"unknown GPU {shown(name)}", hint)]
    count = 0 if gpu.is_cpu else profile.hardware.count
    return gpu, f"hardware.gpu {name!r} → {gpu.name}", count, []


def _model_location(server: Server, environ: dict[str, str], field: str, value: str | None,
                    problems: list[Problem], index: int, secret_vars: frozenset[str] = frozenset()) -> str | None:
    if value is None:
        return None
    try:
        return expand_path(value, environ, secret_vars)
    except KeyError as exc:
        problems.append(Problem(("servers", index, *field.split(".")),
                                f"environment variable {exc.args[0]} is not set",
                                f"export {exc.args[0]}=... or write the path out"))
    except UnsafeReference as exc:
        problems.append(Problem(("servers", index, *field.split(".")), str(exc),
                                "write the path out, or use a variable that holds a folder (e.g. ${MODELS_DIR})"))
    return None


def looks_hf(ref: str) -> bool:
    return not ref.startswith(("/", "~", ".", "$")) and ref.count("/") == 1 and not ref.endswith(".gguf")



def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gather_facts(loaded: LoadedProfile, environ: dict[str, str] | None = None,
                 state_dir: str | None = None, detect: bool = True) -> Facts:
    """Hardware and model facts for every server. Engine facts come per server, once its engine is
    chosen: engine_facts()."""
    profile = loaded.profile
    environ = dict(os.environ if environ is None else environ)
    problems: list[Problem] = []
    gpu, reason, count, gpu_problems = resolve_gpu(profile, detect)
    problems += gpu_problems
    models: dict[str, ModelFacts] = {}
    drafts: dict[str, ModelFacts] = {}
    secret_vars = frozenset(s.api_key_env for s in profile.servers if s.api_key_env)
    for i, server in enumerate(profile.servers):
        m = server.model
        if (m.path is None) == (m.hf is None):
            problems.append(Problem(("servers", i, "model"), "give exactly one of model.path or model.hf",
                                    "path: a local GGUF file or HF directory; hf: org/repo[:quant]"))
            continue
        if m.hf is not None:
            models[server.name] = gather(m.hf, m.quant, is_hf=True)
        else:
            loc = _model_location(server, environ, "model.path", m.path, problems, i, secret_vars)
            if loc is not None:
                models[server.name] = gather(loc, m.quant)
        draft = server.speculative.draft_model
        if draft:
            loc = _model_location(server, environ, "speculative.draft_model", draft, problems, i, secret_vars)
            if loc is not None:
                drafts[server.name] = gather(loc) if not looks_hf(draft) else gather(draft, is_hf=True)
    if problems:
        raise ProfileError([loaded.source.locate(p) for p in problems])
    return Facts(gpu, reason, count, models, drafts, environ, state_dir or default_state_dir(environ),
                 _ram_bytes() if detect else None, looked_up=detect)


# --------------------------------------------------------------------------- installed engines

def locate_executable(server: Server, engine: str, gpu: Gpu, run_binary: bool = True) -> Located:
    """The executable `up` would run for this server (process runtime), without installing anything;
    a profile's binary: is run (for its version) only with run_binary."""
    caps = catalog.engine(engine)
    arch = gpu.compute_capability.replace(".", "") if gpu.compute_capability else gpu.gfx_target
    return locate(engine, gpu.accelerator, caps["process_command"][0], server.binary, arch, run_binary,
                  server.engine_version)


def engine_facts(facts: Facts, server: Server, engine: str, run_binary: bool = False) -> None:
    """Record the engine facts of one server whose engine is chosen: its executable (process runtime)
    and the version (and, for llama.cpp/ik_llama, the --help options) the plan targets. A profile's
    binary: runs only with run_binary (up, engines check): checking a profile never runs its program."""
    if facts.looked_up and server.runtime == "process":
        facts.executables[server.name] = locate_executable(server, engine, facts.gpu, run_binary)
    facts.versions[server.name] = resolve_version(server, engine, facts.executables.get(server.name),
                                                 facts.looked_up)


def resolve_version(server: Server, engine: str, found: Located | None,
                    looked_up: bool = True) -> EngineVersion:
    """The engine version the plan targets: pinned in the profile, else the installed binary's own
    --version (process runtime), else the catalog's verified version."""
    caps = catalog.engine(engine)
    probed = None
    if found is not None and found.path and found.usable and found.probed:
        if engine in GGUF_ENGINES:
            probed = engine_probe.probe(engine, found.path)
            if probed is not None:
                probed = engine_probe.probe_history(probed, caps.get("flag_history") or [])
        elif found.version:
            probed = EngineVersion(engine, found.version, f"the {caps['display']} package {found.path} imports")
    if server.engine_version:
        if probed and probed.version == server.engine_version:
            return replace(probed, source=f"engine_version in the profile; {probed.source}")
        return EngineVersion(engine, server.engine_version, "engine_version in the profile")
    if probed:
        return probed
    why = ("binary: from the profile was not run" if found is not None and not found.probed else
           "no installed build found here" if looked_up else "not looked up")
    return EngineVersion(engine, str(caps["verified_version"]), f"catalog default: {why}")
