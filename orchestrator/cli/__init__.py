"""Command line: parse, call, print. Decisions live in the core modules.

The group and its one error boundary live here; the commands live beside it, by what they do:
plan_cmds (read a profile, start nothing), recommend_cmds (rank the catalog for a GPU), run_cmds (start, stop and look at servers), measure_cmds
(bench, eval), engine_cmds (engines, doctor). show holds the printers, common what they share."""

from __future__ import annotations

import importlib
import signal
from typing import Any

import click

from orchestrator.cli.common import fail
from orchestrator.errors import OrchestratorError, ProfileError

# name: (module in orchestrator.cli, attribute). A command's module is imported when the command
# runs (or --help lists it), so `up` does not import the modules of bench, eval or engines first.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("plan_cmds", "validate"), "plan": ("plan_cmds", "plan"), "fit": ("plan_cmds", "fit_cmd"),
    "render": ("plan_cmds", "render"), "schema": ("plan_cmds", "schema"), "gpus": ("plan_cmds", "gpus"),
    "recommend": ("recommend_cmds", "recommend"),
    "up": ("run_cmds", "up"), "down": ("run_cmds", "down"), "status": ("run_cmds", "status"),
    "logs": ("run_cmds", "logs"), "compose": ("run_cmds", "compose"), "gateway": ("gateway_cmds", "gateway"),
    "cache-report": ("gateway_cmds", "cache_report"), "eval-tools": ("gateway_cmds", "eval_tools"),
    "bench": ("measure_cmds", "bench"), "eval": ("measure_cmds", "eval_cmd"),
    "engines": ("engine_cmds", "engines"), "doctor": ("engine_cmds", "doctor"),
    "lock": ("lock_cmds", "lock"), "tune": ("tune_cmds", "tune"),
}


# Two-word commands: `eval route PROFILE` is its own command beside `eval PROFILE`.
# `eval route` and `eval tools` read as eval's own subcommands (`eval-tools` is the same command).
SUBCOMMANDS: dict[tuple[str, str], tuple[str, str]] = {("eval", "route"): ("route_cmds", "eval_route"),
                                                       ("eval", "tools"): ("gateway_cmds", "eval_tools")}


class _Group(click.Group):
    """User errors end as one line and exit 1; a traceback only with -v. Commands load lazily
    (click's documented LazyGroup pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS and cmd_name not in self.commands:
            module, attr = COMMANDS[cmd_name]
            command = getattr(importlib.import_module(f"orchestrator.cli.{module}"), attr)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                            list[str]]:
        if len(args) >= 2 and (args[0], args[1]) in SUBCOMMANDS:
            module, attr = SUBCOMMANDS[(args[0], args[1])]
            return f"{args[0]} {args[1]}", getattr(importlib.import_module(f"orchestrator.cli.{module}"), attr), args[2:]
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ProfileError as exc:
            fail([str(x) for x in exc.problems])
        except OrchestratorError as exc:
            fail([f"error: {exc}"])
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            if ctx.params.get("verbose"):
                raise
            fail([f"error: {type(exc).__name__}: {exc} — rerun with orchestrate -v for the traceback"])


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks for unexpected errors.")
@click.version_option(package_name="orchestrator")
def main(verbose: bool) -> None:
    """Declarative deployments for local LLM servers (llama.cpp, ik_llama.cpp, vLLM, SGLang)."""
    # SIGTERM unwinds like Ctrl-C: servers that bench/eval started for their run (--up, --matrix) are
    # stopped by their finally blocks instead of being left running.
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
