"""The one place facts meet the planner.

  build_plan     facts (hardware, models) -> the planner's engine choice -> that engine's facts
                 (installed build, --version, --help, parser answers) -> plan() -> verify_flags()
  verify_flags   options the plan emits that neither --help nor the catalog can judge, put to the
                 build's own parser before anything starts (pyinfra's lesson: plan from stable facts,
                 re-check the volatile ones before you execute)
  plan_for_up    the plan `up` runs: from the plan cache, or planned now (models shipped on PyPI
                 are fetched first, since the model's own header may change the plan)
  compare_versions  per server, the plan on the installed build vs the catalog's version
  read_lock      the lock file beside the profile, checked against what is here now (a fact, read
                 before planning: the planner applies tuned flags and pinned images where nothing drifted)
  write_lock / verify_lock   `orchestrate lock PROFILE` and `orchestrate lock verify PROFILE`
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import plancache
from orchestrator.errors import OrchestratorError, Problem, ProfileError

if TYPE_CHECKING:
    from orchestrator.facts import lock as lockfile
    from orchestrator.facts.types import EngineVersion, Facts, LockedServer
    from orchestrator.plan.model import Plan, ServerPlan
    from orchestrator.profile import LoadedProfile
    from orchestrator.runtime.deployer import Deployer

# On a plan-cache hit `up` needs the cached Plan and nothing else from here: the profile schema
# (pydantic), fact gathering and the planner's rule modules are imported by the functions that use
# them, so the engine is spawned ~0.2 s sooner (docs/benchmarks.md).


def gather(loaded: LoadedProfile, environ: dict[str, str] | None = None, state_dir: str | None = None,
           detect: bool = True, run_binary: bool = False) -> Facts:
    """Every fact the planner needs: hardware and models, then per server the facts of the engine
    the planner chooses for it. A profile's binary: is run (--version, --help, its parser) only with
    run_binary: `up` and `engines check` pass it; validate, plan and render never run it."""
    from orchestrator.facts.gather import engine_facts, gather_facts
    from orchestrator.plan.decisions import choose_engine

    facts = gather_facts(loaded, environ, state_dir, detect)
    for server in loaded.profile.servers:
        model = facts.models.get(server.name)
        if model is not None:
            engine_facts(facts, server, choose_engine(server, facts.gpu, model)[0], run_binary)
    return facts


def build_plan(loaded: LoadedProfile, environ: dict[str, str] | None = None, state_dir: str | None = None,
               detect: bool = True, enforce_fit: bool = True, run_binary: bool = False, locked: bool = False,
               use_lock: bool = True) -> Plan:
    """The plan for a profile. With a lock file beside it (and detect on), planned twice: by the rules
    first, whose servers name what would run here; then, once the lock is checked against that, with
    the lock's tuned flags and pinned images where nothing drifted. `locked`: drift is an error."""
    from orchestrator.plan.planner import plan

    facts = gather(loaded, environ, state_dir, detect, run_binary)
    result = plan(loaded, facts, enforce_fit)
    if detect and use_lock:
        facts.locks = read_lock(loaded, result, locked)
        if facts.locks:
            result = plan(loaded, facts, enforce_fit)
    verify_flags(loaded, result, facts)
    return result


def check_target(loaded: LoadedProfile, target: str) -> None:
    """What a render target makes reachable must pass the exposure rule too (plan.checks.check_target)."""
    from orchestrator.plan import checks

    problems = checks.check_target(loaded.profile, target)
    if problems:
        raise ProfileError([loaded.source.locate(p) for p in problems])


def observe_server(sp: ServerPlan) -> lockfile.ServerLock:
    """What one server of a rules' plan would run here now: its build or image, and its model."""
    from orchestrator import catalog
    from orchestrator.facts import lock as lockfile

    build = image = None
    if sp.runtime == "process":
        python_engine = bool(catalog.engine(sp.engine).get("python_module"))
        build = lockfile.observe_build(sp.engine_version, sp.executable.path if sp.executable else None,
                                       python_engine)
    if sp.image:   # pinned for compose/k8s renders whatever the runtime
        image = lockfile.observe_image(sp.image)
    return lockfile.ServerLock(sp.engine, sp.runtime, build, image,
                               lockfile.observe_model(sp.model_location, sp.model_is_hf))


def _locked_server(lk: lockfile.LockFile, sp: ServerPlan, machine_drift: list[str]) -> LockedServer:
    from orchestrator.facts import lock as lockfile
    from orchestrator.facts.types import LockedServer

    entry = lk.servers.get(sp.name)
    if entry is None:
        return LockedServer(lk.file, drift=(f"server {sp.name} is not in the lock (write it with orchestrate "
                                             "lock PROFILE, or tune it)",), notes=tuple(lk.notes))
    now = observe_server(sp)
    drift = tuple(machine_drift + lockfile.server_drift(entry, now))
    tuned = entry.tuning.flags if entry.tuning else ()
    why = lockfile.tuned_reason(entry.tuning, lk.machine) if entry.tuning else ""
    image_changed = lockfile.image_drift(entry, now)
    pinned = entry.image.digest if entry.image and not image_changed else None
    notes = [*lk.notes, *(f"image not pinned: {d}" for d in image_changed if sp.runtime != "docker")]
    if entry.image and entry.image.id and not entry.image.digest and not image_changed:
        notes.append(f"image {entry.image.ref} is a local build without a registry digest: the lock holds its id "
                     f"{entry.image.id[:19]}… (checked by lock verify), renders keep the tag")
    return LockedServer(lk.file, tuned, why, pinned, drift, tuple(notes))


