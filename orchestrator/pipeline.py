"""The one place facts meet the planner.

  build_plan     facts (hardware, models) -> the planner's engine choice -> that engine's facts
                 (installed build, --version, --help, parser answers) -> plan() -> verify_flags()
  verify_flags   options the plan emits that neither --help nor the catalog can judge, put to the
                 build's own parser before anything starts (pyinfra's lesson: plan from stable facts,
                 re-check the volatile ones before you execute)
  plan_for_up    the plan `up` runs: from the plan cache, or planned now (models shipped on PyPI
                 are fetched first, since the model's own header may change the plan)
  compare_versions  per server, the plan on the installed build vs the catalog's version
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from orchestrator import plancache
from orchestrator.errors import Problem, ProfileError

if TYPE_CHECKING:
    from orchestrator.facts.types import EngineVersion, Facts
    from orchestrator.plan.model import Plan
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
               detect: bool = True, enforce_fit: bool = True, run_binary: bool = False) -> Plan:
    from orchestrator.plan.planner import plan

    facts = gather(loaded, environ, state_dir, detect, run_binary)
    result = plan(loaded, facts, enforce_fit)
    verify_flags(loaded, result, facts)
    return result


def check_target(loaded: LoadedProfile, target: str) -> None:
    """What a render target makes reachable must pass the exposure rule too (plan.checks.check_target)."""
    from orchestrator.plan import checks

    problems = checks.check_target(loaded.profile, target)
    if problems:
        raise ProfileError([loaded.source.locate(p) for p in problems])


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


def plan_for_up(profile: str, deployer: Deployer, ignore_fit: bool) -> Plan:
    environ = dict(os.environ)
    result = plancache.load(profile, environ)
    if result is None:
        from orchestrator.profile import load

        loaded = load(profile)
        result = build_plan(loaded, enforce_fit=not ignore_fit, run_binary=True)
        if deployer.fetch_models(result):
            result = build_plan(loaded, enforce_fit=not ignore_fit, run_binary=True)
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