def read_lock(loaded: LoadedProfile, rules_plan: Plan, locked: bool = False) -> dict[str, LockedServer]:
    """The lock beside the profile, per server, with what drifted since it was written. `locked`: no
    lock, or any drift, is an error naming each difference."""
    from orchestrator.facts import lock as lockfile

    path = lockfile.lock_path(loaded.file)
    lk = lockfile.read(path)
    if lk is None:
        if locked:
            raise OrchestratorError(f"--locked: there is no lock file {path}",
                                    f"write one with orchestrate lock {loaded.file} (or tune it)")
        return {}
    mdrift = lockfile.machine_drift(lk.machine, lockfile.observe_machine())
    out = {sp.name: _locked_server(lk, sp, mdrift) for sp in rules_plan.servers}
    drifted = [f"{name}: {d}" for name, ls in out.items() for d in ls.drift]
    if locked and drifted:
        raise OrchestratorError(f"--locked: {path} no longer matches this machine: " + "; ".join(drifted),
                                f"re-tune (orchestrate tune {loaded.file}) or re-lock (orchestrate lock "
                                f"{loaded.file}) after checking the change, or drop --locked to plan by the rules")
    return out


def verify_flags(loaded: LoadedProfile, result: Plan, facts: Facts) -> None:
    """Ask the installed build's parser about the options its --help does not list and the catalog
    cannot place (CPU builds of ik_llama.cpp hide GPU offload options their parser still takes)."""
    from orchestrator import catalog
    from orchestrator.facts import engine_probe
    from orchestrator.plan import versions
    from orchestrator.plan.checks import options, unknown_option

    problems: list[Problem] = []
    for index, server in enumerate(loaded.profile.servers):
        target = facts.versions.get(server.name)
        if target is None or target.flags is None or not target.binary:
            continue
        sp = result.server(server.name)
        caps = catalog.engine(sp.engine)
        for option in options(sp.flags, list(server.extra_args)):
            if versions.supports(caps, target, option.name, option.value) is None \
                    and option.name not in target.flags \
                    and engine_probe.parser_accepts(target.binary, option.name, option.value) is False:
                problems.append(unknown_option(server, index, sp.engine, target, option))
    if problems:
        raise ProfileError([loaded.source.locate(p) for p in problems])


def plan_for_up(profile: str, deployer: Deployer, ignore_fit: bool, locked: bool = False) -> Plan:
    """`locked` plans afresh (the lock is checked against this machine now, never a cached verdict)."""
    environ = dict(os.environ)
    result = None if locked else plancache.load(profile, environ)
    if result is None:
        from orchestrator.profile import load

        loaded = load(profile)
        result = build_plan(loaded, enforce_fit=not ignore_fit, run_binary=True, locked=locked)
        if deployer.fetch_models(result):
            result = build_plan(loaded, enforce_fit=not ignore_fit, run_binary=True, locked=locked)
        plancache.store(profile, environ, result, auto_detected=loaded.profile.hardware.gpu == "auto")
    return result


def compare_versions(path: str) -> list[dict[str, Any]]:
    """Per server: the version the plan targets here and the catalog's, the argv each renders, the
    flags that differ, and the problems the targeted build would have (engines check)."""
    from orchestrator import catalog
    from orchestrator.facts.types import EngineVersion
    from orchestrator.plan.planner import plan
    from orchestrator.profile import load

    loaded = load(path)
    facts = gather(loaded, run_binary=True)
    rows: list[dict[str, Any]] = []

    def attempt(by_server: dict[str, EngineVersion]) -> tuple[dict[str, list[str]], list[str]]:
        these = replace(facts, versions=by_server)
        try:
            p = plan(loaded, these, enforce_fit=False)
            verify_flags(loaded, p, these)
        except ProfileError as exc:
            return {}, [str(x) for x in exc.problems]
        return {s.name: s.args() for s in p.servers}, []

    here, here_problems = attempt(facts.versions)
    catalog_versions = {name: EngineVersion(v.engine, str(catalog.engine(v.engine)["verified_version"]),
                                            "catalog") for name, v in facts.versions.items()}
    there, _ = attempt(catalog_versions)
    for name, v in facts.versions.items():
        a, b = here.get(name, []), there.get(name, [])
        index = next(i for i, s in enumerate(loaded.profile.servers) if s.name == name)
        rows.append({
            "server": name, "engine": v.engine, "installed": v.version if v.flags is not None else None,
            "targeted": v.version, "targeted_from": v.source, "catalog": catalog_versions[name].version,
            "argv_targeted": a, "argv_catalog": b,
            "only_targeted": [x for x in a if x not in b], "only_catalog": [x for x in b if x not in a],
            "problems": [p for p in here_problems if f"servers[{index}]" in p or "engine" in p],
        })
    return rows


def installed_versions() -> list[dict[str, Any]]:
    """Each installed build's version, asked of the binary, beside the catalog's."""
    from orchestrator import catalog
    from orchestrator.facts import engine_probe
    from orchestrator.facts.installed import list_installed

    rows = []
    for inst in list_installed():
        v = engine_probe.probe(inst.engine, str(inst.binary()))
        rows.append({"engine": inst.engine, "backend": inst.backend, "binary": str(inst.binary()),
                     "version": v.version if v else None,
                     "catalog": catalog.engine(inst.engine)["verified_version"]})
    return rows


# --------------------------------------------------------------------------- the lock file

def write_lock(profile: str, tuning: dict[str, lockfile.Tuning] | None = None) -> tuple[Path, list[str]]:
    """Write the lock beside the profile from what is installed here: per server the build or image,
    the model, and its tuning (the one given; else the old lock's, kept while nothing it was measured
    on drifted). Returns the path and what changed against the old lock."""
    from orchestrator import __version__
    from orchestrator.facts import lock as lockfile
    from orchestrator.profile import load

    loaded = load(profile)
    rules = build_plan(loaded, enforce_fit=False, run_binary=True, use_lock=False)
    path = lockfile.lock_path(loaded.file)
    said: list[str] = []
    try:
        old = lockfile.read(path)
    except ProfileError as exc:
        old = None
        said.append(f"replaced an unreadable lock ({exc.problems[0]})")
    machine = lockfile.observe_machine()
    servers = {}
    for sp in rules.servers:
        now = observe_server(sp)
        prev = old.servers.get(sp.name) if old else None
        keep = (tuning or {}).get(sp.name)
        if keep is None and old is not None and prev is not None and prev.tuning is not None:
            drift = lockfile.machine_drift(old.machine, machine) + lockfile.server_drift(prev, now)
            if drift:
                said.append(f"{sp.name}: its tuned flags were dropped, they were measured on another setup: "
                            + "; ".join(drift) + " (run orchestrate tune again)")
            else:
                keep = prev.tuning
        servers[sp.name] = replace(now, tuning=keep)
        said += [f"{sp.name}: {gap}" for gap in _unpinned(now)]
    lockfile.write(path, lockfile.LockFile(loaded.profile.name, machine, servers, lockfile.now_iso(),
                                           __version__))
    return path, said


def _unpinned(now: lockfile.ServerLock) -> list[str]:
    """What the lock could not pin because it is not here (it then checks nothing about it)."""
    out = []
    if now.model and now.model.sha256 is None and now.model.location.startswith("/"):
        out.append(f"model {now.model.location} is not on this machine: its size and sha256 are not pinned")
    b = now.build
    if now.runtime == "process" and b and not b.sha256 and not (b.binary and Path(b.binary).exists()):
        what = f"{b.binary} is not here" if b.binary else f"no installed {now.engine} build here"
        out.append(f"{what}: only the version {b.version} is pinned")
    if now.runtime == "docker" and now.image and not (now.image.digest or now.image.id):
        out.append(f"image {now.image.ref} is not on this machine (or no Docker daemon answered): no digest pinned")
    return out


def verify_lock(profile: str, state_dir: str | None = None) -> list[dict[str, Any]]:
    """Per server: what drifted between the lock and what would run here now, and whether a running
    server of the deployment runs the lock's tuned flags."""
    from orchestrator.facts import lock as lockfile
    from orchestrator.paths import state_dir as default_state_dir
    from orchestrator.profile import load
    from orchestrator.runtime import process
    from orchestrator.runtime.state import StateStore

    loaded = load(profile)
    rules = build_plan(loaded, enforce_fit=False, run_binary=True, use_lock=False)
    locks = read_lock(loaded, rules)
    if not locks:
        raise OrchestratorError(f"there is no lock file {lockfile.lock_path(loaded.file)}",
                                f"write one with orchestrate lock {loaded.file} (or tune it)")
    store = StateStore(state_dir or default_state_dir(dict(os.environ)))
    records = store.load(loaded.profile.name)
    rows = []
    for name, ls in locks.items():
        drift = list(ls.drift)
        rec = records.get(name)
        if rec is not None and rec.runtime == "process" and process.identity(rec) != "alive":
            rec = None   # a record left by a server that has gone
        if rec is not None and not drift:
            args = rec.argv
            for flag, value in ls.tuned:
                pairs = {(a, b) for a, b in zip(args, [*args[1:], None], strict=True)}
                if (flag, value) not in pairs and not (value is None and flag in args):
                    drift.append(f"the running server was started without the locked {flag} {value or ''}".rstrip()
                                 + f": restart it with orchestrate up {loaded.file}")
        rows.append({"server": name, "ok": not drift, "drift": drift, "tuned": [list(t) for t in ls.tuned],
                     "image": ls.image, "notes": list(ls.notes)})
    return rows
